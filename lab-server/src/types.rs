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

/// A waiting lease request's id: the sequence number of its
/// `LEASE_REQUESTED` event, so unique across restarts and in arrival order.
pub type WaiterId = u64;

/// A client-chosen id of one lease request (`AcquireRequest.request_id`),
/// by which the client resumes the request after its stream broke: 1–128
/// characters of ASCII letters, digits, `-`, `_`, `.` and `:` (a UUID fits).
/// Scoped to the principal: two principals may use the same id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

/// Why a request id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request id {value:?}: {reason}")]
pub struct InvalidRequestId {
    pub value: String,
    pub reason: &'static str,
}

impl RequestId {
    pub const MAX_LEN: usize = 128;

    pub fn new(s: impl Into<String>) -> Result<Self, InvalidRequestId> {
        let value = s.into();
        let reason = if value.is_empty() {
            "must not be empty"
        } else if value.len() > Self::MAX_LEN {
            "must be at most 128 characters"
        } else if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            "may only contain letters, digits, '-', '_', '.' and ':'"
        } else {
            return Ok(Self(value));
        };
        Err(InvalidRequestId { value, reason })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = InvalidRequestId;
    fn try_from(s: String) -> Result<Self, InvalidRequestId> {
        Self::new(s)
    }
}

impl From<RequestId> for String {
    fn from(r: RequestId) -> String {
        r.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
    pub fn saturating_sub(self, d: std::time::Duration) -> Self {
        Self(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
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
        assert_eq!(
            t.saturating_sub(std::time::Duration::from_millis(400)),
            Timestamp(600)
        );
    }

    #[test]
    fn request_ids_are_validated() {
        assert!(RequestId::new("3f2b0c1e-5a6d-4e7f-8a9b-0c1d2e3f4a5b").is_ok());
        assert!(RequestId::new("ci:job-42.try_1").is_ok());
        assert!(RequestId::new("x".repeat(128)).is_ok());
        for (bad, why) in [
            ("", "must not be empty"),
            ("a b", "may only contain"),
            ("tab\there", "may only contain"),
            ("é", "may only contain"),
        ] {
            let e = RequestId::new(bad).unwrap_err();
            assert!(e.reason.starts_with(why), "{bad:?}: {e}");
        }
        assert!(RequestId::new("x".repeat(129)).is_err());
        let json = serde_json::to_string(&RequestId::new("r-1").unwrap()).unwrap();
        assert_eq!(json, "\"r-1\"");
        assert!(serde_json::from_str::<RequestId>("\"a b\"").is_err());
    }
}
