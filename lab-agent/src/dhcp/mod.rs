//! DHCPv4 for PXE boot: authoritative or proxyDHCP, per rack.
//!
//! - [`config`]: [`DhcpConfig`] (mode, addressing, boot files, script URL).
//! - [`packet`]: guarded decode of a datagram into a [`Request`]
//!   (dhcproto under `catch_unwind`; option 93 read as a list) and reply
//!   encoding.
//! - [`mod@decide`]: the pure decision `decide(&Request, &HostTable,
//!   &DhcpConfig) -> Decision`, tested over captured packets.
//! - [`server`]: the socket2 + tokio loop and [`DhcpStats`].
//!
//! Not done yet: IPv6 router advertisements (iPXE waits ~13 s for IPv6
//! autoconfiguration when none is on the link).
//!
//! ```no_run
//! # async fn f(hosts: lab_agent::hosts::HostTable) -> Result<(), lab_agent::dhcp::server::ServerError> {
//! use lab_agent::dhcp::{DhcpConfig, DhcpServer, Mode};
//! let mut cfg = DhcpConfig::new(Mode::Authoritative, "198.18.0.1".parse().unwrap());
//! cfg.interface = Some("eth1".into());
//! let server = DhcpServer::bind(cfg, hosts)?;
//! let stats = server.stats();
//! server.run().await?;
//! # drop(stats); Ok(()) }
//! ```

pub mod config;
pub mod decide;
pub mod packet;
pub mod server;

pub use config::{BootFiles, DhcpConfig, Mode};
pub use decide::{ClientKind, Decision, IgnoreReason, decide};
pub use packet::{Arrival, Request};
pub use server::{DhcpServer, DhcpStats, DhcpStatsSnapshot};
