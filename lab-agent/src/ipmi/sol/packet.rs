//! The SOL packet, sans-IO: the 4-byte header (sequence number, acked
//! sequence number, accepted character count, operation/status bits) and
//! the characters. Pure encode and decode, tested with bytes.

/// Operation bits of a console-to-BMC SOL packet (byte 3).
pub mod op {
    /// NACK: the packet from the BMC was not accepted.
    pub const NACK: u8 = 0x40;
    /// Assert the ring / wake-on-ring indicator.
    pub const RING: u8 = 0x20;
    /// Generate a serial break.
    pub const BREAK: u8 = 0x10;
    /// Deassert CTS (pause the host's output).
    pub const CTS_PAUSE: u8 = 0x08;
    /// Drop DCD/DSR.
    pub const DROP_DCD_DSR: u8 = 0x04;
    /// Flush the BMC's inbound (to the host) buffer.
    pub const FLUSH_INBOUND: u8 = 0x02;
    /// Flush the BMC's outbound (from the host) buffer.
    pub const FLUSH_OUTBOUND: u8 = 0x01;
}

/// Status bits of a BMC-to-console SOL packet (byte 3).
pub mod status {
    /// NACK: the BMC did not accept (all of) the packet; it cannot take
    /// more characters right now.
    pub const NACK: u8 = 0x40;
    /// The host's serial port is not available (e.g. powered off).
    pub const CHAR_UNAVAILABLE: u8 = 0x20;
    /// The BMC is deactivating SOL: the stream ends.
    pub const DEACTIVATING: u8 = 0x10;
    /// Characters from the host were dropped (BMC buffer overrun).
    pub const TX_OVERRUN: u8 = 0x08;
    /// The BMC saw a break from the host.
    pub const BREAK: u8 = 0x04;
}

/// Errors decoding a SOL packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SolPacketError {
    /// Fewer than the 4 header bytes.
    #[error("SOL packet: need 4 header bytes, have {have}")]
    Truncated { have: usize },
}

/// One SOL payload: the 4-byte header and the characters.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SolPacket {
    /// Packet sequence number 1..=15; 0 = ack-only packet.
    pub seq: u8,
    /// Sequence number of the packet being acknowledged; 0 = none.
    pub ack_seq: u8,
    /// How many characters of the acknowledged packet were accepted.
    pub accepted: u8,
    /// Operation ([`op`], console to BMC) or status ([`status`], BMC to
    /// console) bits.
    pub flags: u8,
    /// The characters.
    pub data: Vec<u8>,
}

impl SolPacket {
    /// An ack-only packet.
    pub fn ack(ack_seq: u8, accepted: u8) -> Self {
        SolPacket {
            ack_seq,
            accepted,
            ..SolPacket::default()
        }
    }

    /// Wire bytes (sequence numbers masked to 4 bits).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        v.extend_from_slice(&[
            self.seq & 0x0F,
            self.ack_seq & 0x0F,
            self.accepted,
            self.flags,
        ]);
        v.extend_from_slice(&self.data);
        v
    }

    /// Decode untrusted bytes; reserved bits are ignored.
    pub fn decode(b: &[u8]) -> Result<Self, SolPacketError> {
        if b.len() < 4 {
            return Err(SolPacketError::Truncated { have: b.len() });
        }
        Ok(SolPacket {
            seq: b[0] & 0x0F,
            ack_seq: b[1] & 0x0F,
            accepted: b[2],
            flags: b[3],
            data: b[4..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_bytes() {
        let p = SolPacket {
            seq: 3,
            ack_seq: 9,
            accepted: 200,
            flags: op::BREAK,
            data: b"hi".to_vec(),
        };
        assert_eq!(p.encode(), [0x03, 0x09, 200, 0x10, b'h', b'i']);
        assert_eq!(SolPacket::decode(&p.encode()).unwrap(), p);
        // Reserved upper bits of the sequence numbers are ignored.
        let q = SolPacket::decode(&[0xF5, 0xA2, 7, 0x44]).unwrap();
        assert_eq!((q.seq, q.ack_seq, q.accepted), (5, 2, 7));
        assert_eq!(q.flags & status::NACK, status::NACK);
        assert_eq!(q.flags & status::BREAK, status::BREAK);
        assert!(q.data.is_empty());
        assert_eq!(
            SolPacket::decode(&[1, 2, 3]),
            Err(SolPacketError::Truncated { have: 3 })
        );
        assert_eq!(SolPacket::ack(4, 10).encode(), [0, 4, 10, 0]);
    }
}
