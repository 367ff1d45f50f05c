//! The boot services' targets (DHCP, TFTP, HTTP) and what they share: the
//! rack's host table and a boot tree with a secret just outside it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use dhcproto::v4::{self, Message, MessageType};
use dhcproto::{Decodable, Decoder};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::input::{Input, InputWriter};
use crate::assets::boot::BootFiles;
use crate::assets::render::RenderConfig;
use crate::assets::root::DirRoot;
use crate::assets::{Content, FileSource, OpenError};
use crate::dhcp::decide::address_for;
use crate::dhcp::packet::{self, DHCP_CLIENT_PORT, PXE_PORT};
use crate::dhcp::{Arrival, Decision, DhcpConfig, Mode, Request, decide};
use crate::hosts::{Arch, BootHost, Firmware, HostTable};
use crate::http::request::{RangeDecision, decode_path, parse_range};
use crate::http::server::HttpConfig;
use crate::tftp::TftpConfig;
use crate::tftp::packet::{MAX_BLKSIZE, Packet, TftpOption};
use crate::tftp::session::{Limits, Sender, Step, negotiate};

/// The contents of the one file outside the boot tree; no reply may ever
/// carry it.
pub const SECRET: &[u8] = b"LAB-FUZZ-SECRET-OUTSIDE-THE-ROOT";

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The rack: the MACs of the captured packets (`tests/fixtures/dhcp`) and
/// pool-addressed hosts, with every profile kind.
fn hosts() -> HostTable {
    let host =
        |name: &str, mac: &str, ip: Option<[u8; 4]>, arch, firmware, profile: &str| BootHost {
            name: name.to_owned(),
            mac: mac.parse().expect("valid MAC"),
            ipv4: ip.map(Ipv4Addr::from),
            arch,
            firmware,
            profile: profile.to_owned(),
            lease: Some("7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".to_owned()),
            holder: Some("ci".to_owned()),
            ssh_key: None,
        };
    HostTable::new([
        host(
            "bios1",
            "52:54:00:12:34:56",
            Some([198, 18, 0, 10]),
            Arch::X86_64,
            Firmware::Bios,
            "xen",
        ),
        host(
            "arm1",
            "52:54:00:aa:00:01",
            Some([198, 18, 0, 11]),
            Arch::Aarch64,
            Firmware::Uefi,
            "xen",
        ),
        host(
            "pool-a",
            "52:54:00:00:00:0a",
            None,
            Arch::X86_64,
            Firmware::Uefi,
            "xen-install",
        ),
        host(
            "pool-b",
            "52:54:00:00:00:0b",
            None,
            Arch::X86_64,
            Firmware::Bios,
            "local-disk",
        ),
        host(
            "health",
            "52:54:00:00:00:0c",
            Some([198, 18, 0, 12]),
            Arch::Aarch64,
            Firmware::Uefi,
            "health-check",
        ),
        // A profile that is gone: rendering fails (a 500, never a panic).
        host(
            "stale",
            "52:54:00:00:00:0d",
            None,
            Arch::X86_64,
            Firmware::Uefi,
            "gone",
        ),
    ])
}

/// A boot tree in the temporary directory, built once per process:
///
/// ```text
/// secret                    SECRET (outside both roots)
/// assets/profiles/*.j2      copies of pxe-assets/profiles
/// assets/boot.ipxe, assets/sub/file.txt
/// assets/escape -> ../secret, assets/abs -> <tree>/secret,
/// assets/up -> .., assets/loop -> loop
/// artifacts/xen, artifacts/out -> ../secret
/// ```
struct BootTree {
    source: BootFiles,
}

fn boot_tree() -> &'static BootTree {
    static TREE: LazyLock<BootTree> = LazyLock::new(BootTree::create);
    &TREE
}

impl BootTree {
    fn create() -> Self {
        let dir = scratch_dir("boot");
        let io = |what: &str, r: std::io::Result<()>| {
            r.unwrap_or_else(|e| panic!("fuzz boot tree: {what}: {e}"))
        };
        let assets = dir.join("assets");
        let artifacts = dir.join("artifacts");
        io("mkdir", std::fs::create_dir_all(assets.join("profiles")));
        io("mkdir", std::fs::create_dir_all(assets.join("sub")));
        io("mkdir", std::fs::create_dir_all(&artifacts));
        io("write", std::fs::write(dir.join("secret"), SECRET));
        io(
            "write",
            std::fs::write(assets.join("boot.ipxe"), "#!ipxe\n"),
        );
        io(
            "write",
            std::fs::write(assets.join("sub/file.txt"), "inside"),
        );
        io(
            "write",
            std::fs::write(artifacts.join("xen"), vec![7u8; 3000]),
        );
        let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets/profiles");
        for entry in std::fs::read_dir(&templates).expect("pxe-assets/profiles") {
            let entry = entry.expect("pxe-assets/profiles entry");
            io(
                "copy template",
                std::fs::copy(
                    entry.path(),
                    assets.join("profiles").join(entry.file_name()),
                )
                .map(drop),
            );
        }
        let link =
            |target: &Path, at: PathBuf| io("symlink", std::os::unix::fs::symlink(target, at));
        link(Path::new("../secret"), assets.join("escape"));
        link(&dir.join("secret"), assets.join("abs"));
        link(Path::new(".."), assets.join("up"));
        link(Path::new("loop"), assets.join("loop"));
        link(Path::new("../secret"), artifacts.join("out"));
        let config = RenderConfig {
            http_url: Some(format!("http://{SERVER_IP}:8080")),
            tftp_server: Some(IpAddr::V4(SERVER_IP)),
            artifacts_url: None,
            grub_http: true,
            extra: BTreeMap::new(),
        };
        let source = BootFiles::new(&assets, Some(&artifacts), hosts(), config)
            .expect("the fuzz boot tree loads");
        Self { source }
    }
}

/// A fresh directory for this process under the temporary directory;
/// directories of processes that are gone are removed first.
pub(super) fn scratch_dir(what: &str) -> PathBuf {
    let base = std::env::temp_dir();
    let prefix = format!("lab-fuzz-{what}-");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
    dir
}

/// What `source` serves at `path`, read whole (the tree's files are small).
fn read_content(source: &dyn FileSource, path: &str) -> Result<Vec<u8>, OpenError> {
    match source.open(path, None)? {
        Content::Bytes(b) => Ok(b),
        Content::File { mut file, len } => {
            let mut v = Vec::new();
            file.read_to_end(&mut v).expect("read a served file");
            assert_eq!(
                v.len() as u64,
                len,
                "{path}: the length served is the file's"
            );
            Ok(v)
        }
    }
}

fn assert_confined(served: &[u8], what: &str) {
    assert!(
        !served.windows(SECRET.len()).any(|w| w == SECRET),
        "{what}: served the file outside the root"
    );
}

// ------------------------------------------------------------ DHCP

/// DHCP target; the input is one datagram. It is decoded once and decided
/// as it would be on port 67 by an authoritative server, on port 67 by a
/// proxy, and on port 4011 by a proxy. A reply must go only to an inventory
/// MAC, echo the transaction, address the client right, give it the
/// address the table says, and encode into a message that decodes.
pub fn dhcp(data: &[u8]) {
    static HOSTS: LazyLock<HostTable> = LazyLock::new(hosts);
    static CONFIGS: LazyLock<[DhcpConfig; 2]> = LazyLock::new(|| {
        let mut auth = DhcpConfig::new(Mode::Authoritative, SERVER_IP);
        auth.router = Some(SERVER_IP);
        auth.dns = vec![SERVER_IP];
        auth.pool = (10..=13).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
        let proxy = DhcpConfig::new(Mode::Proxy, SERVER_IP);
        [auth, proxy]
    });
    let broadcast = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DHCP_CLIENT_PORT);
    let Ok(mut req) = Request::decode(data, broadcast, Arrival::Dhcp) else {
        return;
    };
    assert_eq!(req.mac.octets()[..], data[28..34], "chaddr is the MAC");
    let [auth, proxy] = &*CONFIGS;
    let pxe_client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 77), PXE_PORT);
    for (cfg, arrival, src) in [
        (auth, Arrival::Dhcp, broadcast),
        (proxy, Arrival::Dhcp, broadcast),
        (proxy, Arrival::Pxe, pxe_client),
    ] {
        req.arrival = arrival;
        req.src = src;
        if let Decision::Reply(reply, to) = decide(&req, &HOSTS, cfg) {
            check_dhcp_reply(&req, &reply, to, cfg, &HOSTS);
        }
    }
}

fn check_dhcp_reply(
    req: &Request,
    reply: &Message,
    to: SocketAddrV4,
    cfg: &DhcpConfig,
    hosts: &HostTable,
) {
    let host = hosts
        .by_mac(&req.mac)
        .expect("replies go only to inventory MACs");
    assert_eq!(reply.xid(), req.msg.xid());
    assert_eq!(reply.opcode(), v4::Opcode::BootReply);
    assert_eq!(reply.chaddr()[..6], req.mac.octets());
    let kind = reply.opts().msg_type().expect("a reply has a message type");
    assert!(
        matches!(
            kind,
            MessageType::Offer | MessageType::Ack | MessageType::Nak
        ),
        "{kind:?}"
    );
    match req.arrival {
        Arrival::Pxe => assert_eq!(to, req.src, "port 4011 replies go back to the source"),
        Arrival::Dhcp => assert!(matches!(to.port(), 67 | 68), "{to}"),
    }
    match cfg.mode {
        Mode::Proxy => assert!(reply.yiaddr().is_unspecified(), "a proxy gives no address"),
        Mode::Authoritative if kind != MessageType::Nak && !reply.yiaddr().is_unspecified() => {
            assert_eq!(Some(reply.yiaddr()), address_for(&host, hosts, cfg));
        }
        Mode::Authoritative => {}
    }
    if let Ok(bytes) = packet::encode(reply) {
        assert!(bytes.len() >= 300, "padded to the BOOTP minimum");
        let back = Message::decode(&mut Decoder::new(&bytes)).expect("our reply decodes");
        assert_eq!(back.xid(), reply.xid());
        assert_eq!(back.opts().msg_type(), Some(kind));
    }
}

// ------------------------------------------------------------ TFTP

/// The server's default caps (what `TftpConfig::default` negotiates with).
fn tftp_limits() -> Limits {
    let c = TftpConfig::default();
    Limits {
        blksize_cap: c.blksize_cap,
        windowsize_cap: c.windowsize_cap,
        default_timeout: c.timeout,
        max_timeout: c.max_timeout,
        deadline_floor: c.deadline_floor,
        min_rate: c.min_rate,
    }
}

/// A TFTP input: the length of the file served (it decides the block
/// count, so the 16-bit block number wraps within reach), the first
/// datagram, then what the client sends during the transfer (an empty
/// datagram stands for a retransmit timeout).
pub fn tftp_input(file_len: u32, request: &[u8], client: &[&[u8]]) -> Vec<u8> {
    let mut w = InputWriter::new().u32(file_len).long_frame(request);
    for d in client {
        w = w.frame(d);
    }
    w.finish()
}

/// TFTP target (format: [`tftp_input`]). Every datagram is decoded and
/// must re-encode to itself. A read request is negotiated against the
/// default caps and opened in the boot tree (never outside it); the
/// transfer of a file of the given length runs on the client's datagrams,
/// every block it sends lying within the file and the window, and then
/// with a client that acknowledges each window it must finish.
pub fn tftp(data: &[u8]) {
    let mut input = Input::new(data);
    let file_len = u64::from(input.u32());
    let Some(first) = input.long_frame() else {
        return;
    };
    let Ok(packet) = Packet::decode(first) else {
        return;
    };
    assert_eq!(Packet::decode(&packet.encode()).as_ref(), Ok(&packet));
    let Packet::Rrq(req) = packet else {
        return;
    };
    if let Ok(served) = read_content(&boot_tree().source, &req.filename) {
        assert_confined(&served, &req.filename);
    }
    let limits = tftp_limits();
    let Ok(neg) = negotiate(&req, &limits) else {
        return;
    };
    assert!((8..=limits.blksize_cap.min(MAX_BLKSIZE)).contains(&neg.blksize));
    assert!((1..=limits.windowsize_cap).contains(&neg.windowsize));
    assert!(neg.timeout <= limits.max_timeout);
    let oack = neg.oack(file_len);
    if let Some(options) = &oack {
        let p = Packet::Oack {
            options: options.clone(),
        };
        assert_eq!(Packet::decode(&p.encode()).as_ref(), Ok(&p));
        let names: Vec<&str> = options
            .iter()
            .map(|o: &TftpOption| o.name.as_str())
            .collect();
        for name in &names {
            assert!(
                req.option(name).is_some(),
                "OACK option {name} was asked for"
            );
        }
    }
    let mut s = Sender::new(
        file_len,
        neg.blksize,
        neg.windowsize,
        oack.is_some(),
        TftpConfig::default().retries,
    );
    let total = s.total_blocks();
    assert_eq!(total, file_len / u64::from(neg.blksize) + 1);
    let check = |s: &Sender, step: Step| {
        if let Step::SendBlocks { first, last } = step {
            assert!(
                1 <= first && first <= last && last <= total,
                "{first}..={last} of {total}"
            );
            assert!(
                last - first < u64::from(neg.windowsize),
                "window {}",
                neg.windowsize
            );
            for n in [first, last] {
                let (off, len) = s.block_range(n);
                assert!(off + len as u64 <= file_len);
                let full = usize::from(neg.blksize);
                if n < total {
                    assert_eq!(len, full, "only the last block is short");
                } else {
                    assert!(len < full, "the last block is short");
                }
            }
        }
    };
    let mut step = s.start();
    check(&s, step);
    // The client's datagrams.
    loop {
        if matches!(step, Step::Done | Step::GiveUp) {
            return;
        }
        let Some(d) = input.frame() else { break };
        step = if d.is_empty() {
            s.on_timeout()
        } else {
            match Packet::decode(d) {
                Ok(Packet::Ack { block }) => s.on_ack(block),
                Ok(Packet::Error { .. }) => return,
                Ok(p) => {
                    assert_eq!(Packet::decode(&p.encode()).as_ref(), Ok(&p));
                    Step::Wait
                }
                Err(_) => Step::Wait,
            }
        };
        check(&s, step);
    }
    // A client that acknowledges every window finishes the transfer: one
    // timeout for a wait the datagrams left (which may be the last), the
    // OACK, then a window per acknowledgement.
    let window = u64::from(neg.windowsize);
    let bound = total.div_ceil(window) + 2;
    if bound > 4096 {
        return;
    }
    let mut moves = 0;
    let mut waited = false;
    loop {
        step = match step {
            Step::Done => return,
            Step::GiveUp => {
                assert!(waited && moves == 1, "only the first timeout may give up");
                return;
            }
            Step::SendOack => s.on_ack(0),
            Step::SendBlocks { last, .. } => s.on_ack(Sender::wire_block(last)),
            Step::Wait => {
                waited = true;
                s.on_timeout()
            }
        };
        check(&s, step);
        moves += 1;
        assert!(
            moves <= bound,
            "{total} blocks not sent after {moves} steps: {step:?}"
        );
    }
}

// ------------------------------------------------------------ HTTP

/// HTTP target: the input is what a client sends on one connection (then
/// it closes its side). The agent's HTTP/1.1 server (hyper with the
/// agent's request handler) serves it from the boot tree; nothing it
/// writes may carry the file outside the tree, and every response starts
/// with a status line. Each input line is also taken as a `Range` value
/// and as a request path, which must decode and confine consistently.
pub fn http(data: &[u8]) {
    static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    let response = RUNTIME.block_on(exchange(data));
    assert_confined(&response, "http");
    if !response.is_empty() {
        assert!(
            response.starts_with(b"HTTP/1."),
            "{:?}",
            String::from_utf8_lossy(&response)
        );
    }
    for line in data.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        check_range(line);
        check_path(line);
    }
}

/// One connection through the real server's connection setup and handler.
async fn exchange(request: &[u8]) -> Vec<u8> {
    let source: Arc<dyn FileSource> = Arc::new(BootFilesRef(&boot_tree().source));
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 10), 40000));
    let service = hyper::service::service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(crate::http::server::handle(req, source, peer).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HttpConfig::default().header_timeout);
    let conn = builder.serve_connection(TokioIo::new(server), service);
    let talk = async move {
        let _ = client.write_all(request).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        out
    };
    let (_, out) = tokio::join!(conn, talk);
    out
}

/// The process-wide [`BootFiles`] as an `Arc<dyn FileSource>`.
struct BootFilesRef(&'static BootFiles);

impl FileSource for BootFilesRef {
    fn open(&self, path: &str, client: Option<IpAddr>) -> Result<Content, OpenError> {
        self.0.open(path, client)
    }
}

fn check_range(header: &str) {
    for len in [0, 1, 100, u64::MAX] {
        match parse_range(Some(header), len) {
            RangeDecision::Partial { start, end } => {
                assert!(
                    start <= end && end < len,
                    "{header:?} of {len}: {start}-{end}"
                );
            }
            RangeDecision::Full | RangeDecision::Unsatisfiable => {}
        }
    }
}

fn check_path(raw: &str) {
    let Some(path) = decode_path(raw) else {
        return;
    };
    match DirRoot::normalize(&path) {
        Ok(rel) => {
            assert!(rel.is_relative(), "{raw:?} -> {rel:?}");
            assert!(
                rel.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{raw:?} -> {rel:?}"
            );
        }
        Err(OpenError::NotFound | OpenError::Forbidden(_)) => {}
        Err(OpenError::Io(e)) => panic!("normalize does no I/O: {e}"),
    }
}
