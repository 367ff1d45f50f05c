//! Boot content: the confined asset root ([`root::DirRoot`]) and the
//! [`FileSource`] interface through which TFTP and HTTP serve files, so both
//! protocols serve exactly the same things with the same confinement.

pub mod boot;
pub mod install;
pub mod render;
pub mod root;

use std::net::IpAddr;

/// What a request path resolved to.
#[derive(Debug)]
pub enum Content {
    /// A regular file inside the root, opened, with its length.
    File { file: std::fs::File, len: u64 },
    /// Generated content (a per-host script).
    Bytes(Vec<u8>),
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::File { len, .. } => *len,
            Content::Bytes(b) => b.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a path was not served. `Display` is safe to send to the client.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("file not found")]
    NotFound,
    #[error("access violation: {0}")]
    Forbidden(&'static str),
    #[error("cannot read file")]
    Io(#[source] std::io::Error),
}

/// Resolves request paths (a TFTP file name or an HTTP path) for a client.
pub trait FileSource: Send + Sync + 'static {
    fn open(&self, path: &str, client: Option<IpAddr>) -> Result<Content, OpenError>;
}
