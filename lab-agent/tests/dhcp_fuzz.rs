//! Fuzz-style robustness test: mutated captured packets (xorshift mutator,
//! fixed seed, so failures reproduce) must never make the guarded decode,
//! the decision or the reply encoding panic.

use std::net::{Ipv4Addr, SocketAddrV4};

use lab_agent::dhcp::packet::{self, DecodeError};
use lab_agent::dhcp::{Arrival, Decision, DhcpConfig, Mode, Request, decide};
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable};

const ITERATIONS: usize = 30_000;

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
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/dhcp/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

/// Option codes whose decoding in dhcproto has asserts or arithmetic.
const NASTY: &[u8] = &[
    94, 93, 81, 121, 82, 91, 92, 53, 119, 141, 151, 152, 153, 154, 155,
];

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            // Flip random bytes, mostly in the options.
            0 => {
                for _ in 0..=rng.below(8) {
                    let i = 236 + rng.below(b.len().saturating_sub(236));
                    if i < b.len() {
                        b[i] = rng.byte();
                    }
                }
            }
            // Truncate.
            1 => b.truncate(rng.below(b.len() + 1)),
            // Splice a short, odd option into the option area.
            2 => {
                let at = 240 + rng.below(b.len().saturating_sub(240));
                let code = NASTY[rng.below(NASTY.len())];
                let len = rng.below(5) as u8;
                let mut opt = vec![code, len];
                opt.extend((0..rng.below(6)).map(|_| rng.byte()));
                let at = at.min(b.len());
                b.splice(at..at, opt);
            }
            // Corrupt a length byte somewhere.
            3 => {
                let i = 240 + rng.below(b.len().saturating_sub(240));
                if i < b.len() {
                    b[i] = [0, 1, 2, 255][rng.below(4)];
                }
            }
            // Header fields: hlen, op, htype.
            4 => {
                let i = [0, 1, 2, 3][rng.below(4)];
                if i < b.len() {
                    b[i] = rng.byte();
                }
            }
            // Random tail.
            _ => b.extend((0..rng.below(64)).map(|_| rng.byte())),
        }
    }
    b
}

#[test]
fn mutated_packets_never_panic() {
    let seeds = [
        fixture("ipxe-bios-discover.hex"),
        fixture("ipxe-bios-request.hex"),
        fixture("aavmf-arm64-discover.hex"),
    ];
    let hosts = HostTable::new(
        [
            ("52:54:00:12:34:56", Arch::X86_64),
            ("52:54:00:aa:00:01", Arch::Aarch64),
        ]
        .map(|(mac, arch)| BootHost {
            name: mac.into(),
            mac: mac.parse().unwrap(),
            ipv4: None,
            arch,
            firmware: Firmware::Uefi,
            profile: "xen".into(),
            lease: None,
            holder: None,
            ssh_key: None,
        }),
    );
    let server = Ipv4Addr::new(198, 18, 0, 1);
    let mut auth = DhcpConfig::new(Mode::Authoritative, server);
    auth.pool = vec![Ipv4Addr::new(198, 18, 0, 100)];
    let proxy = DhcpConfig::new(Mode::Proxy, server);
    let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);

    // The decoder's caught panics would print one message each; keep the
    // output readable (restored below, before any assertion).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut rejected, mut panicked, mut replies) = (0, 0, 0, 0);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for i in 0..ITERATIONS {
            let bytes = mutate(&mut rng, &seeds[i % seeds.len()]);
            for arrival in [Arrival::Dhcp, Arrival::Pxe] {
                match Request::decode(&bytes, src, arrival) {
                    Ok(req) => {
                        ok += 1;
                        for cfg in [&auth, &proxy] {
                            if let Decision::Reply(m, _) = decide(&req, &hosts, cfg) {
                                replies += 1;
                                let _ = packet::encode(&m);
                            }
                        }
                    }
                    Err(DecodeError::Panicked { .. }) => panicked += 1,
                    Err(_) => rejected += 1,
                }
            }
        }
    }));
    std::panic::set_hook(hook);
    assert!(
        outcome.is_ok(),
        "a panic escaped the guarded decode/decide/encode"
    );
    println!(
        "decoded {ok}, rejected {rejected}, decoder panics caught {panicked}, replies {replies}"
    );
    assert!(
        ok > 0 && rejected > 0 && replies > 0,
        "mutator too weak or too strong"
    );
}

#[test]
fn short_option_94_is_caught() {
    // iPXE's DISCOVER with option 94 cut to one byte: dhcproto
    // `debug_assert!(len == 3)`s on it.
    let mut b = fixture("ipxe-bios-discover.hex");
    let at = b
        .windows(5)
        .position(|w| w == [94, 3, 1, 2, 1])
        .expect("option 94");
    b.splice(at..at + 5, [94, 1, 1]);
    let src = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);
    let r = Request::decode(&b, src, Arrival::Dhcp);
    if cfg!(debug_assertions) {
        assert!(matches!(r, Err(DecodeError::Panicked { .. })), "{r:?}");
    }
}
