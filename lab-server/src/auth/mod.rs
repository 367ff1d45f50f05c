//! Who is calling: bearer tokens from a tokens file mapped to a principal and
//! a role. Only SHA-256 digests of tokens are stored; a token is never logged.
//!
//! Tokens file (TOML):
//! ```toml
//! [[token]]
//! principal = "osstest"
//! role = "ci"            # ci | developer | operator | agent
//! sha256 = "9f86d0…"     # hex SHA-256 of the token; `lab-server token new` makes one
//! ```
//!
//! `lab-server token new --tokens-file PATH` adds an entry to the file in
//! place ([`append_token`]).
//!
//! Development mode (`--dev-insecure-no-auth`) takes any bearer token as the
//! caller's name with the operator role, and `dev` when there is none.

mod append;

pub use append::{AppendError, append_token, entry};

use crate::types::{Caller, Principal, Role};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Why the tokens file was refused: unreadable, or invalid at
/// `path:line:column`.
pub type TokensError = lab_types::FileError;

/// Why a call was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed authorization header (expected `Bearer <token>`)")]
    Malformed,
    #[error("unknown token")]
    Unknown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<toml::Spanned<RawToken>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    principal: String,
    role: String,
    sha256: String,
}

/// Maps tokens to callers.
#[derive(Debug, Clone)]
pub enum Authenticator {
    Tokens(HashMap<[u8; 32], Caller>),
    /// Development mode: no checks at all.
    InsecureDev,
}

/// SHA-256 digest of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    format!("lab_{}", hex::encode(b))
}

impl Authenticator {
    /// The development mode (no authentication at all)?
    pub fn is_insecure_dev(&self) -> bool {
        matches!(self, Authenticator::InsecureDev)
    }

    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            what: "tokens file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, TokensError> {
        let invalid = |offset: usize, reason: String| {
            let (line, column) = crate::inventory::line_column(text, offset);
            TokensError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason,
            }
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| invalid(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
        let mut map = HashMap::new();
        for t in raw.token {
            let at = t.span().start;
            let t = t.into_inner();
            let principal = Principal::new(t.principal).map_err(|e| invalid(at, e.to_string()))?;
            let role: Role = t.role.parse().map_err(|e| invalid(at, e))?;
            let bytes = hex::decode(&t.sha256)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| invalid(at, "sha256 must be 64 hex digits".into()))?;
            if map.insert(bytes, Caller { principal, role }).is_some() {
                return Err(invalid(at, "the same token digest appears twice".into()));
            }
        }
        Ok(Authenticator::Tokens(map))
    }

    /// The caller behind an `authorization` metadata value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let token = match authorization {
            None => None,
            Some(v) => {
                let t = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or(AuthError::Malformed)?;
                Some(t.trim())
            }
        };
        match self {
            Authenticator::InsecureDev => {
                let principal = token
                    .and_then(|t| Principal::new(t).ok())
                    .unwrap_or_else(|| Principal::new("dev").expect("valid name"));
                Ok(Caller {
                    principal,
                    role: Role::Operator,
                })
            }
            Authenticator::Tokens(map) => {
                let token = token.ok_or(AuthError::Missing)?;
                map.get(&digest(token)).cloned().ok_or(AuthError::Unknown)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(token: &str) -> String {
        format!(
            "[[token]]\nprincipal = \"osstest\"\nrole = \"ci\"\nsha256 = \"{}\"\n",
            hex::encode(digest(token))
        )
    }

    #[test]
    fn known_token_maps_to_caller() {
        let a = Authenticator::parse(&file("s3cret"), Path::new("tokens.toml")).unwrap();
        let c = a.authenticate(Some("Bearer s3cret")).unwrap();
        assert_eq!(c.principal.as_str(), "osstest");
        assert_eq!(c.role, Role::Ci);
        assert_eq!(
            a.authenticate(Some("Bearer other")),
            Err(AuthError::Unknown)
        );
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some("Basic abc")), Err(AuthError::Malformed));
    }

    #[test]
    fn bad_file_names_line_and_reason() {
        let text = "[[token]]\nprincipal = \"a\"\nrole = \"root\"\nsha256 = \"00\"\n";
        let e = Authenticator::parse(text, Path::new("t.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:1:1: unknown role \"root\" (expected ci, developer, operator or agent)"
        );
        let e = Authenticator::parse(
            "[[token]]\nprincipal = \"a\"\nrol = 1\n",
            Path::new("t.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("t.toml:3:1: unknown field `rol`"),
            "{e}"
        );
    }

    #[test]
    fn dev_mode_takes_the_token_as_name() {
        let a = Authenticator::InsecureDev;
        assert_eq!(
            a.authenticate(Some("Bearer alice"))
                .unwrap()
                .principal
                .as_str(),
            "alice"
        );
        assert_eq!(a.authenticate(None).unwrap().principal.as_str(), "dev");
    }

    #[test]
    fn new_tokens_differ() {
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 4 + 64);
    }
}
