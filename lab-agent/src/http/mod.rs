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
//! Every client is on a network where lease holders have root, so the
//! server bounds what one client can hold: connections in all and per IP
//! address, header, idle and send timeouts, and a back-off when `accept`
//! fails ([`HttpConfig`], counted in [`HttpStats`]).
//!
//! - [`request`]: pure decisions (path decoding, range parsing).
//! - [`watch`]: the progress watchdog of one connection.
//! - [`server`]: the socket loop on hyper ([`HttpServer`], [`serve`]).
//!
//! [`FileSource`]: crate::assets::FileSource

pub mod request;
pub mod server;
pub mod watch;

pub use server::{
    HttpConfig, HttpError, HttpServer, HttpStats, HttpStatsSnapshot, LISTEN_BACKLOG, bind, serve,
};
