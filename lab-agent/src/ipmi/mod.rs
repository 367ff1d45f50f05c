//! IPMI 2.0 over LAN (RMCP+, "lanplus") for driving BMCs: power, boot
//! device and Serial-over-LAN. Sans-IO in the style of ipmi-rs: [`packet`],
//! [`crypto`], [`commands`], [`session`] and the SOL [`sol::packet`] and
//! [`sol::state`] are pure functions and machines over bytes; [`client`] is
//! the only place with a socket.
//!
//! - [`crypto`]: RAKP codes, SIK/K1/K2, HMAC integrity, AES-CBC-128 (suites
//!   3 and 17); keys are zeroized on drop.
//! - [`packet`]: RMCP header, RMCP+ session wrapper, Open Session, RAKP 1–4,
//!   IPMI messages with checksums.
//! - [`commands`]: Get Channel Cipher Suites, Set Session Privilege Level,
//!   Close Session, Get Chassis Status, Chassis Control, Get/Set System Boot
//!   Options, and the payload commands (Activate/Deactivate Payload, Get
//!   Payload Instance Info).
//! - [`session`]: the RMCP+ handshake (Open Session, RAKP 1–4) as a sans-IO
//!   [`session::Handshake`], and the cipher suite choice.
//! - [`error`]: one error type, [`IpmiError`], for the handshake, the
//!   client and SOL.
//! - [`client`]: [`IpmiClient`], one task owning the UDP socket: requests
//!   with retransmission, and the hook a payload (SOL) rides on.
//! - [`sol`]: Serial-over-LAN: the SOL packet, the protocol machine
//!   [`sol::SolState`], and [`SolStream`], the console as `AsyncRead +
//!   AsyncWrite` over a client session.
//!
//! Dependencies go one way: `client` → `session`, `commands`, `packet`,
//! `crypto`; `sol::stream` → `client`. The client knows nothing of SOL.
//!
//! Known BMC quirks handled here (OpenIPMI `ipmi_sim` 2.0.33): it does not
//! answer Get Channel Cipher Suites outside a session (we fall back to the
//! configured suites after `cipher_probe_timeout`), it rejects suite 17 (we
//! fall back to suite 3), and it crashes on Get Channel Payload Support
//! (App 0x4E), which this module never sends.

pub mod client;
pub mod commands;
pub mod crypto;
pub mod error;
pub mod packet;
pub mod session;
pub mod sol;

pub use client::{ConnectOptions, IpmiClient, Secret};
pub use commands::{BootDevice, BootFlags, ChassisStatus, PowerAction};
pub use crypto::CipherSuite;
pub use error::IpmiError;
pub use packet::Privilege;
pub use sol::{SolActivation, SolOptions, SolStream};
