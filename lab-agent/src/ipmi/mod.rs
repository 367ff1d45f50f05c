//! IPMI 2.0 over LAN (RMCP+, "lanplus") for driving BMCs: power and boot
//! device. Sans-IO in the style of ipmi-rs: [`packet`], [`crypto`] and
//! [`commands`] are pure functions over bytes; [`client`] is the only place
//! with a socket.
//!
//! - [`crypto`]: RAKP codes, SIK/K1/K2, HMAC integrity, AES-CBC-128 (suites
//!   3 and 17); keys are zeroized on drop.
//! - [`packet`]: RMCP header, RMCP+ session wrapper, Open Session, RAKP 1–4,
//!   IPMI messages with checksums.
//! - [`commands`]: Get Channel Cipher Suites, Set Session Privilege Level,
//!   Close Session, Get Chassis Status, Chassis Control, Get/Set System Boot
//!   Options.
//! - [`client`]: [`IpmiClient`], one task owning the UDP socket.
//! - [`sol`]: Serial-over-LAN: the SOL packet and protocol machine (pure)
//!   and [`SolStream`], the console as `AsyncRead + AsyncWrite`.
//!
//! Known BMC quirks handled here (OpenIPMI `ipmi_sim` 2.0.33): it does not
//! answer Get Channel Cipher Suites outside a session (we fall back to the
//! configured suites after `cipher_probe_timeout`), it rejects suite 17 (we
//! fall back to suite 3), and it crashes on Get Channel Payload Support
//! (App 0x4E), which this module never sends.

pub mod client;
pub mod commands;
pub mod crypto;
pub mod packet;
pub mod sol;

pub use client::{ConnectOptions, IpmiClient, IpmiError, Secret};
pub use commands::{BootDevice, BootFlags, ChassisStatus, PowerAction};
pub use crypto::CipherSuite;
pub use packet::Privilege;
pub use sol::{SolActivation, SolOptions, SolStream};
