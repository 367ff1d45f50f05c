//! Pure tests of the DHCP decision over captured packets
//! (`tests/fixtures/dhcp/*.hex`) and hand-built variants. No sockets.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};
use lab_agent::dhcp::{Arrival, Decision, DhcpConfig, IgnoreReason, Mode, Request, decide, packet};
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable, MacAddr};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BIOS_MAC: &str = "52:54:00:12:34:56";
const ARM_MAC: &str = "52:54:00:aa:00:01";
const BCAST68: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);

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

fn host(name: &str, mac: &str, ip: Option<[u8; 4]>, arch: Arch, fw: Firmware) -> BootHost {
    BootHost {
        name: name.into(),
        mac: mac.parse().unwrap(),
        ipv4: ip.map(Ipv4Addr::from),
        arch,
        firmware: fw,
        profile: "xen".into(),
        lease: None,
        holder: None,
        ssh_key: None,
    }
}

fn hosts() -> HostTable {
    HostTable::new([
        host(
            "bios1",
            BIOS_MAC,
            Some([198, 18, 0, 10]),
            Arch::X86_64,
            Firmware::Bios,
        ),
        host(
            "arm1",
            ARM_MAC,
            Some([198, 18, 0, 11]),
            Arch::Aarch64,
            Firmware::Uefi,
        ),
        host(
            "pool-b",
            "52:54:00:00:00:0b",
            None,
            Arch::X86_64,
            Firmware::Uefi,
        ),
        host(
            "pool-a",
            "52:54:00:00:00:0a",
            None,
            Arch::X86_64,
            Firmware::Uefi,
        ),
    ])
}

fn cfg(mode: Mode) -> DhcpConfig {
    let mut c = DhcpConfig::new(mode, SERVER);
    c.router = Some(SERVER);
    c.pool = vec![
        Ipv4Addr::new(198, 18, 0, 10), // some host's static address: skipped
        Ipv4Addr::new(198, 18, 0, 100),
        Ipv4Addr::new(198, 18, 0, 101),
    ];
    c.script_url_template = "http://{server_ip}:8080/hosts/{mac}.ipxe".into();
    c
}

fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68)
}

/// A raw BOOTREQUEST with the given options (code, value), in order.
fn raw(mac: &str, ciaddr: [u8; 4], opts: &[(u8, &[u8])]) -> Vec<u8> {
    let mac: MacAddr = mac.parse().unwrap();
    let mut b = vec![0u8; 240];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[12..16].copy_from_slice(&ciaddr);
    b[28..34].copy_from_slice(&mac.octets());
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    for (code, v) in opts {
        b.push(*code);
        b.push(v.len() as u8);
        b.extend_from_slice(v);
    }
    b.push(255);
    b
}

fn run(bytes: &[u8], mode: Mode) -> Decision {
    run_at(bytes, mode, Arrival::Dhcp, client())
}

fn run_at(bytes: &[u8], mode: Mode, arrival: Arrival, src: SocketAddrV4) -> Decision {
    let req = Request::decode(bytes, src, arrival).expect("decodes");
    decide(&req, &hosts(), &cfg(mode))
}

fn reply(d: Decision) -> (Message, SocketAddrV4) {
    match d {
        Decision::Reply(m, to) => (m, to),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

fn file(m: &Message) -> String {
    m.fname_str()
        .unwrap()
        .unwrap()
        .trim_end_matches('\0')
        .to_owned()
}

#[test]
fn captured_ipxe_bios_discover_decodes() {
    let bytes = fixture("ipxe-bios-discover.hex");
    let req = Request::decode(&bytes, client(), Arrival::Dhcp).unwrap();
    assert_eq!(req.mac.to_string(), BIOS_MAC);
    assert_eq!(req.client_arches, vec![0]);
    assert!(req.is_ipxe());
    assert!(req.vendor_class().starts_with(b"PXEClient:Arch:00000"));
    assert_eq!(req.msg.opts().msg_type(), Some(MessageType::Discover));
}

#[test]
fn ipxe_discover_gets_offer_with_script_url_and_no_pxedhcp() {
    let (m, to) = reply(run(&fixture("ipxe-bios-discover.hex"), Mode::Authoritative));
    assert_eq!(to, BCAST68);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.yiaddr(), Ipv4Addr::new(198, 18, 0, 10));
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(m.xid(), 0x81d5_7676);
    assert_eq!(
        file(&m),
        "http://198.18.0.1:8080/hosts/52-54-00-12-34-56.ipxe"
    );
    assert_eq!(
        opt(&m, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
    assert_eq!(
        opt(&m, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        opt(&m, OptionCode::Router),
        Some(&DhcpOption::Router(vec![SERVER]))
    );
    match opt(&m, OptionCode::Unknown(175)) {
        Some(DhcpOption::Unknown(u)) => assert_eq!(u.data(), &[176, 1, 1]),
        other => panic!("no option 175: {other:?}"),
    }
    // Echoes the client identifier.
    assert!(opt(&m, OptionCode::ClientIdentifier).is_some());
    // The encoded reply is a valid message of at least 300 bytes.
    let bytes = packet::encode(&m).unwrap();
    assert!(bytes.len() >= 300);
    let back = Message::decode(&mut Decoder::new(&bytes)).unwrap();
    assert_eq!(back.opts(), m.opts());
    assert_eq!(
        (back.yiaddr(), back.siaddr(), back.xid()),
        (m.yiaddr(), m.siaddr(), m.xid())
    );
    assert_eq!(file(&back), file(&m));
}

#[test]
fn aarch64_uefi_discover_gets_arm64_ipxe() {
    let bytes = fixture("aavmf-arm64-discover.hex");
    let req = Request::decode(&bytes, client(), Arrival::Dhcp).unwrap();
    assert_eq!(req.client_arches, vec![11]);
    assert!(!req.is_ipxe());
    let (m, _) = reply(decide(&req, &hosts(), &cfg(Mode::Authoritative)));
    assert_eq!(file(&m), "ipxe-arm64.efi");
    assert_eq!(m.yiaddr(), Ipv4Addr::new(198, 18, 0, 11));
    assert!(opt(&m, OptionCode::Unknown(175)).is_none());
}

#[test]
fn option_93_is_a_list_first_known_wins() {
    let disc: &[u8] = &[1];
    // 10 (arm32 UEFI) is not served; 7 is x86-64 UEFI.
    let b = raw(BIOS_MAC, [0; 4], &[(53, disc), (93, &[0, 10, 0, 7])]);
    assert_eq!(file(&reply(run(&b, Mode::Authoritative)).0), "ipxe.efi");
    let b = raw(BIOS_MAC, [0; 4], &[(53, disc), (93, &[0, 9])]);
    assert_eq!(file(&reply(run(&b, Mode::Authoritative)).0), "ipxe.efi");
    let b = raw(BIOS_MAC, [0; 4], &[(53, disc), (93, &[0, 0])]);
    assert_eq!(
        file(&reply(run(&b, Mode::Authoritative)).0),
        "undionly.kpxe"
    );
    // Odd length: the trailing byte is ignored.
    let b = raw(BIOS_MAC, [0; 4], &[(53, disc), (93, &[0, 11, 0])]);
    assert_eq!(
        file(&reply(run(&b, Mode::Authoritative)).0),
        "ipxe-arm64.efi"
    );
}

#[test]
fn without_option_93_the_inventory_decides() {
    let disc: &[u8] = &[1];
    let b = raw(ARM_MAC, [0; 4], &[(53, disc)]);
    assert_eq!(
        file(&reply(run(&b, Mode::Authoritative)).0),
        "ipxe-arm64.efi"
    );
    let b = raw(BIOS_MAC, [0; 4], &[(53, disc)]);
    assert_eq!(
        file(&reply(run(&b, Mode::Authoritative)).0),
        "undionly.kpxe"
    );
}

#[test]
fn http_boot_gets_url_and_httpclient_echoed() {
    let b = raw(
        ARM_MAC,
        [0; 4],
        &[
            (53, &[1]),
            (93, &[0, 19]),
            (60, b"HTTPClient:Arch:00019:UNDI:003000"),
        ],
    );
    let (m, _) = reply(run(&b, Mode::Authoritative));
    assert_eq!(file(&m), "http://198.18.0.1/ipxe-arm64.efi");
    assert_eq!(
        opt(&m, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
    );
    let b = raw(BIOS_MAC, [0; 4], &[(53, &[1]), (93, &[0, 16])]);
    assert_eq!(
        file(&reply(run(&b, Mode::Authoritative)).0),
        "http://198.18.0.1/ipxe.efi"
    );
}

#[test]
fn unknown_mac_is_ignored() {
    let b = raw("02:00:00:00:00:99", [0; 4], &[(53, &[1]), (93, &[0, 0])]);
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::UnknownMac)
    );
    let b = raw(
        "02:00:00:00:00:99",
        [0; 4],
        &[(53, &[1]), (60, b"PXEClient")],
    );
    assert_eq!(
        run(&b, Mode::Proxy),
        Decision::Ignore(IgnoreReason::UnknownMac)
    );
}

#[test]
fn request_for_our_offer_is_acked_others_naked_or_ignored() {
    let ours = [198, 18, 0, 10];
    let b = raw(
        BIOS_MAC,
        [0; 4],
        &[(53, &[3]), (50, &ours), (54, &SERVER.octets())],
    );
    let (m, to) = reply(run(&b, Mode::Authoritative));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::from(ours));
    assert_eq!(to, BCAST68);

    // Renewal: ciaddr set, unicast back.
    let b = raw(BIOS_MAC, ours, &[(53, &[3])]);
    let (m, to) = reply(run(&b, Mode::Authoritative));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(to, SocketAddrV4::new(Ipv4Addr::from(ours), 68));

    // Not the address we offer to this MAC: NAK, broadcast.
    let b = raw(BIOS_MAC, [0; 4], &[(53, &[3]), (50, &[198, 18, 0, 77])]);
    let (m, to) = reply(run(&b, Mode::Authoritative));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(to, BCAST68);

    // Addressed to another server: silence.
    let b = raw(
        BIOS_MAC,
        [0; 4],
        &[(53, &[3]), (50, &ours), (54, &[198, 18, 0, 2])],
    );
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::OtherServer)
    );

    // Neither option 50 nor ciaddr.
    let b = raw(BIOS_MAC, [0; 4], &[(53, &[3])]);
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::NoRequestedAddress)
    );
}

#[test]
fn release_decline_inform() {
    let ours = [198, 18, 0, 10];
    let b = raw(BIOS_MAC, ours, &[(53, &[7])]);
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::Released)
    );
    let b = raw(BIOS_MAC, [0; 4], &[(53, &[4]), (50, &ours)]);
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::Declined)
    );
    let b = raw(BIOS_MAC, ours, &[(53, &[8])]);
    let (m, to) = reply(run(&b, Mode::Authoritative));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&m, OptionCode::AddressLeaseTime).is_none());
    assert_eq!(to, SocketAddrV4::new(Ipv4Addr::from(ours), 68));
    // No message type at all.
    let b = raw(BIOS_MAC, [0; 4], &[]);
    assert_eq!(
        run(&b, Mode::Authoritative),
        Decision::Ignore(IgnoreReason::UnsupportedType)
    );
}

#[test]
fn pool_addresses_follow_mac_order_and_skip_static_ones() {
    let a = raw("52:54:00:00:00:0a", [0; 4], &[(53, &[1])]);
    let b = raw("52:54:00:00:00:0b", [0; 4], &[(53, &[1])]);
    assert_eq!(
        reply(run(&a, Mode::Authoritative)).0.yiaddr(),
        Ipv4Addr::new(198, 18, 0, 100)
    );
    assert_eq!(
        reply(run(&b, Mode::Authoritative)).0.yiaddr(),
        Ipv4Addr::new(198, 18, 0, 101)
    );
    // A REQUEST for the pool address is acked.
    let r = raw(
        "52:54:00:00:00:0b",
        [0; 4],
        &[(53, &[3]), (50, &[198, 18, 0, 101])],
    );
    assert_eq!(
        reply(run(&r, Mode::Authoritative)).0.opts().msg_type(),
        Some(MessageType::Ack)
    );
    // Exhausted pool.
    let mut c = cfg(Mode::Authoritative);
    c.pool.truncate(2);
    let req = Request::decode(&b, client(), Arrival::Dhcp).unwrap();
    assert_eq!(
        decide(&req, &hosts(), &c),
        Decision::Ignore(IgnoreReason::NoAddress)
    );
}

#[test]
fn odd_option_97_and_foreign_vendor_classes_are_tolerated() {
    let b = raw(
        BIOS_MAC,
        [0; 4],
        &[
            (53, &[1]),
            (60, b"MSFT 5.0"),
            (97, &[1, 2, 3]),
            (93, &[0, 7]),
        ],
    );
    let (m, _) = reply(run(&b, Mode::Authoritative));
    assert_eq!(file(&m), "ipxe.efi");
    // Proxy mode answers only boot clients.
    assert_eq!(
        run(&b, Mode::Proxy),
        Decision::Ignore(IgnoreReason::NotBootClient)
    );
    // Empty option 97 in proxy mode: answered, not echoed.
    let b = raw(
        BIOS_MAC,
        [0; 4],
        &[(53, &[1]), (60, b"PXEClient"), (97, &[])],
    );
    let (m, _) = reply(run(&b, Mode::Proxy));
    assert!(opt(&m, OptionCode::ClientMachineIdentifier).is_none());
}

#[test]
fn proxy_offer_has_boot_info_and_no_address() {
    let bytes = fixture("aavmf-arm64-discover.hex");
    let (m, to) = reply(run(&bytes, Mode::Proxy));
    assert_eq!(to, BCAST68);
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(file(&m), "ipxe-arm64.efi");
    assert_eq!(
        opt(&m, OptionCode::ClassIdentifier),
        Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
    );
    assert_eq!(
        opt(&m, OptionCode::VendorExtensions),
        Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
    );
    assert!(opt(&m, OptionCode::AddressLeaseTime).is_none());
    // AAVMF's well-formed all-zero GUID is echoed.
    assert_eq!(
        opt(&m, OptionCode::ClientMachineIdentifier),
        Some(&DhcpOption::ClientMachineIdentifier(vec![0; 17]))
    );
}

#[test]
fn proxy_port_4011_request_is_acked_to_its_source() {
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 50), 68);
    let b = raw(
        ARM_MAC,
        [198, 18, 0, 50],
        &[
            (53, &[3]),
            (60, b"PXEClient:Arch:00011:UNDI:003000"),
            (93, &[0, 11]),
        ],
    );
    let (m, to) = reply(run_at(&b, Mode::Proxy, Arrival::Pxe, src));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(to, src);
    assert_eq!(file(&m), "ipxe-arm64.efi");
    // On port 67, address traffic belongs to the real DHCP server.
    assert_eq!(
        run(&b, Mode::Proxy),
        Decision::Ignore(IgnoreReason::NotOurs)
    );
    // And iPXE in proxy mode gets its script.
    let b = raw(
        BIOS_MAC,
        [0; 4],
        &[(53, &[1]), (77, b"iPXE"), (93, &[0, 0])],
    );
    let (m, _) = reply(run(&b, Mode::Proxy));
    assert_eq!(
        file(&m),
        "http://198.18.0.1:8080/hosts/52-54-00-12-34-56.ipxe"
    );
}

#[test]
fn relayed_requests_go_back_to_the_relay() {
    let mut b = raw(BIOS_MAC, [0; 4], &[(53, &[1])]);
    b[24..28].copy_from_slice(&[10, 0, 0, 1]);
    let (m, to) = reply(run(&b, Mode::Authoritative));
    assert_eq!(to, SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 67));
    assert_eq!(m.giaddr(), Ipv4Addr::new(10, 0, 0, 1));
}

#[test]
fn captured_ipxe_request_is_acked() {
    let bytes = fixture("ipxe-bios-request.hex");
    let req = Request::decode(&bytes, client(), Arrival::Dhcp).unwrap();
    assert_eq!(req.requested_ip(), Some(Ipv4Addr::new(198, 18, 0, 10)));
    assert_eq!(req.server_id(), Some(SERVER));
    let (m, to) = reply(decide(&req, &hosts(), &cfg(Mode::Authoritative)));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::new(198, 18, 0, 10));
    assert_eq!(to, BCAST68);
    assert_eq!(
        file(&m),
        "http://198.18.0.1:8080/hosts/52-54-00-12-34-56.ipxe"
    );
    // The same REQUEST seen by a second agent with another address: silence.
    let mut other = cfg(Mode::Authoritative);
    other.server_ip = Ipv4Addr::new(198, 18, 0, 2);
    assert_eq!(
        decide(&req, &hosts(), &other),
        Decision::Ignore(IgnoreReason::OtherServer)
    );
}

/// The boot file the lab gives arm64 UEFI hosts: the GRUB netboot image
/// that `pxe-assets/fetch-artifacts.sh` builds (agent.toml
/// `boot_efi_arm64 = "artifacts/grubnetaa64-lab.efi"`).
const GRUB_ARM64: &str = "artifacts/grubnetaa64-lab.efi";

fn grub_cfg() -> DhcpConfig {
    let mut c = cfg(Mode::Authoritative);
    c.boot_files.efi_arm64 = GRUB_ARM64.into();
    c
}

#[test]
fn captured_aavmf_discover_gets_the_grub_image() {
    let bytes = fixture("aavmf-arm64-discover.hex");
    let req = Request::decode(&bytes, client(), Arrival::Dhcp).unwrap();
    assert_eq!(req.mac.to_string(), ARM_MAC);
    assert_eq!(req.vendor_class(), b"PXEClient:Arch:00011:UNDI:003000");
    assert_eq!(req.msg.opts().msg_type(), Some(MessageType::Discover));
    let (m, to) = reply(decide(&req, &hosts(), &grub_cfg()));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(to, BCAST68);
    assert_eq!(m.yiaddr(), Ipv4Addr::new(198, 18, 0, 11));
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(m.xid(), req.msg.xid());
    assert_eq!(file(&m), GRUB_ARM64);
    assert_eq!(
        opt(&m, OptionCode::BootfileName),
        Some(&DhcpOption::BootfileName(GRUB_ARM64.as_bytes().to_vec()))
    );
    // Plain PXE: neither iPXE's option 175 nor HTTP boot's class.
    assert!(opt(&m, OptionCode::Unknown(175)).is_none());
    assert!(opt(&m, OptionCode::ClassIdentifier).is_none());
    let bytes = packet::encode(&m).unwrap();
    assert!(bytes.len() >= 300);
}

#[test]
fn captured_aavmf_request_is_acked_with_the_grub_image() {
    let bytes = fixture("aavmf-arm64-request.hex");
    let req = Request::decode(&bytes, client(), Arrival::Dhcp).unwrap();
    assert_eq!(req.mac.to_string(), ARM_MAC);
    assert_eq!(req.client_arches, vec![11]);
    assert!(!req.is_ipxe());
    assert_eq!(req.requested_ip(), Some(Ipv4Addr::new(198, 18, 0, 11)));
    assert_eq!(req.server_id(), Some(SERVER));
    let (m, to) = reply(decide(&req, &hosts(), &grub_cfg()));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(m.yiaddr(), Ipv4Addr::new(198, 18, 0, 11));
    assert_eq!(m.siaddr(), SERVER);
    assert_eq!(to, BCAST68);
    assert_eq!(file(&m), GRUB_ARM64);
    assert!(opt(&m, OptionCode::Unknown(175)).is_none());
    // Without the lab's boot_efi_arm64, the default name.
    let (m, _) = reply(decide(&req, &hosts(), &cfg(Mode::Authoritative)));
    assert_eq!(file(&m), "ipxe-arm64.efi");
    // Another agent's address in option 54: silence.
    let mut other = grub_cfg();
    other.server_ip = Ipv4Addr::new(198, 18, 0, 2);
    assert_eq!(
        decide(&req, &hosts(), &other),
        Decision::Ignore(IgnoreReason::OtherServer)
    );
    // If the inventory had the MAC as another address, the REQUEST is NAKed.
    let moved = HostTable::new([host(
        "arm1",
        ARM_MAC,
        Some([198, 18, 0, 12]),
        Arch::Aarch64,
        Firmware::Uefi,
    )]);
    let (m, to) = reply(decide(&req, &moved, &grub_cfg()));
    assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(to, BCAST68);
}
