//! [`SshPublicKey`]: an OpenSSH public key as a lease carries it for root on
//! its hosts (`ssh-ed25519 AAAA… comment`), validated where it enters (the
//! server's request conversion) and again where it is used (the agent), and
//! shown by its type and SHA-256 fingerprint, as `ssh-keygen -l` prints it.
//!
//! The key ends up in root's `authorized_keys` on an installed host, so the
//! rules are strict: one line of printable characters, at most
//! [`MAX_LEN`] bytes, a known key type first (so no `authorized_keys`
//! options such as `command="…"` can be smuggled in front), a base64 body
//! whose own type name matches, then an optional comment.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// The longest key line accepted (an RSA-16384 key is about 2.8 KiB).
pub const MAX_LEN: usize = 8 * 1024;

/// The key types accepted: those OpenSSH itself still offers by default.
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Why a public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSshKey {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes long, at most {MAX_LEN} are allowed")]
    TooLong { len: usize },
    #[error("must be one line without control characters")]
    ControlCharacter,
    #[error("unknown key type {found:?} (expected one of: {})", KEY_TYPES.join(", "))]
    UnknownType { found: String },
    #[error("has no base64 key body after the type")]
    NoBody,
    #[error("the key body is not base64")]
    NotBase64,
    #[error("the key body is a {found:?} key, not {declared}")]
    TypeMismatch {
        declared: &'static str,
        found: String,
    },
}

/// A validated OpenSSH public key line: type, base64 body, optional
/// comment (as given, single spaces between the parts). Only the line is
/// kept (it travels in every desired state); the type and the key blob
/// are read from it again when asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SshPublicKey {
    line: String,
}

impl SshPublicKey {
    /// Checks `line` (no trailing newline: read a key file and trim it).
    pub fn parse(line: &str) -> Result<SshPublicKey, InvalidSshKey> {
        if line.is_empty() {
            return Err(InvalidSshKey::Empty);
        }
        if line.len() > MAX_LEN {
            return Err(InvalidSshKey::TooLong { len: line.len() });
        }
        if line.chars().any(char::is_control) {
            return Err(InvalidSshKey::ControlCharacter);
        }
        let mut parts = line.splitn(3, ' ');
        let declared = parts.next().unwrap_or_default();
        let key_type = known_type(declared).ok_or_else(|| InvalidSshKey::UnknownType {
            found: declared.to_owned(),
        })?;
        let body = parts
            .next()
            .filter(|b| !b.is_empty())
            .ok_or(InvalidSshKey::NoBody)?;
        let blob = base64_decode(body).ok_or(InvalidSshKey::NotBase64)?;
        let found = blob_type(&blob).unwrap_or_default();
        if found != key_type {
            return Err(InvalidSshKey::TypeMismatch {
                declared: key_type,
                found,
            });
        }
        Ok(SshPublicKey {
            line: line.to_owned(),
        })
    }

    /// The key type, e.g. `ssh-ed25519`.
    pub fn key_type(&self) -> &'static str {
        known_type(self.line.split(' ').next().unwrap_or_default()).unwrap_or_default()
    }

    /// The comment after the body (empty when there is none).
    pub fn comment(&self) -> &str {
        self.line.splitn(3, ' ').nth(2).unwrap_or_default()
    }

    /// `SHA256:<base64 without padding>` of the key blob, as
    /// `ssh-keygen -l` and sshd's logs print it.
    pub fn fingerprint(&self) -> String {
        let body = self.line.split(' ').nth(1).unwrap_or_default();
        let digest = Sha256::digest(base64_decode(body).unwrap_or_default());
        format!("SHA256:{}", base64_encode_unpadded(&digest))
    }

    /// The whole line, as for `authorized_keys`.
    pub fn as_str(&self) -> &str {
        &self.line
    }
}

impl fmt::Display for SshPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl FromStr for SshPublicKey {
    type Err = InvalidSshKey;
    fn from_str(s: &str) -> Result<Self, InvalidSshKey> {
        SshPublicKey::parse(s)
    }
}

impl TryFrom<String> for SshPublicKey {
    type Error = InvalidSshKey;
    fn try_from(s: String) -> Result<Self, InvalidSshKey> {
        SshPublicKey::parse(&s)
    }
}

impl From<SshPublicKey> for String {
    fn from(k: SshPublicKey) -> String {
        k.line
    }
}

/// `name` if it is one of [`KEY_TYPES`].
fn known_type(name: &str) -> Option<&'static str> {
    KEY_TYPES.iter().copied().find(|t| *t == name)
}

/// The type name at the start of a key blob (an SSH `string`: a 32-bit
/// big-endian length, then the bytes).
fn blob_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    let name = blob.get(4..4usize.checked_add(len)?)?;
    String::from_utf8(name.to_vec()).ok()
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with optional padding; `None` for anything else.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    let body = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(s);
    if s.len() != body.len() && !s.len().is_multiple_of(4) {
        return None;
    }
    if body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in body {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero (a canonical encoding).
    (acc == 0).then_some(out)
}

fn base64_encode_unpadded(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ssh-keygen -t ed25519 -C alice@ci` and what `ssh-keygen -l` printed.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";
    const ED25519_FP: &str = "SHA256:Ta1rn4StT+nsdHkfjJcGU06FFLNR/RB6bfMEtDXcUEU";

    #[test]
    fn a_key_parses_and_prints_its_fingerprint() {
        let k = SshPublicKey::parse(ED25519).unwrap();
        assert_eq!(k.key_type(), "ssh-ed25519");
        assert_eq!(k.comment(), "alice@ci");
        assert_eq!(k.fingerprint(), ED25519_FP);
        assert_eq!(k.to_string(), ED25519);
        let bare = ED25519.rsplit_once(' ').unwrap().0;
        let k2 = SshPublicKey::parse(bare).unwrap();
        assert_eq!(
            (k2.comment(), k2.fingerprint()),
            ("", ED25519_FP.to_owned())
        );
        assert_eq!(String::from(k.clone()), ED25519);
        assert_eq!(SshPublicKey::try_from(ED25519.to_owned()).unwrap(), k);
    }

    #[test]
    fn bad_keys_are_refused_with_the_reason() {
        let body = ED25519.split(' ').nth(1).unwrap();
        let long = format!("ssh-rsa {body} {}", "x".repeat(MAX_LEN));
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "must not be empty"),
            (long, "at most 8192 are allowed"),
            (
                format!("{ED25519}\n"),
                "one line without control characters",
            ),
            (format!("ssh-ed25519 {body}\nssh-rsa {body}"), "one line"),
            (format!("ssh-ed25519 {body} a\u{7}b"), "control characters"),
            (
                format!("command=\"/bin/sh\" ssh-ed25519 {body}"),
                "unknown key type \"command=\\\"/bin/sh\\\"\"",
            ),
            (format!("ssh-dss {body}"), "unknown key type \"ssh-dss\""),
            ("ssh-ed25519".into(), "no base64 key body"),
            ("ssh-ed25519 ".into(), "no base64 key body"),
            ("ssh-ed25519 not*base64".into(), "not base64"),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5A".into(), "not base64"),
            (
                format!("ssh-rsa {body}"),
                "is a \"ssh-ed25519\" key, not ssh-rsa",
            ),
            ("ssh-ed25519 AAAA".into(), "is a \"\" key"),
        ];
        for (line, want) in cases {
            let err = SshPublicKey::parse(&line).unwrap_err().to_string();
            assert!(err.contains(want), "{line:?}: {err}");
        }
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64_encode_unpadded(&bytes);
            assert_eq!(base64_decode(&enc), Some(bytes.clone()), "{len}");
            let padded = format!("{enc}{}", "=".repeat((4 - enc.len() % 4) % 4));
            assert_eq!(base64_decode(&padded), Some(bytes), "{len} padded");
        }
        assert_eq!(base64_encode_unpadded(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode_unpadded(b"fo"), "Zm8");
        assert_eq!(base64_decode("Zm8="), Some(b"fo".to_vec()));
        assert_eq!(base64_decode("Zm9="), None, "non-zero leftover bits");
        assert_eq!(base64_decode("Zm8=="), None, "too much padding");
    }
}
