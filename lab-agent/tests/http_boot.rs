//! The HTTP boot server against a real client (`curl`, Debian package
//! `curl`): whole downloads, HEAD, ranges, traversal and symlink escapes
//! refused, per-host scripts rendered from the host table.

use lab_agent::assets::FileSource;
use lab_agent::assets::boot::BootFiles;
use lab_agent::assets::render::RenderConfig;
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

struct Server {
    base: String,
    hosts: HostTable,
    artifacts: PathBuf,
    tmp: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    async fn start() -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let artifacts = tmp.path().join("artifacts");
        std::fs::create_dir_all(artifacts.join("sub")).unwrap();
        // 1 MiB + 3 of non-repeating bytes: several chunks, odd tail.
        let blob: Vec<u8> = (0..(1 << 20) + 3u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(artifacts.join("blob.bin"), &blob).unwrap();
        std::fs::write(artifacts.join("sub/small.txt"), b"small\n").unwrap();
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
        }]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let config = RenderConfig {
            http_url: Some(base.clone()),
            ..RenderConfig::default()
        };
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets");
        let files = BootFiles::new(&assets, Some(&artifacts), hosts.clone(), config).unwrap();
        let source: Arc<dyn FileSource> = Arc::new(files);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(lab_agent::http::serve(listener, source, async {
            let _ = stopped.await;
        }));
        Server {
            base,
            hosts,
            artifacts,
            tmp,
            stop: Some(stop),
            task: Some(task),
        }
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
