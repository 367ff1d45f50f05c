//! `--ssh-key`: which OpenSSH key a lease carries for root on its hosts
//! (`lease acquire`, `run`) and which private key `lab ssh` offers.
//!
//! `--ssh-key FILE` names the public key (`FILE.pub` is tried when FILE is
//! the private key); `--ssh-key none` sends none. Without the option:
//! `~/.ssh/id_ed25519.pub`, else `~/.ssh/id_rsa.pub`, else no key. The
//! private key is the public key's path without `.pub`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lab_types::SshPublicKey;

/// What `--ssh-key` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SshKeyArg {
    /// `none`: no key.
    None,
    File(PathBuf),
}

/// clap value parser for `--ssh-key`.
pub fn parse_arg(s: &str) -> Result<SshKeyArg, String> {
    match s {
        "" => Err("give a public key file, or none".to_owned()),
        "none" => Ok(SshKeyArg::None),
        path => Ok(SshKeyArg::File(PathBuf::from(path))),
    }
}

/// The default public keys, in the order they are tried.
pub const DEFAULTS: [&str; 2] = [".ssh/id_ed25519.pub", ".ssh/id_rsa.pub"];

/// The public key file to use, if any: the one named (or `FILE.pub` for a
/// private key FILE), else the first default under `home` that exists.
pub fn public_path(arg: Option<&SshKeyArg>, home: Option<&Path>) -> Option<PathBuf> {
    match arg {
        Some(SshKeyArg::None) => None,
        Some(SshKeyArg::File(p)) => {
            let with_pub = PathBuf::from(format!("{}.pub", p.display()));
            if p.extension().is_none_or(|e| e != "pub") && with_pub.exists() {
                Some(with_pub)
            } else {
                Some(p.clone())
            }
        }
        None => {
            let home = home?;
            DEFAULTS.iter().map(|d| home.join(d)).find(|p| p.exists())
        }
    }
}

/// The private key beside a public key file (`id_ed25519.pub` →
/// `id_ed25519`).
pub fn private_path(public: &Path) -> PathBuf {
    match public.to_str().and_then(|s| s.strip_suffix(".pub")) {
        Some(p) => PathBuf::from(p),
        None => public.to_path_buf(),
    }
}

/// The user's home directory.
pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Reads and checks a public key file (the server checks again).
pub fn read_public(path: &Path) -> anyhow::Result<SshPublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the SSH public key {}", path.display()))?;
    let line = text.trim();
    if line.starts_with("-----BEGIN") {
        bail!(
            "{} is a private key: give the public key (the .pub file)",
            path.display()
        );
    }
    SshPublicKey::parse(line)
        .with_context(|| format!("{} is not an OpenSSH public key", path.display()))
}

/// The key a lease request carries, as its one line (`None`: no key).
pub fn for_request(arg: Option<&SshKeyArg>) -> anyhow::Result<Option<String>> {
    match public_path(arg, home().as_deref()) {
        Some(path) => Ok(Some(read_public(&path)?.to_string())),
        None => Ok(None),
    }
}

/// `ssh-ed25519 SHA256:… (comment)`: how a key is shown.
pub fn describe(line: &str) -> String {
    match SshPublicKey::parse(line) {
        Ok(k) if k.comment().is_empty() => format!("{} {}", k.key_type(), k.fingerprint()),
        Ok(k) => format!("{} {} ({})", k.key_type(), k.fingerprint(), k.comment()),
        Err(_) => "(unreadable)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";

    #[test]
    fn defaults_explicit_files_and_none() {
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        assert_eq!(public_path(None, Some(home.path())), None, "no key at all");
        std::fs::write(ssh.join("id_rsa.pub"), KEY).unwrap();
        assert_eq!(
            public_path(None, Some(home.path())),
            Some(ssh.join("id_rsa.pub"))
        );
        std::fs::write(ssh.join("id_ed25519.pub"), format!("{KEY}\n")).unwrap();
        let ed = ssh.join("id_ed25519.pub");
        assert_eq!(public_path(None, Some(home.path())), Some(ed.clone()));
        assert_eq!(public_path(Some(&SshKeyArg::None), Some(home.path())), None);
        // A private key's name finds its .pub beside it.
        let private = SshKeyArg::File(ssh.join("id_ed25519"));
        assert_eq!(public_path(Some(&private), None), Some(ed.clone()));
        assert_eq!(private_path(&ed), ssh.join("id_ed25519"));
        assert_eq!(read_public(&ed).unwrap().as_str(), KEY, "trimmed");
        assert_eq!(parse_arg("none"), Ok(SshKeyArg::None));
    }

    #[test]
    fn bad_key_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n").unwrap();
        let e = format!("{:#}", read_public(&p).unwrap_err());
        assert!(e.contains("is a private key"), "{e}");
        std::fs::write(&p, "ssh-foo AAAA").unwrap();
        let e = format!("{:#}", read_public(&p).unwrap_err());
        assert!(e.contains("unknown key type"), "{e}");
        let e = format!(
            "{:#}",
            read_public(&dir.path().join("gone.pub")).unwrap_err()
        );
        assert!(e.starts_with("cannot read the SSH public key"), "{e}");
    }

    #[test]
    fn keys_are_shown_by_fingerprint() {
        assert_eq!(
            describe(KEY),
            "ssh-ed25519 SHA256:Ta1rn4StT+nsdHkfjJcGU06FFLNR/RB6bfMEtDXcUEU (alice@ci)"
        );
        assert_eq!(describe("junk"), "(unreadable)");
    }
}
