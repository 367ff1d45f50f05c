//! The real `lab-agent` under a hostile lease holder's flood (issue 12,
//! items 1 and 2), with the open files limit a service gets by default
//! enforced on it: `prlimit --nofile=N:N` (soft and hard, so the agent
//! cannot raise it).
//!
//! - `flood_leaves_boot_services_answering`: at 1,024 files, 1,100 idle TCP
//!   connections and 50 that request a large file and never read, plus 64
//!   TFTP requests with `timeout=255` that are never acknowledged. While they
//!   are held, curl gets a file over HTTP and over TFTP within 1 s each, the
//!   agent's log grows by less than 1 MB, and the caps are exact (16
//!   connections and 8 transfers per client address). Once the attackers
//!   give up, their slots are free again within seconds.
//! - `out_of_files_backs_off_and_recovers`: with caps above what a tiny
//!   limit allows, accept fails with `EMFILE`; the agent then backs off
//!   (little CPU), logs the burst once, and serves again once the attackers
//!   leave.
//!
//! The attackers are this test process, on 127.0.0.2 and 127.0.0.3 (the
//! whole 127/8 is loopback); the honest clients (curl) come from 127.0.0.1.
//! The agent's lab-server is a closed loopback port: the boot services do
//! not need the link. Needs `prlimit` (util-linux) and `curl`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lab_agent::tftp::packet::{ErrorCode, Mode, Packet, Request, TftpOption};
use socket2::{Domain, Socket, Type};

/// The two tests each start an agent and time its answers: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const SMALL_LEN: usize = 200_000;
const BIG_LEN: u64 = 64 << 20;

/// A running `lab-agent`, killed on drop (its log printed if the test failed).
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    http: SocketAddr,
    tftp: SocketAddr,
}

impl Agent {
    /// Start the agent under `prlimit --nofile=nofile:nofile` with extra
    /// `[http]` keys; returns once both servers listen.
    fn start(nofile: u32, http_keys: &str) -> Agent {
        require("prlimit", "util-linux");
        require("curl", "curl");
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        std::fs::create_dir(&artifacts).unwrap();
        std::fs::write(artifacts.join("small.bin"), pattern(SMALL_LEN)).unwrap();
        // Sparse: larger than every socket buffer on the way, no disk used.
        std::fs::File::create(artifacts.join("big.bin"))
            .unwrap()
            .set_len(BIG_LEN)
            .unwrap();
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "rack = \"r1\"\nserver = \"http://127.0.0.1:1\"\n\
                 [tftp]\nlisten = \"127.0.0.1:0\"\n\
                 [http]\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1\"\n{http_keys}\n\
                 [assets]\nroot = \"{}\"\nartifacts = \"{}\"\n",
                assets.display(),
                artifacts.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_lab-agent"))
            .arg("--config")
            .arg(&config)
            .env("LAB_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn prlimit lab-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Agent {
            child,
            dir,
            http: "0.0.0.0:0".parse().unwrap(),
            tftp: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.http.port() == 0 || agent.tftp.port() == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "the agent did not report its listeners; log:\n{}",
                    agent.log()
                )
            });
            if let Some(a) = line.strip_prefix("lab-agent http listening on ") {
                agent.http = a.parse().unwrap();
            }
            if let Some(a) = line.strip_prefix("lab-agent tftp listening on ") {
                agent.tftp = a.parse().unwrap();
            }
        }
        agent
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len())
    }

    /// Descriptors the agent has open now.
    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// User + system CPU time the agent has used.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14 and stime 15, in clock ticks.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on every Linux ABI in use.
        Duration::from_millis(ticks * 10)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    fn artifact(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("artifacts").join(name)).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
    }
}

fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed: install the Debian package `{package}` (apt-get install -y {package})"
    );
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The attacker needs more descriptors than the agent gets.
fn raise_own_limit(to: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < to {
        setrlimit(Resource::RLIMIT_NOFILE, to.min(hard), hard).unwrap();
    }
}

/// A TCP connection to `to` from the loopback address `from`; `None` if
/// the server reset it before `connect` returned (a refused connection).
fn connect_from(from: &str, to: SocketAddr) -> Option<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    match s.connect_timeout(&to.into(), Duration::from_secs(10)) {
        Ok(()) => Some(s.into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect from {from}: {e}"),
    }
}

/// What the far end has done to a connection we never read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Nothing yet: the server holds it open.
    Open,
    /// Bytes are waiting (a response is being sent).
    Data,
    /// Closed or reset by the server.
    Closed,
}

/// Look at a connection without consuming anything.
fn peek(s: &Option<TcpStream>) -> Seen {
    let Some(s) = s else {
        return Seen::Closed;
    };
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let seen = match s.peek(&mut b) {
        Ok(0) => Seen::Closed,
        Ok(_) => Seen::Data,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Seen::Open,
        Err(_) => Seen::Closed,
    };
    s.set_nonblocking(false).unwrap();
    seen
}

/// Poll `conns` until `done` holds for their counts by [`Seen`], or 15 s.
fn settle(conns: &[Option<TcpStream>], what: &str, done: impl Fn(usize, usize, usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen: Vec<Seen> = conns.iter().map(peek).collect();
        let n = |k| seen.iter().filter(|&&s| s == k).count();
        let (open, data, closed) = (n(Seen::Open), n(Seen::Data), n(Seen::Closed));
        if done(open, data, closed) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: open {open}, sending {data}, closed {closed}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    Packet::Rrq(Request {
        filename: name.into(),
        mode: Mode::Octet,
        options: options.iter().map(|(n, v)| TftpOption::new(n, v)).collect(),
    })
    .encode()
}

/// The server's first answer to an RRQ on `sock`: DATA from a transfer's
/// port, or an ERROR; and where it came from.
fn first_answer(sock: &UdpSocket) -> (Packet, SocketAddr) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).expect("no TFTP answer within 5 s");
    (Packet::decode(&buf[..n]).unwrap(), from)
}

/// Ask for a file from `count` fresh ports of 127.0.0.2 at once; true if
/// none was refused. Started transfers are aborted (ERROR to their port),
/// so that probing does not itself hold slots.
fn tftp_slots_free(agent: &Agent, count: usize) -> bool {
    let socks: Vec<UdpSocket> = (0..count)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.2:0").unwrap();
            s.send_to(&rrq("artifacts/small.bin", &[]), agent.tftp)
                .unwrap();
            s
        })
        .collect();
    let mut free = true;
    for s in &socks {
        let (p, from) = first_answer(s);
        if is_busy(&p) {
            free = false;
        } else {
            let abort = Packet::Error {
                code: ErrorCode::NotDefined,
                message: "probe done".into(),
            };
            s.send_to(&abort.encode(), from).unwrap();
        }
    }
    free
}

fn is_busy(p: &Packet) -> bool {
    matches!(p, Packet::Error { code: ErrorCode::NotDefined, message } if message == "server busy")
}

/// curl fetches `url` into a file; returns the time the transfer took by
/// curl's own clock (connect included, its process start not: that is the
/// machine's load, not the agent's answer) and the bytes.
fn curl(url: &str, out: &Path) -> (Duration, Vec<u8>) {
    let r = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-w",
            "%{time_total}",
            "-o",
        ])
        .arg(out)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let secs: f64 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap();
    (Duration::from_secs_f64(secs), std::fs::read(out).unwrap())
}

/// `count` HTTP GETs of `path` at once from `from`, each read to the end;
/// how many got the whole file.
fn gets_from(from: &str, agent: &Agent, path: &str, count: usize, want: &[u8]) -> usize {
    let conns: Vec<TcpStream> = (0..count)
        .filter_map(|_| {
            let mut c = connect_from(from, agent.http)?;
            let _ = write!(
                c,
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            );
            Some(c)
        })
        .collect();
    conns
        .into_iter()
        .filter(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            got.ends_with(want) && got.starts_with(b"HTTP/1.1 200")
        })
        .count()
}

#[test]
fn flood_leaves_boot_services_answering() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_own_limit(4096);
    let agent = Agent::start(1024, "");
    let small = agent.artifact("small.bin");
    assert!(
        agent.log().contains("open files limit soft=1024 hard=1024"),
        "the limit was raised or not logged:\n{}",
        agent.log()
    );
    let log_before = agent.log_len();
    let files_before = agent.open_files();

    // 50 connections from 127.0.0.3 ask for 64 MiB and never read.
    let t_attack = Instant::now();
    let stalled: Vec<Option<TcpStream>> = (0..50)
        .map(|_| {
            let mut c = connect_from("127.0.0.3", agent.http)?;
            // (A refused connection may be reset before or after this.)
            let _ = c.write_all(b"GET /artifacts/big.bin HTTP/1.1\r\nHost: t\r\n\r\n");
            Some(c)
        })
        .collect();
    // 1,100 idle connections from 127.0.0.2.
    let idle: Vec<Option<TcpStream>> = (0..1100)
        .map(|_| connect_from("127.0.0.2", agent.http))
        .collect();
    // 64 RRQs with timeout=255 from 127.0.0.2, never acknowledged.
    let t_rrqs = Instant::now();
    let rrqs: Vec<UdpSocket> = (0..64)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.2:0").unwrap();
            s.send_to(&rrq("artifacts/big.bin", &[("timeout", "255")]), agent.tftp)
                .unwrap();
            s
        })
        .collect();
    let answers: Vec<Packet> = rrqs.iter().map(|s| first_answer(s).0).collect();
    let started = answers
        .iter()
        .filter(|p| matches!(p, Packet::Data { block: 1, .. }))
        .count();
    let busy = answers.iter().filter(|p| is_busy(p)).count();
    assert_eq!(
        (started, busy),
        (8, 56),
        "8 transfers per client, the rest refused"
    );
    // Each client address keeps exactly its 16 connections.
    settle(&stalled, "stalled downloads", |open, data, closed| {
        open == 0 && data == 16 && closed == 34
    });
    settle(&idle, "idle connections", |open, data, closed| {
        open == 16 && data == 0 && closed == 1084
    });
    let attack_setup = t_attack.elapsed();

    // While all that is held: honest clients are served at once.
    let out = agent.dir.path().join("out");
    let (took_http, got) = curl(&agent.url("/artifacts/small.bin"), &out);
    assert!(got == small, "HTTP download differs");
    let (took_tftp, got) = curl(&format!("tftp://{}/artifacts/small.bin", agent.tftp), &out);
    assert!(got == small, "TFTP download differs");
    let files_held = agent.open_files();
    let log_growth = agent.log_len() - log_before;
    eprintln!(
        "attack set up in {attack_setup:?}; HTTP GET {took_http:?}, TFTP read {took_tftp:?}; \
         agent files {files_before} -> {files_held} (limit 1024); log +{log_growth} bytes"
    );
    assert!(
        took_http < Duration::from_secs(1),
        "HTTP took {took_http:?}"
    );
    assert!(
        took_tftp < Duration::from_secs(1),
        "TFTP took {took_tftp:?}"
    );
    assert!(log_growth < 1 << 20, "log grew by {log_growth} bytes");
    // 32 connections, 16 files being sent, 8 transfers (socket + file).
    assert!(files_held < files_before + 120, "{files_held} files open");
    let log = agent.log();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(lines("http connection refused"), 1, "{log}");
    assert_eq!(lines("TFTP request refused"), 1, "{log}");
    assert_eq!(lines("Too many open files"), 0, "{log}");

    // The TFTP attackers stay silent with their sockets open: their
    // transfers end after (retries + 1) x 1 s, the 255 s they asked for
    // being refused, and the slots are free for others.
    let mut tftp_free = None;
    while tftp_free.is_none() {
        assert!(
            t_rrqs.elapsed() < Duration::from_secs(20),
            "TFTP slots not free 20 s after the stalled requests"
        );
        if tftp_slots_free(&agent, 8) {
            tftp_free = Some(t_rrqs.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(rrqs);
    // The HTTP attackers give up: their slots come free as soon as the agent
    // sees the connections close.
    drop((stalled, idle));
    let t_gone = Instant::now();
    let mut http_free = None;
    while http_free.is_none() {
        assert!(
            t_gone.elapsed() < Duration::from_secs(20),
            "HTTP slots not free 20 s after the attackers left"
        );
        if gets_from("127.0.0.2", &agent, "/artifacts/small.bin", 16, &small) == 16 {
            http_free = Some(t_gone.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "TFTP slots free {tftp_free:?} after the silent timeout=255 requests; \
         HTTP slots free {http_free:?} after the attackers closed"
    );
    // 6 s of silence, plus the machine's slack.
    let tftp_free = tftp_free.unwrap();
    assert!(
        tftp_free >= Duration::from_secs(5) && tftp_free < Duration::from_secs(9),
        "{tftp_free:?}"
    );
    assert!(http_free.unwrap() < Duration::from_secs(3), "{http_free:?}");
    let log_total = agent.log_len() - log_before;
    assert!(
        log_total < 64 * 1024,
        "log grew by {log_total} bytes in all"
    );
}

#[test]
fn out_of_files_backs_off_and_recovers() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    raise_own_limit(4096);
    // Caps far above what 128 descriptors allow: accept itself must fail.
    let agent = Agent::start(
        128,
        "max_connections = 1000\nmax_connections_per_client = 1000",
    );
    let log_before = agent.log_len();
    // (Those the agent cannot accept wait in its listen backlog.)
    let idle: Vec<Option<TcpStream>> = (0..200)
        .map(|_| connect_from("127.0.0.2", agent.http))
        .collect();
    // Wait until the agent is out of descriptors (the log says so once).
    let t = Instant::now();
    while !agent.log().contains("http accept failed") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no accept failure logged; {} files open",
            agent.open_files()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Out of files for 3 s: the accept loop backs off instead of spinning.
    let cpu0 = agent.cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = agent.cpu_time() - cpu0;
    let log = agent.log();
    let failures = log
        .lines()
        .filter(|l| l.contains("http accept failed"))
        .count();
    let growth = agent.log_len() - log_before;
    eprintln!(
        "out of files for 3 s: agent CPU {cpu:?}, {failures} accept failure lines, log +{growth} bytes"
    );
    assert!(
        cpu < Duration::from_millis(600),
        "accept loop used {cpu:?} of CPU in 3 s"
    );
    assert_eq!(failures, 1, "{log}");
    assert!(growth < 64 * 1024, "log grew by {growth} bytes");

    // The attackers leave: accept works again, and says how long it failed.
    drop(idle);
    let small = agent.artifact("small.bin");
    let out = agent.dir.path().join("out");
    let t = Instant::now();
    let (took, got) = loop {
        let r = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "5", "-o"])
            .arg(&out)
            .arg(agent.url("/artifacts/small.bin"))
            .status()
            .unwrap();
        if r.success() {
            break (t.elapsed(), std::fs::read(&out).unwrap());
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(got == small);
    let log = agent.log();
    assert!(log.contains("http accept works again"), "{log}");
    eprintln!("served again {took:?} after the attackers left");
}
