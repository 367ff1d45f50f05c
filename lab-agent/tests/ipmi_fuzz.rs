//! Robustness of every IPMI decoder (SOL included): random and mutated inputs (xorshift,
//! fixed seed so failures reproduce) must give `Ok` or `Err`, never a panic.

use lab_agent::ipmi::commands::{
    self, BootFlags, Command, GetChannelCipherSuites, GetChassisStatus, GetSystemBootOptions,
    SetSessionPrivilege,
};
use lab_agent::ipmi::crypto::{CipherSuite, SessionKeys, aes_cbc_decrypt};
use lab_agent::ipmi::packet::{
    IpmiResponse, OpenSessionResponse, PayloadType, Privilege, Rakp2, Rakp4, decode_packet,
    encode_packet,
};
use lab_agent::ipmi::sol::{
    ActivatePayload, GetPayloadInstanceInfo, SolOptions, SolPacket, SolState,
};
use zeroize::Zeroizing;

const ITERATIONS: usize = 20_000;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] = self.next() as u8;
                }
                1 if !v.is_empty() => {
                    let n = self.below(v.len());
                    v.truncate(n);
                }
                2 => v.push(self.next() as u8),
                _ if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                _ => {}
            }
        }
        v
    }
}

fn decode_everything(b: &[u8], keys: &[SessionKeys]) {
    let _ = decode_packet(b, None);
    for k in keys {
        let _ = decode_packet(b, Some(k));
        let _ = aes_cbc_decrypt(k.aes_key(), b);
    }
    let _ = OpenSessionResponse::decode(b);
    let _ = Rakp2::decode(b);
    let _ = Rakp4::decode(b);
    let _ = IpmiResponse::decode(b);
    let _ = BootFlags::decode(b);
    let _ = commands::parse_cipher_suite_records(b);
    let _ = GetChassisStatus.parse_response(b);
    let _ = GetSystemBootOptions { param: 5 }.parse_response(b);
    let _ = GetChannelCipherSuites { index: 0 }.parse_response(b);
    let _ = SetSessionPrivilege(Privilege::Administrator).parse_response(b);
    let _ = SolPacket::decode(b);
    let _ = ActivatePayload {
        encrypt: true,
        authenticate: true,
    }
    .parse_response(b);
    let _ = GetPayloadInstanceInfo.parse_response(b);
}

/// The SOL decoder and protocol machine take arbitrary packets (random
/// sequence numbers, counts, status bits, lengths, room) without panicking,
/// and never deliver more than the room or duplicate a repeated packet.
#[test]
fn sol_machine_never_panics() {
    use std::collections::VecDeque;
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    let mut state = SolState::new(SolOptions::default());
    let start = tokio::time::Instant::now();
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut delivered = 0usize;
    for i in 0..ITERATIONS {
        let now = start + std::time::Duration::from_millis(i as u64 * 37);
        let bytes = rng.bytes(300);
        let Ok(pkt) = SolPacket::decode(&bytes) else {
            assert!(bytes.len() < 4);
            continue;
        };
        assert_eq!(SolPacket::decode(&pkt.encode()).as_ref(), Ok(&pkt));
        let room = rng.below(400);
        let got = state.receive(&pkt, room, now);
        assert!(got.data.len() <= room.min(pkt.data.len()));
        delivered += got.data.len();
        if rng.below(3) == 0 {
            pending.extend(rng.bytes(100));
        }
        let mut brk = rng.below(10) == 0;
        for _ in 0..8 {
            match state.poll_transmit(now, &mut pending, &mut brk, rng.below(300)) {
                Ok(Some(p)) => assert!(p.data.len() <= 255 && p.seq <= 15),
                Ok(None) => break,
                Err(_) => {
                    state = SolState::new(SolOptions::default());
                    break;
                }
            }
        }
        let _ = state.next_deadline();
    }
    assert!(delivered > 0);
}

#[test]
fn decoders_never_panic() {
    let keys = vec![
        SessionKeys::derive(CipherSuite::Suite3, Zeroizing::new(vec![1; 20])),
        SessionKeys::derive(CipherSuite::Suite17, Zeroizing::new(vec![2; 32])),
    ];
    let resp = IpmiResponse {
        netfn: 1,
        cmd: 1,
        rq_seq: 3,
        completion: 0,
        data: vec![0x01, 0x00, 0x00],
    }
    .encode();
    let mut seeds = vec![
        encode_packet(PayloadType::Ipmi, 0, 0, &resp, None, [0; 16]).unwrap(),
        encode_packet(PayloadType::Ipmi, 9, 1, &resp, Some(&keys[0]), [3; 16]).unwrap(),
        encode_packet(PayloadType::Ipmi, 9, 1, &resp, Some(&keys[1]), [4; 16]).unwrap(),
        resp,
        vec![0x00, 0x00, 0x04, 0x00, 0x01, 0, 0, 0, 2, 0, 0, 0],
        vec![0; 40],
    ];
    let mut open = vec![0u8; 36];
    for i in 0..3 {
        open[12 + 8 * i] = i as u8;
    }
    seeds.push(open);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for i in 0..ITERATIONS {
        let input = if i % 3 == 0 {
            rng.bytes(96)
        } else {
            let s = &seeds[rng.below(seeds.len())];
            rng.mutate(s)
        };
        decode_everything(&input, &keys);
    }
    // Every truncation of every seed too.
    for s in &seeds {
        for n in 0..=s.len() {
            decode_everything(&s[..n], &keys);
        }
    }
}

#[test]
fn sealed_packets_round_trip() {
    let keys = SessionKeys::derive(CipherSuite::Suite17, Zeroizing::new(vec![7; 32]));
    let mut rng = XorShift(42);
    for _ in 0..500 {
        let payload = rng.bytes(200);
        let mut iv = [0; 16];
        iv.iter_mut().for_each(|b| *b = rng.next() as u8);
        let pkt = encode_packet(PayloadType::Sol, 5, 6, &payload, Some(&keys), iv).unwrap();
        let back = decode_packet(&pkt, Some(&keys)).unwrap();
        assert_eq!(back.payload, payload);
        assert_eq!(back.payload_type, PayloadType::Sol);
    }
}
