//! Adding a token to the tokens file in place, for
//! `lab-server token new --tokens-file PATH`: the file is checked (it must
//! parse, and must not name the principal yet), a `[[token]]` entry is
//! appended to its text (comments and layout kept), and the result replaces
//! the file atomically: written to a temporary file in the same directory
//! with the original's mode, owner and group, synced, then renamed over it.
//! A missing file is created with mode 0600.
//!
//! Two concurrent runs on the same file may lose one entry (the last rename
//! wins); it is an operator's command, not a service.

use super::{Authenticator, RawFile, TokensError, digest};
use crate::types::{Principal, Role};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why the token could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The existing file is unreadable or invalid: it is left untouched.
    #[error("the tokens file was not changed")]
    Existing(#[source] TokensError),
    #[error(
        "{}:{line}: principal {principal} already has a token; remove that entry first to replace it",
        path.display()
    )]
    DuplicatePrincipal {
        path: PathBuf,
        principal: Principal,
        line: usize,
    },
    #[error("cannot write the tokens file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Append a `[[token]]` entry for `principal` with `role` and the digest of
/// `token` to the tokens file at `path` (see the module documentation).
pub fn append_token(
    path: &Path,
    principal: &Principal,
    role: Role,
    token: &str,
) -> Result<(), AppendError> {
    // Edit the file a symlink points to, not the link.
    let path = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => path.to_owned(),
        Err(source) => {
            return Err(AppendError::Existing(TokensError::Read {
                what: "tokens file",
                path: path.to_owned(),
                source,
            }));
        }
    };
    let write_err = |source| AppendError::Write {
        path: path.clone(),
        source,
    };
    let (text, meta) = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let meta = std::fs::metadata(&path).map_err(write_err)?;
            (text, Some(meta))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
        Err(source) => {
            return Err(AppendError::Existing(TokensError::Read {
                what: "tokens file",
                path,
                source,
            }));
        }
    };
    Authenticator::parse(&text, &path).map_err(AppendError::Existing)?;
    let raw: RawFile = toml::from_str(&text).expect("parsed just above");
    if let Some(t) = raw
        .token
        .iter()
        .find(|t| t.get_ref().principal == principal.as_str())
    {
        let (line, _) = crate::inventory::line_column(&text, t.span().start);
        return Err(AppendError::DuplicatePrincipal {
            path,
            principal: principal.clone(),
            line,
        });
    }

    let mut new = text;
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    if !new.is_empty() {
        new.push('\n');
    }
    new.push_str(&entry(principal, role, token));
    // The result must still be a valid tokens file that knows the token.
    let check = Authenticator::parse(&new, &path).map_err(AppendError::Existing)?;
    debug_assert!(
        check
            .authenticate(Some(&format!("Bearer {token}")))
            .is_ok_and(|c| &c.principal == principal && c.role == role)
    );
    replace(&path, new.as_bytes(), meta.as_ref()).map_err(write_err)
}

/// The tokens-file entry for a token (its digest, never the token).
pub fn entry(principal: &Principal, role: Role, token: &str) -> String {
    format!(
        "[[token]]\nprincipal = \"{principal}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
        hex::encode(digest(token))
    )
}

/// Write `data` to a temporary file beside `path` with the mode, owner and
/// group of `meta` (0600 and the caller's when `None`), sync it, rename it
/// over `path` and sync the directory.
fn replace(path: &Path, data: &[u8], meta: Option<&std::fs::Metadata>) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        // No umask dependence: the mode is set explicitly, before any data.
        let mode = meta.map_or(0o600, |m| m.mode() & 0o7777);
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some(m) = meta {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(s: &str) -> Principal {
        Principal::new(s).unwrap()
    }

    #[test]
    fn appends_keeps_text_mode_and_refuses_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let head = "# the lab's tokens\n[[token]]\nprincipal = \"ci\"\nrole = \"ci\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"";
        std::fs::write(&path, head).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

        append_token(&path, &principal("agent-rack1"), Role::Agent, "lab_secret").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(head), "{text}");
        assert!(text.ends_with(&entry(&principal("agent-rack1"), Role::Agent, "lab_secret")));
        assert!(!text.contains("lab_secret"), "only the digest is stored");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        let a = Authenticator::load(&path).unwrap();
        let c = a.authenticate(Some("Bearer lab_secret")).unwrap();
        assert_eq!((c.principal.as_str(), c.role), ("agent-rack1", Role::Agent));
        assert!(
            a.authenticate(Some("Bearer test")).is_ok(),
            "old entry kept"
        );

        let e = append_token(&path, &principal("agent-rack1"), Role::Ci, "other").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:7: principal agent-rack1 already has a token; remove that entry first to replace it",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "unchanged");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left: {left:?}");
    }

    #[test]
    fn a_missing_file_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        append_token(&path, &principal("ops"), Role::Operator, "t1").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            entry(&principal("ops"), Role::Operator, "t1")
        );
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    }

    #[test]
    fn an_invalid_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, "[[token]]\nprincipal = \"a\"\nrole = \"root\"\n").unwrap();
        let e = append_token(&path, &principal("ops"), Role::Operator, "t").unwrap_err();
        assert!(matches!(e, AppendError::Existing(_)), "{e:?}");
        assert_eq!(
            lab_types::error_chain(&e),
            format!(
                "the tokens file was not changed: {}:1:1: missing field `sha256`",
                path.display()
            )
        );
    }

    #[test]
    fn a_symlink_is_followed_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("tokens.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        append_token(&link, &principal("ops"), Role::Operator, "t").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(std::fs::read_to_string(&real).unwrap().contains("\"ops\""));
    }
}
