//! [`MacAddr`]: a unicast Ethernet MAC address with one parser and one rule
//! for the inventory, the agent's configuration, DHCP and the boot files.
//!
//! Accepted spellings: six two-digit hex octets separated by `:` or by `-`
//! (one separator throughout), in either case. Displayed lower-case with
//! colons; [`MacAddr::hyphenated`] gives iPXE's `${mac:hexhyp}` form.
//! Multicast (and broadcast) and all-zero addresses are refused: no NIC
//! boots from them. The parser works on bytes and never panics, whatever
//! the input (non-ASCII included).

use std::fmt;
use std::str::FromStr;

/// A unicast, non-zero Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {value:?}: {reason}")]
pub struct InvalidMac {
    /// The refused input (or the octets, for [`MacAddr::try_from`]).
    pub value: String,
    pub reason: &'static str,
}

const SHAPE: &str = "expected six two-digit hex octets separated by ':' or '-'";

impl MacAddr {
    /// The six octets.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// `aa-bb-cc-dd-ee-ff`, as iPXE's `${net0/mac:hexhyp}` prints it.
    pub fn hyphenated(&self) -> String {
        let [a, b, c, d, e, g] = self.0;
        format!("{a:02x}-{b:02x}-{c:02x}-{d:02x}-{e:02x}-{g:02x}")
    }

    fn check(octets: [u8; 6]) -> Result<Self, &'static str> {
        if octets[0] & 1 != 0 {
            return Err("is a multicast address");
        }
        if octets == [0; 6] {
            return Err("must not be all zeros");
        }
        Ok(Self(octets))
    }
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, InvalidMac> {
        let err = |reason| InvalidMac {
            value: s.to_owned(),
            reason,
        };
        let b = s.as_bytes();
        if b.len() != 17 {
            return Err(err(SHAPE));
        }
        let sep = b[2];
        if !matches!(sep, b':' | b'-') {
            return Err(err(SHAPE));
        }
        let mut octets = [0u8; 6];
        for (i, octet) in octets.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && b[at - 1] != sep {
                return Err(err(SHAPE));
            }
            let (Some(hi), Some(lo)) = (hex(b[at]), hex(b[at + 1])) else {
                return Err(err(SHAPE));
            };
            *octet = hi << 4 | lo;
        }
        MacAddr::check(octets).map_err(err)
    }
}

impl TryFrom<[u8; 6]> for MacAddr {
    type Error = InvalidMac;

    fn try_from(octets: [u8; 6]) -> Result<Self, InvalidMac> {
        MacAddr::check(octets).map_err(|reason| InvalidMac {
            value: MacAddr(octets).to_string(),
            reason,
        })
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    #[test]
    fn spellings_round_trip() {
        for (input, shown) in [
            ("52:54:00:12:34:01", "52:54:00:12:34:01"),
            ("52-54-00-12-34-01", "52:54:00:12:34:01"),
            ("52:54:00:AB:cd:EF", "52:54:00:ab:cd:ef"),
        ] {
            let m = mac(input);
            assert_eq!(m.to_string(), shown);
            assert_eq!(mac(shown), m);
        }
        assert_eq!(mac("52:54:00:ab:cd:01").hyphenated(), "52-54-00-ab-cd-01");
        assert_eq!(
            format!("{:?}", mac("52:54:00:ab:cd:01")),
            "MacAddr(52:54:00:ab:cd:01)"
        );
    }

    #[test]
    fn odd_spellings_and_non_ascii_are_errors() {
        for bad in [
            "",
            "52:54:00",
            "52:54:00:12:34",
            "52:54:00:12:34:01:02",
            "52:54-00:12:34:01",
            "52.54.00.12.34.01",
            "5254.0012.3401",
            "525400123401",
            "52:54:00:12:34:1",
            "2:54:00:12:34:01x",
            " 52:54:00:12:34:01",
            "52:54:00:12:34:01 ",
            "52:54:00:12:34:0g",
            "+2:54:00:12:34:01",
            "52:54:00:12:34:+1",
            "00:0é:00:00:00:0",
            "00:00:00:00:00:é",
            "ä2:54:00:12:34:0",
            "52:54:00:12:34:０1",
            "５2:54:00:12:34:01",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(e.value, bad);
            assert_eq!(e.reason, SHAPE, "{bad:?}");
        }
    }

    #[test]
    fn multicast_and_zero_are_refused() {
        let e = "01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err();
        assert_eq!(e.reason, "is a multicast address");
        let e = "ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap_err();
        assert_eq!(e.reason, "is a multicast address");
        let e = "00:00:00:00:00:00".parse::<MacAddr>().unwrap_err();
        assert_eq!(e.reason, "must not be all zeros");
        assert!(MacAddr::try_from([1, 0, 0, 0, 0, 0]).is_err());
        assert_eq!(
            MacAddr::try_from([0x52, 0x54, 0, 1, 2, 3]).unwrap(),
            mac("52:54:00:01:02:03")
        );
    }

    #[test]
    fn serde_uses_the_same_parser() {
        #[derive(serde::Deserialize)]
        struct T {
            mac: MacAddr,
        }
        let t: T = serde_json_like("52-54-00-12-34-01");
        assert_eq!(t.mac, mac("52:54:00:12:34:01"));
        fn serde_json_like(s: &str) -> T {
            use serde::de::IntoDeserializer;
            use serde::de::value::{Error, MapDeserializer};
            let map = MapDeserializer::<_, Error>::new(std::iter::once(("mac", s)));
            serde::Deserialize::deserialize(map.into_deserializer()).unwrap()
        }
    }

    /// Fuzz: random byte strings (valid UTF-8 or not, then lossily
    /// decoded), mutations of valid addresses with multi-byte characters
    /// spliced in at every offset, and every 17-byte shape: the parser must
    /// answer an error or an address that displays back to an equal
    /// address, never panic.
    #[test]
    fn fuzzed_inputs_never_panic() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let alphabet: Vec<char> = "0123456789abcdefABCDEF:-. éä０ÿ\u{1F600}\0g"
            .chars()
            .collect();
        let check = |s: &str| {
            if let Ok(m) = s.parse::<MacAddr>() {
                assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m, "{s:?}");
                assert!(s.is_ascii());
            }
        };
        for _ in 0..200_000 {
            let len = (next() % 24) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            check(&s);
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            check(&String::from_utf8_lossy(&bytes));
        }
        let valid = "52:54:00:12:34:01";
        for at in 0..=valid.len() {
            for c in ['é', '０', '\u{1F600}', 'ÿ'] {
                let mut s = valid.to_owned();
                s.insert(at, c);
                check(&s);
                let mut t = valid.to_owned();
                t.replace_range(at..(at + 1).min(valid.len()), &c.to_string());
                check(&t);
                let u: String = t.chars().take(16).collect();
                check(&u);
            }
        }
    }
}
