//! TFTP packets as pure data: decode any datagram into a [`Packet`] (or a
//! [`PacketError`], never a panic) and encode packets back to bytes.
//!
//! Covers RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR) and the option extension of
//! RFC 2347 (options in requests, OACK). Option names are compared
//! case-insensitively, so they are stored lower-cased; values are kept as
//! sent. The mode is decoded into [`Mode`]; what to do with `netascii` is the
//! session's decision, not the codec's.

/// The largest block size any option may negotiate (RFC 2348).
pub const MAX_BLKSIZE: u16 = 65464;
/// Bytes before the payload of a DATA packet: opcode and block number.
pub const DATA_HEADER_LEN: usize = 4;

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Transfer mode named in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
    Mail,
    /// Anything else, as sent (lower-cased).
    Other(String),
}

impl Mode {
    fn parse(s: &str) -> Mode {
        match s.to_ascii_lowercase().as_str() {
            "octet" => Mode::Octet,
            "netascii" => Mode::Netascii,
            "mail" => Mode::Mail,
            other => Mode::Other(other.to_owned()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
            Mode::Mail => "mail",
            Mode::Other(s) => s,
        }
    }
}

/// One option of a request or an OACK: the name lower-cased, the value as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpOption {
    pub name: String,
    pub value: String,
}

impl TftpOption {
    pub fn new(name: &str, value: impl ToString) -> Self {
        Self {
            name: name.to_ascii_lowercase(),
            value: value.to_string(),
        }
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    pub mode: Mode,
    /// In the order sent; a repeated name keeps its first occurrence only.
    pub options: Vec<TftpOption>,
}

impl Request {
    /// The value of an option, by lower-case name.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|o| o.name == name)
            .map(|o| o.value.as_str())
    }
}

/// TFTP error codes (RFC 1350, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionRefused,
    /// A code outside 0..=8, as received.
    Unknown(u16),
}

impl ErrorCode {
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_code(code: u16) -> Self {
        match code {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            c => ErrorCode::Unknown(c),
        }
    }
}

/// A decoded TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: Vec<u8> },
    Ack { block: u16 },
    Error { code: ErrorCode, message: String },
    Oack { options: Vec<TftpOption> },
}

/// Why a datagram is not a valid TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("datagram of {len} bytes is too short")]
    TooShort { len: usize },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("string field is not NUL-terminated")]
    Unterminated,
    #[error("string field is not UTF-8")]
    NotUtf8,
    #[error("option {name:?} has no value")]
    OptionWithoutValue { name: String },
    #[error("{0}-byte trailer after the last field")]
    Trailing(usize),
    #[error("empty file name")]
    EmptyFilename,
}

impl Packet {
    /// Decode one datagram. Never panics, whatever the bytes.
    pub fn decode(buf: &[u8]) -> Result<Packet, PacketError> {
        if buf.len() < 2 {
            return Err(PacketError::TooShort { len: buf.len() });
        }
        let opcode = u16::from_be_bytes([buf[0], buf[1]]);
        let body = &buf[2..];
        match opcode {
            OP_RRQ => decode_request(body).map(Packet::Rrq),
            OP_WRQ => decode_request(body).map(Packet::Wrq),
            OP_DATA => {
                let block = read_u16(body, buf.len())?;
                Ok(Packet::Data {
                    block,
                    data: body[2..].to_vec(),
                })
            }
            OP_ACK => {
                let block = read_u16(body, buf.len())?;
                // Some clients pad ACKs; the extra bytes carry nothing.
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let code = ErrorCode::from_code(read_u16(body, buf.len())?);
                let rest = &body[2..];
                // The message is often sent without its NUL; accept both.
                let msg = match rest.iter().position(|&b| b == 0) {
                    Some(i) => &rest[..i],
                    None => rest,
                };
                Ok(Packet::Error {
                    code,
                    message: String::from_utf8_lossy(msg).into_owned(),
                })
            }
            OP_OACK => {
                let mut fields = Fields { rest: body };
                Ok(Packet::Oack {
                    options: decode_options(&mut fields)?,
                })
            }
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }

    /// Encode into a fresh buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Encode, appending to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Rrq(r) => encode_request(out, OP_RRQ, r),
            Packet::Wrq(r) => encode_request(out, OP_WRQ, r),
            Packet::Data { block, data } => {
                out.extend_from_slice(&OP_DATA.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&OP_ACK.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&OP_ERROR.to_be_bytes());
                out.extend_from_slice(&code.code().to_be_bytes());
                push_str(out, message);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&OP_OACK.to_be_bytes());
                for o in options {
                    push_str(out, &o.name);
                    push_str(out, &o.value);
                }
            }
        }
    }
}

/// Write the 4-byte header of a DATA packet into `out[..4]`; the payload
/// goes after it. The hot path builds DATA this way, without a [`Packet`].
pub fn write_data_header(out: &mut [u8; DATA_HEADER_LEN], block: u16) {
    out[..2].copy_from_slice(&OP_DATA.to_be_bytes());
    out[2..].copy_from_slice(&block.to_be_bytes());
}

/// An ERROR packet as bytes.
pub fn error_bytes(code: ErrorCode, message: &str) -> Vec<u8> {
    Packet::Error {
        code,
        message: message.to_owned(),
    }
    .encode()
}

fn read_u16(body: &[u8], total: usize) -> Result<u16, PacketError> {
    match body {
        [a, b, ..] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(PacketError::TooShort { len: total }),
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // A NUL inside would end the field early on the wire; cut it there.
    let bytes = s.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    out.extend_from_slice(&bytes[..end]);
    out.push(0);
}

/// Walks NUL-terminated strings.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn next_str(&mut self) -> Result<&'a str, PacketError> {
        let i = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(PacketError::Unterminated)?;
        let (s, tail) = self.rest.split_at(i);
        self.rest = &tail[1..];
        std::str::from_utf8(s).map_err(|_| PacketError::NotUtf8)
    }
}

fn decode_request(body: &[u8]) -> Result<Request, PacketError> {
    let mut fields = Fields { rest: body };
    let filename = fields.next_str()?;
    if filename.is_empty() {
        return Err(PacketError::EmptyFilename);
    }
    let mode = Mode::parse(fields.next_str()?);
    let options = decode_options(&mut fields)?;
    Ok(Request {
        filename: filename.to_owned(),
        mode,
        options,
    })
}

fn decode_options(fields: &mut Fields<'_>) -> Result<Vec<TftpOption>, PacketError> {
    let mut options: Vec<TftpOption> = Vec::new();
    while !fields.rest.is_empty() {
        // Some firmware pads requests with NULs; a run of them ends the list.
        if fields.rest.iter().all(|&b| b == 0) {
            break;
        }
        let name = fields.next_str()?;
        let value = match fields.next_str() {
            Ok(v) => v,
            Err(PacketError::Unterminated) => {
                return Err(PacketError::OptionWithoutValue {
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(e),
        };
        let name = name.to_ascii_lowercase();
        // An empty name carries nothing (and would read back as padding).
        if !name.is_empty() && !options.iter().any(|o| o.name == name) {
            options.push(TftpOption {
                name,
                value: value.to_owned(),
            });
        }
    }
    Ok(options)
}

fn encode_request(out: &mut Vec<u8>, opcode: u16, r: &Request) {
    out.extend_from_slice(&opcode.to_be_bytes());
    push_str(out, &r.filename);
    push_str(out, r.mode.as_str());
    for o in &r.options {
        push_str(out, &o.name);
        push_str(out, &o.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/tftp/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn opts(pairs: &[(&str, &str)]) -> Vec<TftpOption> {
        pairs.iter().map(|(n, v)| TftpOption::new(n, v)).collect()
    }

    #[test]
    fn ipxe_rrq() {
        let bytes = fixture("ipxe_rrq.bin");
        let want = Packet::Rrq(Request {
            filename: "undionly.kpxe".into(),
            mode: Mode::Octet,
            options: opts(&[("blksize", "1432"), ("tsize", "0")]),
        });
        assert_eq!(Packet::decode(&bytes).unwrap(), want);
        assert_eq!(want.encode(), bytes);
    }

    #[test]
    fn curl_rrqs() {
        let p = Packet::decode(&fixture("curl_rrq_blksize1468.bin")).unwrap();
        let Packet::Rrq(r) = p else { panic!("{p:?}") };
        assert_eq!(r.filename, "boot/undionly.kpxe");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(
            r.options,
            opts(&[("tsize", "0"), ("blksize", "1468"), ("timeout", "1")])
        );
        let p = Packet::decode(&fixture("curl_rrq_default.bin")).unwrap();
        let Packet::Rrq(r) = p else { panic!("{p:?}") };
        assert_eq!(r.filename, "ipxe.efi");
        assert_eq!(r.option("blksize"), Some("512"));
        // Round trip is byte-identical.
        assert_eq!(Packet::Rrq(r).encode(), fixture("curl_rrq_default.bin"));
    }

    #[test]
    fn atftp_requests() {
        let p = Packet::decode(&fixture("atftp_rrq_windowsize.bin")).unwrap();
        let Packet::Rrq(r) = p else { panic!("{p:?}") };
        assert_eq!(r.filename, "vmlinuz");
        assert_eq!(r.option("windowsize"), Some("16"));
        assert_eq!(r.option("blksize"), Some("1468"));
        assert_eq!(r.option("tsize"), Some("0"));
        let p = Packet::decode(&fixture("atftp_wrq.bin")).unwrap();
        assert_eq!(
            p,
            Packet::Wrq(Request {
                filename: "up.txt".into(),
                mode: Mode::Octet,
                options: vec![],
            })
        );
    }

    #[test]
    fn tftpd_hpa_replies() {
        let bytes = fixture("tftpd_hpa_oack.bin");
        let want = Packet::Oack {
            options: opts(&[("tsize", "3000"), ("blksize", "1468"), ("timeout", "1")]),
        };
        assert_eq!(Packet::decode(&bytes).unwrap(), want);
        assert_eq!(want.encode(), bytes);
        let bytes = fixture("tftpd_hpa_notfound.bin");
        let want = Packet::Error {
            code: ErrorCode::FileNotFound,
            message: "File not found".into(),
        };
        assert_eq!(Packet::decode(&bytes).unwrap(), want);
        assert_eq!(want.encode(), bytes);
    }

    #[test]
    fn option_names_are_case_insensitive_and_first_wins() {
        let bytes = b"\x00\x01F\x00OcTeT\x00BLKSIZE\x001024\x00blksize\x00512\x00";
        let Packet::Rrq(r) = Packet::decode(bytes).unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.options, opts(&[("blksize", "1024")]));
        let Packet::Rrq(r) = Packet::decode(b"\x00\x01f\x00NetASCII\x00").unwrap() else {
            panic!()
        };
        assert_eq!(r.mode, Mode::Netascii);
    }

    #[test]
    fn data_ack_error_round_trip() {
        for p in [
            Packet::Data {
                block: 65535,
                data: vec![1, 2, 3],
            },
            Packet::Data {
                block: 0,
                data: vec![],
            },
            Packet::Ack { block: 0 },
            Packet::Ack { block: 0xfffe },
            Packet::Error {
                code: ErrorCode::OptionRefused,
                message: "no".into(),
            },
            Packet::Error {
                code: ErrorCode::Unknown(77),
                message: String::new(),
            },
        ] {
            assert_eq!(Packet::decode(&p.encode()).unwrap(), p);
        }
        let mut h = [0u8; DATA_HEADER_LEN];
        write_data_header(&mut h, 0x1234);
        assert_eq!(h, [0, 3, 0x12, 0x34]);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let cases: &[(&[u8], PacketError)] = &[
            (b"", PacketError::TooShort { len: 0 }),
            (b"\x00", PacketError::TooShort { len: 1 }),
            (b"\x00\x04\x01", PacketError::TooShort { len: 3 }),
            (b"\x00\x09abc", PacketError::UnknownOpcode(9)),
            (b"\x00\x01file", PacketError::Unterminated),
            (b"\x00\x01file\x00octet", PacketError::Unterminated),
            (b"\x00\x01\x00octet\x00", PacketError::EmptyFilename),
            (b"\x00\x01\xff\x00octet\x00", PacketError::NotUtf8),
            (
                b"\x00\x01f\x00octet\x00blksize\x00",
                PacketError::OptionWithoutValue {
                    name: "blksize".into(),
                },
            ),
            (
                b"\x00\x01f\x00octet\x00blksize\x00512",
                PacketError::OptionWithoutValue {
                    name: "blksize".into(),
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(Packet::decode(bytes).as_ref(), Err(want), "{bytes:?}");
        }
        // Trailing NUL padding after the options is tolerated.
        assert!(Packet::decode(b"\x00\x01f\x00octet\x00\x00\x00\x00").is_ok());
    }

    /// Property: decoding never panics, and whatever decodes re-encodes to
    /// something that decodes to the same packet.
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: &[u8] = b"\0\0\0\x01\x02\x03\x04\x05\x06octetblksize0123\xff";
        for i in 0..200_000 {
            let len = (next() % 48) as usize;
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    // Half the inputs draw from bytes that make valid-looking
                    // packets, so the deep paths are reached too.
                    if i % 2 == 0 {
                        alphabet[(r % alphabet.len() as u64) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            if i % 3 == 0 && buf.len() >= 2 {
                buf[0] = 0;
                buf[1] = (next() % 7) as u8;
            }
            if let Ok(p) = Packet::decode(&buf) {
                assert_eq!(Packet::decode(&p.encode()).as_ref(), Ok(&p), "{buf:?}");
            }
        }
    }
}
