//! Entry points of the coverage-guided fuzz targets in `fuzz/` (the
//! fuzzing tier of `docs/testing.md`): one function per target, taking the
//! fuzzer's bytes, running the code the agent runs on what a hostile peer
//! sends, and asserting what must hold whatever the bytes. A panic is a
//! finding. `tests/fuzz_regressions.rs` replays the seed corpora and every
//! input that ever failed through the same functions in the normal test
//! suite; the `*_input` writers build seeds in each target's format.
//!
//! - [`dhcp`]: a datagram on port 67 or 4011 (decode, decision, reply).
//! - [`tftp`]: a read request and the client's datagrams during the
//!   transfer (packet codec, option negotiation, the sender machine, the
//!   confined file source).
//! - [`http`]: the bytes of one HTTP connection (hyper, the request
//!   handler, `Range`, path decoding and confinement).
//! - [`ipmi`](fn@ipmi): what a BMC (or a host spoofing one) sends: RMCP+ packets
//!   with and without integrity and confidentiality, the session handshake,
//!   every command's response.
//! - [`sol`]: SOL packets and console writes driving the SOL machine.
//! - [`agent_config`], [`names`]: `agent.toml`; MAC addresses and names.
//! - [`server_message`]: a `lab.v1.ServerMessage` off the link, through
//!   the agent's conversions.
//! - [`console_log`]: console log files as found on disk, read and then
//!   appended to.
//!
//! Fixed parts (the host table, a boot tree with files outside it that must
//! never be served) are built once per process in the temporary directory.
//! Not part of the agent's interface.

mod agent;
mod boot;
mod console;
mod input;
mod ipmi;

pub use agent::{agent_config, names, server_message};
pub use boot::{dhcp, http, tftp, tftp_input};
pub use console::{console_log, console_log_input};
pub use input::{Input, InputWriter};
pub use ipmi::{IpmiMode, SolStep, ipmi, ipmi_input, sol, sol_input};

/// A fuzz target: its name and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target of this crate by its name in `fuzz/` (also the name of its
/// corpus and regression directories).
pub const TARGETS: &[Target] = &[
    ("dhcp", dhcp),
    ("tftp", tftp),
    ("http", http),
    ("ipmi", ipmi),
    ("sol", sol),
    ("agent_config", agent_config),
    ("names", names),
    ("server_message", server_message),
    ("console_log", console_log),
];
