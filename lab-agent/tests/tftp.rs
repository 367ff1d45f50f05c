//! The TFTP server against real clients (curl, atftp) and hand-made packets,
//! on 127.0.0.1 with a port picked by the kernel.
//!
//! Needs the Debian packages `curl` and `atftp`; a missing client fails the
//! test with the package name (never a silent skip).

use lab_agent::assets::root::DirRoot;
use lab_agent::assets::{Content, FileSource, OpenError};
use lab_agent::tftp::packet::{ErrorCode, Mode, Packet, Request, TftpOption};
use lab_agent::tftp::{TftpConfig, TftpServer, TftpStats};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::process::Command;

/// Files in the root, with their sizes.
const SMALL: (&str, usize) = ("small.txt", 100);
const EXACT: (&str, usize) = ("boot/exact.bin", 512 * 40);
/// More than 65535 blocks of 512 bytes: the block number wraps.
const BIG: (&str, usize) = ("big.bin", 512 * 65536 + 777);

/// The assets root plus one generated file that names the client.
struct Source {
    root: DirRoot,
}

impl FileSource for Source {
    fn open(&self, path: &str, client: Option<IpAddr>) -> Result<Content, OpenError> {
        if path == "host.ipxe" {
            let ip = client.map(|c| c.to_string()).unwrap_or_default();
            return Ok(Content::Bytes(
                format!("#!ipxe\necho client {ip}\n").into_bytes(),
            ));
        }
        self.root.open(path, client)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    stats: Arc<TftpStats>,
}

impl Fixture {
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn content(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.root().join(name)).unwrap()
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name.replace('/', "_"))
    }

    fn url(&self, name: &str) -> String {
        format!("tftp://{}/{name}", self.addr)
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

async fn start(config: TftpConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    for (i, (name, len)) in [SMALL, EXACT, BIG].into_iter().enumerate() {
        std::fs::write(root.join(name), pattern(len, i as u64 + 7)).unwrap();
    }
    std::fs::write(dir.path().join("secret"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
    let source = Arc::new(Source {
        root: DirRoot::new(&root).unwrap(),
    });
    let config = TftpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config
    };
    let server = TftpServer::bind(config, source).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    tokio::spawn(server.run());
    Fixture { dir, addr, stats }
}

/// Panics, naming the Debian package, when `tool` is not installed.
fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: install the Debian package `{package}` (apt-get install -y {package})"
    );
}

/// curl; returns (exit code, stderr).
async fn curl(args: &[&str]) -> (i32, String) {
    require("curl", "curl");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn atftp(fx: &Fixture, args: &[&str]) -> (bool, String) {
    require("atftp", "atftp");
    let out = Command::new("atftp")
        .args(args)
        .arg("127.0.0.1")
        .arg(fx.addr.port().to_string())
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_same(got: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(got).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got == want, "{what}: content differs");
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    Packet::Rrq(Request {
        filename: name.into(),
        mode: Mode::Octet,
        options: options.iter().map(|(n, v)| TftpOption::new(n, v)).collect(),
    })
    .encode()
}

/// Send `bytes` to the server and return the first reply and where it came from.
async fn exchange(sock: &UdpSocket, to: SocketAddr, bytes: &[u8]) -> (Packet, SocketAddr) {
    sock.send_to(bytes, to).await.unwrap();
    recv(sock).await
}

async fn recv(sock: &UdpSocket) -> (Packet, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("no reply within 3 s")
        .unwrap();
    (Packet::decode(&buf[..n]).unwrap(), from)
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

fn error_code(p: &Packet) -> ErrorCode {
    match p {
        Packet::Error { code, .. } => *code,
        other => panic!("expected an ERROR, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_gets_byte_identical_files() {
    let fx = start(TftpConfig::default()).await;
    for (name, _) in [SMALL, EXACT] {
        for blksize in [None, Some("1468"), Some("512")] {
            let out = fx.out(name);
            let mut args = vec!["-o", out.to_str().unwrap()];
            if let Some(b) = blksize {
                args.extend(["--tftp-blksize", b]);
            }
            let url = fx.url(name);
            args.push(&url);
            let (code, err) = curl(&args).await;
            assert_eq!(code, 0, "{name} blksize {blksize:?}: {err}");
            assert_same(&out, &fx.content(name), &format!("{name} {blksize:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_large_file_wraps_block_number() {
    let fx = start(TftpConfig::default()).await;
    let out = fx.out("big");
    let t = Instant::now();
    let (code, err) = curl(&[
        "--tftp-blksize",
        "512",
        "-o",
        out.to_str().unwrap(),
        &fx.url(BIG.0),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_same(&out, &fx.content(BIG.0), "big.bin over 65536 blocks");
    eprintln!("{} bytes in {:?} with blksize 512", BIG.1, t.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn atftp_with_windowsize_is_byte_identical() {
    let fx = start(TftpConfig::default()).await;
    for (name, _) in [SMALL, EXACT, BIG] {
        let out = fx.out(name);
        let (ok, text) = atftp(
            &fx,
            &[
                "--verbose",
                "--option",
                "blksize 1468",
                "--option",
                "windowsize 16",
                "--option",
                "tsize 0",
                "-g",
                "-r",
                name,
                "-l",
                out.to_str().unwrap(),
            ],
        )
        .await;
        assert!(ok, "{name}: {text}");
        assert_same(&out, &fx.content(name), name);
        // atftp prints the options the server acknowledged.
        assert!(
            text.contains("windowsize") && text.contains("16"),
            "windowsize not acknowledged: {text}"
        );
    }
    // Counted when each last ACK arrives, which may follow atftp's exit.
    wait_stats(&fx, "three transfers completed", |s| s.completed >= 3).await;
    let s = fx.stats.snapshot();
    assert_eq!(s.completed, 3, "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn atftp_windowsize_over_block_wrap_with_small_blocks() {
    let fx = start(TftpConfig::default()).await;
    let out = fx.out("big-w");
    let (ok, text) = atftp(
        &fx,
        &[
            "--option",
            "blksize 512",
            "--option",
            "windowsize 16",
            "-g",
            "-r",
            BIG.0,
            "-l",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{text}");
    assert_same(&out, &fx.content(BIG.0), "big.bin windowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn options_negotiated_and_capped() {
    let fx = start(TftpConfig::default()).await;
    let sock = client().await;
    // iPXE's request, as captured.
    let ipxe = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tftp/ipxe_rrq.bin"
    ))
    .unwrap();
    let ipxe = String::from_utf8(ipxe)
        .unwrap()
        .replace("undionly.kpxe", EXACT.0)
        .into_bytes();
    let (p, tid) = exchange(&sock, fx.addr, &ipxe).await;
    assert_ne!(tid, fx.addr, "transfer must use its own port");
    assert_eq!(
        p,
        Packet::Oack {
            options: vec![
                TftpOption::new("blksize", 1432),
                TftpOption::new("tsize", EXACT.1),
            ]
        }
    );
    let (p, _) = exchange(&sock, tid, &Packet::Ack { block: 0 }.encode()).await;
    match p {
        Packet::Data { block: 1, data } => assert_eq!(data, fx.content(EXACT.0)[..1432]),
        other => panic!("{other:?}"),
    }
    sock.send_to(
        &Packet::Error {
            code: ErrorCode::NotDefined,
            message: "enough".into(),
        }
        .encode(),
        tid,
    )
    .await
    .unwrap();

    // Above the cap: lowered to the cap; windowsize too.
    let (p, _) = exchange(
        &sock,
        fx.addr,
        &rrq(
            SMALL.0,
            &[("BlkSize", "9000"), ("windowsize", "500"), ("foo", "1")],
        ),
    )
    .await;
    assert_eq!(
        p,
        Packet::Oack {
            options: vec![
                TftpOption::new("blksize", 1468),
                TftpOption::new("windowsize", 64),
            ]
        }
    );

    // No options: DATA 1 straight away, 512 bytes.
    let (p, _) = exchange(&sock, fx.addr, &rrq(EXACT.0, &[])).await;
    assert!(
        matches!(p, Packet::Data { block: 1, ref data } if data.len() == 512),
        "{p:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_file_sees_the_client_ip() {
    let fx = start(TftpConfig::default()).await;
    let out = fx.out("host.ipxe");
    let (code, err) = curl(&["-o", out.to_str().unwrap(), &fx.url("host.ipxe")]).await;
    assert_eq!(code, 0, "{err}");
    assert_same(&out, b"#!ipxe\necho client 127.0.0.1\n", "host.ipxe");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_file_fails_fast() {
    let fx = start(TftpConfig::default()).await;
    let t = Instant::now();
    let (code, err) = curl(&["-o", "/dev/null", &fx.url("no/such/file")]).await;
    // 68: "File not found on TFTP server".
    assert_eq!(code, 68, "{err}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    let sock = client().await;
    let t = Instant::now();
    let (p, _) = exchange(&sock, fx.addr, &rrq("nope.bin", &[("tsize", "0")])).await;
    assert_eq!(error_code(&p), ErrorCode::FileNotFound);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    // A directory is not a file.
    let (p, _) = exchange(&sock, fx.addr, &rrq("boot", &[])).await;
    assert_eq!(error_code(&p), ErrorCode::FileNotFound);
    assert_eq!(fx.stats.snapshot().not_found, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn traversal_and_symlink_escape_are_refused() {
    let fx = start(TftpConfig::default()).await;
    let sock = client().await;
    for name in [
        "../secret",
        "boot/../../secret",
        "..\\secret",
        "boot\\..\\..\\secret",
        "/../secret",
        "escape",
    ] {
        let (p, _) = exchange(&sock, fx.addr, &rrq(name, &[])).await;
        assert_eq!(error_code(&p), ErrorCode::AccessViolation, "{name}");
    }
    // Real clients too: curl sends the path as is, atftp sends it raw.
    let out = fx.out("secret-curl");
    let (code, _) = curl(&[
        "--path-as-is",
        "-o",
        out.to_str().unwrap(),
        &fx.url("../secret"),
    ])
    .await;
    assert_ne!(code, 0);
    let out = fx.out("secret-atftp");
    for name in ["../secret", "escape"] {
        let (ok, text) = atftp(&fx, &["-g", "-r", name, "-l", out.to_str().unwrap()]).await;
        assert!(!ok, "{name}: {text}");
        let leaked = std::fs::read(&out).unwrap_or_default();
        assert!(!leaked.starts_with(b"outside"), "{name} leaked");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_and_bad_requests_are_refused() {
    let fx = start(TftpConfig::default()).await;
    let sock = client().await;
    let wrq = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tftp/atftp_wrq.bin"
    ))
    .unwrap();
    let (p, _) = exchange(&sock, fx.addr, &wrq).await;
    assert_eq!(error_code(&p), ErrorCode::IllegalOperation);

    let local = fx.dir.path().join("upload");
    std::fs::write(&local, b"data").unwrap();
    let (ok, text) = atftp(&fx, &["-p", "-r", "up.txt", "-l", local.to_str().unwrap()]).await;
    assert!(!ok, "{text}");
    assert!(!fx.root().join("up.txt").exists());

    let (p, _) = exchange(
        &sock,
        fx.addr,
        &Packet::Rrq(Request {
            filename: SMALL.0.into(),
            mode: Mode::Netascii,
            options: vec![],
        })
        .encode(),
    )
    .await;
    assert_eq!(error_code(&p), ErrorCode::NotDefined);

    let (p, _) = exchange(&sock, fx.addr, &rrq(SMALL.0, &[("blksize", "4")])).await;
    assert_eq!(error_code(&p), ErrorCode::OptionRefused);

    // Malformed datagrams are dropped and counted; the server keeps serving.
    for junk in [&b""[..], b"\x00", b"\x00\x09zz", b"\x00\x01no-nul"] {
        sock.send_to(junk, fx.addr).await.unwrap();
    }
    let (p, _) = exchange(&sock, fx.addr, &rrq("nope", &[])).await;
    assert_eq!(error_code(&p), ErrorCode::FileNotFound);
    let s = fx.stats.snapshot();
    assert_eq!(
        (s.malformed, s.write_refused, s.refused),
        (4, 2, 2),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_server_refuses_and_stalled_transfer_retransmits() {
    let fx = start(TftpConfig {
        max_transfers: 1,
        retries: 1,
        ..TftpConfig::default()
    })
    .await;
    let stalled = client().await;
    let (p, tid) = exchange(&stalled, fx.addr, &rrq(EXACT.0, &[])).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }));

    let other = client().await;
    let (p, _) = exchange(&other, fx.addr, &rrq(SMALL.0, &[])).await;
    assert_eq!(p, error_code_busy());

    // No ACK: DATA 1 again after the 1 s timeout, from the same TID.
    let t = Instant::now();
    let (p, from) = recv(&stalled).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    assert_eq!(from, tid);
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    // Then the transfer is given up, and the slot is free again.
    let (p, _) = recv(&stalled).await;
    assert_eq!(error_code(&p), ErrorCode::NotDefined);
    // (The slot is released just after the ERROR is sent: poll briefly.)
    let mut p = error_code_busy();
    for _ in 0..50 {
        p = exchange(&other, fx.addr, &rrq(SMALL.0, &[])).await.0;
        if p != error_code_busy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    let s = fx.stats.snapshot();
    assert!(s.busy >= 1, "{s:?}");
    assert_eq!((s.failed, s.retransmits), (1, 1), "{s:?}");
}

fn error_code_busy() -> Packet {
    Packet::Error {
        code: ErrorCode::NotDefined,
        message: "server busy".into(),
    }
}

/// Poll the counters until `pred` holds (10 s at most).
async fn wait_stats(
    fx: &Fixture,
    what: &str,
    pred: impl Fn(&lab_agent::tftp::TftpStatsSnapshot) -> bool,
) {
    let t = Instant::now();
    loop {
        let s = fx.stats.snapshot();
        if pred(&s) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retransmitted_request_does_not_start_a_second_transfer() {
    let fx = start(TftpConfig::default()).await;
    let sock = client().await;
    let req = rrq(SMALL.0, &[]);
    let (p, tid) = exchange(&sock, fx.addr, &req).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    // The client thinks its request was lost and sends it again, twice.
    sock.send_to(&req, fx.addr).await.unwrap();
    sock.send_to(&req, fx.addr).await.unwrap();
    wait_stats(&fx, "duplicates counted", |s| s.duplicates == 2).await;
    // Only the first transfer answers: its retransmission of DATA 1 after
    // the 1 s timeout, from the same port; nothing from anywhere else.
    let (p, from) = recv(&sock).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    assert_eq!(from, tid, "a second transfer answered");
    let s = fx.stats.snapshot();
    assert_eq!((s.requests, s.duplicates, s.active), (3, 2, 1), "{s:?}");
    // It completes; then the same request from the same port is a new
    // transfer (the slot was released with the first).
    sock.send_to(&Packet::Ack { block: 1 }.encode(), tid)
        .await
        .unwrap();
    wait_stats(&fx, "completed", |s| s.completed == 1 && s.active == 0).await;
    let (p, tid2) = exchange(&sock, fx.addr, &req).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    assert_ne!(tid2, tid);
    // A different request from the same port while that one runs is not a
    // retransmission: it gets its own transfer.
    let (p, tid3) = exchange(&sock, fx.addr, &rrq(EXACT.0, &[])).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
    assert_ne!(tid3, tid2);
    let s = fx.stats.snapshot();
    assert_eq!((s.duplicates, s.active), (2, 2), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_client_cap_and_a_refused_timeout_option() {
    let fx = start(TftpConfig {
        max_transfers_per_client: 2,
        ..TftpConfig::default()
    })
    .await;
    let from = |ip: &'static str| async move { UdpSocket::bind(format!("{ip}:0")).await.unwrap() };
    // Two transfers for 127.0.0.2, never acknowledged; a third is refused.
    let (a, b, c) = (
        from("127.0.0.2").await,
        from("127.0.0.2").await,
        from("127.0.0.2").await,
    );
    for s in [&a, &b] {
        let (p, _) = exchange(
            s,
            fx.addr,
            &rrq(EXACT.0, &[("timeout", "255"), ("tsize", "0")]),
        )
        .await;
        // timeout=255 is left out of the OACK (max_timeout is 5 s); tsize is kept.
        assert_eq!(
            p,
            Packet::Oack {
                options: vec![TftpOption::new("tsize", EXACT.1)]
            }
        );
    }
    let (p, _) = exchange(&c, fx.addr, &rrq(SMALL.0, &[])).await;
    assert_eq!(p, error_code_busy());
    // Another client address is served meanwhile, with curl.
    let out = fx.out("other");
    let (code, err) = curl(&["-o", out.to_str().unwrap(), &fx.url(SMALL.0)]).await;
    assert_eq!(code, 0, "{err}");
    // curl exits once it has sent its last ACK: the server counts the
    // transfer complete when that ACK arrives, a moment later.
    wait_stats(&fx, "curl's transfer completed", |s| s.completed == 1).await;
    let s = fx.stats.snapshot();
    assert_eq!((s.client_busy, s.busy, s.completed), (1, 0, 1), "{s:?}");
    // The silent transfers end after (retries + 1) x 1 s, the default
    // timeout: the client's 255 s was not granted.
    let t = Instant::now();
    wait_stats(&fx, "silent transfers given up", |s| {
        s.failed == 2 && s.active == 0
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(7), "{:?}", t.elapsed());
    let (p, _) = exchange(&c, fx.addr, &rrq(SMALL.0, &[])).await;
    assert!(matches!(p, Packet::Data { block: 1, .. }), "{p:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_acks_just_in_time_meets_the_overall_deadline() {
    // 2 s plus 20 KiB at 1 MiB/s: ~2 s for this 20 KiB file.
    let fx = start(TftpConfig {
        deadline_floor: Duration::from_secs(2),
        min_rate: 1 << 20,
        ..TftpConfig::default()
    })
    .await;
    let sock = client().await;
    let (mut p, tid) = exchange(&sock, fx.addr, &rrq(EXACT.0, &[])).await;
    let t = Instant::now();
    // ACK each block after 600 ms: below the 1 s retransmit timeout, so the
    // transfer never times out, but 41 blocks would take 25 s.
    let err = loop {
        match p {
            Packet::Data { block, .. } => {
                tokio::time::sleep(Duration::from_millis(600)).await;
                p = exchange(&sock, tid, &Packet::Ack { block }.encode())
                    .await
                    .0;
            }
            other => break other,
        }
    };
    let took = t.elapsed();
    assert_eq!(
        err,
        Packet::Error {
            code: ErrorCode::NotDefined,
            message: "transfer too slow".into()
        }
    );
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    wait_stats(&fx, "deadline counted", |s| {
        s.deadline_exceeded == 1 && s.failed == 1 && s.active == 0
    })
    .await;
    assert_eq!(fx.stats.snapshot().retransmits, 0);
}
