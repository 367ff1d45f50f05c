//! Serial-over-LAN (IPMI 2.0 payload type 1) over our RMCP+ session.
//!
//! - [`packet`]: the SOL packet ([`SolPacket::encode`] /
//!   [`SolPacket::decode`]), pure and tested with bytes.
//! - [`state`]: [`SolState`], the sans-IO protocol machine: sequence
//!   numbers 1..=15, acks, retransmission of unacknowledged data, partial
//!   accepts and NACKs (the unaccepted tail is resent), break.
//! - [`stream`]: [`SolStream`], the console as a tokio `AsyncRead +
//!   AsyncWrite`. It runs on an [`IpmiClient`](super::IpmiClient) session:
//!   the session's request task routes inbound SOL packets into it and
//!   sends what [`SolState`] produces (through the client's payload hook, so
//!   the client knows nothing of SOL).
//!
//! The payload commands (Activate Payload App 0x48, Deactivate Payload App
//! 0x49, Get Payload Instance Info App 0x4B as the keepalive) are IPMI
//! commands like any other, in [`super::commands`]; they are re-exported
//! here. Get Channel Payload Support (App 0x4E) is never sent: it crashes
//! OpenIPMI's `ipmi_sim`.

pub mod packet;
pub mod state;
pub mod stream;

pub use super::commands::{
    ActivatePayload, CC_PAYLOAD_ALREADY_ACTIVE, CC_PAYLOAD_ALREADY_INACTIVE, DeactivatePayload,
    GetPayloadInstanceInfo, SOL_INSTANCE, SolActivation,
};
pub use packet::{SolPacket, SolPacketError, op, status};
pub use state::{Received, SolFailure, SolOptions, SolState};
pub use stream::{SolStream, SolStreamError};
