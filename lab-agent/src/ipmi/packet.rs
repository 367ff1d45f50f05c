//! RMCP / RMCP+ framing as pure functions: the RMCP header, the IPMI 2.0
//! session wrapper (integrity trailer, AES-CBC payload), the session-setup
//! payloads (Open Session, RAKP 1–4) and the IPMI message with its checksums.
//! Every decoder takes untrusted bytes and returns an error, never panics.

use super::crypto::{CryptoError, SessionKeys, aes_cbc_decrypt, aes_cbc_encrypt};

/// RMCP header: version 6, reserved, sequence 0xFF (no RMCP ack), class IPMI.
pub const RMCP_HEADER: [u8; 4] = [0x06, 0x00, 0xFF, 0x07];
/// Session authentication type meaning "RMCP+ (IPMI 2.0) format".
pub const AUTH_TYPE_RMCP_PLUS: u8 = 0x06;
/// BMC slave address.
pub const BMC_ADDR: u8 = 0x20;
/// Remote console software id used as requester address.
pub const CONSOLE_ADDR: u8 = 0x81;

/// Errors decoding or encoding packets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    /// Not an RMCP IPMI-class packet.
    #[error("not an RMCP IPMI packet")]
    NotRmcp,
    /// A session format this client does not speak (IPMI 1.5 auth types).
    #[error("unsupported session auth type {0:#04x}")]
    UnsupportedAuthType(u8),
    /// Authenticated or encrypted packet but no session keys.
    #[error("secured packet outside a session")]
    NoKeys,
    /// The AuthCode does not match.
    #[error("integrity check failed")]
    Integrity,
    /// Bad integrity pad / next header.
    #[error("malformed integrity trailer")]
    Trailer,
    /// Confidentiality layer failure.
    #[error("confidentiality layer")]
    Crypto(#[source] CryptoError),
    /// A checksum of an IPMI message is wrong.
    #[error("IPMI message checksum {which} is wrong")]
    Checksum { which: u8 },
    /// A field has a value this client cannot accept.
    #[error("bad {field}: {value:#04x}")]
    BadField { field: &'static str, value: u32 },
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), PacketError> {
    if b.len() < n {
        Err(PacketError::Truncated {
            what,
            need: n,
            have: b.len(),
        })
    } else {
        Ok(())
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn arr16(b: &[u8]) -> [u8; 16] {
    let mut a = [0; 16];
    a.copy_from_slice(&b[..16]);
    a
}

/// RMCP+ payload types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadType {
    /// An IPMI message.
    Ipmi,
    /// Serial over LAN.
    Sol,
    /// RMCP+ Open Session Request.
    OpenSessionRequest,
    /// RMCP+ Open Session Response.
    OpenSessionResponse,
    /// RAKP message 1.
    Rakp1,
    /// RAKP message 2.
    Rakp2,
    /// RAKP message 3.
    Rakp3,
    /// RAKP message 4.
    Rakp4,
    /// Anything else.
    Other(u8),
}

impl PayloadType {
    /// The 6-bit wire code.
    pub fn code(self) -> u8 {
        match self {
            PayloadType::Ipmi => 0x00,
            PayloadType::Sol => 0x01,
            PayloadType::OpenSessionRequest => 0x10,
            PayloadType::OpenSessionResponse => 0x11,
            PayloadType::Rakp1 => 0x12,
            PayloadType::Rakp2 => 0x13,
            PayloadType::Rakp3 => 0x14,
            PayloadType::Rakp4 => 0x15,
            PayloadType::Other(c) => c & 0x3F,
        }
    }

    /// From the 6-bit wire code.
    pub fn from_code(c: u8) -> Self {
        match c & 0x3F {
            0x00 => PayloadType::Ipmi,
            0x01 => PayloadType::Sol,
            0x10 => PayloadType::OpenSessionRequest,
            0x11 => PayloadType::OpenSessionResponse,
            0x12 => PayloadType::Rakp1,
            0x13 => PayloadType::Rakp2,
            0x14 => PayloadType::Rakp3,
            0x15 => PayloadType::Rakp4,
            o => PayloadType::Other(o),
        }
    }
}

/// A decoded RMCP+ packet (payload already decrypted and verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Payload type.
    pub payload_type: PayloadType,
    /// Whether the payload was encrypted on the wire.
    pub encrypted: bool,
    /// Whether the packet carried an AuthCode.
    pub authenticated: bool,
    /// Session id (the receiver's id for this session; 0 before activation).
    pub session_id: u32,
    /// Session sequence number (0 before activation).
    pub seq: u32,
    /// The plain payload.
    pub payload: Vec<u8>,
}

/// Encode an RMCP+ packet. With `keys`, the payload is encrypted with AES-CBC
/// under `iv` and an AuthCode is appended; without, it goes in the clear.
pub fn encode_packet(
    payload_type: PayloadType,
    session_id: u32,
    seq: u32,
    payload: &[u8],
    keys: Option<&SessionKeys>,
    iv: [u8; 16],
) -> Result<Vec<u8>, PacketError> {
    let mut out = RMCP_HEADER.to_vec();
    out.push(AUTH_TYPE_RMCP_PLUS);
    let body = match keys {
        Some(k) => {
            out.push(payload_type.code() | 0xC0);
            aes_cbc_encrypt(k.aes_key(), iv, payload).map_err(PacketError::Crypto)?
        }
        None => {
            out.push(payload_type.code());
            payload.to_vec()
        }
    };
    let len = u16::try_from(body.len()).map_err(|_| PacketError::BadField {
        field: "payload length",
        value: body.len() as u32,
    })?;
    out.extend_from_slice(&session_id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    if let Some(k) = keys {
        // Session header (12) + payload + pad + pad length + next header, multiple of 4.
        let pad = (4 - (12 + body.len() + 2) % 4) % 4;
        out.extend(std::iter::repeat_n(0xFF, pad));
        out.push(pad as u8);
        out.push(0x07);
        let code = k.integrity(&out[4..]);
        out.extend_from_slice(&code);
    }
    Ok(out)
}

/// Decode an RMCP+ packet, verifying the AuthCode and decrypting with `keys`.
pub fn decode_packet(bytes: &[u8], keys: Option<&SessionKeys>) -> Result<Packet, PacketError> {
    need("RMCP header", bytes, 5)?;
    if bytes[0] != 0x06 || bytes[3] & 0x1F != 0x07 {
        return Err(PacketError::NotRmcp);
    }
    if bytes[4] != AUTH_TYPE_RMCP_PLUS {
        return Err(PacketError::UnsupportedAuthType(bytes[4]));
    }
    need("session header", bytes, 16)?;
    let pt = bytes[5];
    let encrypted = pt & 0x80 != 0;
    let authenticated = pt & 0x40 != 0;
    let payload_type = PayloadType::from_code(pt);
    if payload_type == PayloadType::Other(0x02) {
        // OEM explicit payloads carry an IANA and id before the length.
        return Err(PacketError::BadField {
            field: "payload type",
            value: 0x02,
        });
    }
    let session_id = le32(&bytes[6..10]);
    let seq = le32(&bytes[10..14]);
    let len = u16::from_le_bytes([bytes[14], bytes[15]]) as usize;
    need("payload", bytes, 16 + len)?;
    let body = &bytes[16..16 + len];
    if authenticated {
        let k = keys.ok_or(PacketError::NoKeys)?;
        let code_len = k.suite.hash().truncated_len();
        need("integrity trailer", bytes, 16 + len + 2 + code_len)?;
        let code_at = bytes.len() - code_len;
        if bytes[code_at - 1] != 0x07 {
            return Err(PacketError::Trailer);
        }
        let pad = bytes[code_at - 2] as usize;
        if 16 + len + pad + 2 != code_at || !(code_at - 4).is_multiple_of(4) {
            return Err(PacketError::Trailer);
        }
        let expect = k.integrity(&bytes[4..code_at]);
        if expect != bytes[code_at..] {
            return Err(PacketError::Integrity);
        }
    }
    let payload = if encrypted {
        let k = keys.ok_or(PacketError::NoKeys)?;
        aes_cbc_decrypt(k.aes_key(), body).map_err(PacketError::Crypto)?
    } else {
        body.to_vec()
    };
    Ok(Packet {
        payload_type,
        encrypted,
        authenticated,
        session_id,
        seq,
        payload,
    })
}

/// Privilege levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Privilege {
    /// Callback.
    Callback = 1,
    /// User.
    User = 2,
    /// Operator.
    Operator = 3,
    /// Administrator.
    Administrator = 4,
}

/// RMCP+ Open Session Request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSessionRequest {
    /// Message tag echoed by the BMC.
    pub tag: u8,
    /// Requested maximum privilege (0 = highest the user has).
    pub max_privilege: u8,
    /// Our session id (SIDm).
    pub console_session_id: u32,
    /// Authentication algorithm.
    pub auth_alg: u8,
    /// Integrity algorithm.
    pub integrity_alg: u8,
    /// Confidentiality algorithm.
    pub confidentiality_alg: u8,
}

impl OpenSessionRequest {
    /// Wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.tag, self.max_privilege, 0, 0];
        v.extend_from_slice(&self.console_session_id.to_le_bytes());
        for (kind, alg) in [
            (0u8, self.auth_alg),
            (1, self.integrity_alg),
            (2, self.confidentiality_alg),
        ] {
            v.extend_from_slice(&[kind, 0, 0, 8, alg, 0, 0, 0]);
        }
        v
    }
}

/// RMCP+ Open Session Response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSessionResponse {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code (0 = success).
    pub status: u8,
    /// Granted maximum privilege.
    pub max_privilege: u8,
    /// Our session id echoed.
    pub console_session_id: u32,
    /// The BMC's session id (SIDc).
    pub bmc_session_id: u32,
    /// Chosen algorithms (auth, integrity, confidentiality).
    pub algorithms: [u8; 3],
}

impl OpenSessionResponse {
    /// Decode; on a non-zero status only the first 8 bytes are required.
    pub fn decode(b: &[u8]) -> Result<Self, PacketError> {
        need("open session response", b, 2)?;
        let (tag, status) = (b[0], b[1]);
        if status != 0 {
            return Ok(OpenSessionResponse {
                tag,
                status,
                max_privilege: 0,
                console_session_id: if b.len() >= 8 { le32(&b[4..8]) } else { 0 },
                bmc_session_id: 0,
                algorithms: [0; 3],
            });
        }
        need("open session response", b, 36)?;
        let mut algorithms = [0; 3];
        for (i, a) in algorithms.iter_mut().enumerate() {
            let rec = &b[12 + 8 * i..20 + 8 * i];
            if rec[0] != i as u8 {
                return Err(PacketError::BadField {
                    field: "algorithm payload type",
                    value: rec[0] as u32,
                });
            }
            *a = rec[4] & 0x3F;
        }
        Ok(OpenSessionResponse {
            tag,
            status,
            max_privilege: b[2],
            console_session_id: le32(&b[4..8]),
            bmc_session_id: le32(&b[8..12]),
            algorithms,
        })
    }
}

/// RAKP message 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rakp1 {
    /// Message tag.
    pub tag: u8,
    /// The BMC's session id.
    pub bmc_session_id: u32,
    /// Our random number Rm.
    pub console_random: [u8; 16],
    /// Requested role (privilege | 0x10 for name-only lookup).
    pub role: u8,
    /// User name, at most 16 bytes.
    pub user: Vec<u8>,
}

impl Rakp1 {
    /// Wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.tag, 0, 0, 0];
        v.extend_from_slice(&self.bmc_session_id.to_le_bytes());
        v.extend_from_slice(&self.console_random);
        v.extend_from_slice(&[self.role, 0, 0, self.user.len() as u8]);
        v.extend_from_slice(&self.user);
        v
    }
}

/// RAKP message 2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rakp2 {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code.
    pub status: u8,
    /// Our session id echoed.
    pub console_session_id: u32,
    /// The BMC's random number Rc.
    pub bmc_random: [u8; 16],
    /// The BMC's GUID.
    pub bmc_guid: [u8; 16],
    /// Key exchange authentication code (the rest of the message).
    pub auth_code: Vec<u8>,
}

impl Rakp2 {
    /// Decode; on a non-zero status only tag and status are filled in.
    pub fn decode(b: &[u8]) -> Result<Self, PacketError> {
        need("RAKP 2", b, 2)?;
        if b[1] != 0 {
            return Ok(Rakp2 {
                tag: b[0],
                status: b[1],
                console_session_id: 0,
                bmc_random: [0; 16],
                bmc_guid: [0; 16],
                auth_code: Vec::new(),
            });
        }
        need("RAKP 2", b, 40)?;
        Ok(Rakp2 {
            tag: b[0],
            status: b[1],
            console_session_id: le32(&b[4..8]),
            bmc_random: arr16(&b[8..24]),
            bmc_guid: arr16(&b[24..40]),
            auth_code: b[40..].to_vec(),
        })
    }
}

/// RAKP message 3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rakp3 {
    /// Message tag.
    pub tag: u8,
    /// Status (0, or an error code to abort).
    pub status: u8,
    /// The BMC's session id.
    pub bmc_session_id: u32,
    /// Authentication code.
    pub auth_code: Vec<u8>,
}

impl Rakp3 {
    /// Wire payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.tag, self.status, 0, 0];
        v.extend_from_slice(&self.bmc_session_id.to_le_bytes());
        v.extend_from_slice(&self.auth_code);
        v
    }
}

/// RAKP message 4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rakp4 {
    /// Message tag.
    pub tag: u8,
    /// RMCP+ status code.
    pub status: u8,
    /// Our session id echoed.
    pub console_session_id: u32,
    /// Integrity check value (the rest of the message).
    pub icv: Vec<u8>,
}

impl Rakp4 {
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Self, PacketError> {
        need("RAKP 4", b, 2)?;
        if b[1] != 0 {
            return Ok(Rakp4 {
                tag: b[0],
                status: b[1],
                console_session_id: 0,
                icv: Vec::new(),
            });
        }
        need("RAKP 4", b, 8)?;
        Ok(Rakp4 {
            tag: b[0],
            status: b[1],
            console_session_id: le32(&b[4..8]),
            icv: b[8..].to_vec(),
        })
    }
}

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)).wrapping_neg()
}

/// An IPMI request message (LUN 0, to the BMC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpmiRequest {
    /// Network function (even).
    pub netfn: u8,
    /// Command.
    pub cmd: u8,
    /// Requester sequence (6 bits).
    pub rq_seq: u8,
    /// Request data.
    pub data: Vec<u8>,
}

impl IpmiRequest {
    /// Wire bytes with both checksums.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![BMC_ADDR, self.netfn << 2];
        v.push(checksum(&v));
        let start = v.len();
        v.extend_from_slice(&[CONSOLE_ADDR, (self.rq_seq & 0x3F) << 2, self.cmd]);
        v.extend_from_slice(&self.data);
        let c = checksum(&v[start..]);
        v.push(c);
        v
    }
}

/// An IPMI response message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpmiResponse {
    /// Network function (odd: request netfn + 1).
    pub netfn: u8,
    /// Command.
    pub cmd: u8,
    /// Requester sequence echoed.
    pub rq_seq: u8,
    /// Completion code.
    pub completion: u8,
    /// Data after the completion code.
    pub data: Vec<u8>,
}

impl IpmiResponse {
    /// Decode, checking both checksums.
    pub fn decode(b: &[u8]) -> Result<Self, PacketError> {
        need("IPMI response", b, 8)?;
        if checksum(&b[..2]) != b[2] {
            return Err(PacketError::Checksum { which: 1 });
        }
        let last = b.len() - 1;
        if checksum(&b[3..last]) != b[last] {
            return Err(PacketError::Checksum { which: 2 });
        }
        Ok(IpmiResponse {
            netfn: b[1] >> 2,
            cmd: b[5],
            rq_seq: b[4] >> 2,
            completion: b[6],
            data: b[7..last].to_vec(),
        })
    }

    /// Encode (for tests and simulators).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![CONSOLE_ADDR, self.netfn << 2];
        v.push(checksum(&v));
        let start = v.len();
        v.extend_from_slice(&[
            BMC_ADDR,
            (self.rq_seq & 0x3F) << 2,
            self.cmd,
            self.completion,
        ]);
        v.extend_from_slice(&self.data);
        let c = checksum(&v[start..]);
        v.push(c);
        v
    }
}
