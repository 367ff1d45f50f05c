//! Read-only TFTP: RFC 1350 with the options `blksize` (RFC 2348), `tsize`
//! and `timeout` (RFC 2349) and `windowsize` (RFC 7440), serving whatever a
//! [`crate::assets::FileSource`] resolves (the confined assets root and the
//! per-host generated scripts).
//!
//! - [`packet`]: pure encode/decode of every packet.
//! - [`session`]: pure negotiation and transfer state machine.
//! - [`server`]: the sockets; start here:
//!
//! ```no_run
//! # async fn f(source: std::sync::Arc<dyn lab_agent::assets::FileSource>) -> Result<(), lab_agent::tftp::TftpError> {
//! use lab_agent::tftp::{TftpConfig, TftpServer};
//! let config = TftpConfig { listen: "0.0.0.0:69".parse().unwrap(), ..TftpConfig::default() };
//! let server = TftpServer::bind(config, source).await?;
//! let stats = server.stats();
//! tokio::spawn(server.run());
//! # let _ = stats; Ok(()) }
//! ```

pub mod packet;
pub mod server;
pub mod session;

pub use server::{TftpConfig, TftpError, TftpServer, TftpStats, TftpStatsSnapshot};
