//! The BMC-facing targets: RMCP+ packets, the session handshake, command
//! responses, and Serial-over-LAN.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use lab_types::Secret;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::input::{Input, InputWriter};
use crate::ipmi::commands::{
    self, ActivatePayload, BootFlags, ChassisControl, CloseSession, Command, DeactivatePayload,
    GetChannelCipherSuites, GetChassisStatus, GetPayloadInstanceInfo, GetSystemBootOptions,
    PowerAction, SetSessionPrivilege, SetSystemBootOptions,
};
use crate::ipmi::crypto::{self, CipherSuite, RakpParams, SessionKeys, aes_cbc_decrypt};
use crate::ipmi::packet::{
    AUTH_TYPE_RMCP_PLUS, IpmiResponse, OpenSessionResponse, PacketError, Privilege, RMCP_HEADER,
    Rakp2, Rakp4, decode_packet, encode_packet,
};
use crate::ipmi::session::{Handshake, Randoms, usable_suites};
use crate::ipmi::sol::{SolOptions, SolPacket, SolState, op};

/// Session keys of a session that is up, for each suite we speak.
fn test_keys(suite: CipherSuite) -> &'static SessionKeys {
    static K3: LazyLock<SessionKeys> =
        LazyLock::new(|| SessionKeys::derive(CipherSuite::Suite3, Zeroizing::new(vec![0x5a; 20])));
    static K17: LazyLock<SessionKeys> =
        LazyLock::new(|| SessionKeys::derive(CipherSuite::Suite17, Zeroizing::new(vec![0xa5; 32])));
    match suite {
        CipherSuite::Suite3 => &K3,
        CipherSuite::Suite17 => &K17,
    }
}

fn suite_of(b: u8) -> CipherSuite {
    if b & 1 == 0 {
        CipherSuite::Suite3
    } else {
        CipherSuite::Suite17
    }
}

/// What an IPMI input holds, chosen by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpmiMode {
    /// A datagram, decoded outside a session and inside one of each suite.
    Datagram,
    /// A session packet whose integrity trailer is made valid for the keys
    /// of a suite (so that the confidentiality layer and the payload get
    /// fuzzed, not the HMAC): suite byte, payload type byte, session id,
    /// sequence number, then the payload as sent (encrypted or not).
    Sealed,
    /// The BMC's three answers to our handshake, each either raw bytes or
    /// a well-formed answer (MACs right) with fuzzed fields, then a sealed
    /// packet under the keys agreed.
    Handshake,
    /// Response data of every command, and an IPMI response message.
    Responses,
}

/// An IPMI input: the mode, then its bytes.
pub fn ipmi_input(mode: IpmiMode, body: &[u8]) -> Vec<u8> {
    let b = match mode {
        IpmiMode::Datagram => 0,
        IpmiMode::Sealed => 1,
        IpmiMode::Handshake => 2,
        IpmiMode::Responses => 3,
    };
    InputWriter::new().byte(b).bytes(body).finish()
}

/// IPMI target (format: [`ipmi_input`]). Decoders return errors, never
/// panic; a packet that decodes re-encodes to the same bytes; a packet with
/// the integrity bit is only accepted with keys; the handshake only
/// completes when every MAC is right.
pub fn ipmi(data: &[u8]) {
    let mut input = Input::new(data);
    match input.byte() % 4 {
        0 => datagram(input.rest()),
        1 => sealed(&mut input, None),
        2 => handshake(&mut input),
        _ => responses(input.rest()),
    }
}

fn datagram(bytes: &[u8]) {
    for keys in [
        None,
        Some(test_keys(CipherSuite::Suite3)),
        Some(test_keys(CipherSuite::Suite17)),
    ] {
        let Ok(p) = decode_packet(bytes, keys) else {
            continue;
        };
        assert!(!(p.authenticated || p.encrypted) || keys.is_some());
        assert!(p.payload.len() <= bytes.len());
        if !p.authenticated && !p.encrypted {
            let again = encode_packet(
                p.payload_type,
                p.session_id,
                p.seq,
                &p.payload,
                None,
                [0; 16],
            )
            .expect("a decoded payload re-encodes");
            // Bytes 1-3 of the RMCP header are not checked; the rest is.
            assert_eq!(again[4..], bytes[4..again.len()], "plain packets re-encode");
        }
        responses(&p.payload);
    }
}

/// Build a packet with a valid trailer for `keys` around the fuzzed body
/// and decode it; with `keys` `None`, the suite comes from the input.
fn sealed(input: &mut Input<'_>, keys: Option<&SessionKeys>) {
    let keys = keys.unwrap_or_else(|| test_keys(suite_of(input.byte())));
    let pt = input.byte() | 0x40;
    let session_id = input.u32();
    let seq = input.u32();
    let body = input.take(usize::from(u16::MAX));
    let mut bytes = RMCP_HEADER.to_vec();
    bytes.push(AUTH_TYPE_RMCP_PLUS);
    bytes.push(pt);
    bytes.extend_from_slice(&session_id.to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u16).to_le_bytes());
    bytes.extend_from_slice(body);
    let pad = (4 - (12 + body.len() + 2) % 4) % 4;
    bytes.extend(std::iter::repeat_n(0xFF, pad));
    bytes.push(pad as u8);
    bytes.push(0x07);
    let code = keys.integrity(&bytes[4..]);
    bytes.extend_from_slice(&code);
    let encrypted = pt & 0x80 != 0;
    match decode_packet(&bytes, Some(keys)) {
        Ok(p) => {
            assert!(p.authenticated);
            assert_eq!(p.encrypted, encrypted);
            assert_eq!((p.session_id, p.seq), (session_id, seq));
            if encrypted {
                // Decryption checked the padding, which is the one the
                // encoder writes: the same IV gives the same packet.
                let iv: [u8; 16] = body[..16].try_into().expect("an IV");
                let again =
                    encode_packet(p.payload_type, session_id, seq, &p.payload, Some(keys), iv)
                        .expect("a decrypted payload re-encrypts");
                assert_eq!(again, bytes, "sealed packets re-encode to themselves");
            } else {
                assert_eq!(p.payload, body);
            }
            responses(&p.payload);
        }
        Err(PacketError::Crypto(_)) => assert!(encrypted),
        Err(PacketError::BadField { field, .. }) => assert_eq!(field, "payload type"),
        Err(e) => panic!("a sealed packet is refused: {e}"),
    }
}

/// The console's side of the handshake against a BMC whose answers come
/// from the input.
fn handshake(input: &mut Input<'_>) {
    const USER: &str = "admin";
    const CONSOLE_SID: u32 = 0x0102_0304;
    let suite = suite_of(input.byte());
    let h = suite.hash();
    let password = Secret::new(b"fuzz-password".to_vec());
    let randoms = Randoms {
        console_session_id: CONSOLE_SID,
        tag: 7,
        console_random: [0x11; 16],
    };
    let endpoint = SocketAddr::from(([127, 0, 0, 1], 623));
    let mut hs = Handshake::new(
        endpoint,
        suite,
        Privilege::Administrator,
        USER,
        &password,
        randoms,
    );
    let _ = hs.open_session();
    let role = 0x10 | Privilege::Administrator as u8;
    // A status byte that is mostly 0 (success) for random input.
    let status = |b: u8| if b < 0x10 { b } else { 0 };
    let mut params = RakpParams {
        console_session_id: CONSOLE_SID,
        bmc_session_id: 0,
        console_random: randoms.console_random,
        bmc_random: [0; 16],
        bmc_guid: [0; 16],
        role,
        user: USER.as_bytes(),
    };

    // Open Session response.
    let (answer, good) = if input.byte() & 1 == 0 {
        (input.frame().unwrap_or_default().to_vec(), false)
    } else {
        let (tag, st, sid) = (input.byte(), status(input.byte()), input.u32());
        params.bmc_session_id = sid;
        let mut v = vec![tag, st, Privilege::Administrator as u8, 0];
        v.extend_from_slice(&CONSOLE_SID.to_le_bytes());
        v.extend_from_slice(&sid.to_le_bytes());
        for (i, alg) in [
            suite.auth_alg(),
            suite.integrity_alg(),
            suite.confidentiality_alg(),
        ]
        .into_iter()
        .enumerate()
        {
            v.extend_from_slice(&[i as u8, 0, 0, 8, alg, 0, 0, 0]);
        }
        (v, st == 0)
    };
    if let Ok(r) = OpenSessionResponse::decode(&answer) {
        params.bmc_session_id = r.bmc_session_id;
    }
    if let Err(e) = hs.rakp1(&answer) {
        assert!(!good, "a good Open Session response refused: {e}");
        return;
    }

    // RAKP 2.
    let (answer, good) = if input.byte() & 1 == 0 {
        (input.frame().unwrap_or_default().to_vec(), false)
    } else {
        let (tag, st) = (input.byte(), status(input.byte()));
        params.bmc_random.copy_from_slice(&pad16(input.take(16)));
        params.bmc_guid.copy_from_slice(&pad16(input.take(16)));
        let mut v = vec![tag, st, 0, 0];
        v.extend_from_slice(&CONSOLE_SID.to_le_bytes());
        v.extend_from_slice(&params.bmc_random);
        v.extend_from_slice(&params.bmc_guid);
        v.extend_from_slice(&crypto::rakp2_auth_code(h, password.expose(), &params));
        (v, st == 0)
    };
    let r2 = Rakp2::decode(&answer).ok().filter(|r| r.status == 0);
    if let Err(e) = hs.rakp3(&answer) {
        assert!(!good, "a good RAKP 2 refused: {e}");
        return;
    }
    let r2 = r2.expect("RAKP 3 only after a RAKP 2 with status 0");
    params.bmc_random = r2.bmc_random;
    params.bmc_guid = r2.bmc_guid;

    // RAKP 4.
    let (answer, good) = if input.byte() & 1 == 0 {
        (input.frame().unwrap_or_default().to_vec(), false)
    } else {
        let (tag, st) = (input.byte(), status(input.byte()));
        let sik = crypto::session_integrity_key(h, password.expose(), &params);
        let mut v = vec![tag, st, 0, 0];
        v.extend_from_slice(&CONSOLE_SID.to_le_bytes());
        v.extend_from_slice(&crypto::rakp4_icv(h, &sik, &params));
        (v, st == 0)
    };
    let r4_ok = Rakp4::decode(&answer).is_ok_and(|r| r.status == 0);
    let session = match hs.finish(&answer) {
        Ok(s) => s,
        Err(e) => {
            assert!(!good, "a good RAKP 4 refused: {e}");
            return;
        }
    };
    assert!(r4_ok, "a session only after a RAKP 4 with status 0");
    assert_eq!(session.keys.suite, suite);
    assert_eq!(session.console_session_id, CONSOLE_SID);
    sealed(input, Some(&session.keys));
}

fn pad16(b: &[u8]) -> [u8; 16] {
    let mut a = [0; 16];
    a[..b.len()].copy_from_slice(b);
    a
}

/// Every response parser over `data`; and `data` as the data of an IPMI
/// response, which must survive encode and decode.
fn responses(data: &[u8]) {
    fn parse<C: Command>(c: &C, data: &[u8]) -> Option<C::Output> {
        c.parse_response(data).ok()
    }
    parse(&GetChannelCipherSuites { index: 0 }, data);
    parse(&SetSessionPrivilege(Privilege::Administrator), data);
    parse(&CloseSession { bmc_session_id: 1 }, data);
    parse(&GetChassisStatus, data);
    parse(&ChassisControl(PowerAction::Cycle), data);
    parse(&SetSystemBootOptions::keep_valid_past_timeout(), data);
    for param in [0, 5, 0x85] {
        if let Some(v) = parse(&GetSystemBootOptions { param }, data) {
            assert_eq!(v.len() + 2, data.len());
        }
    }
    if let Some(a) = parse(
        &ActivatePayload {
            encrypt: true,
            authenticate: true,
        },
        data,
    ) {
        assert!((1..=255).contains(&a.max_chunk()));
    }
    parse(&DeactivatePayload, data);
    parse(&GetPayloadInstanceInfo, data);
    if let Ok(flags) = BootFlags::decode(data) {
        assert_eq!(BootFlags::decode(&flags.encode()), Ok(flags));
    }
    let ids = commands::parse_cipher_suite_records(data);
    assert!(ids.len() <= data.len());
    let configured = [CipherSuite::Suite17, CipherSuite::Suite3];
    let usable = usable_suites(&configured, data);
    assert!(!usable.is_empty() && usable.iter().all(|s| configured.contains(s)));
    let _ = OpenSessionResponse::decode(data);
    let _ = Rakp2::decode(data);
    let _ = Rakp4::decode(data);
    let _ = aes_cbc_decrypt(test_keys(CipherSuite::Suite3).aes_key(), data);
    if let Ok(r) = IpmiResponse::decode(data) {
        assert_eq!(IpmiResponse::decode(&r.encode()).as_ref(), Ok(&r));
    }
    if let [netfn, cmd, seq, completion, rest @ ..] = data {
        let r = IpmiResponse {
            netfn: netfn & 0x3F,
            cmd: *cmd,
            rq_seq: seq & 0x3F,
            completion: *completion,
            data: rest.to_vec(),
        };
        assert_eq!(IpmiResponse::decode(&r.encode()), Ok(r));
    }
}

// ------------------------------------------------------------ SOL

/// One step of a SOL input.
#[derive(Debug, Clone, Copy)]
pub enum SolStep<'a> {
    /// A packet from the BMC (raw bytes), with room for `room * 4`
    /// characters in the reader.
    Packet { room: u8, bytes: &'a [u8] },
    /// The console writes `n` characters.
    Write(u8),
    /// Time passes (milliseconds).
    Wait(u16),
    /// The console asks for a break.
    Break,
    /// The session task polls for a packet to send, `max_chunk` characters.
    Poll(u8),
}

/// A SOL input: its steps in order.
pub fn sol_input(steps: &[SolStep<'_>]) -> Vec<u8> {
    let mut w = InputWriter::new();
    for s in steps {
        w = match *s {
            SolStep::Packet { room, bytes } => w.byte(0).frame(bytes).byte(room),
            SolStep::Write(n) => w.byte(1).byte(n),
            SolStep::Wait(ms) => w.byte(2).u16(ms),
            SolStep::Break => w.byte(3),
            SolStep::Poll(max) => w.byte(4).byte(max),
        };
    }
    w.finish()
}

/// SOL target (format: [`sol_input`]). The BMC side is played by the input:
/// whatever it sends, the SOL machine never delivers more than the reader
/// has room for, only resends a packet unchanged, keeps one data packet in
/// flight, and the characters the BMC acknowledged are exactly the start of
/// what the console wrote, in order. Then a BMC that acknowledges
/// everything must get all of it, once.
pub fn sol(data: &[u8]) {
    let options = SolOptions {
        retry_timeout: Duration::from_secs(1),
        retries: 3,
        nack_backoff: Duration::from_millis(10),
        keepalive: Duration::from_secs(10),
        read_buffer: 1024,
        write_buffer: 1024,
    };
    let mut m = SolModel::new(options);
    let mut input = Input::new(data);
    while !input.is_empty() {
        let ok = match input.byte() % 5 {
            0 => {
                let bytes = input.frame().unwrap_or_default();
                let room = usize::from(input.byte()) * 4;
                m.bmc_sends(bytes, room);
                true
            }
            1 => {
                m.write(usize::from(input.byte()));
                true
            }
            2 => {
                m.now += Duration::from_millis(u64::from(input.u16()));
                true
            }
            3 => {
                m.brk = true;
                true
            }
            _ => m.poll(usize::from(input.byte()), false),
        };
        if !ok {
            return;
        }
    }
    m.drain();
}

/// The SOL machine, what was written to it and what a BMC accepted.
struct SolModel {
    s: SolState,
    now: Instant,
    pending: VecDeque<u8>,
    brk: bool,
    written: Vec<u8>,
    delivered: Vec<u8>,
    /// The data packet the BMC has not acknowledged, as the model sees it.
    in_flight: Option<(u8, Vec<u8>)>,
    next_byte: u8,
}

impl SolModel {
    fn new(options: SolOptions) -> Self {
        Self {
            s: SolState::new(options),
            now: Instant::now(),
            pending: VecDeque::new(),
            brk: false,
            written: Vec::new(),
            delivered: Vec::new(),
            in_flight: None,
            next_byte: 0,
        }
    }

    fn write(&mut self, n: usize) {
        for _ in 0..n.min(4096usize.saturating_sub(self.pending.len())) {
            self.pending.push_back(self.next_byte);
            self.written.push(self.next_byte);
            self.next_byte = self.next_byte.wrapping_add(1);
        }
    }

    fn bmc_sends(&mut self, bytes: &[u8], room: usize) {
        let Ok(pkt) = SolPacket::decode(bytes) else {
            assert!(bytes.len() < 4);
            return;
        };
        assert_eq!(SolPacket::decode(&pkt.encode()).as_ref(), Ok(&pkt));
        self.receive(&pkt, room);
    }

    fn receive(&mut self, pkt: &SolPacket, room: usize) {
        let got = self.s.receive(pkt, room, self.now);
        assert!(
            got.data.len() <= room.min(255),
            "delivered beyond the reader's room"
        );
        assert_eq!(got.data, pkt.data[..got.data.len()]);
        if pkt.ack_seq != 0
            && let Some((seq, data)) = self.in_flight.take_if(|(seq, _)| *seq == pkt.ack_seq)
        {
            let accepted = usize::from(pkt.accepted).min(data.len());
            self.delivered.extend_from_slice(&data[..accepted]);
            assert_eq!(seq, pkt.ack_seq);
        }
        assert!(
            self.written.starts_with(&self.delivered),
            "the BMC got characters out of order or twice"
        );
    }

    /// One poll; `false` once the machine has failed.
    fn poll(&mut self, max_chunk: usize, draining: bool) -> bool {
        match self
            .s
            .poll_transmit(self.now, &mut self.pending, &mut self.brk, max_chunk)
        {
            Err(_) => false,
            Ok(None) => true,
            Ok(Some(p)) => {
                if p.seq == 0 {
                    assert!(p.data.is_empty(), "an ack carries no data");
                } else if p.flags & op::BREAK != 0 {
                    assert!(p.data.is_empty(), "a break carries no data");
                } else {
                    assert!(!p.data.is_empty());
                    assert!((1..=15).contains(&p.seq));
                    match &self.in_flight {
                        Some((seq, data)) => {
                            assert_eq!((*seq, data), (p.seq, &p.data), "one packet in flight");
                        }
                        None => {
                            assert!(p.data.len() <= max_chunk.clamp(1, 255), "chunk too big");
                            self.in_flight = Some((p.seq, p.data.clone()));
                        }
                    }
                    if draining {
                        let ack = SolPacket::ack(p.seq, p.data.len() as u8);
                        self.receive(&ack, 0);
                    }
                }
                true
            }
        }
    }

    /// A BMC that acknowledges every character: all that was written
    /// reaches it.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.pending.is_empty() && !self.s.busy() && !self.brk {
                assert_eq!(
                    self.delivered, self.written,
                    "everything written is delivered once"
                );
                return;
            }
            if !self.poll(255, true) {
                // Retries used up before the drain began.
                return;
            }
            if let Some(at) = self.s.next_deadline() {
                self.now = self.now.max(at);
            }
        }
        panic!("SOL never drained: {} bytes pending", self.pending.len());
    }
}
