//! [`BootFiles`]: everything the agent serves to booting hosts, over TFTP
//! and HTTP alike.
//!
//! - `hosts/<mac>.ipxe` (MAC hyphenated, as iPXE's `${net0/mac:hexhyp}`):
//!   rendered on each request from the host's *current* profile in the
//!   [`HostTable`]; an unknown MAC is not found.
//!   Its `install.*` variables ([`install::install_vars`]): the install
//!   image's sha256 (from the artifacts cache) and the host's metadata URL.
//! - `hosts/<mac>.lease` (MAC hyphenated): the lease metadata of an install
//!   to disk ([`install::lease_metadata`]: host, lease, holder, SSH key),
//!   served only to the host's own address (inventory, else its DHCP pool
//!   address) and only while it is leased under a profile with
//!   `install = true` ([`install::metadata_for`], [`MetadataPolicy`]).
//! - `hosts/<mac>.preseed`: the profile's preseed, if it has one.
//! - `hosts/<mac>.grub`: the profile's GRUB config, for aarch64 UEFI hosts
//!   that boot GRUB (`pxe-assets/grub/grub.cfg` sources it); the MAC as
//!   GRUB's `$net_default_mac` prints it (`52:54:00:aa:00:01`) or hyphenated.
//! - `artifacts/…`: the artifacts cache (Xen, kernels, iPXE binaries; see
//!   `pxe-assets/fetch-artifacts.sh`), a second confined [`DirRoot`].
//! - everything else: the `pxe-assets` directory, confined.

use super::install::{self, ImageChecksum, MetadataPolicy, MetadataRefusal};
use super::render::{Profiles, RenderConfig, RenderError};
use super::root::DirRoot;
use super::{Content, FileSource, OpenError};
use crate::hosts::{HostTable, MacAddr};
use crate::ratelimit::{DEFAULT_LOG_INTERVAL, LogLimiter};
use std::net::IpAddr;
use std::path::{Component, Path};

/// The boot content of one agent.
#[derive(Debug)]
pub struct BootFiles {
    assets: DirRoot,
    artifacts: Option<DirRoot>,
    profiles: Profiles,
    hosts: HostTable,
    config: RenderConfig,
    /// The install image's sha256, if there is an artifacts cache.
    image_sha256: Option<ImageChecksum>,
    /// Whose lease metadata is served, to whom.
    metadata: MetadataPolicy,
    /// Refused metadata reads: one log line per interval.
    metadata_refused: LogLimiter,
}

/// Why [`BootFiles`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootFilesError {
    #[error("cannot open asset directory {}", path.display())]
    Root {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load boot profiles")]
    Profiles(#[source] RenderError),
}

impl BootFiles {
    /// `assets` is the `pxe-assets` directory (templates in its `profiles/`);
    /// `artifacts`, if given, is served under `artifacts/`.
    pub fn new(
        assets: &Path,
        artifacts: Option<&Path>,
        hosts: HostTable,
        config: RenderConfig,
    ) -> Result<Self, BootFilesError> {
        let root = |path: &Path| {
            DirRoot::new(path).map_err(|source| BootFilesError::Root {
                path: path.to_owned(),
                source,
            })
        };
        let assets = root(assets)?;
        let image_sha256 = artifacts.map(ImageChecksum::new);
        let artifacts = artifacts.map(root).transpose()?;
        let profiles =
            Profiles::load(&assets.path().join("profiles")).map_err(BootFilesError::Profiles)?;
        Ok(Self {
            assets,
            artifacts,
            profiles,
            hosts,
            config,
            image_sha256,
            metadata: MetadataPolicy::default(),
            metadata_refused: LogLimiter::new(DEFAULT_LOG_INTERVAL),
        })
    }

    /// Serve lease metadata under `policy` (the default serves none).
    pub fn with_metadata_policy(mut self, policy: MetadataPolicy) -> Self {
        self.metadata = policy;
        self
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// A generated per-host file, or `None` if `file` is not one.
    fn host_file(&self, file: &str, client: Option<IpAddr>) -> Option<Result<Content, OpenError>> {
        let (mac, kind) = file.rsplit_once('.')?;
        if !matches!(kind, "ipxe" | "preseed" | "grub" | "lease") {
            return None;
        }
        // iPXE sends the hyphenated form, GRUB the one with colons; anything
        // else is a plain file.
        if mac.len() != 17 || (mac.contains(':') && kind != "grub") {
            return None;
        }
        let mac: MacAddr = mac.parse().ok()?;
        let Some(host) = self.hosts.by_mac(&mac) else {
            return Some(Err(OpenError::NotFound));
        };
        if kind == "lease" {
            let own = self.metadata.address_of(&host, &self.hosts);
            let installing =
                host.lease.is_some() && self.metadata.install_profiles.contains(&host.profile);
            return Some(
                match install::metadata_for(&host, own, client, installing) {
                    Ok(text) => Ok(Content::Bytes(text.into_bytes())),
                    Err(refusal) => {
                        if refusal != MetadataRefusal::NotInstalling
                            && let Some(count) = self.metadata_refused.check()
                        {
                            tracing::warn!(
                                host = %host.name,
                                client = ?client,
                                count,
                                reason = %refusal,
                                "lease metadata refused"
                            );
                        }
                        Err(refusal.open_error())
                    }
                },
            );
        }
        let rendered = match kind {
            "ipxe" => {
                let sha256 = self.image_sha256.as_ref().and_then(ImageChecksum::get);
                let vars = install::install_vars(&host, self.config.http_url.as_deref(), sha256);
                self.profiles
                    .script_with(&host, &self.config, &vars)
                    .map(Some)
            }
            "grub" => self.profiles.grub(&host, &self.config).map(Some),
            _ => self.profiles.preseed(&host, &self.config),
        };
        Some(match rendered {
            Ok(Some(text)) => Ok(Content::Bytes(text.into_bytes())),
            Ok(None) => Err(OpenError::NotFound),
            Err(e) => {
                tracing::error!(
                    host = %host.name,
                    mac = %mac,
                    profile = %host.profile,
                    error = &e as &dyn std::error::Error,
                    "cannot render boot file"
                );
                Err(OpenError::Io(std::io::Error::other(e)))
            }
        })
    }
}

impl FileSource for BootFiles {
    fn open(&self, path: &str, client: Option<IpAddr>) -> Result<Content, OpenError> {
        let rel = DirRoot::normalize(path)?;
        let mut parts = rel.components().filter_map(|c| match c {
            Component::Normal(p) => p.to_str(),
            _ => None,
        });
        match (parts.next(), parts.next(), parts.next()) {
            (Some("hosts"), Some(file), None) => {
                if let Some(result) = self.host_file(file, client) {
                    return result;
                }
            }
            (Some("artifacts"), Some(_), _) => {
                let Some(artifacts) = &self.artifacts else {
                    return Err(OpenError::NotFound);
                };
                let rest = rel
                    .strip_prefix("artifacts")
                    .map_err(|_| OpenError::NotFound)?;
                return artifacts.open(rest.to_str().ok_or(OpenError::NotFound)?, client);
            }
            _ => {}
        }
        self.assets.open(path, client)
    }
}
