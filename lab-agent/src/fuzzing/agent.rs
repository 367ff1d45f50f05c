//! The agent's own inputs: `agent.toml`, the names and MAC addresses it
//! parses, and what the server sends down the link.

use std::path::Path;
use std::str::FromStr;

use lab_proto::v1 as pb;
use lab_types::{Flag, HostName, LeaseId, MacAddr, Principal, ProfileName, RackName};
use prost::Message;

use crate::config::AgentConfig;
use crate::console::ConsoleHost;
use crate::link::convert;

/// `agent.toml` target: the input is the file's text (not UTF-8: not
/// parsed). A configuration that parses is one the agent can run with:
/// console log limits the writer accepts, cipher suites, durations that fit
/// a deadline.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match AgentConfig::parse(text, Path::new("/etc/lab/agent.toml")) {
        Ok(cfg) => cfg,
        Err(e) => {
            // Errors point into the file.
            let _ = crate::error_chain(&e);
            return;
        }
    };
    assert!(cfg.console_limits.validate().is_ok());
    assert!(!cfg.ipmi_cipher_suites.is_empty());
    // Every duration becomes a deadline (`Instant + d`, which panics on
    // overflow) in the task that uses it.
    let mut durations = vec![cfg.bmc_probe_interval];
    if let Some(h) = &cfg.http {
        durations.extend([
            h.limits.header_timeout,
            h.limits.idle_timeout,
            h.limits.send_timeout,
        ]);
    }
    durations.extend(cfg.tftp.iter().filter_map(|t| t.max_timeout));
    durations.extend(cfg.profiles.values().map(|p| p.timeout));
    let now = std::time::Instant::now();
    for d in durations {
        assert!(now.checked_add(d).is_some(), "{d:?} cannot be a deadline");
    }
}

/// Names target: the input is a string a peer or a config file gives as a
/// MAC address, a host, rack, profile or console name, a flag, a principal
/// or a lease id. What parses prints back to itself (MACs in either
/// spelling).
pub fn names(data: &[u8]) {
    if let [a, b, c, d, e, f, ..] = *data
        && let Ok(mac) = MacAddr::try_from([a, b, c, d, e, f])
    {
        assert_eq!(mac.octets(), [a, b, c, d, e, f]);
        assert_eq!(mac.to_string().parse::<MacAddr>().ok(), Some(mac));
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mac) = s.parse::<MacAddr>() {
        assert_eq!(mac.to_string(), s.to_ascii_lowercase().replace('-', ":"));
        assert_eq!(mac.hyphenated().parse::<MacAddr>().ok(), Some(mac));
    }
    fn round_trip<T: FromStr + ToString + PartialEq + std::fmt::Debug>(s: &str) {
        if let Ok(v) = s.parse::<T>() {
            assert_eq!(v.to_string().parse::<T>().ok(), Some(v));
        }
    }
    round_trip::<HostName>(s);
    round_trip::<RackName>(s);
    round_trip::<ProfileName>(s);
    round_trip::<Flag>(s);
    round_trip::<LeaseId>(s);
    if let Ok(p) = Principal::new(s) {
        assert_eq!(p.as_str(), s);
    }
    if let Ok(h) = ConsoleHost::new(s) {
        // A directory name that stays in the console root.
        assert!(!h.as_str().contains('/') && !h.as_str().starts_with('.'));
        assert_eq!(Path::new(h.as_str()).components().count(), 1);
    }
}

/// Link target: the input is a `lab.v1.ServerMessage` as the server sends
/// it. Decoding or converting may refuse it, never panic; a BMC password
/// never shows in the `Debug` of what it converts to.
pub fn server_message(data: &[u8]) {
    let Ok(m) = pb::ServerMessage::decode(data) else {
        return;
    };
    use pb::server_message::Msg;
    match m.msg {
        None | Some(Msg::Input(_)) => {}
        Some(Msg::Rack(state)) => {
            for h in state.hosts.clone() {
                host(h);
            }
            let _ = convert::rack_hosts(state);
        }
        Some(Msg::Host(h)) => host(h),
        Some(Msg::Command(c)) => {
            use pb::agent_command::Cmd;
            match c.cmd {
                Some(Cmd::Power(a)) => {
                    let _ = convert::power_action(a);
                }
                Some(Cmd::Reclaim(r)) => {
                    let _ = convert::reclaim(r).map_err(|e| e.message);
                }
                Some(Cmd::Log(l)) => {
                    // The time range of a console log read.
                    for t in [l.from, l.to].iter().flatten() {
                        let _ = u64::try_from(lab_proto::convert::millis_from_timestamp(t));
                    }
                }
                // A forward's only field the agent reads first is its port,
                // a plain `u16::try_from` (link.rs).
                Some(Cmd::Console(_) | Cmd::CloseSession(_) | Cmd::Forward(_)) | None => {}
            }
        }
    }
}

fn host(h: pb::AgentHost) {
    let password = h.bmc.as_ref().map(|b| b.password.clone());
    let mut blank = h.clone();
    if let Some(b) = &mut blank.bmc {
        b.password.clear();
    }
    let spec = convert::host_spec(h).map(|s| format!("{s:?}"));
    let Some(pw) = password.and_then(|p| String::from_utf8(p).ok()) else {
        return;
    };
    // A password the other fields do not spell out must not be printed.
    if pw.len() < 8 || !pw.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return;
    }
    let without = convert::host_spec(blank).map(|s| format!("{s:?}"));
    if let (Ok(with), Ok(without)) = (spec, without)
        && !without.contains(&pw)
    {
        assert!(
            !with.contains(&pw),
            "a host spec's Debug shows the BMC password"
        );
    }
}
