//! Typed ids and validated newtypes shared by every subsystem: host and rack
//! names, lease ids, principals and roles, architectures, timestamps.
//! No bare `String` travels through the core's signatures.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub use lab_types::{
    Arch, Firmware, Flag, HostName, InvalidName, LeaseId, Principal, ProfileName, RackName,
    SshPublicKey,
};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A CI system: leases hosts, manages its own leases.
    Ci,
    /// A person who leases hosts interactively; same rights as `ci`.
    Developer,
    /// Everything: maintenance, inventory reloads, other holders' leases.
    Operator,
    /// A rack agent: may only attach for the rack whose `agent` is its
    /// principal; no user calls.
    Agent,
}

impl Role {
    pub fn is_operator(self) -> bool {
        self == Role::Operator
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ci" => Ok(Role::Ci),
            "developer" => Ok(Role::Developer),
            "operator" => Ok(Role::Operator),
            "agent" => Ok(Role::Agent),
            other => Err(format!(
                "unknown role {other:?} (expected ci, developer, operator or agent)"
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Ci => "ci",
            Role::Developer => "developer",
            Role::Operator => "operator",
            Role::Agent => "agent",
        })
    }
}

/// A caller the server has authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    pub role: Role,
}

/// A waiting lease request's id, in arrival order (restarts at 1 with the server).
pub type WaiterId = u64;

/// A generation number: bumped by every state change of a record; the store
/// writes with compare-and-set on it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// Wall-clock time in milliseconds since the Unix epoch. Persisted, so that
/// TTLs keep running across a server restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }
    pub fn saturating_add(self, d: std::time::Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> std::time::Duration {
        std::time::Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.0.max(0) as u64);
        write!(f, "{}", humantime::format_rfc3339_millis(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_display_and_arith() {
        let t = Timestamp(1_000);
        assert_eq!(t.to_string(), "1970-01-01T00:00:01.000Z");
        assert_eq!(
            t.saturating_add(std::time::Duration::from_millis(500)),
            Timestamp(1_500)
        );
        assert_eq!(
            Timestamp(1_500).since(t),
            std::time::Duration::from_millis(500)
        );
        assert_eq!(t.since(Timestamp(1_500)), std::time::Duration::ZERO);
    }
}
