//! IPv6 router advertisements on the boot network.
//!
//! iPXE configures IPv6 as well as IPv4 and, when no router advertisement
//! arrives, waits about 13 s for one before it goes on (measured in the lab
//! in a box). The agent answers every router solicitation at once, and
//! advertises periodically, with an RA that says "no router, no prefixes,
//! no DHCPv6" (router lifetime 0, M = O = 0): iPXE's IPv6 configuration then
//! finishes immediately and nothing else on the link changes.

use std::net::{Ipv6Addr, SocketAddrV6};
use std::path::Path;
use std::time::Duration;
use tracing::{debug, info};

const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Why the advertiser could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaError {
    #[error("no network interface {interface}")]
    NoInterface {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the ICMPv6 socket on {interface}")]
    Socket {
        interface: String,
        #[source]
        source: std::io::Error,
    },
}

/// The advertisement: ICMPv6 type 134 with hop limit 0 (unspecified), no
/// flags, router lifetime 0, no reachable/retransmit times, and the source
/// link-layer address option when the MAC is known. The kernel fills in the
/// checksum of raw ICMPv6 sockets (RFC 3542 §3.1).
pub fn advertisement(source_mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = vec![
        ICMPV6_ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    if let Some(mac) = source_mac {
        p.extend_from_slice(&[1, 1]);
        p.extend_from_slice(&mac);
    }
    p
}

/// Is this ICMPv6 message a router solicitation?
pub fn is_solicitation(msg: &[u8]) -> bool {
    msg.len() >= 8 && msg[0] == ICMPV6_ROUTER_SOLICITATION && msg[1] == 0
}

fn read_sys(interface: &str, file: &str) -> std::io::Result<String> {
    Ok(
        std::fs::read_to_string(Path::new("/sys/class/net").join(interface).join(file))?
            .trim()
            .to_owned(),
    )
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    s.parse::<lab_types::MacAddr>().ok().map(|m| m.octets())
}

/// Advertise on `interface` until the future is dropped: at start, every
/// `interval`, and in answer to each router solicitation.
pub async fn run(interface: String, interval: Duration) -> Result<(), RaError> {
    let ifindex: u32 = read_sys(&interface, "ifindex")
        .and_then(|s| s.parse().map_err(|_| std::io::Error::other("bad ifindex")))
        .map_err(|source| RaError::NoInterface {
            interface: interface.clone(),
            source,
        })?;
    let mac = read_sys(&interface, "address")
        .ok()
        .as_deref()
        .and_then(parse_mac);
    let sock_err = |source| RaError::Socket {
        interface: interface.clone(),
        source,
    };
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).map_err(sock_err)?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(sock_err)?;
    socket.set_multicast_hops_v6(255).map_err(sock_err)?;
    socket.set_unicast_hops_v6(255).map_err(sock_err)?;
    socket.set_multicast_if_v6(ifindex).map_err(sock_err)?;
    socket.set_multicast_loop_v6(false).map_err(sock_err)?;
    socket
        .join_multicast_v6(&ALL_ROUTERS, ifindex)
        .map_err(sock_err)?;
    socket.set_nonblocking(true).map_err(sock_err)?;
    // tokio's UDP socket type is only a datagram fd wrapper here: it drives
    // the raw ICMPv6 socket without any unsafe registration.
    let fd =
        tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket)).map_err(sock_err)?;
    let ra = advertisement(mac);
    let dest = SocketAddrV6::new(ALL_NODES, 0, 0, ifindex);
    let send = |why: &str| match fd.try_send_to(&ra, dest.into()) {
        Ok(_) => debug!(interface = %interface, why, "router advertisement sent"),
        // The link-local address may still be tentative right after start.
        Err(e) => debug!(interface = %interface, error = %e, "router advertisement not sent"),
    };
    info!(interface = %interface, "advertising IPv6: no router, no prefixes (speeds up iPXE)");
    send("start");
    let mut tick = tokio::time::interval(interval);
    let mut buf = [0u8; 1500];
    loop {
        tokio::select! {
            _ = tick.tick() => send("periodic"),
            r = fd.recv(&mut buf) => match r {
                Ok(n) if is_solicitation(&buf[..n]) => send("solicited"),
                Ok(_) => {}
                Err(e) => debug!(error = %e, "ICMPv6 read failed"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_bytes() {
        let ra = advertisement(Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(ra.len(), 24);
        assert_eq!(ra[0], 134);
        assert_eq!(
            &ra[4..8],
            &[0, 0, 0, 0],
            "hop limit 0, no M/O flags, router lifetime 0"
        );
        assert_eq!(&ra[16..24], &[1, 1, 0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(advertisement(None).len(), 16);
    }

    #[test]
    fn solicitations_are_recognised() {
        assert!(is_solicitation(&[133, 0, 0x12, 0x34, 0, 0, 0, 0]));
        assert!(!is_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_solicitation(&[133, 0, 0]));
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mac("nope"), None);
    }
}
