//! What the agent serves for an install to disk (docs/netboot.md,
//! "Installing to disk"): the lease metadata a host's installer reads
//! (`hosts/<mac>.lease`, [`lease_metadata`]), who may read it
//! ([`metadata_for`] under a [`MetadataPolicy`]: only the host itself, at
//! the address the agent's DHCP or inventory gives it, and only while it is
//! leased under an installing profile), and the template variables `install.*`
//! ([`InstallVars`]) with the image's sha256, read from the artifacts
//! cache and kept until its file changes ([`ImageChecksum`]).

use super::OpenError;
use super::render::InstallVars;
use crate::dhcp::config::{DhcpConfig, Mode};
use crate::dhcp::decide::address_for;
use crate::hosts::{BootHost, HostTable};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The disk image in the artifacts cache (`pxe-assets/build-image.sh`),
/// the template's default `install.image_url`.
pub const IMAGE: &str = "xenlab-amd64.img.zst";
/// Its checksum file: `<64 hex>  xenlab-amd64.img.zst`, the sha256 of the
/// compressed bytes (what an HTTP GET of the image returns).
pub const IMAGE_SHA256: &str = "xenlab-amd64.img.zst.sha256";

/// The lease metadata of `host` (`KEY=VALUE` lines the installer checks
/// and the installed system reads), or `None` when it has no lease.
/// Every value is printable ASCII, as the installer requires: the names
/// are validated names, and an SSH key's comment that is not ASCII is
/// left out (the key works without it).
pub fn lease_metadata(host: &BootHost) -> Option<String> {
    let lease = host.lease.as_deref().filter(|l| !l.is_empty())?;
    let mut s = format!(
        "# lab lease metadata (docs/netboot.md \"Lease metadata\")\n\
         LAB_HOST={}\nLAB_LEASE={lease}\n",
        host.name
    );
    if let Some(holder) = &host.holder {
        s.push_str(&format!("LAB_HOLDER={holder}\n"));
    }
    if let Some(key) = &host.ssh_key {
        let printable = |t: &str| t.bytes().all(|b| (0x20..=0x7e).contains(&b));
        let mut parts = key.splitn(3, ' ');
        let (kind, body) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let line = match parts.next() {
            Some(comment) if printable(comment) => format!("{kind} {body} {comment}"),
            _ => format!("{kind} {body}"),
        };
        if printable(&line) {
            s.push_str(&format!("LAB_SSH_KEY={line}\n"));
        }
    }
    Some(s)
}

/// Which hosts' lease metadata the agent serves, and to whom
/// (docs/netboot.md "Lease metadata"), from `agent.toml`.
#[derive(Debug, Clone, Default)]
pub struct MetadataPolicy {
    /// The profiles with `install = true`: only a host leased under one of
    /// them has metadata. Empty (the default): nobody's is served.
    pub install_profiles: BTreeSet<String>,
    /// The agent's DHCP configuration when it hands out addresses
    /// (authoritative mode): a host without an inventory address is then
    /// reached at its pool address ([`address_for`]). `None`, or proxy
    /// mode: only inventory addresses are known.
    pub dhcp: Option<DhcpConfig>,
}

impl MetadataPolicy {
    /// The address the agent's DHCP gives `host` (its inventory address,
    /// else its pool address), the only one its metadata is served to.
    pub fn address_of(&self, host: &BootHost, hosts: &HostTable) -> Option<Ipv4Addr> {
        match &self.dhcp {
            Some(cfg) if cfg.mode == Mode::Authoritative => address_for(host, hosts, cfg),
            _ => host.ipv4,
        }
    }
}

/// Why a metadata read is refused ([`metadata_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MetadataRefusal {
    /// The agent does not know the host's address (no inventory address,
    /// and no pool address from its own DHCP): nobody may read it.
    #[error("the host's address is unknown to the agent")]
    NoAddress,
    /// The request came from another address (or an unknown one).
    #[error("lease metadata is for the host's own address")]
    OtherAddress,
    /// The host is not leased under an installing profile.
    #[error("the host is not installing under a lease")]
    NotInstalling,
}

impl MetadataRefusal {
    /// As the file servers answer it: the host's own address gets "not
    /// found" when there is nothing for it, anyone else "forbidden".
    pub fn open_error(self) -> OpenError {
        match self {
            MetadataRefusal::NotInstalling => OpenError::NotFound,
            MetadataRefusal::NoAddress => {
                OpenError::Forbidden("lease metadata needs the host's address")
            }
            MetadataRefusal::OtherAddress => {
                OpenError::Forbidden("lease metadata is for the host's own address")
            }
        }
    }
}

/// The decision on a read of `host`'s metadata by `client`, whose own
/// address is `own` (its DHCP/inventory address, [`MetadataPolicy::address_of`])
/// and which is `installing` when it is leased under a profile with
/// `install = true`. The address is checked first, so a stranger learns
/// nothing about the host's lease. IPv4-mapped IPv6 clients count as IPv4.
pub fn metadata_for(
    host: &BootHost,
    own: Option<Ipv4Addr>,
    client: Option<IpAddr>,
    installing: bool,
) -> Result<String, MetadataRefusal> {
    let own = own.ok_or(MetadataRefusal::NoAddress)?;
    match client.map(|c| c.to_canonical()) {
        Some(IpAddr::V4(c)) if c == own => {}
        _ => return Err(MetadataRefusal::OtherAddress),
    }
    if !installing {
        return Err(MetadataRefusal::NotInstalling);
    }
    lease_metadata(host).ok_or(MetadataRefusal::NotInstalling)
}

/// The `install.*` variables of `host`: the image's sha256 and, when it is
/// leased and the agent serves HTTP, its metadata URL.
pub fn install_vars(
    host: &BootHost,
    http_url: Option<&str>,
    image_sha256: Option<String>,
) -> InstallVars {
    let metadata_url = match (http_url, host.lease.as_deref()) {
        (Some(url), Some(l)) if !l.is_empty() => Some(format!(
            "{}/hosts/{}.lease",
            url.trim_end_matches('/'),
            host.mac.hyphenated()
        )),
        _ => None,
    };
    InstallVars {
        image_sha256,
        metadata_url,
        ..InstallVars::default()
    }
}

/// The image's sha256 from [`IMAGE_SHA256`] in the artifacts cache, read
/// again only when the file's modification time or length changes
/// (`build-image.sh` replaces it last, after the image).
#[derive(Debug)]
pub struct ImageChecksum {
    path: PathBuf,
    cached: Mutex<Option<Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    modified: SystemTime,
    len: u64,
    sha256: Option<String>,
}

impl ImageChecksum {
    /// The checksum file in `artifacts`.
    pub fn new(artifacts: &Path) -> Self {
        ImageChecksum {
            path: artifacts.join(IMAGE_SHA256),
            cached: Mutex::new(None),
        }
    }

    /// The sha256 (64 lower-case hex digits), or `None` when the file is
    /// missing or does not hold one. Blocking (a `stat`, and a read when it
    /// changed).
    pub fn get(&self) -> Option<String> {
        let meta = std::fs::metadata(&self.path).ok()?;
        let (modified, len) = (meta.modified().ok()?, meta.len());
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref()
            && c.modified == modified
            && c.len == len
        {
            return c.sha256.clone();
        }
        let sha256 = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|text| parse_sha256(&text));
        if sha256.is_none() {
            tracing::warn!(path = %self.path.display(), "no sha256 in the image's checksum file");
        }
        *cached = Some(Cached {
            modified,
            len,
            sha256: sha256.clone(),
        });
        sha256
    }
}

/// The first word of a `sha256sum` line, if it is 64 hex digits.
pub fn parse_sha256(text: &str) -> Option<String> {
    let word = text.split_whitespace().next()?;
    (word.len() == 64 && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| word.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{Arch, Firmware};

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI";

    fn host(lease: Option<&str>) -> BootHost {
        BootHost {
            name: "h1".into(),
            mac: "52:54:00:00:01:01".parse().unwrap(),
            ipv4: Some("198.18.0.11".parse().unwrap()),
            arch: Arch::X86_64,
            firmware: Firmware::Bios,
            profile: "xen-install".into(),
            lease: lease.map(Into::into),
            holder: Some("alice".into()),
            ssh_key: Some(format!("{KEY} alice@ci")),
        }
    }

    #[test]
    fn metadata_of_a_leased_host_only() {
        assert_eq!(lease_metadata(&host(None)), None);
        assert_eq!(
            lease_metadata(&host(Some("L-1"))).unwrap(),
            format!(
                "# lab lease metadata (docs/netboot.md \"Lease metadata\")\n\
                 LAB_HOST=h1\nLAB_LEASE=L-1\nLAB_HOLDER=alice\nLAB_SSH_KEY={KEY} alice@ci\n"
            )
        );
        // A comment the installer would refuse is left out; no holder, no
        // key: no lines for them.
        let h = BootHost {
            ssh_key: Some(format!("{KEY} \u{e9}lodie@ci")),
            ..host(Some("L-1"))
        };
        assert!(
            lease_metadata(&h)
                .unwrap()
                .ends_with(&format!("LAB_SSH_KEY={KEY}\n"))
        );
        let h = BootHost {
            holder: None,
            ssh_key: None,
            ..host(Some("L-1"))
        };
        assert!(
            lease_metadata(&h)
                .unwrap()
                .ends_with("LAB_HOST=h1\nLAB_LEASE=L-1\n")
        );
    }

    /// Every reader × host state: only the host's own address, only while
    /// it is installing under a lease; a stranger learns nothing more.
    #[test]
    fn only_the_host_itself_reads_its_metadata() {
        use MetadataRefusal::*;
        let own = Some("198.18.0.11".parse::<Ipv4Addr>().unwrap());
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let leased = host(Some("L-1"));
        let free = host(None);
        type Row<'a> = (
            &'a BootHost,
            Option<Ipv4Addr>,
            Option<IpAddr>,
            bool,
            Result<(), MetadataRefusal>,
        );
        let table: [Row; 11] = [
            (&leased, own, ip("198.18.0.11"), true, Ok(())),
            (&leased, own, ip("::ffff:198.18.0.11"), true, Ok(())),
            (&leased, own, ip("198.18.0.12"), true, Err(OtherAddress)),
            (&leased, own, ip("fe80::1"), true, Err(OtherAddress)),
            (&leased, own, None, true, Err(OtherAddress)),
            (&leased, None, ip("198.18.0.11"), true, Err(NoAddress)),
            (&leased, None, None, true, Err(NoAddress)),
            // Leased under a profile that does not install.
            (&leased, own, ip("198.18.0.11"), false, Err(NotInstalling)),
            (&leased, own, ip("198.18.0.12"), false, Err(OtherAddress)),
            // Not leased.
            (&free, own, ip("198.18.0.11"), true, Err(NotInstalling)),
            (&free, own, ip("198.18.0.12"), true, Err(OtherAddress)),
        ];
        for (h, own, client, installing, want) in table {
            let got = metadata_for(h, own, client, installing);
            assert_eq!(
                got.as_ref().map(|_| ()).map_err(|e| *e),
                want,
                "{own:?} {client:?} installing={installing} lease={:?}",
                h.lease
            );
            if let Ok(text) = got {
                assert_eq!(Some(text), lease_metadata(h));
            }
        }
        assert!(matches!(NotInstalling.open_error(), OpenError::NotFound));
        assert!(matches!(OtherAddress.open_error(), OpenError::Forbidden(_)));
        assert!(matches!(NoAddress.open_error(), OpenError::Forbidden(_)));
    }

    /// The address a host's metadata goes to: its inventory address, else
    /// its DHCP pool address when the agent's DHCP is authoritative.
    #[test]
    fn the_readers_address_is_the_dhcp_one() {
        let fixed = host(Some("L-1"));
        let dynamic = BootHost {
            name: "h2".into(),
            mac: "52:54:00:00:01:02".parse().unwrap(),
            ipv4: None,
            ..host(Some("L-2"))
        };
        let hosts = HostTable::new([fixed.clone(), dynamic.clone()]);
        let server = "198.18.0.1".parse().unwrap();
        let mut dhcp = DhcpConfig::new(Mode::Authoritative, server);
        dhcp.pool = vec![
            "198.18.0.11".parse().unwrap(),
            "198.18.0.50".parse().unwrap(),
        ];
        let mut policy = MetadataPolicy::default();
        assert_eq!(policy.address_of(&fixed, &hosts), fixed.ipv4);
        assert_eq!(policy.address_of(&dynamic, &hosts), None, "no DHCP");
        policy.dhcp = Some(dhcp.clone());
        assert_eq!(policy.address_of(&fixed, &hosts), fixed.ipv4);
        // The pool's first address is h1's static one: skipped.
        assert_eq!(
            policy.address_of(&dynamic, &hosts),
            Some("198.18.0.50".parse().unwrap())
        );
        dhcp.mode = Mode::Proxy;
        policy.dhcp = Some(dhcp);
        assert_eq!(policy.address_of(&dynamic, &hosts), None, "proxy DHCP");
    }

    #[test]
    fn install_variables() {
        let v = install_vars(
            &host(Some("L-1")),
            Some("http://198.18.0.1:8080/"),
            Some("ab".repeat(32)),
        );
        assert_eq!(
            v.metadata_url.as_deref(),
            Some("http://198.18.0.1:8080/hosts/52-54-00-00-01-01.lease")
        );
        assert_eq!(v.image_sha256, Some("ab".repeat(32)));
        let v = install_vars(&host(None), Some("http://a"), None);
        assert_eq!(v, InstallVars::default());
        assert_eq!(
            install_vars(&host(Some("L-1")), None, None).metadata_url,
            None
        );
    }

    #[test]
    fn the_checksum_is_read_again_only_when_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let c = ImageChecksum::new(dir.path());
        assert_eq!(c.get(), None, "no file");
        let path = dir.path().join(IMAGE_SHA256);
        let a = "A".repeat(64);
        std::fs::write(&path, format!("{a}  {IMAGE}\n")).unwrap();
        assert_eq!(c.get(), Some("a".repeat(64)));
        // Same length, same modification time: the cached value.
        let t = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, format!("{}  {IMAGE}\n", "b".repeat(64))).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(t).unwrap();
        assert_eq!(c.get(), Some("a".repeat(64)));
        f.set_modified(t + std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(c.get(), Some("b".repeat(64)));
        std::fs::write(&path, "not a checksum\n").unwrap();
        assert_eq!(c.get(), None);
        assert_eq!(parse_sha256(&"0".repeat(63)), None);
        assert_eq!(parse_sha256(&format!("{}g", "0".repeat(63))), None);
    }
}
