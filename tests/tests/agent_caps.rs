//! The agent's least privilege, found by trying: the real `lab-agent` runs
//! as the unprivileged user `nobody` with exactly the capabilities that
//! `packaging/lab-agent/lab-agent.service` grants (read from the unit file:
//! `AmbientCapabilities=`), through `setpriv` with the same inheritable,
//! ambient and bounding sets and no-new-privs, in a network namespace this
//! test creates. It serves:
//! - DHCP on port 67 bound to the boot interface (`SO_BINDTODEVICE`):
//!   busybox `udhcpc` in a second namespace gets the host's address;
//! - TFTP on port 69 and HTTP on port 80: `curl` fetches the host's boot
//!   script over both;
//! - IPv6 router advertisements (a raw ICMPv6 socket): a router
//!   solicitation sent from the client namespace is answered.
//!
//! lab-server runs beside it as `nobody` with no capabilities at all, as
//! its unit has none. Both run under `strace` when it is installed: every
//! system call they made must pass the units' `SystemCallFilter=`
//! (`@system-service` minus `@privileged` and `@resources`, expanded by
//! `systemd-analyze syscall-filter`) and every socket family their
//! `RestrictAddressFamilies=`, the sandboxing this machine (no systemd as
//! PID 1) cannot apply for real.
//!
//! The negative checks: without any capability the agent cannot bind its
//! ports, and without each one of the unit's capabilities it fails at start
//! naming what that capability was for.
//!
//! Needs root (network namespaces, setpriv, strace); skipped with a message
//! otherwise. Packages: iproute2, util-linux (setpriv), busybox (udhcpc),
//! curl, python3 (the router solicitation), systemd (systemd-analyze),
//! strace.

use lab_tests::bin_path;
use lab_tests::netns::Netns;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SERVER_IP: &str = "198.18.0.1";
const HOST_IP: &str = "198.18.0.10";
const HOST_MAC: &str = "52:54:00:ca:fe:01";
const SRV_IF: &str = "veth-srv";
const CLI_IF: &str = "veth-cli";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// nobody's uid and gid.
fn nobody() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// The unit's `AmbientCapabilities=`, as setpriv names them
/// (`net_bind_service`, …).
fn unit_caps(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("packaging").join(unit)).unwrap();
    let caps: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("AmbientCapabilities="))
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    let bounding: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    assert_eq!(caps, bounding, "{unit}: ambient and bounding sets differ");
    caps
}

/// `setpriv` arguments that drop to nobody with exactly `caps`, as systemd
/// does for `User=`, `AmbientCapabilities=`, `CapabilityBoundingSet=` and
/// `NoNewPrivileges=yes`.
fn setpriv(caps: &[String]) -> Vec<String> {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv".to_owned(),
        "--reuid=nobody".into(),
        "--regid=nogroup".into(),
        "--init-groups".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
        "--no-new-privs".into(),
        "--".into(),
    ]
    .into()
}

fn have(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn require(program: &str, args: &[&str], package: &str) {
    assert!(
        have(program, args),
        "`{program}` is missing: apt-get install {package} (scripts/deps.sh)"
    );
}

/// A child process (in its own process group, with whatever it runs under
/// strace) whose stdout lines arrive on a channel; killed on drop, its log
/// printed when the test fails.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    log: PathBuf,
    what: &'static str,
}

impl Proc {
    fn spawn(what: &'static str, mut cmd: Command, log: PathBuf) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("LAB_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
            log,
            what,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first stdout line with `prefix` (its rest), waiting up to 30 s.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(rest) = self.seen.iter().find_map(|l| l.strip_prefix(prefix)) {
                return rest.to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "{} never printed {prefix:?}; stdout {:?}; log:\n{}",
                    self.what,
                    self.seen,
                    self.log_text()
                ),
            }
        }
    }

    /// Wait for the process to exit by itself (30 s at most).
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit; log:\n{}",
                self.what,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, signal);
    }

    /// SIGTERM to the whole group (strace then writes out its log and
    /// exits), then wait.
    fn stop(&mut self) {
        self.signal_group(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.what, self.log_text());
        }
    }
}

/// The lab: a server namespace (lab-server and the agent; the boot
/// interface with 198.18.0.1/24) and a client namespace (the host's MAC)
/// joined by a veth pair; files in a directory `nobody` can read.
struct Lab {
    dir: tempfile::TempDir,
    srv: Netns,
    cli: Netns,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let srv = Netns::new("caps-srv");
        let cli = Netns::new("caps-cli");
        srv.ip(&[
            "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF, "netns", &cli.0,
        ]);
        srv.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", SRV_IF]);
        srv.ip(&["link", "set", "dev", SRV_IF, "up"]);
        cli.ip(&["link", "set", "dev", CLI_IF, "address", HOST_MAC]);
        cli.ip(&["link", "set", "dev", CLI_IF, "up"]);
        Lab { dir, srv, cli }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A directory owned by nobody.
    fn nobody_dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).unwrap();
        let (uid, gid) = nobody();
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        p
    }

    /// `argv` in the server namespace, under strace into `trace` if given.
    fn command(&self, trace: Option<&Path>, argv: Vec<String>) -> Command {
        let mut full = Vec::new();
        if let Some(t) = trace {
            full.extend(
                ["strace", "-f", "-qq", "-o"]
                    .map(String::from)
                    .into_iter()
                    .chain([t.display().to_string()]),
            );
        }
        full.extend(argv);
        self.srv.command(&full)
    }

    fn start_server(&self, trace: Option<&Path>) -> (Proc, String) {
        let inventory = self.path("inventory.toml");
        std::fs::write(
            &inventory,
            format!(
                "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n[[host]]\nname = \"h1\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"{HOST_MAC}\"\nipv4 = \"{HOST_IP}\"\n"
            ),
        )
        .unwrap();
        let data = self.nobody_dir("server-data");
        let mut argv = setpriv(&[]);
        argv.extend([
            bin_path("lab-server").display().to_string(),
            "--dev-insecure-no-auth".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--web-listen".into(),
            "127.0.0.1:0".into(),
            "--inventory".into(),
            inventory.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
        ]);
        let mut server = Proc::spawn(
            "lab-server",
            self.command(trace, argv),
            self.path("server.log"),
        );
        let addr = server.wait_for("lab-server listening on ");
        (server, addr)
    }

    fn start_agent(&self, caps: &[String], server: &str, trace: Option<&Path>) -> Proc {
        let config = self.path("agent.toml");
        let data = self.nobody_dir("agent-data");
        let assets = repo().join("pxe-assets");
        std::fs::write(
            &config,
            format!(
                "rack = \"r1\"\nserver = \"http://{server}\"\ndata_dir = \"{}\"\n\
                 [dhcp]\nmode = \"authoritative\"\ninterface = \"{SRV_IF}\"\nserver_ip = \"{SERVER_IP}\"\n\
                 subnet_mask = \"255.255.255.0\"\nrouter = \"{SERVER_IP}\"\n\
                 script_url = \"http://{{server_ip}}/hosts/{{mac}}.ipxe\"\n\
                 [tftp]\nlisten = \"{SERVER_IP}:69\"\n\
                 [http]\nlisten = \"{SERVER_IP}:80\"\nurl = \"http://{SERVER_IP}\"\n\
                 [assets]\nroot = \"{}\"\n",
                data.display(),
                assets.display()
            ),
        )
        .unwrap();
        let mut argv = setpriv(caps);
        argv.extend([
            bin_path("lab-agent").display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--token".into(),
            "agent-r1".into(),
        ]);
        Proc::spawn(
            "lab-agent",
            self.command(trace, argv),
            self.path(&format!("agent-{}.log", caps.join("+"))),
        )
    }
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every system call (by name) after the traced program's `execve` of
/// `exe`, and the socket families it asked for, from an `strace -f` log.
fn traced(log: &Path, exe: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(log).unwrap();
    let exec = format!("execve(\"{}\"", exe.display());
    let start = text
        .lines()
        .position(|l| l.contains(&exec) && l.trim_end().ends_with("= 0"))
        .unwrap_or_else(|| panic!("{}: no execve of {}", log.display(), exe.display()));
    let mut calls = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in text.lines().skip(start + 1) {
        // "PID name(args) = result", "PID <... name resumed>…", "PID +++ exited …"
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let name = if let Some(r) = rest.strip_prefix("<... ") {
            r.split_whitespace().next().unwrap_or("")
        } else {
            rest.split('(').next().unwrap_or("")
        };
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            calls.insert(name.to_owned());
        }
        if let Some(args) = rest
            .strip_prefix("socket(")
            .or_else(|| rest.strip_prefix("socketpair("))
        {
            families.insert(args.split(',').next().unwrap_or("").to_owned());
        }
    }
    (calls, families)
}

/// The system calls of a `systemd-analyze syscall-filter` group, nested
/// groups expanded.
fn syscall_group(group: &str) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", group])
        .output()
        .expect("systemd-analyze (package systemd)");
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {group}"
    );
    let mut set = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if l.starts_with('@') {
            set.extend(syscall_group(l));
        } else {
            set.insert(l.to_owned());
        }
    }
    set
}

/// What a unit's sandbox allows: `SystemCallFilter=` lines (an allow list,
/// then `~` lines that take groups away) and `RestrictAddressFamilies=`.
fn unit_sandbox(unit: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(repo().join("packaging").join(unit)).unwrap();
    let mut allowed = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("SystemCallFilter=") {
            if let Some(deny) = v.strip_prefix('~') {
                for g in deny.split_whitespace() {
                    for c in syscall_group(g) {
                        allowed.remove(&c);
                    }
                }
            } else {
                for g in v.split_whitespace() {
                    allowed.extend(syscall_group(g));
                }
            }
        }
        if let Some(v) = line.strip_prefix("RestrictAddressFamilies=") {
            families.extend(v.split_whitespace().map(String::from));
        }
    }
    assert!(!allowed.is_empty(), "{unit} has no SystemCallFilter");
    (allowed, families)
}

fn check_sandbox(unit: &str, trace: &Path, exe: &Path) {
    let (calls, families) = traced(trace, exe);
    let (allowed, allowed_families) = unit_sandbox(unit);
    let denied: Vec<_> = calls.difference(&allowed).collect();
    assert!(
        denied.is_empty(),
        "{unit}: {} made system calls its SystemCallFilter denies: {denied:?}",
        exe.display()
    );
    let denied: Vec<_> = families.difference(&allowed_families).collect();
    assert!(
        denied.is_empty(),
        "{unit}: {} opened sockets of families RestrictAddressFamilies denies: {denied:?}",
        exe.display()
    );
    eprintln!(
        "{unit}: {} distinct system calls, all allowed; socket families {families:?}",
        calls.len()
    );
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, setpriv); CI runs as root");
    true
}

#[test]
fn the_units_capabilities_are_enough() {
    if skip_unless_root("the_units_capabilities_are_enough") {
        return;
    }
    require("ip", &["-V"], "iproute2");
    require("setpriv", &["--version"], "util-linux");
    require("busybox", &["udhcpc", "--help"], "busybox-static");
    require("curl", &["--version"], "curl");
    require("python3", &["--version"], "python3");
    let strace = have("strace", &["-V"]);
    if !strace {
        eprintln!("strace is missing (apt-get install strace): system calls not checked");
    }
    let caps = unit_caps("lab-agent/lab-agent.service");
    assert_eq!(
        unit_caps("lab-agent/lab-agent@.service"),
        caps,
        "the template unit grants other capabilities"
    );
    assert!(unit_caps("lab-server/lab-server.service").is_empty());

    let lab = Lab::new();
    let server_trace = lab.path("server.strace");
    let agent_trace = lab.path("agent.strace");
    let (mut server, addr) = lab.start_server(strace.then_some(server_trace.as_path()));
    let mut agent = lab.start_agent(&caps, &addr, strace.then_some(agent_trace.as_path()));
    agent.wait_for("lab-agent running for rack r1");
    agent.wait_for("lab-agent attached to ");

    // DHCP: port 67, SO_BINDTODEVICE, broadcast replies.
    let lease = lab
        .cli
        .udhcpc(CLI_IF, lab.dir.path())
        .unwrap_or_else(|out| {
            panic!(
                "udhcpc got no lease:\n{out}\nagent log:\n{}",
                agent.log_text()
            )
        });
    assert_eq!(lease, format!("ip={HOST_IP} serverid={SERVER_IP}"));

    // TFTP on 69 and HTTP on 80: the host's boot script, the same bytes.
    lab.cli
        .ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", CLI_IF]);
    let file = "hosts/52-54-00-ca-fe-01.ipxe";
    let (ok, tftp, err) = lab.cli.output(&[
        "curl",
        "-fsS",
        "--max-time",
        "10",
        &format!("tftp://{SERVER_IP}/{file}"),
    ]);
    assert!(ok, "TFTP failed: {err}\nagent log:\n{}", agent.log_text());
    assert!(tftp.starts_with("#!ipxe"), "{tftp}");
    let (ok, http, err) = lab.cli.output(&[
        "curl",
        "-fsS",
        "--max-time",
        "10",
        &format!("http://{SERVER_IP}/{file}"),
    ]);
    assert!(ok, "HTTP failed: {err}");
    assert_eq!(http, tftp);

    // Router advertisements: a raw ICMPv6 socket bound to the interface.
    let (ra, src) = lab.cli.solicit_router(CLI_IF).unwrap_or_else(|e| {
        panic!(
            "no router advertisement: {e}\nagent log:\n{}",
            agent.log_text()
        )
    });
    assert!(ra.starts_with("86"), "type 134: {ra}");
    assert!(
        src.starts_with("fe80::"),
        "from a link-local address: {src}"
    );

    agent.stop();
    server.stop();
    if strace {
        check_sandbox(
            "lab-agent/lab-agent.service",
            &agent_trace,
            &bin_path("lab-agent"),
        );
        check_sandbox(
            "lab-server/lab-server.service",
            &server_trace,
            &bin_path("lab-server"),
        );
    }
}

#[test]
fn without_each_capability_the_agent_fails_to_start() {
    if skip_unless_root("without_each_capability_the_agent_fails_to_start") {
        return;
    }
    require("ip", &["-V"], "iproute2");
    require("setpriv", &["--version"], "util-linux");
    let caps = unit_caps("lab-agent/lab-agent.service");
    // What each capability is for, as the agent's error names it.
    let needs = |cap: &str| match cap {
        "net_bind_service" => "Permission denied",
        "net_raw" => "cannot open the ICMPv6 socket on veth-srv: Operation not permitted",
        other => panic!("the unit grants {other}: say here what it is for"),
    };
    let lab = Lab::new();
    // No server: the agent binds its sockets before it needs one.
    let mut cases: Vec<(Vec<String>, &str)> = vec![(Vec::new(), "Permission denied")];
    for cap in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        cases.push((rest, needs(cap)));
    }
    for (granted, expect) in cases {
        let mut agent = lab.start_agent(&granted, "127.0.0.1:9", None);
        let status = agent.exit_status();
        let log = agent.log_text();
        assert!(
            !status.success(),
            "the agent started with only {granted:?}:\n{log}"
        );
        assert!(
            log.contains(expect),
            "with only {granted:?} the agent failed otherwise than {expect:?}:\n{log}"
        );
        eprintln!(
            "with only {granted:?}: {}",
            log.lines()
                .find(|l| l.contains(expect))
                .unwrap_or_default()
                .trim()
        );
    }
}
