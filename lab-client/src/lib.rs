//! Client plumbing that the `lab` CLI and lab-agent share, so that both
//! reach lab-server the same way, and the daemons' log set-up.
//!
//! - [`endpoint`]: a [`ServerEndpoint`] from a server URL: timeouts and
//!   HTTP/2 keepalive from [`ChannelSettings`], and for an `https://` server
//!   TLS that trusts a CA certificate file (PEM) or else the system's roots.
//! - [`auth`]: the [`BearerToken`] (a sensitive header value whose `Debug`
//!   shows nothing) and [`BearerAuth`], the interceptor that sends it with
//!   every call.
//! - `log` (feature `log`): `log::init`, the `tracing` subscriber of
//!   lab-server and lab-agent, filtered by `LAB_LOG`.
//! - `web` (feature `web`): the daemons' metrics plumbing and the HTTP/1.1
//!   server of lab-server's web port and the agent's metrics port.
//!
//! Nothing here knows the lab's services or any server internals: callers
//! build their generated clients over the channel with the interceptor.

pub mod auth;
pub mod endpoint;
#[cfg(feature = "log")]
pub mod log;
#[cfg(feature = "web")]
pub mod web;

pub use auth::{BearerAuth, BearerToken, InvalidToken};
pub use endpoint::{ChannelSettings, EndpointError, ServerEndpoint};
