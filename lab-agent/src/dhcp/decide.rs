//! The DHCP decision: a pure function from a decoded [`Request`], the host
//! table and the configuration to a [`Decision`] (a reply and where to send
//! it, or why we stay silent). No sockets, no clock, no state.
//!
//! Boot file choice, in order:
//! 1. a client that already runs iPXE (option 77 `iPXE`, or option 175)
//!    gets its per-host script URL — this breaks the chainload loop;
//! 2. otherwise the first architecture in option 93 that we know:
//!    0 → BIOS iPXE (`undionly.kpxe`), 7/9 → x86-64 iPXE EFI, 11 → arm64
//!    iPXE EFI, 16/19 → an HTTP URL with option 60 `HTTPClient` echoed;
//! 3. without a usable option 93, the host's inventory arch and firmware.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, OptionCode, UnknownOption};

use super::config::{DhcpConfig, Mode};
use super::packet::{Arrival, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, Request};
use crate::hosts::{Arch, BootHost, Firmware, HostTable};

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Ignore(IgnoreReason),
    /// Send this message to this address (from the socket it came in on).
    Reply(Message, SocketAddrV4),
}

/// Why a request got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoreReason {
    /// The MAC is not in the inventory.
    UnknownMac,
    /// REQUEST naming another server in option 54.
    OtherServer,
    /// No message type, or one a server does not answer.
    UnsupportedType,
    /// Known host without a static address and the pool is exhausted.
    NoAddress,
    /// REQUEST with neither option 50 nor `ciaddr`.
    NoRequestedAddress,
    /// Proxy mode: the client is not a PXE/HTTP-boot client.
    NotBootClient,
    /// Proxy mode: address traffic belongs to the other DHCP server.
    NotOurs,
    Released,
    Declined,
}

/// The kind of boot client, from option 93 or the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    Bios,
    EfiX64,
    EfiArm64,
    HttpX64,
    HttpArm64,
}

impl ClientKind {
    /// First known architecture type (RFC 4578 / IANA registry) in `arches`.
    pub fn from_arches(arches: &[u16]) -> Option<Self> {
        arches.iter().find_map(|a| match a {
            0 => Some(Self::Bios),
            7 | 9 => Some(Self::EfiX64),
            11 => Some(Self::EfiArm64),
            16 => Some(Self::HttpX64),
            19 => Some(Self::HttpArm64),
            _ => None,
        })
    }

    fn from_host(host: &BootHost) -> Self {
        match (host.arch, host.firmware) {
            (Arch::X86_64, Firmware::Bios) => Self::Bios,
            (Arch::X86_64, Firmware::Uefi) => Self::EfiX64,
            (Arch::Aarch64, _) => Self::EfiArm64,
        }
    }

    fn is_http(self) -> bool {
        matches!(self, Self::HttpX64 | Self::HttpArm64)
    }
}

/// Decide the answer to `req`. Never panics.
pub fn decide(req: &Request, hosts: &HostTable, cfg: &DhcpConfig) -> Decision {
    let Some(msg_type) = req.msg.opts().msg_type() else {
        return Decision::Ignore(IgnoreReason::UnsupportedType);
    };
    match (cfg.mode, req.arrival) {
        (Mode::Authoritative, Arrival::Dhcp) => authoritative(req, msg_type, hosts, cfg),
        (Mode::Proxy, _) => proxy(req, msg_type, hosts, cfg),
        // We only listen on 4011 in proxy mode.
        (Mode::Authoritative, Arrival::Pxe) => Decision::Ignore(IgnoreReason::NotOurs),
    }
}

fn authoritative(
    req: &Request,
    msg_type: MessageType,
    hosts: &HostTable,
    cfg: &DhcpConfig,
) -> Decision {
    use IgnoreReason as R;
    match msg_type {
        MessageType::Release => return Decision::Ignore(R::Released),
        MessageType::Decline => return Decision::Ignore(R::Declined),
        MessageType::Discover | MessageType::Request | MessageType::Inform => {}
        _ => return Decision::Ignore(R::UnsupportedType),
    }
    if msg_type == MessageType::Request && req.server_id().is_some_and(|id| id != cfg.server_ip) {
        return Decision::Ignore(R::OtherServer);
    }
    let Some(host) = hosts.by_mac(&req.mac) else {
        return Decision::Ignore(R::UnknownMac);
    };
    if msg_type == MessageType::Inform {
        let mut reply = base_reply(req, MessageType::Ack, cfg);
        add_network_options(&mut reply, cfg, false);
        add_boot(&mut reply, req, &host, cfg);
        return Decision::Reply(reply, destination(req, false));
    }
    let Some(addr) = address_for(&host, hosts, cfg) else {
        return Decision::Ignore(R::NoAddress);
    };
    let reply_type = if msg_type == MessageType::Discover {
        MessageType::Offer
    } else {
        let ciaddr = Some(req.msg.ciaddr()).filter(|a| !a.is_unspecified());
        let Some(requested) = req.requested_ip().or(ciaddr) else {
            return Decision::Ignore(R::NoRequestedAddress);
        };
        if requested != addr {
            let nak = base_reply(req, MessageType::Nak, cfg);
            return Decision::Reply(nak, destination(req, true));
        }
        MessageType::Ack
    };
    let mut reply = base_reply(req, reply_type, cfg);
    reply.set_yiaddr(addr);
    add_network_options(&mut reply, cfg, true);
    add_boot(&mut reply, req, &host, cfg);
    if cfg.ipxe_no_pxedhcp && req.is_ipxe() {
        // Encapsulated iPXE option 176 (no-pxedhcp) = 1.
        reply
            .opts_mut()
            .insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(175),
                vec![176, 1, 1],
            )));
    }
    Decision::Reply(reply, destination(req, false))
}

fn proxy(req: &Request, msg_type: MessageType, hosts: &HostTable, cfg: &DhcpConfig) -> Decision {
    use IgnoreReason as R;
    let reply_type = match (req.arrival, msg_type) {
        (Arrival::Dhcp, MessageType::Discover) => MessageType::Offer,
        (Arrival::Pxe, MessageType::Request | MessageType::Inform) => MessageType::Ack,
        _ => return Decision::Ignore(R::NotOurs),
    };
    let vendor = req.vendor_class();
    if !(vendor.starts_with(b"PXEClient") || vendor.starts_with(b"HTTPClient") || req.is_ipxe()) {
        return Decision::Ignore(R::NotBootClient);
    }
    let Some(host) = hosts.by_mac(&req.mac) else {
        return Decision::Ignore(R::UnknownMac);
    };
    let mut reply = base_reply(req, reply_type, cfg);
    let kind = add_boot(&mut reply, req, &host, cfg);
    let opts = reply.opts_mut();
    if !kind.is_http() {
        opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
    }
    // PXE vendor options: PXE_DISCOVERY_CONTROL (6) = 8, "boot the file
    // named in this reply, no boot-server discovery".
    opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    // The PXE spec has servers echo a well-formed client UUID (type 0 + 16
    // bytes); anything else is tolerated and not echoed.
    if let Some(DhcpOption::ClientMachineIdentifier(guid)) =
        req.msg.opts().get(OptionCode::ClientMachineIdentifier)
        && guid.len() == 17
        && guid[0] == 0
    {
        opts.insert(DhcpOption::ClientMachineIdentifier(guid.clone()));
    }
    Decision::Reply(reply, destination(req, false))
}

/// The address `host` gets: its static one, or the pool entry at its rank
/// among the pool-addressed hosts (in MAC order), skipping addresses that
/// are some host's static one.
pub fn address_for(host: &BootHost, hosts: &HostTable, cfg: &DhcpConfig) -> Option<Ipv4Addr> {
    if let Some(ip) = host.ipv4 {
        return Some(ip);
    }
    let all = hosts.all();
    let taken: HashSet<Ipv4Addr> = all.iter().filter_map(|h| h.ipv4).collect();
    let rank = all
        .iter()
        .filter(|h| h.ipv4.is_none())
        .position(|h| h.mac == host.mac)?;
    cfg.pool
        .iter()
        .filter(|ip| !taken.contains(ip))
        .nth(rank)
        .copied()
}

/// Reply skeleton: same xid, flags, giaddr and chaddr; message type and
/// server identifier; client identifier echoed (RFC 6842).
fn base_reply(req: &Request, msg_type: MessageType, cfg: &DhcpConfig) -> Message {
    let m = &req.msg;
    let mut reply = Message::new_with_id(
        m.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        m.giaddr(),
        &req.mac.octets(),
    );
    reply.set_opcode(v4::Opcode::BootReply);
    reply.set_flags(m.flags());
    if msg_type != MessageType::Nak {
        reply.set_ciaddr(m.ciaddr());
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(msg_type));
    opts.insert(DhcpOption::ServerIdentifier(cfg.server_ip));
    if let Some(DhcpOption::ClientIdentifier(id)) = m.opts().get(OptionCode::ClientIdentifier) {
        opts.insert(DhcpOption::ClientIdentifier(id.clone()));
    }
    reply
}

fn add_network_options(reply: &mut Message, cfg: &DhcpConfig, lease: bool) {
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::SubnetMask(cfg.subnet_mask));
    if let Some(r) = cfg.router {
        opts.insert(DhcpOption::Router(vec![r]));
    }
    if !cfg.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(cfg.dns.clone()));
    }
    if lease {
        opts.insert(DhcpOption::AddressLeaseTime(cfg.lease_secs));
    }
}

/// Set next-server and the boot file (or script URL); returns the client
/// kind used.
fn add_boot(reply: &mut Message, req: &Request, host: &BootHost, cfg: &DhcpConfig) -> ClientKind {
    let kind = ClientKind::from_arches(&req.client_arches).unwrap_or(ClientKind::from_host(host));
    let files = &cfg.boot_files;
    let file = if req.is_ipxe() {
        cfg.script_url(&host.mac)
    } else {
        match kind {
            ClientKind::Bios => files.bios.clone(),
            ClientKind::EfiX64 => files.efi_x64.clone(),
            ClientKind::EfiArm64 => files.efi_arm64.clone(),
            ClientKind::HttpX64 => files.http_efi_x64.clone(),
            ClientKind::HttpArm64 => files.http_efi_arm64.clone(),
        }
    };
    reply.set_siaddr(cfg.next_server);
    if file.len() < 128 {
        reply.set_fname_str(&file);
    }
    reply
        .opts_mut()
        .insert(DhcpOption::BootfileName(file.into_bytes()));
    if kind.is_http() {
        reply
            .opts_mut()
            .insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
    }
    kind
}

/// Where a reply goes (RFC 2131 §4.1): back to the source for port 4011;
/// to the relay; NAKs broadcast; to `ciaddr` if the client has one; else
/// broadcast (we cannot unicast to a client without an address without
/// writing its ARP entry).
fn destination(req: &Request, nak: bool) -> SocketAddrV4 {
    let m = &req.msg;
    if req.arrival == Arrival::Pxe {
        req.src
    } else if !m.giaddr().is_unspecified() {
        SocketAddrV4::new(m.giaddr(), DHCP_SERVER_PORT)
    } else if !nak && !m.ciaddr().is_unspecified() {
        SocketAddrV4::new(m.ciaddr(), DHCP_CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, DHCP_CLIENT_PORT)
    }
}
