//! The bearer token and the interceptor that puts it on every call as
//! `authorization: Bearer <token>`.
//!
//! The header value is built once, marked sensitive (HTTP/2 never indexes
//! it in HPACK tables, `Debug` of the metadata hides it) and kept in a
//! [`BearerToken`] whose own `Debug` prints no part of it.

use std::fmt;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// `Bearer <token>` as a sensitive header value. `Debug` shows
/// `BearerToken(..)`; there is no `Display`.
#[derive(Clone)]
pub struct BearerToken(MetadataValue<Ascii>);

/// The token cannot be sent in a header: it holds a control character
/// (other than tab) or DEL.
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid header value")]
pub struct InvalidToken;

impl BearerToken {
    /// Any token that fits in a header value. Callers that take tokens
    /// from users may insist on more (the CLI: printable ASCII, no spaces).
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let mut value =
            MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(BearerToken(value))
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

/// Adds the bearer token to every call; adds nothing when there is none.
#[derive(Clone, Debug, Default)]
pub struct BearerAuth(Option<BearerToken>);

impl BearerAuth {
    pub fn new(token: Option<BearerToken>) -> Self {
        BearerAuth(token)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(BearerToken(value)) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_sensitive_and_never_printed() {
        let t = BearerToken::new("s3cr3t.token-_~").unwrap();
        assert_eq!(format!("{t:?}"), "BearerToken(..)");
        let auth = BearerAuth::new(Some(t.clone()));
        let shown = format!("{auth:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(t.0.is_sensitive());
        assert_eq!(t.0.to_str().unwrap(), "Bearer s3cr3t.token-_~");
    }

    #[test]
    fn header_rules() {
        for bad in ["line\nbreak", "nul\0", "del\x7f"] {
            assert!(BearerToken::new(bad).is_err(), "{bad:?}");
        }
        // Not the CLI's stricter rule: the agent has always sent these.
        for ok in ["", "has space", "tab\there"] {
            assert!(BearerToken::new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn interceptor_sets_the_header_only_with_a_token() {
        let mut with = BearerAuth::new(Some(BearerToken::new("abc").unwrap()));
        let req = with.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");

        let mut without = BearerAuth::default();
        let req = without.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
