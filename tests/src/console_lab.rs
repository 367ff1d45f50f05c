//! A small real lab without VMs for tests that need a host console: the
//! real lab-server (tokens file, web port) and a real lab-agent for rack
//! `r1` with three hosts, `h00` (flag `iommu`) whose console is a `tcp`
//! terminal server run by the test — it prints a Xen dom0 boot tail, prompts
//! `lab-h00 dom0 login: ` again every second while nobody types (a holder
//! sees only what came after its lease's grant), and answers each line `L`
//! it is sent with `echo: L` — and `h01`, `h02` without a console. Loopback
//! only. Used by the dashboard's browser test and `lab grab`'s test.

use crate::{ServerProcess, bin_path, tokens_toml};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The terminal server of `h00`'s console; runs until the process ends.
pub fn terminal_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || serve_terminal(conn));
        }
    });
    addr
}

fn serve_terminal(mut conn: std::net::TcpStream) {
    let banner = "(XEN) Xen version 4.17.5 (Debian 4.17.5+23-ga4e5191dc0-1)\r\n\
        (XEN) Dom0 has maximum 2 VCPUs\r\n\
        [    0.000000] Linux version 6.1.0-40-amd64 (Debian 6.1.153-1)\r\n\
        [  OK  ] Reached target multi-user.target - Multi-User System.\r\n\r\n\
        Debian GNU/Linux 12 lab-h00 hvc0\r\n\r\nlab-h00 dom0 login: ";
    if conn.write_all(banner.as_bytes()).is_err() {
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
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
                if line.is_empty() && conn.write_all(b"\r\nlab-h00 dom0 login: ").is_err() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if !line.is_empty() {
                    let reply = format!("\r\necho: {}\r\n", String::from_utf8_lossy(&line));
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
}

/// lab-server and lab-agent with the three hosts, the agent attached.
pub struct ConsoleLab {
    // Dropped in this order: the agent, then the server, then the files.
    pub agent: Killed,
    pub server: ServerProcess,
    pub web: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl ConsoleLab {
    /// Starts the lab with these tokens (`(token, principal, role)`; an
    /// `agent-r1` agent token is added), and waits until the agent has
    /// attached and every host is reachable.
    pub fn start(tokens: &[(&str, &str, &str)]) -> ConsoleLab {
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
        let mut all = vec![("tok-agent", "agent-r1", "agent")];
        all.extend_from_slice(tokens);
        std::fs::write(dir.path().join("tokens.toml"), tokens_toml(&all)).unwrap();
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
        let agent = Killed(child);
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
        ConsoleLab {
            agent,
            server,
            web,
            dir,
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

/// `curl -fsS URL`'s output (empty on failure).
pub fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
