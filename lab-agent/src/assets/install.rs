//! What the agent serves for an install to disk (docs/netboot.md,
//! "Installing to disk"): the lease metadata a host's installer reads
//! (`hosts/<mac>.lease`, [`lease_metadata`]), who may read it
//! ([`may_read_metadata`]), and the template variables `install.*`
//! ([`InstallVars`]) with the image's sha256, read from the artifacts
//! cache and kept until its file changes ([`ImageChecksum`]).

use super::render::InstallVars;
use crate::hosts::BootHost;
use std::net::IpAddr;
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

/// Whether `client` may read `host`'s metadata: the host's own inventory
/// address only, when it has one (cheap to check, and the only address
/// its installer gets from the agent's DHCP). A host without one (a
/// dynamic address) is readable by anyone on the boot network, like its
/// boot script; so is a request whose client is unknown.
pub fn may_read_metadata(host: &BootHost, client: Option<IpAddr>) -> bool {
    match (host.ipv4, client.map(|c| c.to_canonical())) {
        (Some(own), Some(IpAddr::V4(c))) => c == own,
        (Some(_), Some(IpAddr::V6(_))) => false,
        _ => true,
    }
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

    #[test]
    fn only_the_host_itself_reads_its_metadata() {
        let h = host(Some("L-1"));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert!(may_read_metadata(&h, ip("198.18.0.11")));
        assert!(may_read_metadata(&h, ip("::ffff:198.18.0.11")));
        assert!(!may_read_metadata(&h, ip("198.18.0.12")));
        assert!(!may_read_metadata(&h, ip("fe80::1")));
        let dynamic = BootHost { ipv4: None, ..h };
        assert!(may_read_metadata(&dynamic, ip("198.18.0.99")));
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
