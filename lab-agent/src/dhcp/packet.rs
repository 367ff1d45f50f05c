//! Bytes ↔ messages: the guarded decode of a received datagram into a
//! [`Request`], and the encoding of replies. No sockets here.
//!
//! dhcproto 0.15 has `debug_assert!`s (option 94 must be 3 bytes, …) and
//! unchecked subtractions in its option decoder, so a malformed packet can
//! panic it in debug builds. [`Request::decode`] runs the decoder under
//! `catch_unwind` and turns a panic into [`DecodeError::Panicked`], which
//! carries the panic's message. Such a panic is expected and handled, so it
//! must not reach the process's panic hook (the default one prints it to
//! stderr, the agent's logs it as an error: a line per packet for a flood):
//! the first guarded decode installs, once per process, a hook in front of
//! the existing one that keeps the message of a panic raised inside the
//! guard on that thread and hands every other panic to the previous hook.
//!
//! dhcproto keeps only the first architecture of option 93; we read the
//! whole list from the raw bytes ourselves ([`raw_option`]).

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use dhcproto::v4::{self, Message};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::hosts::MacAddr;

/// Well-known server port for DHCP.
pub const DHCP_SERVER_PORT: u16 = 67;
/// Well-known client port for DHCP.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// PXE boot-server port (proxyDHCP REQUESTs from UEFI clients).
pub const PXE_PORT: u16 = 4011;

/// Offset of the options (after the 236-byte BOOTP header and the cookie).
const OPTIONS_OFFSET: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Some PXE ROMs drop replies shorter than a BOOTP minimum message.
const MIN_REPLY_LEN: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram of {len} bytes is too short for a DHCP message")]
    TooShort { len: usize },
    #[error("missing DHCP magic cookie")]
    NoMagic,
    #[error("dhcproto rejected the message")]
    Invalid(#[source] dhcproto::error::DecodeError),
    #[error("dhcproto panicked while decoding the message: {message}")]
    Panicked { message: String },
    #[error("not a BOOTREQUEST or no Ethernet hardware address")]
    NotEthernetRequest,
    #[error("client hardware address is multicast or all zeros")]
    BadClientMac,
}

#[derive(Debug, thiserror::Error)]
#[error("could not encode the DHCP reply")]
pub struct EncodeError(#[source] pub dhcproto::error::EncodeError);

/// The socket a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Port 67 (broadcast DHCP).
    Dhcp,
    /// Port 4011 (PXE boot-server / proxyDHCP REQUEST).
    Pxe,
}

/// One received client message, decoded once, plus where it came from.
#[derive(Debug, Clone)]
pub struct Request {
    pub msg: Message,
    pub mac: MacAddr,
    /// Every architecture type listed in option 93, in order.
    pub client_arches: Vec<u16>,
    /// The datagram's source (`0.0.0.0:68` for most clients).
    pub src: SocketAddrV4,
    pub arrival: Arrival,
}

impl Request {
    /// Decode `bytes`; never panics.
    pub fn decode(bytes: &[u8], src: SocketAddrV4, arrival: Arrival) -> Result<Self, DecodeError> {
        if bytes.len() < OPTIONS_OFFSET {
            return Err(DecodeError::TooShort { len: bytes.len() });
        }
        if bytes[236..OPTIONS_OFFSET] != MAGIC {
            return Err(DecodeError::NoMagic);
        }
        let msg = guarded(|| Message::decode(&mut Decoder::new(bytes)))
            .map_err(|message| DecodeError::Panicked { message })?
            .map_err(DecodeError::Invalid)?;
        if msg.opcode() != v4::Opcode::BootRequest || msg.hlen() != 6 {
            return Err(DecodeError::NotEthernetRequest);
        }
        let mut octets = [0u8; 6];
        octets.copy_from_slice(&msg.chaddr()[..6]);
        let mac = MacAddr::try_from(octets).map_err(|_| DecodeError::BadClientMac)?;
        let client_arches = raw_option(bytes, 93)
            .map(|v| {
                v.chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            msg,
            mac,
            client_arches,
            src,
            arrival,
        })
    }

    /// `true` if the client already runs iPXE (user class `iPXE`, or it
    /// sent iPXE's own option 175).
    pub fn is_ipxe(&self) -> bool {
        let user_class = match self.msg.opts().get(v4::OptionCode::UserClass) {
            Some(v4::DhcpOption::UserClass(v)) => v.as_slice(),
            _ => &[],
        };
        // iPXE sends the bare string; RFC 3004 clients prefix a length.
        user_class.windows(4).any(|w| w == b"iPXE")
            || self.msg.opts().contains(v4::OptionCode::Unknown(175))
    }

    /// Option 60, if present.
    pub fn vendor_class(&self) -> &[u8] {
        match self.msg.opts().get(v4::OptionCode::ClassIdentifier) {
            Some(v4::DhcpOption::ClassIdentifier(v)) => v,
            _ => &[],
        }
    }

    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        match self.msg.opts().get(v4::OptionCode::RequestedIpAddress) {
            Some(v4::DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        }
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        match self.msg.opts().get(v4::OptionCode::ServerIdentifier) {
            Some(v4::DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        }
    }
}

thread_local! {
    /// Set while [`guarded`] runs its closure on this thread.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// What the last panic inside [`guarded`] on this thread said.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Run `f`, turning a panic into `Err(message)` without the panic hook
/// seeing it (see the module docs).
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let what = info.payload_as_str().unwrap_or("(no message)");
                let message = match info.location() {
                    Some(at) => format!("{what} at {at}"),
                    None => what.to_owned(),
                };
                CAUGHT.with(|c| *c.borrow_mut() = Some(message));
            } else {
                previous(info);
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    r.map_err(|_| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| "(no message)".to_owned())
    })
}

/// The value of option `code` in a raw BOOTP message, with RFC 3396
/// concatenation of repeated instances; `None` if absent or truncated.
/// Stops at the first malformed option. Does not look into `file`/`sname`
/// overloading.
pub fn raw_option(bytes: &[u8], code: u8) -> Option<Vec<u8>> {
    let mut rest = bytes.get(OPTIONS_OFFSET..)?;
    let mut found: Option<Vec<u8>> = None;
    while let Some((&c, tail)) = rest.split_first() {
        match c {
            0 => rest = tail,
            255 => break,
            _ => {
                let (&len, tail) = tail.split_first()?;
                let value = tail.get(..len as usize)?;
                if c == code {
                    found.get_or_insert_with(Vec::new).extend_from_slice(value);
                }
                rest = &tail[len as usize..];
            }
        }
    }
    found
}

/// Encode a reply, padded to the 300-byte BOOTP minimum.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut buf = Vec::with_capacity(MIN_REPLY_LEN);
    msg.encode(&mut Encoder::new(&mut buf))
        .map_err(EncodeError)?;
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, 0);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_options(opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; OPTIONS_OFFSET];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn raw_option_concatenates_and_stops_at_truncation() {
        let b = with_options(&[93, 2, 0, 7, 0, 93, 2, 0, 11, 255]);
        assert_eq!(raw_option(&b, 93), Some(vec![0, 7, 0, 11]));
        assert_eq!(raw_option(&b, 60), None);
        let b = with_options(&[93, 9, 0]);
        assert_eq!(raw_option(&b, 93), None);
    }

    #[test]
    fn malformed_option_94_is_an_error_not_a_panic() {
        // option 94 with one byte: dhcproto debug_asserts len == 3.
        let b = with_options(&[53, 1, 1, 94, 1, 1, 255]);
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
        // Whatever the build profile, no panic escapes.
        let r = Request::decode(&b, src, Arrival::Dhcp);
        if cfg!(debug_assertions) {
            let Err(DecodeError::Panicked { message }) = r else {
                panic!("{r:?}")
            };
            assert!(message.contains("dhcproto"), "{message}");
        }
    }

    #[test]
    fn guarded_panics_come_back_with_their_message() {
        let r: Result<(), String> = guarded(|| panic!("boom {}", 7));
        let message = r.unwrap_err();
        assert!(message.starts_with("boom 7 at "), "{message}");
        assert!(message.contains("packet.rs"), "{message}");
        assert_eq!(guarded(|| 5), Ok(5));
        // (That the process's hook does not see them is shown by the
        // process test in tests/dhcp_netns.rs, with the agent's hook.)
    }

    #[test]
    fn short_and_cookieless_datagrams_are_rejected() {
        let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
        assert!(matches!(
            Request::decode(&[1, 2, 3], src, Arrival::Dhcp),
            Err(DecodeError::TooShort { len: 3 })
        ));
        let mut b = with_options(&[255]);
        b[236] = 0;
        assert!(matches!(
            Request::decode(&b, src, Arrival::Dhcp),
            Err(DecodeError::NoMagic)
        ));
    }
}
