//! Forwards, `lab ssh` and `lab run`: the real `lab` binary against an
//! in-process lab-server with real tokens and an in-process agent (its rack
//! model with simulated BMCs and a TCP console played by the test). The
//! leased host's inventory address is 127.0.0.2 (Linux routes all of
//! 127/8 to `lo`), where the test runs what the host would: an echo server,
//! a real `sshd`.
//!
//! - `lab forward` carries 8 MiB both ways byte for byte (through the
//!   credit windows), and `--listen` forwards local connections; a
//!   non-holder is refused (exit 3, also through `lab ssh`), an operator is
//!   not; a closed port is UNAVAILABLE at once, a host without an address
//!   FAILED_PRECONDITION, a forward past the per-lease limit
//!   RESOURCE_EXHAUSTED; a release cuts an open forward (exit 6); the
//!   events log each forward with its byte counts.
//! - `lab ssh` logs into a real sshd (test host key, the lease's key in its
//!   authorized_keys) and passes the remote status through.
//! - `lab run` exports the lease to its command, renews a short TTL,
//!   releases after a failure, a SIGTERM or success, holds the lease with
//!   `--hold-on-failure`, and saves the lease's console as an artifact.

use lab_agent::link::{self, LinkConfig};
use lab_agent::power::{PowerControl, SimPower};
use lab_agent::rack::{PowerFactory, Rack, RackConfig};
use lab_proto::v1 as pb;
use lab_server::auth::Authenticator;
use lab_server::racks::ForwardLimits;
use lab_tests::{Clients, InProcessServer, ServerOptions, bin_path};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(20);
/// The leased hosts' address (on lo).
const HOST_IP: &str = "127.0.0.2";

/// The lab of one test: server, agent, the console of h1, a scratch dir.
struct Lab {
    server: InProcessServer,
    dir: tempfile::TempDir,
    /// The "serial port" of h1, as the agent's capture connected to it.
    serial: TcpStream,
    _agent: tokio::task::JoinHandle<()>,
}

fn tokens() -> String {
    lab_tests::tokens_toml(&[
        ("t-alice", "alice", "ci"),
        ("t-bob", "bob", "ci"),
        ("t-root", "root", "operator"),
        ("agent-r1", "agent-r1", "agent"),
    ])
}

/// h1 at 127.0.0.2 with a BMC and a TCP console; h2 with a BMC and no
/// address.
fn inventory(dir: &Path, console_port: u16) -> String {
    let pw = dir.join("bmc.pw");
    std::fs::write(&pw, "pw").unwrap();
    let bmc = |port: u16| {
        format!(
            "[host.bmc]\naddress = \"127.0.0.1\"\nport = {port}\nuser = \"admin\"\npassword_file = \"{}\"\n",
            pw.display()
        )
    };
    format!(
        "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n\
         [[host]]\nname = \"h1\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:01\"\nipv4 = \"{HOST_IP}\"\n{}\
         [host.console]\nkind = \"tcp\"\naddress = \"127.0.0.1:{console_port}\"\n\n\
         [[host]]\nname = \"h2\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:02\"\n{}\
         [host.console]\nkind = \"none\"\n",
        bmc(10_001),
        bmc(10_002),
    )
}

fn sim_factory() -> PowerFactory {
    let bmcs: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<SimPower>>>> =
        Arc::default();
    Arc::new(move |host, _bmc| {
        let sim = bmcs
            .lock()
            .unwrap()
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(SimPower::new(host)))
            .clone();
        Ok(sim as Arc<dyn PowerControl>)
    })
}

impl Lab {
    async fn start(limits: ForwardLimits) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = console.local_addr().unwrap().port();
        let server = InProcessServer::start(ServerOptions {
            inventory: Some(inventory(dir.path(), port)),
            agents: true,
            auth: Authenticator::parse(&tokens(), Path::new("tokens.toml")).unwrap(),
            forward_limits: limits,
            ..Default::default()
        })
        .await
        .unwrap();
        // The default profile has no ready text: a host is ready once on.
        let rack = Rack::new(
            RackConfig {
                default_profile: "local-disk".into(),
                profiles: Default::default(),
                data_dir: dir.path().join("agent"),
                console_limits: Default::default(),
                bmc_probe_interval: Duration::from_millis(200),
                ipmi: Default::default(),
                capture: Default::default(),
            },
            lab_agent::hosts::HostTable::default(),
            sim_factory(),
        );
        let agent = tokio::spawn(link::run(
            LinkConfig {
                server: format!("http://{}", server.addr),
                token: Some("agent-r1".into()),
                rack: "r1".into(),
                ca: None,
                log_reads: Default::default(),
            },
            rack,
        ));
        let (serial, _) = tokio::time::timeout(WAIT, console.accept())
            .await
            .expect("the agent connects to h1's console")
            .unwrap();
        let lab = Lab {
            server,
            dir,
            serial,
            _agent: agent,
        };
        let mut c = lab.clients("t-root").await;
        until("h1 and h2 reachable", || {
            let mut c = c.clone();
            async move {
                let hosts = c
                    .hosts
                    .list_hosts(pb::ListHostsRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .hosts;
                hosts.iter().all(|h| h.reachable).then_some(())
            }
        })
        .await;
        let _ = &mut c;
        lab
    }

    async fn clients(&self, token: &str) -> Clients {
        self.server.clients(token).await.unwrap()
    }

    /// `lab ARGS` with `token`, ready to spawn.
    fn lab(&self, token: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_path("lab"));
        cmd.args(args)
            .env("LAB_SERVER", format!("http://{}", self.server.addr))
            .env("LAB_TOKEN", token)
            .env("HOME", self.dir.path())
            .env_remove("LAB_CA")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `lab ARGS` to its end: (exit code, stdout, stderr).
    async fn run(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(WAIT * 3, self.lab(token, args).output())
            .await
            .unwrap_or_else(|_| panic!("lab {args:?} did not finish"))
            .expect("run lab (cargo build -p lab-cli first)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn lease(&self, id: &str) -> pb::Lease {
        self.clients("t-root")
            .await
            .leases
            .get_lease(pb::GetLeaseRequest {
                lease_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn events(&self, host: &str) -> Vec<pb::Event> {
        self.clients("t-root")
            .await
            .events
            .list_events(pb::ListEventsRequest {
                host: host.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }
}

/// Polls an async condition.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on the hosts' address: each connection gets its bytes
/// back, and its end of input closes it.
async fn echo_server() -> u16 {
    let l = TcpListener::bind((HOST_IP, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((conn, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    port
}

/// A port on the hosts' address where nothing listens.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind((HOST_IP, 0)).unwrap();
    l.local_addr().unwrap().port()
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn grant(c: &mut Clients, host: &str) -> pb::Lease {
    c.grant_now(pb::LeaseRequest {
        hosts: vec![host.into()],
        ..Default::default()
    })
    .await
    .unwrap()
}

/// `lab forward` with `input` on stdin: (exit code, stdout, stderr).
async fn forward_bytes(
    lab: &Lab,
    token: &str,
    host: &str,
    port: u16,
    input: Vec<u8>,
) -> (i32, Vec<u8>, String) {
    let mut child = lab
        .lab(token, &["forward", host, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        // The child may refuse before reading everything.
        let _ = stdin.write_all(&input).await;
    });
    let out = tokio::time::timeout(WAIT * 3, child.wait_with_output())
        .await
        .expect("lab forward finishes")
        .unwrap();
    writer.await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_carry_bytes_for_the_holder_only_and_end_with_the_lease() {
    let lab = Lab::start(ForwardLimits {
        per_lease: 3,
        ..Default::default()
    })
    .await;
    let echo = echo_server().await;
    let mut alice = lab.clients("t-alice").await;
    let lease = grant(&mut alice, "h1").await;

    // ------------------------------------------------ 8 MiB both ways
    let input = noise(8 << 20);
    let t0 = Instant::now();
    let (code, out, err) = forward_bytes(&lab, "t-alice", "h1", echo, input.clone()).await;
    let took = t0.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), input.len(), "{err}");
    assert!(out == input, "the echo differs from what was sent");
    eprintln!(
        "8 MiB echoed through lab forward in {took:?} ({:.1} MiB/s each way)",
        8.0 / took.as_secs_f64()
    );

    // ------------------------------------------------ who may
    let (code, _, err) = lab
        .run("t-bob", &["forward", "h1", &echo.to_string()])
        .await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("bob may not forward to host h1: it does not hold the host's active lease"),
        "{err}"
    );
    let (code, _, err) = lab
        .run(
            "t-bob",
            &["ssh", "h1", "--port", &echo.to_string(), "--", "true"],
        )
        .await;
    assert_eq!(code, 3, "lab ssh passes on the refusal's code: {err}");
    assert!(err.contains("bob may not forward to host h1"), "{err}");
    let (code, out, err) = forward_bytes(&lab, "t-root", "h1", echo, b"operator\n".to_vec()).await;
    assert_eq!((code, out.as_slice()), (0, &b"operator\n"[..]), "{err}");

    // ------------------------------------------------ what cannot be reached
    let closed = closed_port();
    let t0 = Instant::now();
    let (code, _, err) = lab
        .run("t-alice", &["forward", "h1", &closed.to_string()])
        .await;
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains(&format!("cannot connect to port {closed} of h1")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "refused at once");
    let _h2 = grant(&mut alice, "h2").await;
    let (code, _, err) = lab.run("t-alice", &["forward", "h2", "22"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(
        err.contains("host h2 has no ipv4 in the inventory"),
        "{err}"
    );

    // ------------------------------------------------ --listen
    let mut listener = lab
        .lab(
            "t-alice",
            &["forward", "h1", &echo.to_string(), "--listen", "0"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(listener.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("lab forward --listen says where")
        .unwrap()
        .unwrap();
    let local = line
        .strip_prefix("lab forward listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    assert!(local.starts_with("127.0.0.1:"), "{local}");
    // Two connections at once, each its own forward; the third of the
    // lease's limit of 3 is refused while they are open.
    let mut a = TcpStream::connect(&local).await.unwrap();
    let mut b = TcpStream::connect(&local).await.unwrap();
    for (conn, word) in [(&mut a, &b"first"[..]), (&mut b, &b"second"[..])] {
        conn.write_all(word).await.unwrap();
        let mut got = vec![0u8; word.len()];
        tokio::time::timeout(WAIT, conn.read_exact(&mut got))
            .await
            .expect("echo through --listen")
            .unwrap();
        assert_eq!(got, word);
    }
    // (the 8 MiB forward and the operator's are closed; a and b are open,
    // plus this one makes 3: at the limit, so a fourth is refused)
    let mut c3 = TcpStream::connect(&local).await.unwrap();
    c3.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tokio::time::timeout(WAIT, c3.read_exact(&mut one))
        .await
        .unwrap()
        .unwrap();
    let (code, _, err) = lab
        .run("t-alice", &["forward", "h1", &echo.to_string()])
        .await;
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("already has 3 forwards open"), "{err}");
    drop((a, b, c3));
    listener.kill().await.unwrap();
    // Their slots are free again once all five forwards so far are closed.
    until("five forwards closed", || async {
        let closed = lab
            .events("h1")
            .await
            .iter()
            .filter(|e| e.kind == pb::EventKind::ForwardClosed as i32)
            .count();
        (closed >= 5).then_some(())
    })
    .await;

    // ------------------------------------------------ the lease's end cuts it
    let mut open = lab
        .lab("t-alice", &["forward", "h1", &echo.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = open.stdin.take().unwrap();
    let mut stdout = open.stdout.take().unwrap();
    stdin.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, stdout.read_exact(&mut got))
        .await
        .expect("the forward is open")
        .unwrap();
    alice
        .leases
        .release(pb::ReleaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, open.wait_with_output())
        .await
        .expect("the forward ends with the lease")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("the lease on h1 ended; forward closed"),
        "{err}"
    );
    drop(stdin);

    // ------------------------------------------------ events
    let events = until("the forwards' events", || async {
        let ev = lab.events("h1").await;
        let closed = ev
            .iter()
            .filter(|e| e.kind == pb::EventKind::ForwardClosed as i32)
            .count();
        (closed >= 6).then_some(ev)
    })
    .await;
    let opened: Vec<&pb::Event> = events
        .iter()
        .filter(|e| e.kind == pb::EventKind::ForwardOpened as i32)
        .collect();
    assert!(opened.len() >= 6, "{events:?}");
    assert_eq!(opened[0].actor, "alice");
    assert_eq!(opened[0].lease_id, lease.id);
    assert_eq!(opened[0].detail, format!("port {echo}"));
    let big = events
        .iter()
        .find(|e| e.kind == pb::EventKind::ForwardClosed as i32)
        .unwrap();
    assert_eq!(
        big.detail,
        format!(
            "port {echo}: 8388608 bytes to the host, 8388608 bytes from it; the host closed the connection"
        )
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == pb::EventKind::ForwardClosed as i32
                && e.detail.ends_with("; the lease ended")
                && e.detail.contains("4 bytes to the host, 4 bytes from it")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == pb::EventKind::ForwardOpened as i32 && e.actor == "root")
    );
}

/// Runs `ssh-keygen` quietly.
async fn keygen(args: &[&str]) {
    let st = Command::new("ssh-keygen")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .await
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(st.success(), "ssh-keygen {args:?}");
}

/// A real sshd on 127.0.0.2, accepting `authorized` for root; killed on
/// drop.
async fn sshd(dir: &Path, authorized: &Path) -> (tokio::process::Child, u16) {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(
        sshd.exists(),
        "/usr/sbin/sshd is missing: scripts/deps.sh installs openssh-server"
    );
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join("ssh_host_ed25519_key");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        host_key.to_str().unwrap(),
    ])
    .await;
    let port = closed_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {HOST_IP}:{port}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n",
            host_key.display(),
            authorized.display(),
            dir.join("sshd.pid").display(),
        ),
    )
    .unwrap();
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f", config.to_str().unwrap()])
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("sshd.log")).unwrap(),
        ))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    until("sshd listening", || async move {
        TcpStream::connect((HOST_IP, port)).await.ok().map(|_| ())
    })
    .await;
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_ssh_logs_into_a_real_sshd_through_the_forward() {
    let lab = Lab::start(ForwardLimits::default()).await;
    let dir = lab.dir.path().to_owned();
    let key = dir.join("id_test");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "alice@ci",
        "-f",
        key.to_str().unwrap(),
    ])
    .await;
    let public = PathBuf::from(format!("{}.pub", key.display()));

    // The lease carries the key, shown by its fingerprint.
    let (code, out, err) = lab
        .run(
            "t-alice",
            &[
                "--json",
                "lease",
                "acquire",
                "--host",
                "h1",
                "--ssh-key",
                public.to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let lease: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fp = Command::new("ssh-keygen")
        .args(["-l", "-f", public.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout);
    let fp = fp.split_whitespace().nth(1).unwrap();
    assert_eq!(
        lease["ssh_key"].as_str().unwrap(),
        format!("ssh-ed25519 {fp} (alice@ci)")
    );
    let id = lease["id"].as_str().unwrap();
    let stored = lab.lease(id).await.ssh_public_key;
    assert_eq!(stored, std::fs::read_to_string(&public).unwrap().trim());

    // What the install flow will do on the host: the lease's key for root.
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{stored}\n")).unwrap();
    let (_sshd, port) = sshd(&dir, &authorized).await;
    let port = port.to_string();
    let key = public.to_str().unwrap();
    let ssh = |cmd: &[&str]| {
        let mut args = vec!["ssh", "h1", "--port", &port, "--ssh-key", key, "--"];
        args.extend_from_slice(cmd);
        args.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| {
        let lab = &lab;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.run("t-alice", &args).await
        }
    };
    let (code, out, err) = run(ssh(&["echo", "hi"])).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "hi\n"),
        "{err}\n{}",
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
    let (code, _, err) = run(ssh(&["exit 7"])).await;
    assert_eq!(code, 7, "the remote status passes through: {err}");
    // A wrong key: ssh's own failure (255), not lab's.
    let other = dir.join("id_other");
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        other.to_str().unwrap(),
    ])
    .await;
    let (code, _, err) = lab
        .run(
            "t-alice",
            &[
                "ssh",
                "h1",
                "--port",
                &port,
                "--ssh-key",
                other.to_str().unwrap(),
                "--",
                "true",
            ],
        )
        .await;
    assert_eq!(code, 255, "{err}");
}

/// Waits for `path` to exist.
async fn file(path: &Path) {
    let p = path.to_owned();
    until(&format!("{}", path.display()), || {
        let p = p.clone();
        async move { p.exists().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_run_exports_the_lease_renews_it_and_always_gives_it_back() {
    let mut lab = Lab::start(ForwardLimits::default()).await;
    let dir = lab.dir.path().to_owned();
    let artifacts = dir.join("artifacts");

    // ------------------------------------------------ a failing command
    let script = format!(
        "echo \"$LAB_LEASE|$LAB_HOSTS|$LAB_SERVER\" > {d}/env; touch {d}/started; \
         while [ ! -e {d}/go ]; do sleep 0.05; done; exit 3",
        d = dir.display()
    );
    let run = lab
        .lab(
            "t-alice",
            &[
                "run",
                "--host",
                "h1",
                "--ttl",
                "30s",
                "--ssh-key",
                "none",
                "--artifacts",
                artifacts.to_str().unwrap(),
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    file(&dir.join("started")).await;
    lab.serial
        .write_all(b"LEASE-CONSOLE-MARKER during the job\r\n")
        .await
        .unwrap();
    // The lease's console log has it before the job ends.
    let id = std::fs::read_to_string(dir.join("env")).unwrap();
    let id = id.split('|').next().unwrap().to_owned();
    let mut alice = lab.clients("t-alice").await;
    until("the marker in the lease's console log", || {
        let mut alice = alice.clone();
        let id = id.clone();
        async move {
            let mut log = alice
                .hosts
                .console_log(pb::ConsoleLogRequest { lease_id: id })
                .await
                .ok()?
                .into_inner();
            let mut text = Vec::new();
            while let Some(m) = log.message().await.ok()? {
                if let Some(pb::console_response::Msg::Output(b)) = m.msg {
                    text.extend_from_slice(&b);
                }
            }
            String::from_utf8_lossy(&text)
                .contains("LEASE-CONSOLE-MARKER")
                .then_some(())
        }
    })
    .await;
    let _ = &mut alice;
    std::fs::write(dir.join("go"), "").unwrap();
    let out = tokio::time::timeout(WAIT * 3, run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let env = std::fs::read_to_string(dir.join("env")).unwrap();
    let parts: Vec<&str> = env.trim().split('|').collect();
    assert_eq!(parts[1], "h1");
    assert_eq!(parts[2], format!("http://{}", lab.server.addr));
    let id = parts[0].to_owned();
    assert_eq!(
        lab.lease(&id).await.state,
        pb::LeaseState::Released as i32,
        "{err}"
    );
    let console = std::fs::read_to_string(artifacts.join("h1.console")).unwrap();
    assert!(
        console.contains("LEASE-CONSOLE-MARKER"),
        "{console:?}\n{err}"
    );

    // ------------------------------------------------ SIGTERM
    for f in ["started", "env"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let script = format!(
        "echo \"$LAB_LEASE\" > {d}/env; touch {d}/started; exec sleep 60",
        d = dir.display()
    );
    let run = lab
        .lab(
            "t-alice",
            &[
                "run",
                "--host",
                "h1",
                "--ssh-key",
                "none",
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    file(&dir.join("started")).await;
    let pid = nix::unistd::Pid::from_raw(run.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = tokio::time::timeout(WAIT, run.wait_with_output())
        .await
        .expect("lab run ends soon after SIGTERM")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "killed by SIGTERM: {err}");
    let id = std::fs::read_to_string(dir.join("env"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        lab.lease(&id).await.state,
        pb::LeaseState::Released as i32,
        "{err}"
    );

    // ------------------------------------------------ --hold-on-failure
    let (code, _, err) = lab
        .run(
            "t-alice",
            &[
                "run",
                "--host",
                "h1",
                "--ttl",
                "20s",
                "--ssh-key",
                "none",
                "--hold-on-failure",
                "2m",
                "--",
                "sh",
                "-c",
                "echo $LAB_LEASE > \"$0\"; exit 1",
                dir.join("held").to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("lab ssh h1") && err.contains("lab lease release"),
        "{err}"
    );
    let id = std::fs::read_to_string(dir.join("held"))
        .unwrap()
        .trim()
        .to_owned();
    let held = lab.lease(&id).await;
    assert_eq!(held.state, pb::LeaseState::Active as i32);
    let expires = lab_proto::convert::system_time(held.expires_at.as_ref().unwrap());
    let left = expires.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(100) && left <= Duration::from_secs(120),
        "held for about 2m: {left:?}"
    );
    lab.clients("t-alice")
        .await
        .leases
        .release(pb::ReleaseRequest { lease_id: id })
        .await
        .unwrap();

    // ------------------------------------------------ renewal, lab inside CMD
    let script = format!(
        "sleep 8; {lab} --json lease show \"$LAB_LEASE\" > {d}/show.json",
        lab = bin_path("lab").display(),
        d = dir.display()
    );
    let (code, _, err) = lab
        .run(
            "t-alice",
            &[
                "run",
                "--host",
                "h1",
                "--ttl",
                "3s",
                "--ssh-key",
                "none",
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let show: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("show.json")).unwrap()).unwrap();
    assert_eq!(show["state"], "active", "renewed past its 3 s TTL: {show}");
    let id = show["id"].as_str().unwrap().to_owned();
    assert_eq!(lab.lease(&id).await.state, pb::LeaseState::Released as i32);
    let renewals = lab
        .events("h1")
        .await
        .iter()
        .filter(|e| e.lease_id == id && e.kind == pb::EventKind::LeaseRenewed as i32)
        .count();
    assert!(renewals >= 5, "renewed every second: {renewals}");
}
