//! Known-answer tests for the RMCP+ key derivation, RAKP codes, integrity
//! and confidentiality of suites 3 and 17. The vectors in
//! `fixtures/ipmi/kat.txt` were computed independently, from the spec, by
//! `fixtures/ipmi/gen_kat.py` (Python hmac/hashlib + openssl AES).

use std::collections::HashMap;

use lab_agent::ipmi::crypto::{self, CipherSuite, RakpParams, SessionKeys};
use lab_agent::ipmi::packet::{IpmiRequest, PayloadType, decode_packet, encode_packet};
use zeroize::Zeroizing;

const PASSWORD: &[u8] = b"labpass";
const USER: &[u8] = b"admin";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn vectors(suite: u8) -> HashMap<String, Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ipmi/kat.txt");
    let text = std::fs::read_to_string(path).expect("kat.txt");
    let header = format!("[suite {suite}]");
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside && let Some((k, v)) = line.split_once(" = ") {
            out.insert(k.to_string(), hex(v));
        }
    }
    assert!(!out.is_empty(), "no vectors for suite {suite}");
    out
}

fn params() -> RakpParams<'static> {
    let mut rm = [0; 16];
    let mut rc = [0; 16];
    for i in 0..16 {
        rm[i] = 0x10 + i as u8;
        rc[i] = 0xA0 + i as u8;
    }
    let g = hex("a123456789abcdefa123456789abcdef");
    let mut guid = [0; 16];
    guid.copy_from_slice(&g);
    RakpParams {
        console_session_id: 0x1A2B3C4D,
        bmc_session_id: 0x00C0FFEE,
        console_random: rm,
        bmc_random: rc,
        bmc_guid: guid,
        role: 0x14,
        user: USER,
    }
}

fn check_suite(suite: CipherSuite) {
    let v = vectors(suite.id());
    let h = suite.hash();
    let p = params();
    assert_eq!(
        crypto::rakp2_auth_code(h, PASSWORD, &p),
        v["rakp2"],
        "rakp2"
    );
    assert_eq!(
        crypto::rakp3_auth_code(h, PASSWORD, &p),
        v["rakp3"],
        "rakp3"
    );
    let sik = crypto::session_integrity_key(h, PASSWORD, &p);
    assert_eq!(*sik, v["sik"], "sik");
    assert_eq!(crypto::rakp4_icv(h, &sik, &p), v["rakp4"], "rakp4");
    let keys = SessionKeys::derive(suite, sik);
    assert_eq!(*keys.k1, v["k1"], "k1");
    assert_eq!(*keys.k2, v["k2"], "k2");

    // A whole sealed packet: Get Chassis Status, rqSeq 5, session seq 7.
    let msg = IpmiRequest {
        netfn: 0x00,
        cmd: 0x01,
        rq_seq: 5,
        data: vec![],
    }
    .encode();
    let mut iv = [0; 16];
    for (i, b) in iv.iter_mut().enumerate() {
        *b = 0x30 + i as u8;
    }
    let pkt = encode_packet(PayloadType::Ipmi, 0x00C0FFEE, 7, &msg, Some(&keys), iv).unwrap();
    assert_eq!(pkt, v["packet"], "sealed packet");

    let back = decode_packet(&v["packet"], Some(&keys)).expect("decode vector");
    assert!(back.encrypted && back.authenticated);
    assert_eq!((back.session_id, back.seq), (0x00C0FFEE, 7));
    assert_eq!(back.payload, msg);

    // Any flipped bit breaks integrity.
    for i in 4..pkt.len() {
        let mut bad = pkt.clone();
        bad[i] ^= 0x01;
        assert!(
            decode_packet(&bad, Some(&keys)).is_err(),
            "bit flip at {i} accepted"
        );
    }
    // And a different key does not verify.
    let other = SessionKeys::derive(suite, Zeroizing::new(vec![0x55; h.output_len()]));
    assert!(decode_packet(&pkt, Some(&other)).is_err());
}

#[test]
fn suite_3_known_answers() {
    check_suite(CipherSuite::Suite3);
}

#[test]
fn suite_17_known_answers() {
    check_suite(CipherSuite::Suite17);
}
