//! Fleet health: what the server concludes about a host's own condition,
//! apart from who holds it.
//!
//! - `attribution.rs`: whose fault a failed provisioning was (host, job,
//!   infra), by signature rules over the agent's stage text and the
//!   console tail; the shipped rules and the operator's `--failure-rules`
//!   file.
//! - [`HostVerdict`]: what a provisioning says about its host, handed by
//!   the rack registry to the core, which keeps each host's
//!   [`Health`](crate::lease::machine::Health): a failure attributed to
//!   the host makes it `suspect`, `--quarantine-after` of them within
//!   `--quarantine-window` quarantine it (never granted until an operator
//!   releases it); a later provisioning that reaches READY clears a
//!   suspicion. A host failure also asks for a health check.
//! - `facts.rs`: a health check's `LAB-HEALTH-OK` facts line, parsed and
//!   compared with the host's inventory (`[host.expect]`, arch, MAC, flags).
//! - `checks.rs`: the loop's rules: a failed check quarantines, a pass
//!   clears (unless the quarantine is an operator's, or held after
//!   `--quarantine-after` failed checks within the window). The core runs
//!   checks as leases of `lab-health` with profile `health-check`.

pub mod attribution;
pub mod checks;
pub mod facts;

pub use attribution::{Attribution, FailureClass, Rules};

/// What a host's provisioning in a lease says about the host; sent once per
/// lease and host, when the phase first becomes `Failed` or `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostVerdict {
    Failed(Attribution),
    /// With the console line that matched the profile's ready text (empty
    /// when the agent sent none): a health check's facts.
    Ready {
        ready_line: String,
    },
}
