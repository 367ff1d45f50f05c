//! HTTP/1.1 boot server: the same content as TFTP (any [`FileSource`],
//! normally [`crate::assets::boot::BootFiles`]), which iPXE fetches far
//! faster over HTTP than over TFTP.
//!
//! GET and HEAD only (others: 405); `Content-Length` always; one
//! `Range: bytes=…` gives 206 (several ranges, or a malformed header, are
//! ignored and the whole file is sent, as RFC 9110 allows); 404 not found,
//! 403 refused by confinement. Paths are percent-decoded *before* they reach
//! the source, so `%2e%2e/` meets the same confinement as `../`. Files are
//! streamed in 64 KiB chunks, never read whole into memory.
//!
//! - [`request`]: pure decisions (path decoding, range parsing).
//! - [`server`]: the socket loop on hyper ([`serve`]).
//!
//! [`FileSource`]: crate::assets::FileSource

pub mod request;
pub mod server;

pub use server::serve;
