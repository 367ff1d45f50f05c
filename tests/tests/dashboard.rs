//! The dashboard in a real browser (headless Chromium through chromedriver,
//! driven by `tests/browser/dashboard.py` with Debian's python3-selenium)
//! against the real lab-server with a tokens file and a real lab-agent whose
//! host `h00` has a `tcp` console: a terminal server in this test that
//! prints a Xen dom0 boot tail and echoes each line it is sent. Loopback
//! only; no VM. Screenshots of every page are kept in
//! `$CARGO_TARGET_TMPDIR/dashboard/` (docs/img/ has a few of them).

use lab_tests::{ServerProcess, bin_path, tokens_toml};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A terminal server: each connection gets a dom0 boot tail, then every
/// line it sends comes back as `echo: LINE`.
fn terminal_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let banner = "(XEN) Xen version 4.17.5 (Debian 4.17.5+23-ga4e5191dc0-1)\r\n\
                    (XEN) Dom0 has maximum 2 VCPUs\r\n\
                    [    0.000000] Linux version 6.1.0-40-amd64 (Debian 6.1.153-1)\r\n\
                    [  OK  ] Reached target multi-user.target - Multi-User System.\r\n\r\n\
                    Debian GNU/Linux 12 lab-h00 hvc0\r\n\r\nlab-h00 dom0 login: ";
                if conn.write_all(banner.as_bytes()).is_err() {
                    return;
                }
                // Like a getty, prompt again every second while nobody types:
                // a holder's console shows only what came after its lease's
                // grant, so the banner alone (printed at connect, before any
                // lease) would never reach it.
                let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(1)));
                let mut line = Vec::new();
                let mut buf = [0u8; 256];
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if line.is_empty()
                                && conn.write_all(b"\r\nlab-h00 dom0 login: ").is_err()
                            {
                                return;
                            }
                            continue;
                        }
                        Err(_) => return,
                    };
                    for &b in &buf[..n] {
                        if b == b'\r' || b == b'\n' {
                            if !line.is_empty() {
                                let reply =
                                    format!("\r\necho: {}\r\n", String::from_utf8_lossy(&line));
                                if conn.write_all(reply.as_bytes()).is_err() {
                                    return;
                                }
                                line.clear();
                            }
                        } else {
                            line.push(b);
                        }
                    }
                }
            });
        }
    });
    addr
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_in_headless_chromium() {
    lab_tests::browser::require_chromium();
    let dir = tempfile::tempdir().unwrap();
    let console = terminal_server();
    let mut inventory = String::from("[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n");
    for i in 0..3 {
        inventory.push_str(&format!(
            "\n[[host]]\nname = \"h{i:02}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:{i:02x}\"\nflags = [{}]\n",
            if i == 0 { "\"iommu\"" } else { "" }
        ));
        if i == 0 {
            inventory.push_str(&format!(
                "[host.console]\nkind = \"tcp\"\naddress = \"{console}\"\n"
            ));
        }
    }
    std::fs::write(dir.path().join("inventory.toml"), inventory).unwrap();
    std::fs::write(
        dir.path().join("tokens.toml"),
        tokens_toml(&[
            ("tok-agent", "agent-r1", "agent"),
            ("tok-ci1", "ci1", "ci"),
            ("tok-dev2", "dev2", "developer"),
            ("tok-op3", "op3", "operator"),
        ]),
    )
    .unwrap();
    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let server = ServerProcess::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            &p("inventory.toml"),
            "--tokens",
            &p("tokens.toml"),
            "--data-dir",
            &p("data"),
        ],
        &dir.path().join("server.log"),
    )
    .unwrap();
    let web = server.web.expect("the web port's line");
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-assets");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "rack = \"r1\"\nserver = \"http://{}\"\ndata_dir = \"{}\"\n[assets]\nroot = \"{assets}\"\n",
            server.addr,
            p("agent-data"),
        ),
    )
    .unwrap();
    let mut child = Command::new(bin_path("lab-agent"))
        .args(["--config", &p("agent.toml"), "--token", "tok-agent"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .expect("lab-agent is built");
    let stdout = child.stdout.take().unwrap();
    let _agent = Killed(child);
    for line in BufReader::new(stdout).lines() {
        if line.unwrap().starts_with("lab-agent running") {
            break;
        }
    }
    // The agent attached and the hosts reachable, as /metrics tells.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = curl(&format!("http://{web}/metrics"));
        if m.contains("lab_agents_attached 1\n") && m.contains("lab_hosts_unreachable 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not attach:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let (passed, said) = lab_tests::browser::run_script(
        "dashboard.py",
        &[
            ("WEB_URL", &format!("http://{web}")),
            ("LAB", bin_path("lab").to_str().unwrap()),
            ("LAB_SERVER", &format!("http://{}", server.addr)),
            ("HOLDER_TOKEN", "tok-ci1"),
            ("OTHER_TOKEN", "tok-dev2"),
            ("OPERATOR_TOKEN", "tok-op3"),
            ("OUT", out.to_str().unwrap()),
        ],
    );
    println!("{said}");
    assert!(
        passed,
        "the browser checks failed (screenshots in {}):\n{said}\n--- server log ---\n{}\n--- agent log ---\n{}",
        out.display(),
        server.log_text(),
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
    for page in [
        "login",
        "hosts",
        "queue",
        "leases",
        "lease",
        "host-holder",
        "host-nonholder",
        "host-quarantined",
    ] {
        let png = out.join(format!("{page}.png"));
        let bytes = std::fs::read(&png).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "no screenshot {}",
            png.display()
        );
    }
}
