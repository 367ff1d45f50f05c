//! Entry points of the coverage-guided fuzz targets in `fuzz/` (the
//! fuzzing tier of `docs/testing.md`): one function per target, taking the
//! fuzzer's bytes, running the server's code for what an agent, an API
//! caller or an operator's file gives it, and asserting what must hold
//! whatever the bytes. A panic is a finding. `tests/fuzz_regressions.rs`
//! replays the seed corpora and every input that ever failed through them
//! in the normal test suite. Not part of the server's interface.
//!
//! - [`inventory`]: `inventory.toml`.
//! - [`tokens`]: `tokens.toml`, and `authorization` headers against it.
//! - [`agent_message`]: a `lab.v1.AgentMessage` off an agent's Attach
//!   stream, and the same bytes as the API requests whose fields the
//!   server converts itself (`LeaseRequest`, `ConsoleOpen`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use lab_proto::v1 as pb;
use prost::Message;

use crate::auth::{Authenticator, digest};
use crate::grpc::agent::from_agent;
use crate::grpc::convert;
use crate::inventory::Inventory;
use crate::racks::FromAgent;

/// A fuzz target: its name and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of this crate by its name in `fuzz/` (also the name of its
/// corpus and regression directories).
pub const TARGETS: &[Target] = &[
    ("inventory", inventory),
    ("tokens", tokens),
    ("agent_message", agent_message),
];

/// Inventory target: the input is the file's text (not UTF-8: not parsed).
/// An inventory that parses keeps its promises: unique host names, MACs
/// and static addresses, every host in a listed rack, BMC ports not zero.
pub fn inventory(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let inv = match Inventory::parse(text, Path::new("/etc/lab/inventory.toml")) {
        Ok(inv) => inv,
        Err(e) => {
            let _ = lab_types::error_chain(&e);
            return;
        }
    };
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    let mut addrs = HashSet::new();
    for h in &inv.hosts {
        assert!(names.insert(&h.name), "duplicate host {}", h.name);
        assert!(macs.insert(h.mac), "duplicate MAC {}", h.mac);
        if let Some(ip) = h.ipv4 {
            assert!(addrs.insert(ip), "duplicate address {ip}");
        }
        assert!(
            inv.rack(&h.rack).is_some(),
            "host {} in unknown rack",
            h.name
        );
        if let Some(b) = &h.bmc {
            assert_ne!(b.endpoint.port, 0);
        }
    }
    let racks: HashSet<_> = inv.racks.iter().map(|r| &r.name).collect();
    assert_eq!(racks.len(), inv.racks.len(), "duplicate rack");
}

/// The token the fixed tokens file knows.
const KNOWN_TOKEN: &str = "lab_fuzz_known_token";

/// Tokens target: the input is the text of a tokens file, and also an
/// `authorization` value. A file that parses maps digests to callers;
/// a header authenticates against a known file only as `Bearer` (or
/// `bearer`) and the known token.
pub fn tokens(data: &[u8]) {
    static KNOWN: LazyLock<Authenticator> = LazyLock::new(|| {
        let file = format!(
            "[[token]]\nprincipal = \"ci-fuzz\"\nrole = \"ci\"\nsha256 = \"{}\"\n",
            hex::encode(digest(KNOWN_TOKEN))
        );
        Authenticator::parse(&file, Path::new("tokens.toml")).expect("the fixed tokens file")
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Authenticator::parse(text, Path::new("/etc/lab/tokens.toml")) {
        Ok(Authenticator::Tokens(map)) => {
            for caller in map.values() {
                assert_ne!(caller.principal.as_str(), "server");
            }
        }
        Ok(Authenticator::InsecureDev) => panic!("a file never means development mode"),
        Err(e) => {
            let _ = lab_types::error_chain(&e);
        }
    }
    if let Ok(caller) = KNOWN.authenticate(Some(text)) {
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .expect("only a bearer header authenticates");
        assert_eq!(token.trim(), KNOWN_TOKEN);
        assert_eq!(caller.principal.as_str(), "ci-fuzz");
    }
    let _ = Authenticator::InsecureDev.authenticate(Some(text));
}

/// Link and API target: the input is a `lab.v1.AgentMessage` as an agent
/// sends it; the same bytes are also decoded as a `LeaseRequest` and a
/// `ConsoleOpen`, whose fields the server converts. Conversions refuse bad
/// fields, never panic, and what they accept is valid.
pub fn agent_message(data: &[u8]) {
    if let Ok(m) = pb::AgentMessage::decode(data) {
        match from_agent(m) {
            Ok(FromAgent::Hello(h)) => assert_eq!(h.rack.to_string().parse().ok(), Some(h.rack)),
            Ok(FromAgent::Report(r)) => assert_eq!(r.host.to_string().parse().ok(), Some(r.host)),
            Ok(FromAgent::Reply(_) | FromAgent::Data(_)) => {}
            Err(e) => {
                let _ = lab_types::error_chain(&e);
            }
        }
    }
    if let Ok(r) = pb::LeaseRequest::decode(data) {
        let default_ttl = Duration::from_secs(3600);
        if let Ok(spec) = convert::lease_spec(Some(r), default_ttl) {
            assert!((1..=1024).contains(&spec.count));
            assert!(spec.hosts.is_empty() || spec.count as usize <= spec.hosts.len());
            assert!(!spec.ttl.is_zero());
            assert!(spec.comment.len() <= 1024);
            let back = convert::spec_to_proto(&spec);
            assert_eq!(
                convert::lease_spec(Some(back), default_ttl).as_ref().ok(),
                Some(&spec),
                "an accepted request converts back to itself"
            );
        }
    }
    if let Ok(o) = pb::ConsoleOpen::decode(data) {
        let _ = convert::console_open(o);
    }
}
