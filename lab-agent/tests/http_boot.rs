//! The HTTP boot server against a real client (`curl`, Debian package
//! `curl`): whole downloads, HEAD, ranges, traversal and symlink escapes
//! refused, per-host scripts rendered from the host table, responses as
//! GRUB's case-sensitive HTTP client needs them; and its limits
//! against hand-made clients: connection caps per client address and in
//! all, the header, send and idle timeouts, a slow reader left alone.
//! (The flood of a hostile lease holder against the whole agent binary is
//! `boot_flood.rs`.)

use lab_agent::assets::FileSource;
use lab_agent::assets::boot::BootFiles;
use lab_agent::assets::install::MetadataPolicy;
use lab_agent::assets::render::RenderConfig;
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable};
use lab_agent::http::{HttpConfig, HttpServer, HttpStats};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

struct Server {
    base: String,
    hosts: HostTable,
    artifacts: PathBuf,
    tmp: tempfile::TempDir,
    stats: Arc<HttpStats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Larger than every socket buffer between server and client (sparse).
const HUGE_LEN: u64 = 32 << 20;

impl Server {
    async fn start() -> Server {
        Self::start_with(HttpConfig::default()).await
    }

    async fn start_with(http: HttpConfig) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let artifacts = tmp.path().join("artifacts");
        std::fs::create_dir_all(artifacts.join("sub")).unwrap();
        // 1 MiB + 3 of non-repeating bytes: several chunks, odd tail.
        let blob: Vec<u8> = (0..(1 << 20) + 3u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(artifacts.join("blob.bin"), &blob).unwrap();
        std::fs::write(artifacts.join("sub/small.txt"), b"small\n").unwrap();
        std::fs::File::create(artifacts.join("huge.bin"))
            .unwrap()
            .set_len(HUGE_LEN)
            .unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), artifacts.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", artifacts.join("etc")).unwrap();

        let hosts = HostTable::new([BootHost {
            name: "node1".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ipv4: Some("198.18.0.11".parse().unwrap()),
            arch: Arch::X86_64,
            firmware: Firmware::Bios,
            profile: "xen".into(),
            lease: Some("L-1".into()),
            holder: None,
            ssh_key: None,
        }]);
        let listener = lab_agent::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config = RenderConfig {
            http_url: Some(base.clone()),
            ..RenderConfig::default()
        };
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets");
        let files = BootFiles::new(&assets, Some(&artifacts), hosts.clone(), config)
            .unwrap()
            .with_metadata_policy(MetadataPolicy {
                install_profiles: ["xen-install".to_owned()].into(),
                dhcp: None,
            });
        let source: Arc<dyn FileSource> = Arc::new(files);
        let (stop, stopped) = oneshot::channel();
        let server = HttpServer::new(listener, source, http).unwrap();
        let stats = server.stats();
        let task = tokio::spawn(server.run_until(async {
            let _ = stopped.await;
        }));
        Server {
            base,
            hosts,
            artifacts,
            tmp,
            stats,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.base.trim_start_matches("http://").parse().unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Run curl with `args` then the URL `base` + `path` (sent as is).
async fn curl(s: &Server, path: &str, args: &[&str]) -> Reply {
    let body = s.tmp.path().join("body");
    let _ = std::fs::remove_file(&body);
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--path-as-is", "-D", "-", "-o"])
        .arg(&body)
        .args(args)
        .arg(format!("{}{path}", s.base))
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run curl ({e}): install the Debian package `curl` (apt-get install -y curl)"
            )
        });
    assert!(
        out.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers = String::from_utf8(out.stdout).unwrap();
    let status = headers
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {headers:?}"));
    Reply {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

async fn raw_request(s: &Server, req: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_head_and_range() {
    let s = Server::start().await;
    let blob = std::fs::read(s.artifacts.join("blob.bin")).unwrap();

    let r = curl(&s, "/artifacts/blob.bin", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), blob.len());
    assert!(r.body == blob, "download is not byte-identical");
    assert_eq!(r.header("content-length").unwrap(), blob.len().to_string());
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));

    let r = curl(&s, "/artifacts/blob.bin", &["-I"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").unwrap(), blob.len().to_string());
    // (with -I, curl writes the headers to -o too; no file bytes may follow)
    assert!(r.body.starts_with(b"HTTP/1.1 200"), "{:?}", r.body);
    assert!(r.body.ends_with(b"\r\n\r\n") && r.body.len() < 1024);

    // On the wire: HEAD gets the headers and not one byte more.
    let raw = raw_request(
        &s,
        "HEAD /artifacts/blob.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"), "{raw:?}");
    assert!(raw.ends_with(b"\r\n\r\n") && raw.len() < 1024, "{raw:?}");

    let r = curl(&s, "/artifacts/blob.bin", &["-r", "100000-299999"]).await;
    assert_eq!(r.status, 206);
    assert!(r.body == blob[100_000..300_000]);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 100000-299999/{}", blob.len())
    );
    assert_eq!(r.header("content-length").unwrap(), "200000");

    let r = curl(&s, "/artifacts/blob.bin", &["-r", "-10"]).await;
    assert_eq!(r.status, 206);
    assert!(r.body == blob[blob.len() - 10..]);

    let r = curl(&s, "/artifacts/blob.bin", &["-r", "2000000-"]).await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{}", blob.len())
    );

    // Several ranges: the whole file with 200.
    let r = curl(&s, "/artifacts/blob.bin", &["-r", "0-1,5-6"]).await;
    assert_eq!(r.status, 200);
    assert!(r.body == blob);

    let r = curl(&s, "/artifacts/sub/small.txt", &[]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"small\n"[..]));

    // pxe-assets itself: the first-stage script.
    let r = curl(&s, "/boot.ipxe", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with(b"#!ipxe\n"));

    let r = curl(&s, "/boot.ipxe", &["-X", "POST"]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"));

    let r = curl(&s, "/artifacts/nope", &[]).await;
    assert_eq!(r.status, 404);
    s.stop().await;
}

/// One response read as GRUB 2.06's `http` module reads it
/// (`grub-core/net/http.c`): the status line must start `HTTP/1.1 `, the
/// headers are matched byte for byte (`Content-Length: `), the body is read
/// up to that length and the connection then dropped (GRUB sends no
/// `Connection: close`). Returns the header block and the body.
async fn grub_get(s: &Server, path: &str, range_from: Option<u64>) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    // GRUB's request, byte for byte (its Host header has no port).
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: GRUB 2.06-13+deb12u2\r\n");
    if let Some(from) = range_from {
        req.push_str(&format!("Range: bytes={from}-\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(buf[..end + 2].to_vec()).unwrap();
                let len: usize = head
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map(|v| v.parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = c.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before the body ended");
                    buf.extend_from_slice(&chunk[..n]);
                }
                return (head, buf[end + 4..end + 4 + len].to_vec());
            }
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the headers ended: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a whole response within 10 s, without the connection closing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grub_reads_status_length_and_body() {
    let s = Server::start().await;
    let blob = std::fs::read(s.artifacts.join("blob.bin")).unwrap();
    let (head, body) = grub_get(&s, "/artifacts/blob.bin", None).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    // Case-exact: GRUB 2.06 does not recognize `content-length: `, and
    // without it xen_boot cannot size the module.
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", blob.len())),
        "{head}"
    );
    assert!(body == blob, "body is not byte-identical");
    // GRUB seeks forward by asking again from an offset.
    let (head, body) = grub_get(&s, "/artifacts/blob.bin", Some(1000)).await;
    assert!(head.starts_with("HTTP/1.1 206 "), "{head}");
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", blob.len() - 1000)),
        "{head}"
    );
    assert!(body == blob[1000..]);
    // A missing file: GRUB reports "file not found" on a 404 status line.
    let (head, _) = grub_get(&s, "/artifacts/nope", None).await;
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_symlink_escapes_are_refused() {
    let s = Server::start().await;
    for path in [
        "/../../../../etc/passwd",
        "/artifacts/../../secret",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/artifacts/%2E%2E/%2e%2e/secret",
        "/artifacts/..%2f..%2fsecret",
        "/artifacts/..%5c..%5csecret",
        "/artifacts/escape",
        "/artifacts/etc/passwd",
        "/artifacts/sub/%00",
    ] {
        let r = curl(&s, path, &[]).await;
        assert_eq!(r.status, 403, "{path}");
        assert!(!r.body.windows(7).any(|w| w == b"outside"), "{path}");
        assert!(!r.body.windows(5).any(|w| w == b"root:"), "{path}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_host_scripts_follow_the_host_table() {
    let s = Server::start().await;
    let r = curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body.clone()).unwrap();
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    let kernel = format!(
        "kernel {}/artifacts/xen-4.17-amd64 console=com1 com1=115200,8n1 dom0_mem=512M,max:512M bootscrub=0",
        s.base
    );
    assert!(text.contains(&kernel), "{text}");
    assert_eq!(r.header("content-length").unwrap(), text.len().to_string());

    // Range on a generated file too.
    let r = curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &["-r", "0-5"]).await;
    assert_eq!((r.status, r.body.as_slice()), (206, &b"#!ipxe"[..]));

    // xen has no preseed; unknown MACs have nothing.
    assert_eq!(
        curl(&s, "/hosts/52-54-00-00-00-01.preseed", &[])
            .await
            .status,
        404
    );
    assert_eq!(
        curl(&s, "/hosts/52-54-00-00-00-99.ipxe", &[]).await.status,
        404
    );

    // The CURRENT profile is served.
    let mac = "52:54:00:00:00:01".parse().unwrap();
    assert!(s.hosts.set_profile(&mac, "xen-install", Some("L-2".into())));
    let r = curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await;
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.contains(&format!(
            "lab.image={}/artifacts/xenlab-amd64.img.zst ",
            s.base
        )),
        "{text}"
    );
    assert!(text.contains(" lab.lease=L-2 "), "{text}");
    // No profile has a preseed.
    let r = curl(&s, "/hosts/52-54-00-00-00-01.preseed", &[]).await;
    assert_eq!(r.status, 404);

    assert!(s.hosts.set_profile(&mac, "local-disk", None));
    let r = curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await;
    assert!(
        String::from_utf8(r.body)
            .unwrap()
            .lines()
            .any(|l| l == "exit")
    );

    // An unknown profile is a server error, not a script.
    assert!(s.hosts.set_profile(&mac, "nonesuch", None));
    assert_eq!(
        curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await.status,
        500
    );
    s.stop().await;
}

/// A connection to `s` from the loopback address `from`; `None` if the
/// server reset it before `connect` returned (refused).
async fn connect_from(s: &Server, from: &str) -> Option<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    match sock.connect(s.addr()).await {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect from {from}: {e}"),
    }
}

/// Whether the server has closed (or reset) `c`, waiting up to `wait` for
/// it; a connection still open after that is not closed. Reads nothing the
/// server might send (a test connection sends no request).
async fn closed_within(c: &mut Option<tokio::net::TcpStream>, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let Some(stream) = c else { return true };
    let mut b = [0u8; 1];
    match tokio::time::timeout(wait, stream.read(&mut b)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => panic!("unexpected bytes from the server"),
    }
}

/// Poll the server's counters until `pred` holds (10 s at most).
async fn wait_stats(
    s: &Server,
    what: &str,
    pred: impl Fn(&lab_agent::http::HttpStatsSnapshot) -> bool,
) {
    let t = Instant::now();
    loop {
        let now = s.stats.snapshot();
        if pred(&now) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_caps_are_closed_at_once() {
    let s = Server::start_with(HttpConfig {
        max_connections: 4,
        max_connections_per_client: 2,
        ..HttpConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for from in ["127.0.0.2", "127.0.0.2"] {
        held.push(connect_from(&s, from).await);
    }
    wait_stats(&s, "two held", |n| n.active == 2).await;
    // A third from the same address: the per-client cap.
    let mut third = connect_from(&s, "127.0.0.2").await;
    wait_stats(&s, "per-client refusal", |n| n.refused_client == 1).await;
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);
    for from in ["127.0.0.3", "127.0.0.3"] {
        held.push(connect_from(&s, from).await);
    }
    wait_stats(&s, "four held", |n| n.active == 4).await;
    // A fifth client address: the global cap.
    let mut fifth = connect_from(&s, "127.0.0.4").await;
    wait_stats(&s, "global refusal", |n| n.refused_full == 1).await;
    assert!(closed_within(&mut fifth, Duration::from_secs(5)).await);
    for c in &mut held {
        assert!(
            !closed_within(c, Duration::from_millis(100)).await,
            "a held connection was closed"
        );
    }
    // A held connection is served.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let c = held[0].as_mut().unwrap();
        c.write_all(
            b"GET /artifacts/sub/small.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"small\n"),
            "{out:?}"
        );
    }
    let n = s.stats.snapshot();
    assert_eq!(
        (n.accepted, n.refused_client, n.refused_full),
        (4, 1, 1),
        "{n:?}"
    );
    // Once the clients go, their slots are free again.
    drop(held);
    wait_stats(&s, "all released", |n| n.active == 0).await;
    let r = curl(&s, "/artifacts/sub/small.txt", &[]).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_non_reading_clients_time_out_slow_readers_do_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start_with(HttpConfig {
        header_timeout: Duration::from_secs(1),
        send_timeout: Duration::from_secs(2),
        ..HttpConfig::default()
    })
    .await;
    const GET_HUGE: &[u8] = b"GET /artifacts/huge.bin HTTP/1.1\r\nHost: t\r\n\r\n";

    // Connects and says nothing: the header timeout.
    let t = Instant::now();
    let mut silent = connect_from(&s, "127.0.0.2").await;
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    wait_stats(&s, "header timeout", |n| n.header_timeouts == 1).await;

    // Asks for 32 MiB and reads 128 KiB every 400 ms for 6 s (three send
    // timeouts): never cut; then reads the rest at full speed.
    let mut slow = connect_from(&s, "127.0.0.3").await.unwrap();
    slow.write_all(GET_HUGE).await.unwrap();
    // Meanwhile another asks for it and never reads: cut after 2 s.
    let mut stalled = connect_from(&s, "127.0.0.2").await.unwrap();
    stalled.write_all(GET_HUGE).await.unwrap();
    let t = Instant::now();
    let mut got = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    while t.elapsed() < Duration::from_secs(6) {
        slow.read_exact(&mut buf).await.unwrap();
        got += buf.len() as u64;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let n = s.stats.snapshot();
    assert_eq!(
        n.send_timeouts, 1,
        "the non-reader is cut, the slow reader is not: {n:?}"
    );
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest)
        .await
        .unwrap_or_else(|e| panic!("slow reader cut after {got} bytes: {e}"));
    // (Connection stays open after the body: read_to_end ends at the
    // idle timeout; what matters is that the whole body arrived.)
    let total = got + rest.len() as u64;
    let headers = total - HUGE_LEN;
    assert!(
        headers > 50 && headers < 1024,
        "{total} bytes for {HUGE_LEN}"
    );
    // The non-reader finds its connection closed short of the file.
    let mut partial = Vec::new();
    let _ = stalled.read_to_end(&mut partial).await;
    assert!(
        (partial.len() as u64) < HUGE_LEN,
        "the non-reader got everything"
    );
    s.stop().await;
}

/// A source whose files take 10 s to open (a hung file system).
struct Hung;

impl FileSource for Hung {
    fn open(
        &self,
        _path: &str,
        _client: Option<std::net::IpAddr>,
    ) -> Result<lab_agent::assets::Content, lab_agent::assets::OpenError> {
        std::thread::sleep(Duration::from_secs(10));
        Err(lab_agent::assets::OpenError::NotFound)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_where_nothing_moves_ends_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = lab_agent::http::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new(
        listener,
        Arc::new(Hung),
        HttpConfig {
            idle_timeout: Duration::from_secs(2),
            ..HttpConfig::default()
        },
    )
    .unwrap();
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run_until(async {
        let _ = stopped.await;
    }));
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    c.write_all(b"GET /anything HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(8), c.read_to_end(&mut out)).await;
    let took = t.elapsed();
    assert!(out.is_empty(), "{out:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let n = stats.snapshot();
    assert_eq!((n.idle_timeouts, n.active), (1, 0), "{n:?}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// End to end: QEMU's iPXE ROM (BIOS, TCG) fetches the per-host script,
/// Xen, the dom0 kernel and the test initramfs from this server over HTTP,
/// and the initramfs proves it is dom0. Needs `pxe-assets/fetch-artifacts.sh`
/// to have run (artifacts in `.cache/artifacts` or `LAB_ARTIFACTS`) and the
/// packages `qemu-system-x86` and `ipxe-qemu`; ~15 s.
/// `cargo test -p lab-agent --test http_boot -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a QEMU VM (~15 s); needs fetch-artifacts.sh, qemu-system-x86, ipxe-qemu"]
async fn qemu_ipxe_boots_xen_dom0_over_http() {
    use tokio::io::AsyncBufReadExt;
    let artifacts = std::env::var_os("LAB_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/artifacts"));
    assert!(
        artifacts.join("xen-4.17-amd64").is_file(),
        "no artifacts in {}: run pxe-assets/fetch-artifacts.sh",
        artifacts.display()
    );
    let rom = Path::new("/usr/lib/ipxe/qemu/pxe-e1000.rom");
    assert!(
        rom.is_file(),
        "{}: install the Debian package ipxe-qemu",
        rom.display()
    );

    let mac = "52:54:00:12:34:56";
    let hosts = HostTable::new([BootHost {
        name: "vm1".into(),
        mac: mac.parse().unwrap(),
        ipv4: None,
        arch: Arch::X86_64,
        firmware: Firmware::Bios,
        profile: "xen".into(),
        lease: Some("L-e2e".into()),
        holder: None,
        ssh_key: None,
    }]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // QEMU's user network reaches the host's loopback as 10.0.2.2.
    let base = format!("http://10.0.2.2:{port}");
    let config = RenderConfig {
        http_url: Some(base.clone()),
        ..RenderConfig::default()
    };
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets");
    let files = BootFiles::new(&assets, Some(&artifacts), hosts, config).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(lab_agent::http::serve(listener, Arc::new(files), async {
        let _ = stopped.await;
    }));

    // The user network's DHCP/TFTP stands in for the agent's: its boot file
    // chains to the per-host script over HTTP, as boot.ipxe does with option 224.
    let tftp = tempfile::tempdir().unwrap();
    std::fs::write(
        tftp.path().join("chain.ipxe"),
        format!("#!ipxe\nchain {base}/hosts/${{net0/mac:hexhyp}}.ipxe\n"),
    )
    .unwrap();
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel", "tcg", "-cpu", "qemu64", "-m", "2G", "-display", "none",
        ])
        .args([
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
            "-boot",
            "n",
        ])
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,tftp={},bootfile=chain.ipxe",
            tftp.path().display()
        ))
        .arg("-device")
        .arg(format!(
            "e1000,netdev=n0,mac={mac},romfile={}",
            rom.display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run qemu-system-x86_64: install the Debian package qemu-system-x86");
    let mut lines = tokio::io::BufReader::new(qemu.stdout.take().unwrap()).lines();
    let mut log = String::new();
    let found = tokio::time::timeout(std::time::Duration::from_secs(180), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains("LAB-DOM0-OK") {
                return true;
            }
            if line.contains("LAB-BOOT-FAILED") || line.contains("LAB-DOM0-FAIL") {
                return false;
            }
        }
        false
    })
    .await;
    let _ = qemu.kill().await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    assert!(matches!(found, Ok(true)), "no LAB-DOM0-OK; console:\n{log}");
    // iPXE prints to VGA only; the dom0 command line shows the rendered script ran.
    assert!(
        log.contains("LAB-CMDLINE console=hvc0 earlyprintk=xen panic=-1 lab.expect=dom0"),
        "{log}"
    );
}

/// An install to disk: the host's script carries the image's sha256 (read
/// from the artifacts cache, again when the file changes) and its
/// metadata URL; the metadata is served to the host's own address only,
/// and only while it is leased under an installing profile. A client that reads the image's first
/// 18 bytes and hangs up (the installer reading the zstd header) costs
/// the server nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_gets_its_checksum_and_metadata() {
    use lab_agent::assets::install::{IMAGE, IMAGE_SHA256};
    let s = Server::start().await;
    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";
    let host = |n: u8, ip: &str, lease: Option<&str>| BootHost {
        name: format!("node{n}"),
        mac: format!("52:54:00:00:00:0{n}").parse().unwrap(),
        ipv4: Some(ip.parse().unwrap()),
        arch: Arch::X86_64,
        firmware: Firmware::Bios,
        profile: "xen-install".into(),
        lease: lease.map(Into::into),
        holder: Some("alice".into()),
        ssh_key: Some(KEY.into()),
    };
    s.hosts.replace([
        host(1, "127.0.0.2", Some("L-7")),
        host(2, "198.18.0.12", Some("L-8")),
        host(3, "127.0.0.3", None),
        // Leased, but under a profile that does not install.
        BootHost {
            profile: "xen".into(),
            ..host(4, "127.0.0.4", Some("L-9"))
        },
        // Leased and installing, but its address is unknown to the agent
        // (no inventory address, no DHCP pool here).
        BootHost {
            ipv4: None,
            ..host(5, "127.0.0.5", Some("L-10"))
        },
    ]);
    let sum = "0123456789abcdef".repeat(4);
    std::fs::write(s.artifacts.join(IMAGE), b"(\xb5/\xfd image").unwrap();
    std::fs::write(s.artifacts.join(IMAGE_SHA256), format!("{sum}  {IMAGE}\n")).unwrap();

    let script = |r: Reply| String::from_utf8(r.body).unwrap();
    let text = script(curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await);
    let kernel = text
        .lines()
        .find(|l| l.starts_with("kernel "))
        .expect(&text);
    for want in [
        format!(" lab.sha256={sum} "),
        format!(" lab.metadata={}/hosts/52-54-00-00-00-01.lease ", s.base),
        " lab.lease=L-7 ".to_owned(),
    ] {
        assert!(kernel.contains(&want), "{want} missing: {kernel}");
    }
    assert!(!kernel.contains("lab.sha256_url="), "{kernel}");
    // Without a lease: no metadata URL, still the checksum.
    let text = script(curl(&s, "/hosts/52-54-00-00-00-03.ipxe", &[]).await);
    assert!(
        text.contains(&format!(" lab.sha256={sum} ")) && !text.contains("lab.metadata="),
        "{text}"
    );

    // The metadata, from the host's own address.
    let r = curl(
        &s,
        "/hosts/52-54-00-00-00-01.lease",
        &["--interface", "127.0.0.2"],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    let meta = String::from_utf8(r.body).unwrap();
    let lines: Vec<&str> = meta.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        [
            "LAB_HOST=node1",
            "LAB_LEASE=L-7",
            "LAB_HOLDER=alice",
            &format!("LAB_SSH_KEY={KEY}"),
        ]
    );
    // Another address, another host's, a host without a lease, one not
    // installing, one whose address the agent does not know, the MAC with
    // colons, an unknown MAC.
    for (path, from, status) in [
        ("/hosts/52-54-00-00-00-01.lease", "127.0.0.1", 403),
        ("/hosts/52-54-00-00-00-02.lease", "127.0.0.2", 403),
        ("/hosts/52-54-00-00-00-03.lease", "127.0.0.3", 404),
        ("/hosts/52-54-00-00-00-03.lease", "127.0.0.2", 403),
        ("/hosts/52-54-00-00-00-04.lease", "127.0.0.4", 404),
        ("/hosts/52-54-00-00-00-04.lease", "127.0.0.2", 403),
        ("/hosts/52-54-00-00-00-05.lease", "127.0.0.5", 403),
        ("/hosts/52-54-00-00-00-05.lease", "127.0.0.2", 403),
        ("/hosts/52:54:00:00:00:01.lease", "127.0.0.2", 404),
        ("/hosts/52-54-00-00-00-09.lease", "127.0.0.2", 404),
    ] {
        let r = curl(&s, path, &["--interface", from]).await;
        assert_eq!(r.status, status, "{path} from {from}");
        assert!(r.body.is_empty(), "{path}");
    }

    // A new image: its new checksum (a later modification time).
    let new_sum = "fedcba9876543210".repeat(4);
    let path = s.artifacts.join(IMAGE_SHA256);
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, format!("{new_sum}  {IMAGE}\n")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(before + Duration::from_secs(1))
        .unwrap();
    let text = script(curl(&s, "/hosts/52-54-00-00-00-01.ipxe", &[]).await);
    assert!(text.contains(&format!(" lab.sha256={new_sum} ")), "{text}");

    // The installer's header read: 18 bytes of a large file, then gone.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = connect_from(&s, "127.0.0.2").await.unwrap();
        c.write_all(b"GET /artifacts/huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || got.len() < 18 {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
    }
    wait_stats(&s, "the cut connection is gone", |n| n.active == 0).await;
    let r = curl(&s, "/artifacts/sub/small.txt", &[]).await;
    assert_eq!(r.status, 200);
    s.stop().await;
}
