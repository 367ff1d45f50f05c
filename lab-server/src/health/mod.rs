//! Fleet health: what the server concludes about a host's own condition,
//! apart from who holds it.
//!
//! - `attribution.rs`: whose fault a failed provisioning was (host, job,
//!   infra), by signature rules over the agent's stage text and the
//!   console tail; the shipped rules and the operator's `--failure-rules`
//!   file.

pub mod attribution;

pub use attribution::{Attribution, FailureClass, Rules};
