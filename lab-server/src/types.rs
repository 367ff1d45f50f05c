//! Typed ids and validated newtypes shared by every subsystem: host and rack
//! names, lease ids, principals and roles, architectures, timestamps.
//! No bare `String` travels through the core's signatures.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn check_name(what: &'static str, s: &str) -> Result<(), InvalidName> {
    let err = |reason| InvalidName {
        what,
        value: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(err("must not be empty"));
    }
    if s.len() > 63 {
        return Err(err("must be at most 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(err("may only contain letters, digits, '-', '_' and '.'"));
    }
    if !s.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(err("must start with a letter or digit"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$m:meta])* $t:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                check_name($what, &s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $t {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl FromStr for $t {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A host's unique name in the inventory (`x86-01`).
    HostName,
    "host name"
);
name_type!(
    /// A rack's name; each rack is served by one agent.
    RackName,
    "rack name"
);
name_type!(
    /// A free-form capability flag of a host (`iommu`, `blessed-xen`).
    Flag,
    "flag"
);
name_type!(
    /// A boot profile name (`xen`, `local-disk`).
    ProfileName,
    "profile name"
);

/// The identity behind a token (`ci-osstest`, `alice`), or `server` for the
/// server's own actions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
        let s = s.into();
        check_name("principal", &s)?;
        if s == "server" {
            return Err(InvalidName {
                what: "principal",
                value: s,
                reason: "is reserved for the server's own actions",
            });
        }
        Ok(Self(s))
    }
    /// The server itself (expiry, reclaim, inventory reloads on SIGHUP).
    pub fn server() -> Self {
        Self("server".to_owned())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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

/// CPU architecture of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86_64" => Ok(Arch::X86_64),
            "aarch64" => Ok(Arch::Aarch64),
            other => Err(format!(
                "unknown arch {other:?} (expected x86_64 or aarch64)"
            )),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// Firmware a host boots with; it decides the PXE boot file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// A lease's id: a random UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub uuid::Uuid);

impl LeaseId {
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl FromStr for LeaseId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, uuid::Error> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
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
    fn names_are_validated() {
        assert!(HostName::new("x86-01").is_ok());
        assert!(HostName::new("").is_err());
        assert!(HostName::new("-x").is_err());
        assert!(HostName::new("a b").is_err());
        assert!(HostName::new("a/b").is_err());
        assert!(HostName::new("a".repeat(64)).is_err());
        let e = HostName::new("a b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid host name \"a b\": may only contain letters, digits, '-', '_' and '.'"
        );
    }

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
