//! `agent.toml`: the agent's configuration, in two layers — raw serde types
//! that refuse unknown fields, then the validated settings of each service.
//! Errors carry file, line, column and reason.

use crate::console::LogLimits;
use crate::dhcp::{DhcpConfig, Mode};
use crate::ipmi::CipherSuite;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration was refused: unreadable, or invalid at
/// `path:line:column`.
pub type ConfigError = lab_types::FileError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    rack: String,
    server: String,
    /// File holding the agent's bearer token (else `LAB_TOKEN`).
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for an https:// server (else the
    /// system's roots).
    ca_file: Option<PathBuf>,
    #[serde(default = "default_profile")]
    default_profile: String,
    dhcp: Option<toml::Spanned<RawDhcp>>,
    tftp: Option<RawTftp>,
    http: Option<RawHttp>,
    assets: RawAssets,
    /// Console logs and provisioning state (default `lab-agent-data` beside
    /// this file).
    data_dir: Option<PathBuf>,
    /// How often each BMC is polled, to notice one going silent (or coming
    /// back) while nobody uses it ("30s").
    bmc_probe_interval: Option<toml::Spanned<String>>,
    console: Option<RawConsole>,
    ipmi: Option<RawIpmi>,
    #[serde(default)]
    profiles: std::collections::BTreeMap<String, toml::Spanned<RawProfile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpmi {
    /// Cipher suites in order of preference (17 and 3 are implemented).
    cipher_suites: Option<toml::Spanned<Vec<u8>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    max_file_bytes: Option<u64>,
    max_total_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    /// Text on the console that means the host is up.
    ready: Option<String>,
    /// Texts that mean the boot failed.
    #[serde(default)]
    fail: Vec<String>,
    /// How long the ready text may take ("300s").
    timeout: Option<String>,
    /// Xen debug keys sent at lease end ("hqr"); empty or absent: none.
    xen_debug_keys: Option<String>,
}

fn default_profile() -> String {
    "local-disk".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDhcp {
    mode: String,
    interface: Option<String>,
    server_ip: Ipv4Addr,
    next_server: Option<Ipv4Addr>,
    subnet_mask: Option<Ipv4Addr>,
    router: Option<Ipv4Addr>,
    #[serde(default)]
    dns: Vec<Ipv4Addr>,
    lease_secs: Option<u32>,
    #[serde(default)]
    pool: Vec<Ipv4Addr>,
    script_url: Option<String>,
    /// Boot file names (as TFTP paths) for BIOS, x86-64 UEFI and arm64 UEFI.
    boot_bios: Option<String>,
    boot_efi_x64: Option<String>,
    boot_efi_arm64: Option<String>,
    /// Send IPv6 router advertisements on `interface` (default true).
    router_advertisements: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTftp {
    listen: SocketAddr,
    blksize_cap: Option<u16>,
    windowsize_cap: Option<u16>,
    max_transfers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: SocketAddr,
    /// The HTTP base URL as hosts reach it (for templates).
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssets {
    root: PathBuf,
    artifacts: Option<PathBuf>,
}

/// TFTP settings.
#[derive(Debug, Clone)]
pub struct TftpSettings {
    pub listen: SocketAddr,
    pub blksize_cap: Option<u16>,
    pub windowsize_cap: Option<u16>,
    pub max_transfers: Option<usize>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub rack: String,
    pub server: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub default_profile: String,
    pub dhcp: Option<DhcpConfig>,
    /// Interface to send IPv6 router advertisements on.
    pub ra_interface: Option<String>,
    pub tftp: Option<TftpSettings>,
    pub http: Option<(SocketAddr, String)>,
    pub assets_root: PathBuf,
    pub artifacts: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub bmc_probe_interval: Duration,
    pub console_limits: LogLimits,
    /// IPMI cipher suites in order of preference.
    pub ipmi_cipher_suites: Vec<CipherSuite>,
    /// Boot expectations per profile name.
    pub profiles: BTreeMap<String, ProfileSettings>,
}

/// What the agent expects of a host booting a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSettings {
    /// Console text meaning the host is up; `None`: ready once powered on.
    pub ready: Option<String>,
    /// Console texts meaning the boot failed.
    pub fail: Vec<String>,
    /// How long `ready` may take after power-on.
    pub timeout: Duration,
    /// Xen debug keys to send at lease end (empty: none).
    pub xen_debug_keys: Vec<u8>,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings {
            ready: None,
            fail: Vec::new(),
            timeout: Duration::from_secs(300),
            xen_debug_keys: Vec::new(),
        }
    }
}

/// Default BMC poll interval.
pub const DEFAULT_BMC_PROBE_INTERVAL: Duration = Duration::from_secs(30);

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            what: "agent config",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Relative asset paths are taken from the config file's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |offset: usize, reason: String| {
            let (line, column) = line_column(text, offset);
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason,
            }
        };
        let raw: Raw = toml::from_str(text)
            .map_err(|e| invalid(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut ra_interface = None;
        let dhcp = match raw.dhcp {
            None => None,
            Some(d) => {
                let at = d.span().start;
                let d = d.into_inner();
                let mode = match d.mode.as_str() {
                    "authoritative" => Mode::Authoritative,
                    "proxy" => Mode::Proxy,
                    m => {
                        return Err(invalid(
                            at,
                            format!("unknown dhcp mode {m:?} (authoritative or proxy)"),
                        ));
                    }
                };
                let mut c = DhcpConfig::new(mode, d.server_ip);
                if d.router_advertisements.unwrap_or(true) {
                    ra_interface = d.interface.clone();
                }
                c.interface = d.interface;
                if let Some(n) = d.next_server {
                    c.next_server = n;
                }
                if let Some(m) = d.subnet_mask {
                    c.subnet_mask = m;
                }
                c.router = d.router;
                c.dns = d.dns;
                if let Some(l) = d.lease_secs {
                    c.lease_secs = l;
                }
                c.pool = d.pool;
                if let Some(f) = d.boot_bios {
                    c.boot_files.bios = f;
                }
                if let Some(f) = d.boot_efi_x64 {
                    c.boot_files.efi_x64 = f;
                }
                if let Some(f) = d.boot_efi_arm64 {
                    c.boot_files.efi_arm64 = f;
                }
                if let Some(u) = d.script_url {
                    if !u.contains("{mac}") {
                        return Err(invalid(at, "dhcp.script_url must contain {mac}".into()));
                    }
                    c.script_url_template = u;
                }
                Some(c)
            }
        };
        let tftp = raw.tftp.map(|t| TftpSettings {
            listen: t.listen,
            blksize_cap: t.blksize_cap,
            windowsize_cap: t.windowsize_cap,
            max_transfers: t.max_transfers,
        });
        let http = raw
            .http
            .map(|h| (h.listen, h.url.trim_end_matches('/').to_owned()));
        let duration = |at: usize, v: &str, what: &str| {
            humantime::parse_duration(v)
                .map_err(|e| invalid(at, format!("invalid {what} {v:?}: {e}")))
        };
        let bmc_probe_interval = match &raw.bmc_probe_interval {
            None => DEFAULT_BMC_PROBE_INTERVAL,
            Some(s) => duration(s.span().start, s.get_ref(), "bmc_probe_interval")?,
        };
        let mut console_limits = LogLimits::default();
        if let Some(c) = &raw.console {
            if let Some(v) = c.max_file_bytes {
                console_limits.max_file_bytes = v;
            }
            if let Some(v) = c.max_total_bytes {
                console_limits.max_total_bytes = v;
            }
        }
        let console_limits = console_limits
            .validate()
            .map_err(|e| invalid(text.find("[console]").unwrap_or(0), e.to_string()))?;
        let mut ipmi_cipher_suites = vec![CipherSuite::Suite17, CipherSuite::Suite3];
        if let Some(list) = raw.ipmi.as_ref().and_then(|i| i.cipher_suites.as_ref()) {
            let at = list.span().start;
            ipmi_cipher_suites = list
                .get_ref()
                .iter()
                .map(|n| match n {
                    17 => Ok(CipherSuite::Suite17),
                    3 => Ok(CipherSuite::Suite3),
                    n => Err(invalid(
                        at,
                        format!("unsupported cipher suite {n} (17 and 3 are implemented)"),
                    )),
                })
                .collect::<Result<_, _>>()?;
            if ipmi_cipher_suites.is_empty() {
                return Err(invalid(at, "cipher_suites is empty".into()));
            }
        }
        let mut profiles = BTreeMap::new();
        for (name, p) in raw.profiles {
            let at = p.span().start;
            let p = p.into_inner();
            let mut s = ProfileSettings {
                ready: p.ready.filter(|r| !r.is_empty()),
                fail: p.fail.into_iter().filter(|f| !f.is_empty()).collect(),
                ..ProfileSettings::default()
            };
            if let Some(t) = &p.timeout {
                s.timeout = duration(at, t, "timeout")?;
            }
            if let Some(k) = p.xen_debug_keys {
                if !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(invalid(
                        at,
                        format!("invalid xen_debug_keys {k:?}: printable ASCII keys only"),
                    ));
                }
                s.xen_debug_keys = k.into_bytes();
            }
            profiles.insert(name, s);
        }
        Ok(AgentConfig {
            data_dir: base.join(raw.data_dir.unwrap_or_else(|| "lab-agent-data".into())),
            bmc_probe_interval,
            console_limits,
            ipmi_cipher_suites,
            profiles,
            rack: raw.rack,
            server: raw.server,
            token_file: raw.token_file.map(|p| base.join(p)),
            ca_file: raw.ca_file.map(|p| base.join(p)),
            default_profile: raw.default_profile,
            dhcp,
            ra_interface,
            tftp,
            http,
            assets_root: base.join(raw.assets.root),
            artifacts: raw.assets.artifacts.map(|p| base.join(p)),
        })
    }
}

use lab_types::line_column;

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
rack = "rack1"
server = "http://127.0.0.1:7621"

[dhcp]
mode = "authoritative"
interface = "br0"
server_ip = "198.18.0.1"
script_url = "http://{server_ip}:8080/hosts/{mac}.ipxe"

[tftp]
listen = "198.18.0.1:69"

[http]
listen = "198.18.0.1:8080"
url = "http://198.18.0.1:8080/"

[assets]
root = "../pxe-assets"
artifacts = "/var/cache/lab/artifacts"
"#;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/agent.example.toml"));
        let c = AgentConfig::load(path).unwrap();
        assert_eq!(c.rack, "rack1");
        assert!(c.dhcp.is_some() && c.tftp.is_some() && c.http.is_some());
    }

    #[test]
    fn parses_and_resolves_paths() {
        let c = AgentConfig::parse(GOOD, Path::new("/etc/lab/agent.toml")).unwrap();
        assert_eq!(c.rack, "rack1");
        assert_eq!(c.default_profile, "local-disk");
        assert_eq!(c.assets_root, Path::new("/etc/lab/../pxe-assets"));
        assert_eq!(
            c.artifacts.as_deref(),
            Some(Path::new("/var/cache/lab/artifacts"))
        );
        assert_eq!(c.http.as_ref().unwrap().1, "http://198.18.0.1:8080");
        assert_eq!(c.dhcp.as_ref().unwrap().interface.as_deref(), Some("br0"));
    }

    #[test]
    fn errors_name_line_column_and_reason() {
        let bad = GOOD.replace("mode = \"authoritative\"", "mode = \"rogue\"");
        let e = AgentConfig::parse(&bad, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("agent.toml:5:1: unknown dhcp mode \"rogue\""),
            "{e}"
        );
        let bad = GOOD.replace(
            "listen = \"198.18.0.1:69\"",
            "listen = \"198.18.0.1:69\"\nblksize = 1",
        );
        let e = AgentConfig::parse(&bad, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("agent.toml:13:1: unknown field `blksize`"),
            "{e}"
        );
        let bad = GOOD.replace("server_ip = \"198.18.0.1\"", "server_ip = \"198.18.0\"");
        let e = AgentConfig::parse(&bad, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.toml:8:13: invalid IPv4"), "{e}");
    }
}
