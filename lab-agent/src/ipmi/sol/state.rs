//! The SOL protocol machine, sans-IO ([`SolState`]): sequence numbers
//! 1..=15, acks, retransmission of unacknowledged data, partial accepts and
//! NACKs (the unaccepted tail is resent), break. `now` is always passed in;
//! the session's request task (through [`super::stream`]) feeds it the
//! BMC's packets and sends what it produces.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::packet::{SolPacket, op, status};

/// SOL tuning. Defaults follow ipmitool: 1 s retransmit timeout, a few
/// retries, a keepalive every 30 s.
#[derive(Clone, Debug)]
pub struct SolOptions {
    /// How long to wait for the ack of a data packet before resending it.
    pub retry_timeout: Duration,
    /// Resends of one data packet before the stream fails.
    pub retries: u32,
    /// Pause before resending after the BMC accepted nothing (NACK).
    pub nack_backoff: Duration,
    /// A Get Payload Instance Info is sent when no IPMI request went out
    /// for this long (SOL traffic does not keep a session alive on every
    /// BMC; ipmi_sim drops a session after ~30 s without a request).
    pub keepalive: Duration,
    /// Bytes from the host buffered for the reader; beyond that, BMC
    /// packets are left unacknowledged (the BMC resends them).
    pub read_buffer: usize,
    /// Bytes written by us and not yet sent, before writes wait.
    pub write_buffer: usize,
}

impl Default for SolOptions {
    fn default() -> Self {
        SolOptions {
            retry_timeout: Duration::from_secs(1),
            retries: 4,
            nack_backoff: Duration::from_millis(10),
            keepalive: Duration::from_secs(10),
            read_buffer: 1 << 20,
            write_buffer: 64 * 1024,
        }
    }
}

/// Why the SOL machine gave up.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SolFailure {
    /// A data packet was never acknowledged.
    #[error("SOL packet {seq} not acknowledged after {attempts} attempt(s)")]
    NoAck { seq: u8, attempts: u32 },
    /// The session keepalive got no answer.
    #[error("session keepalive failed")]
    Keepalive,
    /// The BMC is deactivating the payload.
    #[error("the BMC deactivated SOL")]
    Deactivated,
    /// The keepalive found the payload inactive or held by another session
    /// (someone deactivated ours).
    #[error("SOL is no longer active on this session (holder: {holder:#010x})")]
    TakenOver { holder: u32 },
}

#[derive(Clone, Debug)]
struct InFlight {
    seq: u8,
    data: Vec<u8>,
    sent_at: Instant,
    attempts: u32,
}

/// What one inbound packet means for the console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// New characters from the host, in order (duplicates removed).
    pub data: Vec<u8>,
    /// The BMC is deactivating SOL.
    pub deactivating: bool,
    /// The BMC reported a break from the host.
    pub break_detected: bool,
    /// The BMC reported dropped characters or an unavailable port.
    pub trouble: bool,
}

/// The sans-IO SOL protocol machine; `now` is always passed in.
///
/// Outbound: one data packet in flight at a time (sequence 1..=15,
/// wrapping), resent after `retry_timeout` up to `retries` times. An ack
/// that accepts only part of the packet puts the unaccepted tail first in
/// line under a new sequence number; an ack that accepts nothing (NACK)
/// also waits `nack_backoff` (doubling, at most 1 s). A break is a
/// sequenced packet without data; it is sent once and never resent (a
/// second break would be a second break). Inbound: every data packet is
/// acknowledged with an ack-only packet; a repeat of the last sequence
/// number is acknowledged again but not delivered twice.
#[derive(Debug)]
pub struct SolState {
    options: SolOptions,
    next_seq: u8,
    in_flight: Option<InFlight>,
    tail: Vec<u8>,
    hold_until: Option<Instant>,
    backoff: Duration,
    last_rx: Option<(u8, u8)>,
    acks: VecDeque<SolPacket>,
}

impl SolState {
    /// A fresh machine.
    pub fn new(options: SolOptions) -> Self {
        let backoff = options.nack_backoff;
        SolState {
            options,
            next_seq: 1,
            in_flight: None,
            tail: Vec::new(),
            hold_until: None,
            backoff,
            last_rx: None,
            acks: VecDeque::new(),
        }
    }

    fn take_seq(&mut self) -> u8 {
        let s = self.next_seq;
        self.next_seq = if s >= 15 { 1 } else { s + 1 };
        s
    }

    /// Whether sent data is waiting for its ack or a tail for its resend.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() || !self.tail.is_empty()
    }

    /// Handle a packet from the BMC. `room` is how many characters the
    /// reader can take: a packet is accepted up to that (the BMC resends
    /// the rest), and left unacknowledged if there is no room at all.
    pub fn receive(&mut self, pkt: &SolPacket, room: usize, now: Instant) -> Received {
        let mut out = Received {
            deactivating: pkt.flags & status::DEACTIVATING != 0,
            break_detected: pkt.flags & status::BREAK != 0,
            trouble: pkt.flags & (status::TX_OVERRUN | status::CHAR_UNAVAILABLE) != 0,
            ..Received::default()
        };
        // The ack of our data packet.
        if pkt.ack_seq != 0
            && let Some(f) = self.in_flight.take_if(|f| f.seq == pkt.ack_seq)
        {
            let accepted = usize::from(pkt.accepted).min(f.data.len());
            if accepted < f.data.len() {
                let mut rest = f.data[accepted..].to_vec();
                rest.extend_from_slice(&self.tail);
                self.tail = rest;
            }
            if accepted == 0 && !f.data.is_empty() {
                self.hold_until = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
            } else {
                self.backoff = self.options.nack_backoff;
            }
        }
        // Characters from the host.
        if pkt.seq != 0 {
            match self.last_rx {
                Some((seq, accepted)) if seq == pkt.seq => {
                    self.acks.push_back(SolPacket::ack(seq, accepted));
                }
                _ if room == 0 && !pkt.data.is_empty() => {}
                _ => {
                    let n = pkt.data.len().min(room).min(255);
                    out.data.extend_from_slice(&pkt.data[..n]);
                    self.last_rx = Some((pkt.seq, n as u8));
                    self.acks.push_back(SolPacket::ack(pkt.seq, n as u8));
                }
            }
        }
        out
    }

    /// The next packet to send, if any: acks first, then a due resend, then
    /// the unaccepted tail, a break (once `pending` is empty), new data
    /// from `pending` (at most `max_chunk` characters).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        pending: &mut VecDeque<u8>,
        brk: &mut bool,
        max_chunk: usize,
    ) -> Result<Option<SolPacket>, SolFailure> {
        if let Some(ack) = self.acks.pop_front() {
            return Ok(Some(ack));
        }
        if let Some(f) = &mut self.in_flight {
            if now < f.sent_at + self.options.retry_timeout {
                return Ok(None);
            }
            if f.attempts > self.options.retries {
                return Err(SolFailure::NoAck {
                    seq: f.seq,
                    attempts: f.attempts,
                });
            }
            f.attempts += 1;
            f.sent_at = now;
            return Ok(Some(SolPacket {
                seq: f.seq,
                data: f.data.clone(),
                ..SolPacket::default()
            }));
        }
        if self.hold_until.is_some_and(|t| now < t) {
            return Ok(None);
        }
        self.hold_until = None;
        let max_chunk = max_chunk.clamp(1, 255);
        let data: Vec<u8> = if !self.tail.is_empty() {
            let n = self.tail.len().min(max_chunk);
            self.tail.drain(..n).collect()
        } else if *brk && pending.is_empty() {
            *brk = false;
            return Ok(Some(SolPacket {
                seq: self.take_seq(),
                flags: op::BREAK,
                ..SolPacket::default()
            }));
        } else if !pending.is_empty() {
            let n = pending.len().min(max_chunk);
            pending.drain(..n).collect()
        } else {
            return Ok(None);
        };
        let seq = self.take_seq();
        self.in_flight = Some(InFlight {
            seq,
            data: data.clone(),
            sent_at: now,
            attempts: 1,
        });
        Ok(Some(SolPacket {
            seq,
            data,
            ..SolPacket::default()
        }))
    }

    /// When [`SolState::poll_transmit`] should be called again without new
    /// input.
    pub fn next_deadline(&self) -> Option<Instant> {
        if let Some(f) = &self.in_flight {
            return Some(f.sent_at + self.options.retry_timeout);
        }
        self.hold_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn send_all(s: &mut SolState, now: Instant, q: &mut VecDeque<u8>) -> Vec<SolPacket> {
        let mut brk = false;
        let mut v = Vec::new();
        while let Some(p) = s.poll_transmit(now, q, &mut brk, 4).unwrap() {
            v.push(p);
        }
        v
    }

    #[test]
    fn sequence_numbers_wrap_1_to_15() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = (0..200u8).collect();
        let mut seqs = Vec::new();
        for _ in 0..20 {
            let p = send_all(&mut s, now, &mut q);
            assert_eq!(p.len(), 1, "one packet in flight");
            seqs.push(p[0].seq);
            assert_eq!(p[0].data.len(), 4);
            s.receive(&SolPacket::ack(p[0].seq, 4), 0, now);
        }
        let want: Vec<u8> = (1..=15).chain(1..=5).collect();
        assert_eq!(seqs, want);
    }

    #[test]
    fn unacked_data_is_resent_then_fails() {
        let opts = SolOptions::default();
        let mut s = SolState::new(opts.clone());
        let now = t0();
        let mut q: VecDeque<u8> = b"abc".iter().copied().collect();
        let first = send_all(&mut s, now, &mut q);
        assert_eq!(first[0].data, b"abc");
        assert!(send_all(&mut s, now, &mut q).is_empty());
        assert_eq!(s.next_deadline(), Some(now + opts.retry_timeout));
        let mut brk = false;
        for i in 1..=opts.retries {
            let at = now + opts.retry_timeout * (i + 1);
            let p = s.poll_transmit(at, &mut q, &mut brk, 4).unwrap().unwrap();
            assert_eq!((p.seq, p.data.as_slice()), (first[0].seq, &b"abc"[..]));
        }
        let at = now + opts.retry_timeout * (opts.retries + 3);
        assert_eq!(
            s.poll_transmit(at, &mut q, &mut brk, 4),
            Err(SolFailure::NoAck {
                seq: 1,
                attempts: opts.retries + 1
            })
        );
    }

    #[test]
    fn partial_accept_resends_the_tail_under_a_new_seq() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = b"abcdefgh".iter().copied().collect();
        let p = send_all(&mut s, now, &mut q);
        assert_eq!(p[0].data, b"abcd");
        s.receive(&SolPacket::ack(1, 1), 0, now);
        let p = send_all(&mut s, now, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (2, &b"bcd"[..]));
        s.receive(&SolPacket::ack(2, 3), 0, now);
        let p = send_all(&mut s, now, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (3, &b"efgh"[..]));
    }

    #[test]
    fn nack_with_nothing_accepted_backs_off() {
        let opts = SolOptions::default();
        let mut s = SolState::new(opts.clone());
        let now = t0();
        let mut q: VecDeque<u8> = b"xy".iter().copied().collect();
        send_all(&mut s, now, &mut q);
        let nack = SolPacket {
            ack_seq: 1,
            flags: status::NACK,
            ..SolPacket::default()
        };
        s.receive(&nack, 0, now);
        assert!(s.busy());
        assert!(send_all(&mut s, now, &mut q).is_empty(), "holds off");
        assert_eq!(s.next_deadline(), Some(now + opts.nack_backoff));
        let p = send_all(&mut s, now + opts.nack_backoff, &mut q);
        assert_eq!((p[0].seq, p[0].data.as_slice()), (2, &b"xy"[..]));
        // A stale or foreign ack changes nothing.
        s.receive(&SolPacket::ack(9, 2), 0, now);
        assert!(s.busy());
    }

    #[test]
    fn inbound_is_acked_deduplicated_and_limited_by_room() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let pkt = SolPacket {
            seq: 5,
            data: b"hello".to_vec(),
            ..SolPacket::default()
        };
        let r = s.receive(&pkt, 100, now);
        assert_eq!(r.data, b"hello");
        let mut q = VecDeque::new();
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(5, 5)]);
        // The BMC lost our ack and resends: ack again, deliver nothing.
        let r = s.receive(&pkt, 100, now);
        assert!(r.data.is_empty());
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(5, 5)]);
        // Little room: partial accept.
        let pkt6 = SolPacket {
            seq: 6,
            data: b"world".to_vec(),
            ..SolPacket::default()
        };
        assert_eq!(s.receive(&pkt6, 2, now).data, b"wo");
        assert_eq!(send_all(&mut s, now, &mut q), vec![SolPacket::ack(6, 2)]);
        // No room: no ack, the BMC resends later.
        let pkt7 = SolPacket {
            seq: 7,
            data: b"x".to_vec(),
            ..SolPacket::default()
        };
        assert!(s.receive(&pkt7, 0, now).data.is_empty());
        assert!(send_all(&mut s, now, &mut q).is_empty());
        assert_eq!(s.receive(&pkt7, 1, now).data, b"x");
        // Status bits.
        let bye = SolPacket {
            flags: status::DEACTIVATING | status::BREAK,
            ..SolPacket::default()
        };
        let r = s.receive(&bye, 1, now);
        assert!(r.deactivating && r.break_detected && !r.trouble);
    }

    #[test]
    fn break_waits_for_pending_data_and_is_sent_once() {
        let mut s = SolState::new(SolOptions::default());
        let now = t0();
        let mut q: VecDeque<u8> = b"ab".iter().copied().collect();
        let mut brk = true;
        let p = s.poll_transmit(now, &mut q, &mut brk, 4).unwrap().unwrap();
        assert_eq!((p.data.as_slice(), p.flags), (&b"ab"[..], 0));
        assert!(brk, "break waits for the data");
        s.receive(&SolPacket::ack(1, 2), 0, now);
        let p = s.poll_transmit(now, &mut q, &mut brk, 4).unwrap().unwrap();
        assert_eq!((p.seq, p.flags, p.data.len()), (2, op::BREAK, 0));
        assert!(!brk);
        assert!(!s.busy(), "a break is not resent");
        assert_eq!(s.poll_transmit(now, &mut q, &mut brk, 4), Ok(None));
    }
}
