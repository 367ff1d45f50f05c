//! `lab-agent`: the rack agent. It makes a leased host boot what its holder
//! asked for.
//!
//! - [`hosts`]: the rack's hosts and each one's current boot profile.
//! - [`dhcp`]: DHCPv4 (authoritative or proxy) that points PXE firmware and
//!   iPXE at the right boot file; pure decisions, one socket loop.
//! - [`tftp`]: read-only TFTP (RFC 1350 + blksize/tsize/timeout/windowsize),
//!   confined to the assets root and the per-host generated files.
//! - [`http`]: the same content over HTTP (faster for kernels and initrds).
//! - [`ipmi`]: our async IPMI 2.0 (RMCP+) client: power, boot device and
//!   Serial-over-LAN. The bytes are built by pure code (`packet`, `crypto`,
//!   `commands`, the `session` handshake, `sol::packet`/`sol::state`); only
//!   `ipmi::client` has a socket.
//! - [`power`]: the `PowerControl` trait over IPMI, and a simulator for faults.
//! - [`console`]: always-on console capture: log, fan-out, sources.
//! - [`ra`]: IPv6 router advertisements so iPXE does not wait for one.
//! - [`config`]: `agent.toml`, raw and validated.
//! - [`link`]: the one Attach stream to lab-server: desired state down,
//!   reports and command answers up; `link::convert` is the one place
//!   protobuf meets the domain types; `link::forward` carries a user's TCP
//!   connection to a port of a host's inventory IPv4.
//! - [`rack`]: the rack model: a handle that routes to one reconciler task
//!   per host (BMC, probe, console capture, power commands) and keeps the
//!   boot table; a host is provisioned and reclaimed by the pure plan/step
//!   machine in `rack::provision`, which its task carries out.
//! - [`assets`]: the confined asset root and the rendering of per-host iPXE
//!   scripts from `pxe-assets/` templates.
//! - [`slots`]: the per-client and global caps of the HTTP and TFTP servers.
//! - [`ratelimit`]: flood logging, one line per interval with a count.
//! - [`metrics`]: `/metrics` (`[metrics] listen`): the boot services'
//!   counters, BMC commands, console bytes and viewer lags, process metrics.
//!
//! (`fuzzing`, hidden from these docs, holds the entry points of the fuzz
//! targets in `fuzz/`.)
#![forbid(unsafe_code)]

pub mod assets;
pub mod config;
pub mod console;
pub mod dhcp;
#[doc(hidden)]
pub mod fuzzing;
pub mod hosts;
pub mod http;
pub mod ipmi;
pub mod link;
pub mod metrics;
pub mod power;
pub mod ra;
pub mod rack;
pub mod ratelimit;
pub mod slots;
pub mod tftp;

pub use lab_types::error_chain;
