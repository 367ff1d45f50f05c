//! BMC passwords: where the inventory says to find them ([`SecretRef`]) and
//! the bytes once read ([`Secret`]), which never print and are zeroed when
//! dropped. The inventory itself never holds a password.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Where a password lives. Holds only the reference, never the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// An environment variable of the server process (`password_env`).
    Env(String),
    /// A file, read whole, trailing newlines removed (`password_file`).
    File(PathBuf),
}

impl SecretRef {
    /// Reads the password now (environment variables and files may change
    /// while the server runs, so callers resolve at the time of use).
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match self {
            SecretRef::Env(var) => match std::env::var_os(var) {
                Some(value) => Ok(Secret::new(value.into_encoded_bytes())),
                None => Err(SecretError::EnvUnset { var: var.clone() }),
            },
            SecretRef::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut secret = Secret::new(bytes);
                secret.trim_trailing_newlines();
                Ok(secret)
            }
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(var) => write!(f, "env:{var}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// Why a password could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {var} is not set")]
    EnvUnset { var: String },
    #[error("cannot read password file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub use lab_types::Secret;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_secret_trims_trailing_newline() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"s3cret pass\r\n").unwrap();
        let r = SecretRef::File(f.path().to_owned());
        assert_eq!(r.resolve().unwrap().expose(), b"s3cret pass");
    }

    #[test]
    fn env_secret_is_read() {
        // Cargo sets this for test processes; setting our own would need `unsafe`.
        let r = SecretRef::Env("CARGO_PKG_NAME".into());
        assert_eq!(r.resolve().unwrap().expose(), b"lab-server");
    }

    #[test]
    fn missing_sources_are_errors_without_secrets() {
        let e = SecretRef::Env("LAB_TEST_SURELY_UNSET_VARIABLE".into())
            .resolve()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "environment variable LAB_TEST_SURELY_UNSET_VARIABLE is not set"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        let e = SecretRef::File(path.clone()).resolve().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot read password file {}", path.display())
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn secret_ref_display() {
        assert_eq!(SecretRef::Env("X".into()).to_string(), "env:X");
        assert_eq!(
            SecretRef::File("/etc/lab/bmc/x".into()).to_string(),
            "file:/etc/lab/bmc/x"
        );
    }
}
