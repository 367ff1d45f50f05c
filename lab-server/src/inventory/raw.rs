//! The inventory file as it is written: serde types mirroring the TOML, with
//! `deny_unknown_fields` everywhere and a [`Spanned`] around every value that
//! validation checks, so that errors can point at the offending line and
//! column. Nothing here is validated; `super` converts these into the public
//! types.

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;

/// The whole file: `[[rack]]` and `[[host]]` arrays of tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInventory {
    #[serde(default)]
    pub rack: Vec<RawRack>,
    #[serde(default)]
    pub host: Vec<RawHost>,
}

/// One `[[rack]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRack {
    pub name: Spanned<String>,
    #[serde(default)]
    pub agent: Option<Spanned<String>>,
}

/// One `[[host]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHost {
    pub name: Spanned<String>,
    pub arch: Spanned<String>,
    pub firmware: Spanned<String>,
    pub rack: Spanned<String>,
    pub mac: Spanned<String>,
    pub ipv4: Option<Spanned<String>>,
    #[serde(default)]
    pub flags: Vec<Spanned<String>>,
    pub bmc: Option<Spanned<RawBmc>>,
    pub console: Option<Spanned<RawConsole>>,
    pub expect: Option<Spanned<RawExpect>>,
}

/// A host's `[host.expect]` (or `expect = { … }`): what a health check
/// compares the host's facts with.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExpect {
    pub memory_mb: Option<Spanned<i64>>,
    pub cpus: Option<Spanned<i64>>,
    pub disks: Option<Spanned<i64>>,
    pub min_disk_gb: Option<Spanned<i64>>,
}

/// A host's `[host.bmc]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBmc {
    pub address: Spanned<String>,
    pub port: Option<Spanned<i64>>,
    pub user: Spanned<String>,
    /// Only here to refuse inline passwords with a clear message. The value
    /// is skipped without being stored, so it can never reach an error text.
    pub password: Option<Spanned<IgnoredAny>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
}

/// A host's `[host.console]`: a flat table whose `kind` decides which of the
/// other fields are allowed (checked in `super`, where spans are available;
/// an internally tagged serde enum would lose them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    pub kind: Spanned<String>,
    pub device: Option<Spanned<String>>,
    pub baud: Option<Spanned<i64>>,
    pub address: Option<Spanned<String>>,
}
