//! Validated names (hosts, racks, flags, profiles, principals) and lease
//! ids. A name is 1–63 characters of ASCII letters, digits, `-`, `_` and
//! `.`, starting with a letter or digit, so it is safe in file names, URLs,
//! DHCP options, iPXE scripts and terminals.

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

/// The principal of the server's health checks (reserved, like `server`).
pub const HEALTH_PRINCIPAL: &str = "lab-health";

/// The identity behind a token (`ci-osstest`, `alice`), or `server` for the
/// server's own actions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
        let s = s.into();
        check_name("principal", &s)?;
        if s == "server" || s == HEALTH_PRINCIPAL {
            return Err(InvalidName {
                what: "principal",
                value: s,
                reason: "is reserved for the server's own actions",
            });
        }
        Ok(Self(s))
    }
    /// A principal named by another part of the lab — a lease's holder as
    /// the server sends it to an agent —: any valid name, the server's own
    /// (`server`, `lab-health`) included. Tokens and requests go through
    /// [`Principal::new`].
    pub fn named_by_lab(s: impl Into<String>) -> Result<Self, InvalidName> {
        let s = s.into();
        check_name("principal", &s)?;
        Ok(Self(s))
    }
    /// The server itself (expiry, reclaim, inventory reloads on SIGHUP).
    pub fn server() -> Self {
        Self("server".to_owned())
    }
    /// The server's health checks: the holder of their leases.
    pub fn health() -> Self {
        Self(HEALTH_PRINCIPAL.to_owned())
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
    fn the_labs_own_principals_are_named_by_the_lab_only() {
        for own in ["server", HEALTH_PRINCIPAL] {
            assert!(Principal::new(own).is_err(), "{own}");
            assert_eq!(Principal::named_by_lab(own).unwrap().as_str(), own);
        }
        assert!(Principal::named_by_lab("a b").is_err());
        assert!(Principal::named_by_lab("").is_err());
    }

    #[test]
    fn principal_server_is_reserved() {
        assert!(Principal::new("server").is_err());
        assert_eq!(Principal::server().as_str(), "server");
        assert!(Principal::new("ci-osstest").is_ok());
    }

    #[test]
    fn lease_ids_round_trip() {
        let id = LeaseId::random();
        assert_eq!(id.to_string().parse::<LeaseId>().unwrap(), id);
        assert!("not-a-uuid".parse::<LeaseId>().is_err());
    }
}
