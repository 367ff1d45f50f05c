//! Rendering of boot profiles: the `pxe-assets/profiles/*.j2` templates
//! turned into one host's iPXE script (and, for profiles that have one, its
//! installer preseed and its GRUB config) with [`minijinja`].
//!
//! A profile `NAME` is the template `NAME.ipxe.j2`; `NAME.preseed.j2`, if
//! present, is its preseed; `NAME.grub.j2`, if present, is what GRUB hosts
//! (aarch64 UEFI) source instead of the iPXE script — a profile without one
//! gets a GRUB config that reports it. Templates see these variables (see
//! `pxe-assets/README.md`):
//!
//! | variable | value |
//! |---|---|
//! | `host.name`, `host.mac`, `host.mac_hyphen` | `node1`, `52:54:00:ab:cd:01`, `52-54-00-ab-cd-01` |
//! | `host.ipv4` | the host's address, or `""` |
//! | `host.arch`, `host.firmware` | `x86_64` / `aarch64`, `bios` / `uefi` |
//! | `lease` | the lease id, or `""` |
//! | `profile` | the profile name |
//! | `agent.http_url`, `agent.tftp_server` | the agent's HTTP base URL and TFTP address, or `""` |
//! | `artifacts_url` | where the `artifacts/` tree is served (see [`RenderConfig::artifacts_url`]) |
//! | `install.*` | per host, for a profile that installs to disk ([`InstallVars`]); undefined when the agent has none |
//! | `grub_artifacts` | the same tree as a GRUB path: `/artifacts` over GRUB's TFTP, or `(http,HOST:PORT)/artifacts` over the agent's HTTP with [`RenderConfig::grub_http`] (see [`RenderConfig::grub_artifacts`]) |
//! | `extra.*` | free-form strings from the agent's config |
//!
//! Undefined variables are errors ([`UndefinedBehavior::Strict`]), reported
//! with the template, line and expression; a template may still write
//! `extra.x | default("…")` or `extra.x is defined`.

use crate::hosts::{Arch, BootHost, Firmware};
use minijinja::{Environment, UndefinedBehavior, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The suffix of a profile's iPXE template.
pub const SCRIPT_SUFFIX: &str = ".ipxe.j2";
/// The suffix of a profile's preseed template.
pub const PRESEED_SUFFIX: &str = ".preseed.j2";
/// The suffix of a profile's GRUB config template.
pub const GRUB_SUFFIX: &str = ".grub.j2";

/// Agent-wide values every template sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderConfig {
    /// The agent's HTTP base URL as hosts reach it (`http://198.18.0.1:8080`),
    /// without a trailing `/`; `None` if HTTP is not served.
    pub http_url: Option<String>,
    /// The agent's TFTP address as hosts reach it.
    pub tftp_server: Option<IpAddr>,
    /// Overrides where artifacts are fetched from.
    pub artifacts_url: Option<String>,
    /// GRUB hosts load their files from `artifacts_url` with GRUB's `http`
    /// module rather than from its TFTP server (`agent.toml`: `[http]
    /// grub = true`). Off by default: GRUB 2.06's TCP sends no MSS option
    /// (so Linux sends it 536-byte segments) and keeps an 8 KiB window, and
    /// under QEMU TCG that moved the kernel at about half the speed of its
    /// 1024-byte lockstep TFTP (docs/netboot.md, "GRUB over HTTP").
    pub grub_http: bool,
    /// Free-form variables from the config, visible as `extra.NAME`.
    pub extra: BTreeMap<String, String>,
}

impl RenderConfig {
    /// `artifacts_url` if set, else `<http_url>/artifacts`, else
    /// `tftp://<tftp_server>/artifacts`, else `tftp://${next-server}/artifacts`
    /// (which iPXE expands itself).
    pub fn artifacts_url(&self) -> String {
        if let Some(u) = &self.artifacts_url {
            return u.trim_end_matches('/').to_owned();
        }
        if let Some(u) = &self.http_url {
            return format!("{}/artifacts", u.trim_end_matches('/'));
        }
        match self.tftp_server {
            Some(IpAddr::V6(a)) => format!("tftp://[{a}]/artifacts"),
            Some(a) => format!("tftp://{a}/artifacts"),
            None => "tftp://${next-server}/artifacts".to_owned(),
        }
    }

    /// Where GRUB (aarch64 UEFI hosts) loads the `artifacts/` tree from, as a
    /// GRUB path: with [`grub_http`](Self::grub_http),
    /// [`artifacts_url`](Self::artifacts_url) through GRUB's `http` module
    /// (`(http,198.18.0.1:8080)/artifacts`) if it is an `http://` URL GRUB
    /// can fetch (see [`grub_http_path`]); otherwise `/artifacts` on the
    /// TFTP server GRUB itself came from.
    pub fn grub_artifacts(&self) -> String {
        self.grub_http
            .then(|| grub_http_path(&self.artifacts_url()))
            .flatten()
            .unwrap_or_else(|| "/artifacts".to_owned())
    }
}

/// `http://HOST[:PORT][/PATH]` as the GRUB path `(http,HOST[:PORT])/PATH`
/// (GRUB 2.06's `http` module; without a port it uses 80). `None` for what
/// that module cannot fetch or the device syntax cannot carry: another
/// scheme (`https`, `tftp`), user info, a query or fragment, an IPv6
/// literal, a host or port with other characters than letters, digits,
/// `.` and `-`.
pub fn grub_http_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    if rest.contains(['?', '#', '@', ',', '(', ')', ' ', '\\']) {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !host_ok {
        return None;
    }
    let device = match port {
        Some(p) => {
            let port: u16 = p.parse().ok().filter(|&n| n != 0)?;
            format!("(http,{host}:{port})")
        }
        None => format!("(http,{host})"),
    };
    Some(format!("{device}{}", path.trim_end_matches('/')))
}

/// Per-host variables of a profile that installs to disk (`install.*`,
/// docs/netboot.md "Template variables"). Only the values present are
/// defined; with none, `install` itself is undefined and the template
/// uses its defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallVars {
    pub image_url: Option<String>,
    /// The sha256 of the bytes at the image URL.
    pub image_sha256: Option<String>,
    /// The host's lease metadata (`<http_url>/hosts/<mac-hyphen>.lease`).
    pub metadata_url: Option<String>,
    pub disk: Option<String>,
    pub then: Option<String>,
}

impl InstallVars {
    fn value(&self) -> Option<Value> {
        let map: BTreeMap<&str, Value> = [
            ("image_url", &self.image_url),
            ("image_sha256", &self.image_sha256),
            ("metadata_url", &self.metadata_url),
            ("disk", &self.disk),
            ("then", &self.then),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, Value::from(v.clone()?))))
        .collect();
        (!map.is_empty()).then(|| Value::from(map))
    }
}

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read profile templates in {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read template {}", path.display())]
    ReadTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {template} does not parse")]
    Parse {
        template: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("unknown boot profile {profile:?} (known: {known})")]
    UnknownProfile { profile: String, known: String },
    #[error("template {template} line {line}: undefined variable `{variable}`")]
    Undefined {
        template: String,
        variable: String,
        line: usize,
    },
    #[error("template {template} failed to render")]
    Render {
        template: String,
        #[source]
        source: minijinja::Error,
    },
}

/// The parsed profile templates of one `profiles/` directory.
#[derive(Debug)]
pub struct Profiles {
    env: Environment<'static>,
    dir: PathBuf,
    profiles: Vec<String>,
}

impl Profiles {
    /// Parse every `*.j2` file in `dir` (normally `pxe-assets/profiles`).
    pub fn load(dir: &Path) -> Result<Self, RenderError> {
        let read_dir = |source| RenderError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_debug(true);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let entry = entry.map_err(read_dir)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.ends_with(".j2") {
                names.push(name);
            }
        }
        names.sort();
        let mut profiles = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let source =
                std::fs::read_to_string(&path).map_err(|source| RenderError::ReadTemplate {
                    path: path.clone(),
                    source,
                })?;
            if let Some(profile) = name.strip_suffix(SCRIPT_SUFFIX) {
                profiles.push(profile.to_owned());
            }
            env.add_template_owned(name.clone(), source)
                .map_err(|source| RenderError::Parse {
                    template: name,
                    source,
                })?;
        }
        Ok(Self {
            env,
            dir: dir.to_owned(),
            profiles,
        })
    }

    /// The directory the templates came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Profile names (those with a `NAME.ipxe.j2`), sorted.
    pub fn names(&self) -> &[String] {
        &self.profiles
    }

    /// Every template file name (`xen.ipxe.j2`, `xen-install.preseed.j2`, …).
    pub fn templates(&self) -> Vec<String> {
        self.env
            .templates()
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// The iPXE script for `host` under its current profile.
    pub fn script(&self, host: &BootHost, config: &RenderConfig) -> Result<String, RenderError> {
        self.script_with(host, config, &InstallVars::default())
    }

    /// The iPXE script for `host` under its current profile, with the
    /// host's `install.*` variables.
    pub fn script_with(
        &self,
        host: &BootHost,
        config: &RenderConfig,
        install: &InstallVars,
    ) -> Result<String, RenderError> {
        self.known(&host.profile)?;
        let template = format!("{}{SCRIPT_SUFFIX}", host.profile);
        self.render_in(&template, context_with(host, config, install))
    }

    /// The preseed for `host` under its current profile; `None` if the
    /// profile has no preseed template.
    pub fn preseed(
        &self,
        host: &BootHost,
        config: &RenderConfig,
    ) -> Result<Option<String>, RenderError> {
        self.known(&host.profile)?;
        let name = format!("{}{PRESEED_SUFFIX}", host.profile);
        if self.env.get_template(&name).is_err() {
            return Ok(None);
        }
        self.render(&name, host, config).map(Some)
    }

    /// The GRUB config for `host` under its current profile (sourced by
    /// `pxe-assets/grub/grub.cfg`). A profile without a GRUB template gets
    /// a config that marks the host known (`lab_host=1`) and says why it
    /// cannot boot, so GRUB does not report a missing host.
    pub fn grub(&self, host: &BootHost, config: &RenderConfig) -> Result<String, RenderError> {
        self.known(&host.profile)?;
        let template = format!("{}{GRUB_SUFFIX}", host.profile);
        if self.env.get_template(&template).is_ok() {
            return self.render(&template, host, config);
        }
        let lease = host
            .lease
            .as_deref()
            .filter(|l| !l.is_empty())
            .unwrap_or("-");
        Ok(format!(
            "# lab host={name} mac={mac} profile={profile} lease={lease}\n\
             set lab_host=1\n\
             echo \"LAB-GRUB profile={profile} host={name} lease={lease}\"\n\
             echo \"LAB-BOOT-FAILED profile={profile} has no GRUB template ({template})\"\n",
            name = host.name,
            mac = host.mac,
            profile = host.profile,
        ))
    }

    /// Render any loaded template by file name for `host`.
    pub fn render(
        &self,
        template: &str,
        host: &BootHost,
        config: &RenderConfig,
    ) -> Result<String, RenderError> {
        self.render_in(template, context(host, config))
    }

    fn render_in(&self, template: &str, ctx: Value) -> Result<String, RenderError> {
        let tmpl = self
            .env
            .get_template(template)
            .map_err(|source| RenderError::Render {
                template: template.to_owned(),
                source,
            })?;
        tmpl.render(ctx).map_err(|e| classify(template, e))
    }

    fn known(&self, profile: &str) -> Result<(), RenderError> {
        if self.profiles.iter().any(|p| p == profile) {
            Ok(())
        } else {
            Err(RenderError::UnknownProfile {
                profile: profile.to_owned(),
                known: self.profiles.join(", "),
            })
        }
    }
}

/// The template context for one host (no `install.*`).
pub fn context(host: &BootHost, config: &RenderConfig) -> Value {
    context_with(host, config, &InstallVars::default())
}

/// The template context for one host with its `install.*` variables.
pub fn context_with(host: &BootHost, config: &RenderConfig, install: &InstallVars) -> Value {
    let s = |v: &str| Value::from(v.to_owned());
    let host_v: BTreeMap<&str, Value> = BTreeMap::from([
        ("name", s(&host.name)),
        ("mac", Value::from(host.mac.to_string())),
        ("mac_hyphen", Value::from(host.mac.hyphenated())),
        (
            "ipv4",
            Value::from(host.ipv4.map(|a| a.to_string()).unwrap_or_default()),
        ),
        (
            "arch",
            s(match host.arch {
                Arch::X86_64 => "x86_64",
                Arch::Aarch64 => "aarch64",
            }),
        ),
        (
            "firmware",
            s(match host.firmware {
                Firmware::Bios => "bios",
                Firmware::Uefi => "uefi",
            }),
        ),
    ]);
    let agent: BTreeMap<&str, Value> = BTreeMap::from([
        (
            "http_url",
            Value::from(
                config
                    .http_url
                    .as_deref()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .unwrap_or_default(),
            ),
        ),
        (
            "tftp_server",
            Value::from(
                config
                    .tftp_server
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
        ),
    ]);
    let extra: BTreeMap<String, Value> = config
        .extra
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
        ("host", Value::from(host_v)),
        ("lease", Value::from(host.lease.clone().unwrap_or_default())),
        ("profile", s(&host.profile)),
        ("agent", Value::from(agent)),
        ("artifacts_url", Value::from(config.artifacts_url())),
        ("grub_artifacts", Value::from(config.grub_artifacts())),
        ("extra", Value::from(extra)),
    ]);
    if let Some(install) = install.value() {
        ctx.insert("install", install);
    }
    Value::from(ctx)
}

/// Turn minijinja's undefined-value error into one naming the expression.
fn classify(template: &str, e: minijinja::Error) -> RenderError {
    if e.kind() == minijinja::ErrorKind::UndefinedError {
        let variable = match (e.template_source(), e.range()) {
            (Some(src), Some(r)) => src.get(r).unwrap_or("?").trim().to_owned(),
            _ => e.detail().unwrap_or("?").to_owned(),
        };
        return RenderError::Undefined {
            template: template.to_owned(),
            variable,
            line: e.line().unwrap_or(0),
        };
    }
    RenderError::Render {
        template: template.to_owned(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_http_paths() {
        for (url, want) in [
            (
                "http://198.18.0.1:8080/artifacts",
                Some("(http,198.18.0.1:8080)/artifacts"),
            ),
            (
                "http://boot.lab/artifacts",
                Some("(http,boot.lab)/artifacts"),
            ),
            (
                "http://boot-1.lab:80/pxe/artifacts/",
                Some("(http,boot-1.lab:80)/pxe/artifacts"),
            ),
            ("http://10.0.0.1", Some("(http,10.0.0.1)")),
            // What GRUB 2.06's http module cannot fetch, or its device
            // syntax cannot carry: TFTP stays.
            ("https://198.18.0.1/artifacts", None),
            ("tftp://198.18.0.1/artifacts", None),
            ("tftp://${next-server}/artifacts", None),
            ("http://[fd00::1]:8080/artifacts", None),
            ("http://user@host/artifacts", None),
            ("http://host/artifacts?x=1", None),
            ("http://host:0/artifacts", None),
            ("http://host:65536/artifacts", None),
            ("http://host:/artifacts", None),
            ("http:///artifacts", None),
            ("http://ho,st/artifacts", None),
            ("http://host/arti facts", None),
        ] {
            assert_eq!(grub_http_path(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn grub_artifacts_follow_artifacts_url() {
        let http = RenderConfig {
            http_url: Some("http://198.18.0.1:8080/".into()),
            tftp_server: Some("198.18.0.1".parse().unwrap()),
            grub_http: true,
            ..RenderConfig::default()
        };
        assert_eq!(http.grub_artifacts(), "(http,198.18.0.1:8080)/artifacts");
        // Not asked for: GRUB's TFTP, although the agent serves HTTP.
        let off = RenderConfig {
            grub_http: false,
            ..http.clone()
        };
        assert_eq!(off.grub_artifacts(), "/artifacts");
        // An override wins, as for iPXE.
        let mirror = RenderConfig {
            artifacts_url: Some("http://mirror.lab/boot/".into()),
            ..http.clone()
        };
        assert_eq!(mirror.grub_artifacts(), "(http,mirror.lab)/boot");
        // No HTTP: the TFTP server GRUB came from.
        let tftp = RenderConfig {
            http_url: None,
            ..http
        };
        assert_eq!(tftp.grub_artifacts(), "/artifacts");
        assert_eq!(RenderConfig::default().grub_artifacts(), "/artifacts");
    }
}
