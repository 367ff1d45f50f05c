//! `agent.toml`: the agent's configuration, in two layers — raw serde types
//! that refuse unknown fields, then the validated settings of each service.
//! Errors carry file, line, column and reason.

use crate::console::LogLimits;
use crate::dhcp::{DhcpConfig, Mode};
use crate::http::HttpConfig;
use crate::ipmi::CipherSuite;
use crate::link::LogReadLimits;
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
    metrics: Option<RawMetrics>,
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
    /// Console log reads streaming at once per host.
    log_reads_per_host: Option<toml::Spanned<usize>>,
    /// Console log reads streaming at once on the whole agent.
    log_reads: Option<toml::Spanned<usize>>,
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
    /// The profile installs to disk first (`xen-install`): follow the
    /// installer's `LAB-INSTALL` lines, wait for the power-off, boot the
    /// disk, then watch for `ready`.
    #[serde(default)]
    install: bool,
    /// The whole install, power-on → `stage=done` ("15m").
    install_timeout: Option<String>,
    /// The longest wait for the installer's next line ("3m").
    install_stage_timeout: Option<String>,
    /// How long the host has to power itself off after the install ("60s").
    poweroff_timeout: Option<String>,
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
    max_transfers_per_client: Option<toml::Spanned<usize>>,
    /// The largest client `timeout` option granted ("5s").
    max_timeout: Option<toml::Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: SocketAddr,
    /// The HTTP base URL as hosts reach it (for templates).
    url: String,
    max_connections: Option<toml::Spanned<usize>>,
    max_connections_per_client: Option<toml::Spanned<usize>>,
    header_timeout: Option<toml::Spanned<String>>,
    idle_timeout: Option<toml::Spanned<String>>,
    send_timeout: Option<toml::Spanned<String>>,
    /// GRUB hosts load Xen, the kernel and the initrd over this server.
    grub: Option<bool>,
}

/// `[metrics]`: where `/metrics` is served (plain HTTP).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: SocketAddr,
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
    pub max_transfers_per_client: Option<usize>,
    pub max_timeout: Option<Duration>,
}

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// The base URL as hosts reach it, without a trailing `/`.
    pub url: String,
    /// Connection caps and timeouts (the defaults where not set).
    pub limits: HttpConfig,
    /// GRUB hosts (aarch64 UEFI) load Xen, the kernel and the initrd over
    /// this server with GRUB's `http` module instead of its TFTP
    /// (`RenderConfig::grub_http`; default off, see docs/netboot.md).
    pub grub: bool,
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
    /// Where `/metrics` is served (`[metrics] listen`); none when absent.
    pub metrics_listen: Option<SocketAddr>,
    pub tftp: Option<TftpSettings>,
    pub http: Option<HttpSettings>,
    pub assets_root: PathBuf,
    pub artifacts: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub bmc_probe_interval: Duration,
    pub console_limits: LogLimits,
    /// Console log reads streaming at once (per host, in all).
    pub log_reads: LogReadLimits,
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
    /// Install to disk before booting (`None`: boot only). `timeout` is
    /// then the disk boot's: its power-on → `ready`.
    pub install: Option<InstallSettings>,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings {
            ready: None,
            fail: Vec::new(),
            timeout: Duration::from_secs(300),
            xen_debug_keys: Vec::new(),
            install: None,
        }
    }
}

/// The limits of an install to disk (docs/netboot.md "Installing to
/// disk"): the installer prints a `LAB-INSTALL` line at each stage and at
/// every 5 % written, then powers the host off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallSettings {
    /// Power-on → `LAB-INSTALL stage=done`.
    pub timeout: Duration,
    /// Power-on → the installer's first line, and between two of its lines.
    pub stage_timeout: Duration,
    /// `stage=done` → the host off; past it the agent switches it off.
    pub poweroff_timeout: Duration,
}

impl Default for InstallSettings {
    fn default() -> Self {
        InstallSettings {
            timeout: Duration::from_secs(900),
            stage_timeout: Duration::from_secs(180),
            poweroff_timeout: Duration::from_secs(60),
        }
    }
}

/// Default BMC poll interval.
pub const DEFAULT_BMC_PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// The longest duration the file may give (a year): every duration becomes
/// a deadline, `now + duration`, which must not overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

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
        let duration = |at: usize, v: &str, what: &str| {
            let d = humantime::parse_duration(v)
                .map_err(|e| invalid(at, format!("invalid {what} {v:?}: {e}")))?;
            if d > MAX_DURATION {
                return Err(invalid(at, format!("{what} {v:?} is longer than a year")));
            }
            Ok(d)
        };
        // A cap or timeout of zero would refuse everything: refused here,
        // where the error can point at it.
        let positive = |v: &toml::Spanned<usize>, what: &str| match *v.get_ref() {
            0 => Err(invalid(
                v.span().start,
                format!("{what} must be at least 1"),
            )),
            n => Ok(n),
        };
        let timeout = |v: &toml::Spanned<String>, what: &str| {
            let d = duration(v.span().start, v.get_ref(), what)?;
            if d.is_zero() {
                return Err(invalid(v.span().start, format!("{what} must be positive")));
            }
            Ok(d)
        };
        let tftp = match raw.tftp {
            None => None,
            Some(t) => Some(TftpSettings {
                listen: t.listen,
                blksize_cap: t.blksize_cap,
                windowsize_cap: t.windowsize_cap,
                max_transfers: t.max_transfers,
                max_transfers_per_client: t
                    .max_transfers_per_client
                    .as_ref()
                    .map(|v| positive(v, "max_transfers_per_client"))
                    .transpose()?,
                max_timeout: match &t.max_timeout {
                    None => None,
                    Some(v) => {
                        let d = timeout(v, "max_timeout")?;
                        if d < Duration::from_secs(1) || d > Duration::from_secs(255) {
                            return Err(invalid(
                                v.span().start,
                                "max_timeout must be within 1s..=255s (TFTP timeouts are whole seconds)".into(),
                            ));
                        }
                        Some(d)
                    }
                },
            }),
        };
        let http = match raw.http {
            None => None,
            Some(h) => {
                let mut limits = HttpConfig::default();
                if let Some(v) = &h.max_connections {
                    limits.max_connections = positive(v, "max_connections")?;
                }
                if let Some(v) = &h.max_connections_per_client {
                    limits.max_connections_per_client = positive(v, "max_connections_per_client")?;
                }
                if let Some(v) = &h.header_timeout {
                    limits.header_timeout = timeout(v, "header_timeout")?;
                }
                if let Some(v) = &h.idle_timeout {
                    limits.idle_timeout = timeout(v, "idle_timeout")?;
                }
                if let Some(v) = &h.send_timeout {
                    limits.send_timeout = timeout(v, "send_timeout")?;
                }
                Some(HttpSettings {
                    listen: h.listen,
                    url: h.url.trim_end_matches('/').to_owned(),
                    limits,
                    grub: h.grub.unwrap_or(false),
                })
            }
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
        let mut log_reads = LogReadLimits::default();
        if let Some(c) = &raw.console {
            for (v, field, name) in [
                (
                    &c.log_reads_per_host,
                    &mut log_reads.per_host,
                    "log_reads_per_host",
                ),
                (&c.log_reads, &mut log_reads.total, "log_reads"),
            ] {
                if let Some(v) = v {
                    if *v.get_ref() == 0 {
                        return Err(invalid(
                            v.span().start,
                            format!("{name} must be at least 1"),
                        ));
                    }
                    *field = *v.get_ref();
                }
            }
        }
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
            // An install limit: positive, and only for an installing profile.
            let limit = |value: &Option<String>, key: &str, default: Duration| match value {
                None => Ok(default),
                Some(_) if !p.install => Err(invalid(
                    at,
                    format!("profile {name}: {key} needs install = true"),
                )),
                Some(v) => match duration(at, v, key)? {
                    d if d.is_zero() => Err(invalid(at, format!("{key} must be positive"))),
                    d => Ok(d),
                },
            };
            let defaults = InstallSettings::default();
            let install = InstallSettings {
                timeout: limit(&p.install_timeout, "install_timeout", defaults.timeout)?,
                stage_timeout: limit(
                    &p.install_stage_timeout,
                    "install_stage_timeout",
                    defaults.stage_timeout,
                )?,
                poweroff_timeout: limit(
                    &p.poweroff_timeout,
                    "poweroff_timeout",
                    defaults.poweroff_timeout,
                )?,
            };
            if p.install {
                if s.ready.is_none() {
                    return Err(invalid(
                        at,
                        format!(
                            "profile {name}: install = true needs a ready text (the installed disk's ready line)"
                        ),
                    ));
                }
                s.install = Some(install);
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
            log_reads,
            ipmi_cipher_suites,
            profiles,
            rack: raw.rack,
            server: raw.server,
            token_file: raw.token_file.map(|p| base.join(p)),
            ca_file: raw.ca_file.map(|p| base.join(p)),
            default_profile: raw.default_profile,
            dhcp,
            ra_interface,
            metrics_listen: raw.metrics.map(|m| m.listen),
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
        assert_eq!(c.profiles["xen"].install, None);
        let install = &c.profiles["xen-install"];
        assert_eq!(install.ready.as_deref(), Some("LAB-DISK-READY"));
        assert_eq!(install.install, Some(InstallSettings::default()));
    }

    #[test]
    fn install_profiles() {
        let with = |profile: &str| format!("{GOOD}\n[profiles.xen-install]\n{profile}\n");
        let c = AgentConfig::parse(
            &with(
                "ready = \"LAB-DISK-READY\"\ninstall = true\ninstall_timeout = \"20m\"\n\
                 install_stage_timeout = \"2m\"\npoweroff_timeout = \"30s\"\ntimeout = \"5m\"",
            ),
            Path::new("agent.toml"),
        )
        .unwrap();
        let p = &c.profiles["xen-install"];
        assert_eq!(
            p.install,
            Some(InstallSettings {
                timeout: Duration::from_secs(1200),
                stage_timeout: Duration::from_secs(120),
                poweroff_timeout: Duration::from_secs(30),
            })
        );
        assert_eq!(p.timeout, Duration::from_secs(300));
        for (profile, want) in [
            (
                "ready = \"R\"\ninstall_timeout = \"20m\"",
                "profile xen-install: install_timeout needs install = true",
            ),
            (
                "install = true",
                "profile xen-install: install = true needs a ready text",
            ),
            (
                "ready = \"R\"\ninstall = true\npoweroff_timeout = \"0s\"",
                "poweroff_timeout must be positive",
            ),
        ] {
            let e = AgentConfig::parse(&with(profile), Path::new("agent.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{profile}: {e}");
        }
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
        assert_eq!(c.http.as_ref().unwrap().url, "http://198.18.0.1:8080");
        assert_eq!(c.http.as_ref().unwrap().limits, HttpConfig::default());
        // GRUB stays on TFTP unless asked.
        assert!(!c.http.as_ref().unwrap().grub);
        let grub = GOOD.replace("[http]\n", "[http]\ngrub = true\n");
        let c2 = AgentConfig::parse(&grub, Path::new("/etc/lab/agent.toml")).unwrap();
        assert!(c2.http.unwrap().grub);
        let t = c.tftp.as_ref().unwrap();
        assert_eq!((t.max_transfers_per_client, t.max_timeout), (None, None));
        assert_eq!(c.dhcp.as_ref().unwrap().interface.as_deref(), Some("br0"));
    }

    #[test]
    fn connection_limits() {
        let text = GOOD
            .replace(
                "listen = \"198.18.0.1:8080\"",
                "listen = \"198.18.0.1:8080\"\nmax_connections = 100\nmax_connections_per_client = 4\nheader_timeout = \"10s\"\nidle_timeout = \"2m\"\nsend_timeout = \"15s\"",
            )
            .replace(
                "listen = \"198.18.0.1:69\"",
                "listen = \"198.18.0.1:69\"\nmax_transfers_per_client = 2\nmax_timeout = \"3s\"",
            );
        let c = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap();
        let h = c.http.unwrap().limits;
        assert_eq!(
            (
                h.max_connections,
                h.max_connections_per_client,
                h.header_timeout,
                h.idle_timeout,
                h.send_timeout
            ),
            (
                100,
                4,
                Duration::from_secs(10),
                Duration::from_secs(120),
                Duration::from_secs(15)
            )
        );
        let t = c.tftp.unwrap();
        assert_eq!(
            (t.max_transfers_per_client, t.max_timeout),
            (Some(2), Some(Duration::from_secs(3)))
        );
        for (key, value, want) in [
            (
                "max_connections",
                "0",
                "agent.toml:16:19: max_connections must be at least 1",
            ),
            (
                "send_timeout",
                "\"0s\"",
                "agent.toml:16:16: send_timeout must be positive",
            ),
            (
                "idle_timeout",
                "\"soon\"",
                "agent.toml:16:16: invalid idle_timeout \"soon\"",
            ),
            // Found by the agent_config fuzz target: accepted, it made every
            // connection's watchdog panic computing its deadline.
            (
                "idle_timeout",
                "\"500000000000 years\"",
                "agent.toml:16:16: idle_timeout \"500000000000 years\" is longer than a year",
            ),
        ] {
            let bad = GOOD.replace(
                "listen = \"198.18.0.1:8080\"",
                &format!("listen = \"198.18.0.1:8080\"\n{key} = {value}"),
            );
            let e = AgentConfig::parse(&bad, Path::new("agent.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let bad = GOOD.replace(
            "listen = \"198.18.0.1:69\"",
            "listen = \"198.18.0.1:69\"\nmax_timeout = \"300s\"",
        );
        let e = AgentConfig::parse(&bad, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_timeout must be within 1s..=255s"), "{e}");
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
