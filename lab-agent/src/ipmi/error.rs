//! [`IpmiError`]: what can go wrong talking to a BMC, from the socket to a
//! command's completion code. Shared by the handshake ([`super::session`]),
//! the client and the SOL stream.

use std::net::SocketAddr;

use super::commands::{CommandError, PowerAction};
use super::packet::PacketError;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum IpmiError {
    /// Socket setup or I/O failed.
    #[error("UDP socket to {endpoint}")]
    Io {
        endpoint: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// No reply after all retransmissions.
    #[error("{what}: no reply from {endpoint} after {attempts} attempt(s)")]
    Timeout {
        endpoint: SocketAddr,
        what: &'static str,
        attempts: u32,
    },
    /// Encoding a packet failed.
    #[error("encoding {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: PacketError,
    },
    /// The BMC refused every cipher suite we offered.
    #[error(
        "{endpoint} accepted none of the cipher suites {offered:?} (last RMCP+ status {status:#04x})"
    )]
    NoCipherSuite {
        endpoint: SocketAddr,
        offered: Vec<u8>,
        status: u8,
    },
    /// A session setup step returned an RMCP+ error status.
    #[error("{step} rejected by {endpoint} with RMCP+ status {status:#04x}")]
    Rejected {
        endpoint: SocketAddr,
        step: &'static str,
        status: u8,
    },
    /// The BMC's RAKP 2 code does not match the password (wrong password or user).
    #[error("RAKP 2 from {endpoint} does not authenticate: wrong user or password")]
    BadRakp2 { endpoint: SocketAddr },
    /// RAKP 4's integrity check value does not match.
    #[error("RAKP 4 from {endpoint} has a wrong integrity check value")]
    BadRakp4 { endpoint: SocketAddr },
    /// A command completed with a non-zero completion code.
    #[error("{command} on {endpoint}: completion code {code:#04x}")]
    Completion {
        endpoint: SocketAddr,
        command: &'static str,
        code: u8,
    },
    /// A command's response data did not parse.
    #[error("{endpoint}: bad response")]
    Response {
        endpoint: SocketAddr,
        #[source]
        source: CommandError,
    },
    /// The outcome of a power action is unknown (no reply) and the re-read
    /// state does not confirm it. It was not resent.
    #[error("{action:?} on {endpoint}: no reply; power is now {}", if *.power_on { "on" } else { "off" })]
    PowerUnconfirmed {
        endpoint: SocketAddr,
        action: PowerAction,
        power_on: bool,
    },
    /// IPMI user names are at most 16 bytes.
    #[error("user name of {len} bytes is longer than IPMI's 16")]
    UserTooLong { len: usize },
    /// Random numbers unavailable.
    #[error("no random numbers for the session")]
    Random,
    /// The socket task has stopped.
    #[error("session task for {endpoint} has stopped")]
    Closed { endpoint: SocketAddr },
}
