//! The read transfer as a pure state machine, with no socket and no clock:
//! option negotiation against the server's caps ([`negotiate`]) and the
//! sending side of a transfer ([`Sender`]): block numbering with the 16-bit
//! wrap (65535 → 0), windows per RFC 7440, and what to resend on a timeout.
//!
//! Decisions made here:
//! - Only `octet` is served. `netascii` and `mail` are refused with ERROR 0
//!   (boot files are binary; translating line ends would also make `tsize`
//!   wrong).
//! - Unknown options are ignored (left out of the OACK, RFC 2347). A known
//!   option with a value that is not a number or is out of its range is
//!   refused with ERROR 8. `blksize` above the cap (or above 65464) is
//!   lowered to the cap, `windowsize` likewise.
//! - A `timeout` above the server's `max_timeout` is not acknowledged (RFC
//!   2349 lets the server leave it out of the OACK, not change it): the
//!   transfer keeps the server's default. A client asking `timeout=255`
//!   would otherwise hold a slot for (retries + 1) × 255 s without a reply.
//! - Every transfer has an overall deadline ([`Limits::deadline`]): a floor
//!   plus the file's length at a minimum rate, so a client that ACKs just
//!   often enough never to time out still lets go of its slot.
//! - A duplicate ACK (of the block already acknowledged) is ignored, which
//!   avoids the Sorcerer's Apprentice syndrome; the retransmit timer is the
//!   only thing that resends.

use super::packet::{ErrorCode, MAX_BLKSIZE, Mode, Request, TftpOption};
use std::time::Duration;

/// RFC 1350's block size, used when the client asks for none.
pub const DEFAULT_BLKSIZE: u16 = 512;

/// The server's side of the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub blksize_cap: u16,
    pub windowsize_cap: u16,
    /// Used when the client does not ask for a timeout, or asks more than
    /// `max_timeout`.
    pub default_timeout: Duration,
    /// The largest `timeout` option acknowledged.
    pub max_timeout: Duration,
    /// Every transfer may take this long, whatever its size ...
    pub deadline_floor: Duration,
    /// ... plus its length at this many bytes per second.
    pub min_rate: u64,
}

impl Limits {
    /// How long a transfer of `len` bytes may take in all:
    /// `deadline_floor + len / min_rate`.
    pub fn deadline(&self, len: u64) -> Duration {
        let ms = u128::from(len) * 1000 / u128::from(self.min_rate.max(1));
        self.deadline_floor
            .saturating_add(Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
    }
}

/// What a transfer will use, and which options go in the OACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options acknowledged with a fixed value, in request order.
    acked: Vec<Acked>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Acked {
    Blksize(u16),
    Timeout(u8),
    Tsize,
    Windowsize(u16),
}

impl Negotiated {
    /// The OACK options for a file of `file_len` bytes, or `None` when the
    /// client asked for nothing we support (then DATA 1 is sent at once).
    pub fn oack(&self, file_len: u64) -> Option<Vec<TftpOption>> {
        if self.acked.is_empty() {
            return None;
        }
        Some(
            self.acked
                .iter()
                .map(|a| match a {
                    Acked::Blksize(v) => TftpOption::new("blksize", v),
                    Acked::Timeout(v) => TftpOption::new("timeout", v),
                    Acked::Tsize => TftpOption::new("tsize", file_len),
                    Acked::Windowsize(v) => TftpOption::new("windowsize", v),
                })
                .collect(),
        )
    }
}

/// Why a request is refused before any data is sent: the ERROR to reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("only octet mode is served")]
    Mode,
    #[error("option {name} value {value:?} refused")]
    Option { name: &'static str, value: String },
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Mode => ErrorCode::NotDefined,
            Refusal::Option { .. } => ErrorCode::OptionRefused,
        }
    }
}

/// Decide mode and options of a read request against the server's limits.
pub fn negotiate(req: &Request, limits: &Limits) -> Result<Negotiated, Refusal> {
    if req.mode != Mode::Octet {
        return Err(Refusal::Mode);
    }
    let mut n = Negotiated {
        // Without the option, RFC 1350's 512 is the only size a client takes.
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: limits.default_timeout,
        acked: Vec::new(),
    };
    for opt in &req.options {
        let refuse = |name: &'static str| Refusal::Option {
            name,
            value: opt.value.clone(),
        };
        match opt.name.as_str() {
            "blksize" => {
                let v: u64 = opt.value.parse().map_err(|_| refuse("blksize"))?;
                if v < 8 {
                    return Err(refuse("blksize"));
                }
                let v = v
                    .min(u64::from(MAX_BLKSIZE))
                    .min(u64::from(limits.blksize_cap)) as u16;
                n.blksize = v;
                n.acked.push(Acked::Blksize(v));
            }
            "timeout" => {
                let v: u8 = opt.value.parse().map_err(|_| refuse("timeout"))?;
                if v == 0 {
                    return Err(refuse("timeout"));
                }
                let asked = Duration::from_secs(u64::from(v));
                if asked <= limits.max_timeout {
                    n.timeout = asked;
                    n.acked.push(Acked::Timeout(v));
                }
            }
            "tsize" => {
                let _: u64 = opt.value.parse().map_err(|_| refuse("tsize"))?;
                n.acked.push(Acked::Tsize);
            }
            "windowsize" => {
                let v: u64 = opt.value.parse().map_err(|_| refuse("windowsize"))?;
                if v == 0 {
                    return Err(refuse("windowsize"));
                }
                let v = v
                    .min(u64::from(u16::MAX))
                    .min(u64::from(limits.windowsize_cap)) as u16;
                n.windowsize = v;
                n.acked.push(Acked::Windowsize(v));
            }
            _ => {}
        }
    }
    Ok(n)
}

/// What the sender does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send (or resend) the OACK.
    SendOack,
    /// Send blocks `first..=last` (absolute numbers, the first block is 1).
    SendBlocks { first: u64, last: u64 },
    /// Nothing to send; keep waiting until the retransmit deadline.
    Wait,
    /// The last block was acknowledged.
    Done,
    /// Retries are exhausted.
    GiveUp,
}

/// The sending side of one read transfer. Blocks are numbered internally
/// from 1 with a `u64`, so any file length works; [`Sender::wire_block`]
/// gives the 16-bit number on the wire, wrapping 65535 → 0.
#[derive(Debug, Clone)]
pub struct Sender {
    len: u64,
    blksize: u64,
    window: u64,
    total_blocks: u64,
    /// Highest block acknowledged (0: none, or the OACK).
    acked: u64,
    /// Highest block sent.
    sent: u64,
    oack_pending: bool,
    tries: u32,
    max_retries: u32,
}

impl Sender {
    /// `with_oack`: an OACK is sent first and must be acknowledged with ACK 0.
    pub fn new(len: u64, blksize: u16, windowsize: u16, with_oack: bool, max_retries: u32) -> Self {
        let blksize = u64::from(blksize.max(1));
        Self {
            len,
            blksize,
            window: u64::from(windowsize.max(1)),
            // The last block is always shorter than blksize, possibly empty.
            total_blocks: len / blksize + 1,
            acked: 0,
            sent: 0,
            oack_pending: with_oack,
            tries: 0,
            max_retries,
        }
    }

    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    /// The 16-bit number of absolute block `n`.
    pub fn wire_block(n: u64) -> u16 {
        n as u16
    }

    /// File offset and length of absolute block `n` (1-based).
    pub fn block_range(&self, n: u64) -> (u64, usize) {
        let off = (n - 1) * self.blksize;
        let len = self.len.saturating_sub(off).min(self.blksize) as usize;
        (off, len)
    }

    /// The first thing to send.
    pub fn start(&mut self) -> Step {
        if self.oack_pending {
            Step::SendOack
        } else {
            self.next_window()
        }
    }

    fn next_window(&mut self) -> Step {
        let first = self.acked + 1;
        let last = (self.acked + self.window).min(self.total_blocks);
        self.sent = self.sent.max(last);
        Step::SendBlocks { first, last }
    }

    /// An ACK arrived with wire block number `block`.
    pub fn on_ack(&mut self, block: u16) -> Step {
        if self.oack_pending {
            if block != 0 {
                return Step::Wait;
            }
            self.oack_pending = false;
            self.tries = 0;
            return self.next_window();
        }
        // The absolute block this ACK names, taken in (acked, sent].
        let ahead = u64::from(block.wrapping_sub(self.acked as u16));
        let n = self.acked + ahead;
        if ahead == 0 || n > self.sent {
            // Duplicate, stale, or for a block never sent.
            return Step::Wait;
        }
        self.acked = n;
        self.tries = 0;
        if self.acked == self.total_blocks {
            return Step::Done;
        }
        // A partial window ACK (RFC 7440 §4) resends from the block after it.
        self.next_window()
    }

    /// The retransmit deadline passed with no progress.
    pub fn on_timeout(&mut self) -> Step {
        self.tries += 1;
        if self.tries > self.max_retries {
            return Step::GiveUp;
        }
        if self.oack_pending {
            Step::SendOack
        } else {
            self.next_window()
        }
    }

    /// Whether `step` is a resend (for counters).
    pub fn is_retry(&self) -> bool {
        self.tries > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tftp::packet::Packet;

    const LIMITS: Limits = Limits {
        blksize_cap: 1468,
        windowsize_cap: 64,
        default_timeout: Duration::from_secs(1),
        max_timeout: Duration::from_secs(5),
        deadline_floor: Duration::from_secs(60),
        min_rate: 16 * 1024,
    };

    fn rrq(mode: Mode, opts: &[(&str, &str)]) -> Request {
        Request {
            filename: "f".into(),
            mode,
            options: opts.iter().map(|(n, v)| TftpOption::new(n, v)).collect(),
        }
    }

    #[test]
    fn ipxe_request_negotiates_blksize_and_tsize() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tftp/ipxe_rrq.bin"
        ))
        .unwrap();
        let Ok(Packet::Rrq(req)) = Packet::decode(&bytes) else {
            panic!()
        };
        let n = negotiate(&req, &LIMITS).unwrap();
        assert_eq!((n.blksize, n.windowsize), (1432, 1));
        assert_eq!(
            n.oack(1234).unwrap(),
            vec![
                TftpOption::new("blksize", 1432),
                TftpOption::new("tsize", 1234)
            ]
        );
    }

    #[test]
    fn caps_and_defaults() {
        let n = negotiate(&rrq(Mode::Octet, &[]), &LIMITS).unwrap();
        assert_eq!(
            (n.blksize, n.windowsize, n.timeout),
            (512, 1, Duration::from_secs(1))
        );
        assert_eq!(n.oack(10), None);
        let n = negotiate(
            &rrq(
                Mode::Octet,
                &[
                    ("blksize", "65464"),
                    ("windowsize", "1000"),
                    ("timeout", "3"),
                    ("x", "y"),
                ],
            ),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            (n.blksize, n.windowsize, n.timeout),
            (1468, 64, Duration::from_secs(3))
        );
        assert_eq!(
            n.oack(0).unwrap(),
            vec![
                TftpOption::new("blksize", 1468),
                TftpOption::new("windowsize", 64),
                TftpOption::new("timeout", 3),
            ]
        );
        // Above the RFC maximum is lowered too, not refused.
        let n = negotiate(&rrq(Mode::Octet, &[("blksize", "99999")]), &LIMITS).unwrap();
        assert_eq!(n.blksize, 1468);
    }

    #[test]
    fn timeouts_above_the_cap_are_not_acknowledged() {
        let sec = Duration::from_secs;
        for (asked, timeout, acked) in [
            ("1", sec(1), true),
            ("5", sec(5), true),
            ("6", sec(1), false),
            ("255", sec(1), false),
        ] {
            let n = negotiate(&rrq(Mode::Octet, &[("timeout", asked)]), &LIMITS).unwrap();
            assert_eq!(n.timeout, timeout, "timeout={asked}");
            let want = acked.then(|| vec![TftpOption::new("timeout", asked)]);
            assert_eq!(n.oack(10), want, "timeout={asked}");
        }
        // With other options the OACK carries those, without the timeout.
        let n = negotiate(
            &rrq(Mode::Octet, &[("timeout", "255"), ("tsize", "0")]),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(n.oack(10).unwrap(), vec![TftpOption::new("tsize", 10)]);
        // The worst a silent client can hold a slot: (retries + 1) x 5 s.
    }

    #[test]
    fn deadlines_grow_with_the_length_from_a_floor() {
        let sec = Duration::from_secs;
        for (len, want) in [
            (0, sec(60)),
            (100, Duration::from_millis(60_006)),
            (16 * 1024, sec(61)),
            // A 50 MiB initrd: 60 s + 3,200 s.
            (50 << 20, sec(3260)),
            (u64::MAX, Duration::MAX),
        ] {
            let got = LIMITS.deadline(len);
            if want == Duration::MAX {
                assert!(got > sec(1 << 40), "{len}: {got:?}");
            } else {
                assert_eq!(got, want, "{len}");
            }
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            negotiate(&rrq(Mode::Netascii, &[]), &LIMITS),
            Err(Refusal::Mode)
        );
        assert_eq!(
            negotiate(&rrq(Mode::Mail, &[]), &LIMITS),
            Err(Refusal::Mode)
        );
        for (name, value) in [
            ("blksize", "7"),
            ("blksize", "big"),
            ("timeout", "0"),
            ("timeout", "256"),
            ("tsize", "-1"),
            ("windowsize", "0"),
        ] {
            let r = negotiate(&rrq(Mode::Octet, &[(name, value)]), &LIMITS).unwrap_err();
            assert_eq!(r.code(), ErrorCode::OptionRefused, "{name}={value}");
        }
    }

    /// Drive a sender with a perfect client; returns the blocks sent in order.
    fn run_clean(s: &mut Sender) -> Vec<u64> {
        let mut sent = Vec::new();
        let mut step = s.start();
        loop {
            match step {
                Step::SendOack => step = s.on_ack(0),
                Step::SendBlocks { first, last } => {
                    sent.extend(first..=last);
                    step = s.on_ack(Sender::wire_block(last));
                }
                Step::Done => return sent,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lockstep_block_counts() {
        for (len, blocks) in [(0, 1), (1, 1), (511, 1), (512, 2), (1024, 3), (1025, 3)] {
            let mut s = Sender::new(len, 512, 1, false, 5);
            assert_eq!(
                run_clean(&mut s),
                (1..=blocks).collect::<Vec<_>>(),
                "len {len}"
            );
            assert_eq!(s.block_range(blocks).1, (len % 512) as usize);
        }
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        let len = 512 * 70_000 + 5;
        let mut s = Sender::new(len, 512, 1, true, 5);
        let sent = run_clean(&mut s);
        assert_eq!(sent.len(), 70_001);
        assert_eq!(Sender::wire_block(65535), 65535);
        assert_eq!(Sender::wire_block(65536), 0);
        assert_eq!(Sender::wire_block(65537), 1);
        assert_eq!(s.block_range(70_001), (512 * 70_000, 5));
        // Windowed over the wrap as well.
        let mut s = Sender::new(len, 512, 16, true, 5);
        assert_eq!(run_clean(&mut s).len(), 70_001);
    }

    #[test]
    fn windows_partial_acks_and_duplicates() {
        let mut s = Sender::new(512 * 10, 512, 4, true, 5);
        assert_eq!(s.start(), Step::SendOack);
        assert_eq!(s.on_ack(1), Step::Wait, "ACK 1 before the OACK is acked");
        assert_eq!(s.on_ack(0), Step::SendBlocks { first: 1, last: 4 });
        // Client got 1 and 2 only: resend from 3.
        assert_eq!(s.on_ack(2), Step::SendBlocks { first: 3, last: 6 });
        // Late ACK for 4 from the first window is still progress.
        assert_eq!(s.on_ack(4), Step::SendBlocks { first: 5, last: 8 });
        // Duplicates and stale ACKs do nothing.
        assert_eq!(s.on_ack(4), Step::Wait);
        assert_eq!(s.on_ack(2), Step::Wait);
        // ACK for a block never sent is ignored.
        assert_eq!(s.on_ack(9), Step::Wait);
        assert_eq!(s.on_ack(8), Step::SendBlocks { first: 9, last: 11 });
        assert_eq!(s.on_ack(11), Step::Done);
    }

    #[test]
    fn timeouts_resend_then_give_up() {
        let mut s = Sender::new(5000, 512, 4, false, 2);
        assert_eq!(s.start(), Step::SendBlocks { first: 1, last: 4 });
        assert!(!s.is_retry());
        assert_eq!(s.on_timeout(), Step::SendBlocks { first: 1, last: 4 });
        assert!(s.is_retry());
        assert_eq!(s.on_ack(4), Step::SendBlocks { first: 5, last: 8 });
        assert!(!s.is_retry(), "progress resets the retry count");
        assert_eq!(s.on_timeout(), Step::SendBlocks { first: 5, last: 8 });
        assert_eq!(s.on_timeout(), Step::SendBlocks { first: 5, last: 8 });
        assert_eq!(s.on_timeout(), Step::GiveUp);

        let mut s = Sender::new(10, 512, 1, true, 1);
        assert_eq!(s.start(), Step::SendOack);
        assert_eq!(s.on_timeout(), Step::SendOack);
        assert_eq!(s.on_timeout(), Step::GiveUp);
    }
}
