//! The lab-in-a-box harness for tests that boot real VMs: a throw-away
//! network namespace (deleted on drop, with every process still in it),
//! child processes whose stdout lines are logged and watched for readiness
//! markers (never fixed sleeps), prerequisite checks that fail with the
//! install command, and a log directory printed when a test fails.
//!
//! Included by the tests that need it with
//! `#[path = "../labbox/mod.rs"] mod labbox;` (see README.md here).
//!
//! Network rule: everything that serves DHCP runs inside the namespace
//! made here; nothing is added to the root namespace's network.

// Each test uses a different subset of the harness.
#![allow(dead_code)]

/// A lab in a box with a simulated BMC (ipmi_sim) per host; see bmc.rs.
pub mod bmc;
pub mod lab;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The QEMU install line (the image's newer qemu-utils blocks a plain
/// install of bookworm's qemu-system-x86; see lab-in-a-box's README).
pub const QEMU_INSTALL: &str = "apt-get install -y --no-install-recommends --allow-downgrades qemu-system-x86 qemu-utils/bookworm ipxe-qemu";

/// The repository root (this crate is `<repo>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

// ------------------------------------------------------------ prerequisites

/// Missing prerequisites, collected so that one failure names them all.
#[derive(Default)]
pub struct Prereqs(Vec<String>);

impl Prereqs {
    /// `program` must run (`program args…` is spawned; its exit status is
    /// not checked, only that it exists and is executable).
    pub fn tool(&mut self, program: &str, args: &[&str], install: &str) -> &mut Self {
        let ok = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !ok {
            self.0.push(format!("`{program}` not found: {install}"));
        }
        self
    }

    /// A file that must exist.
    pub fn file(&mut self, path: &Path, fix: &str) -> &mut Self {
        if !path.is_file() {
            self.0.push(format!("{} missing: {fix}", path.display()));
        }
        self
    }

    /// Any other condition.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) -> &mut Self {
        if !ok {
            self.0.push(what.into());
        }
        self
    }

    /// Panics (the test fails, it never skips) listing what is missing.
    pub fn assert_all(&self) {
        assert!(
            self.0.is_empty(),
            "prerequisites missing:\n  - {}",
            self.0.join("\n  - ")
        );
    }
}

/// Running as root (network namespaces, tap devices need it; CI is root).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// QEMU's iPXE ROM for virtio-net under BIOS (Debian package ipxe-qemu).
/// `pxe-virtio.rom` is the BIOS-only image; `efi-virtio.rom` holds both.
pub fn ipxe_virtio_rom() -> Option<PathBuf> {
    [
        "/usr/lib/ipxe/qemu/pxe-virtio.rom",
        "/usr/share/qemu/pxe-virtio.rom",
        "/usr/lib/ipxe/qemu/efi-virtio.rom",
        "/usr/share/qemu/efi-virtio.rom",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// The artifacts cache that `pxe-assets/fetch-artifacts.sh` fills by
/// default: `$LAB_ARTIFACTS`, else `$XDG_CACHE_HOME/lab/artifacts`, else
/// `<repo>/.cache/artifacts`.
pub fn artifacts_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LAB_ARTIFACTS") {
        return d.into();
    }
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(x) if !x.is_empty() => Path::new(&x).join("lab/artifacts"),
        _ => repo_root().join(".cache/artifacts"),
    }
}

/// The x86_64 Xen boot artifacts the `xen` profile loads.
pub const XEN_ARTIFACTS: [&str; 3] = ["xen-4.17-amd64", "vmlinuz-amd64", "initrd-labbox-amd64.gz"];

/// Makes sure `files` are in `dir` and were built by the current
/// `pxe-assets/fetch-artifacts.sh`, running it on `dir` once if some are
/// missing or stale (~10 s from its cache of `.deb`s, ~1 min when it
/// rebuilds everything; needs apt access). Returns what is still missing
/// with the reason, or nothing.
pub fn ensure_artifacts(dir: &Path, files: &[&str]) -> Option<String> {
    let missing = |d: &Path| -> Vec<String> {
        files
            .iter()
            .filter(|f| !d.join(f).is_file())
            .map(|f| f.to_string())
            .collect()
    };
    let script = repo_root().join("pxe-assets/fetch-artifacts.sh");
    let stale = stale_artifacts(dir, &script);
    if missing(dir).is_empty() && stale.is_none() {
        return None;
    }
    eprintln!(
        "labbox: artifacts in {} {}; running {}",
        dir.display(),
        stale.as_deref().unwrap_or("missing"),
        script.display()
    );
    let out = Command::new("bash").arg(&script).arg(dir).output();
    let still = missing(dir);
    if still.is_empty() {
        return None;
    }
    let detail = match out {
        Ok(o) => format!(
            "exit {:?}: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    Some(format!(
        "artifacts {still:?} missing in {} and `pxe-assets/fetch-artifacts.sh {}` did not make them ({detail}); it needs apt access to Debian bookworm (apt-get update)",
        dir.display(),
        dir.display()
    ))
}

/// Why the outputs in `dir` are stale, if they are: a cache key the script
/// writes (`VERSIONS`, `VERSIONS-arm64`, `VERSIONS-install`: package
/// versions and the sha256 of its inputs, itself included) records another
/// version of an input under `pxe-assets/` than the current one (e.g. the
/// GRUB image was built before the script added a module the profiles now
/// use, or the test initramfs before `initramfs/init` changed its facts
/// line). The script rebuilds what such a key covers.
fn stale_artifacts(dir: &Path, script: &Path) -> Option<String> {
    let assets = script.parent()?;
    let sha256 = |file: &Path| -> Option<String> {
        let out = Command::new("sha256sum").arg(file).output().ok()?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()?
                .to_owned(),
        )
    };
    ["VERSIONS", "VERSIONS-arm64", "VERSIONS-install"]
        .into_iter()
        .find_map(|key| {
            let text = std::fs::read_to_string(dir.join(key)).ok()?;
            text.lines()
                .filter_map(|l| l.split_once("  "))
                .filter(|(_, name)| assets.join(name).is_file())
                .find(|(hash, name)| sha256(&assets.join(name)).is_some_and(|h| h != *hash))
                .map(|(_, name)| format!("stale ({key} records another {name})"))
        })
}

// ------------------------------------------------------------------- logs

/// A directory for logs and generated files. Removed when the test passes
/// (unless `LAB_KEEP_LOGS` is set); kept, and every `*.log` in it printed,
/// when it fails (panics).
pub struct LogDir {
    path: PathBuf,
}

impl LogDir {
    pub fn new(prefix: &str) -> LogDir {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temporary directory");
        LogDir { path: dir.keep() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Every `*.log` file, each under a header.
    pub fn dump(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension() == Some(OsStr::new("log")))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut s = String::new();
        for p in names {
            let text = std::fs::read(&p).unwrap_or_default();
            s.push_str(&format!(
                "----- {} -----\n{}\n",
                p.display(),
                String::from_utf8_lossy(&text)
            ));
        }
        s
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
            eprintln!("labbox: logs kept in {}", self.path.display());
        } else if std::env::var_os("LAB_KEEP_LOGS").is_some() {
            eprintln!(
                "labbox: logs kept in {} (LAB_KEEP_LOGS)",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------- network namespace

/// A fresh network namespace `<prefix>-<pid>-<n>` with `lo` up. On drop,
/// every process still inside it is killed (SIGKILL, by pid) and the
/// namespace is deleted, which removes its bridges and taps too.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args…`; panics with ip's stderr on failure.
    pub fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec <ns> program`; ip execs it, so the child's pid is
    /// the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Forwards TCP connections made to the returned address on the root
    /// namespace's loopback to `target` inside this namespace (so that a
    /// browser outside can reach a port that listens on the namespace's
    /// loopback). Runs until the process ends; each connection is two
    /// copying threads.
    pub fn forward_to_loopback(&self, target: std::net::SocketAddr) -> std::net::SocketAddr {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("its address");
        let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
        let ns_path = format!("/run/netns/{}", self.name);
        // The thread that dials enters the namespace once: its sockets are
        // made there.
        std::thread::spawn(move || {
            let Ok(ns) = std::fs::File::open(&ns_path) else {
                return;
            };
            if nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return;
            }
            for outside in rx {
                let Ok(inside) = TcpStream::connect(target) else {
                    continue;
                };
                let (Ok(mut o2), Ok(mut i2)) = (outside.try_clone(), inside.try_clone()) else {
                    continue;
                };
                let (mut o, mut i) = (outside, inside);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut o, &mut i);
                    let _ = i.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut i2, &mut o2);
                    let _ = o2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                if tx.send(c).is_err() {
                    return;
                }
            }
        });
        addr
    }

    /// A bridge `name` with `cidr`, up, forwarding at once (no STP delay).
    pub fn bridge(&self, name: &str, cidr: &str) {
        self.ip(&["link", "add", name, "type", "bridge", "forward_delay", "0"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// A tap device `tap` enslaved to `bridge`, up (QEMU opens it by name).
    pub fn tap(&self, tap: &str, bridge: &str) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        self.ip(&["link", "set", tap, "master", bridge, "up"]);
    }

    /// `curl -sS` inside the namespace: (HTTP status or 0, body).
    pub fn curl(&self, url: &str, extra: &[&str]) -> (u16, String) {
        let out = self
            .command("curl")
            .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(url)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.trim().parse().unwrap_or(0), body.to_owned()),
            None => (text.trim().parse().unwrap_or(0), String::new()),
        }
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes this test started can be in its fresh namespace.
        for pid in self.pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("labbox: could not delete network namespace {}", self.name);
        }
    }
}

/// Runs `cmd` and panics with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------- processes

/// A child process, killed and reaped on drop. Its stdout is read line by
/// line (lossy UTF-8, `\r` stripped) into `<name>.log` and to `wait_for`;
/// its stderr goes to `<name>.stderr.log`.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    log: PathBuf,
}

/// Why `wait_for` gave up.
#[derive(Debug)]
pub enum WaitError {
    /// A line matched the failure predicate.
    Failed(String),
    /// The process closed its stdout (exited).
    Exited,
    TimedOut,
}

impl Proc {
    /// Spawns `cmd` with stdout piped and stderr to a log file in `logs`.
    pub fn spawn(name: &str, mut cmd: Command, logs: &LogDir) -> Proc {
        let log = logs.join(&format!("{name}.log"));
        let err = std::fs::File::create(logs.join(&format!("{name}.stderr.log")))
            .expect("create stderr log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let mut file = std::fs::File::create(&log).expect("create stdout log");
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .replace('\r', "");
                        let _ = writeln!(file, "{line}");
                        let _ = file.flush();
                        if tx.send(line).is_err() {
                            // Nobody waits any more: keep logging.
                        }
                    }
                }
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines: rx,
            seen: Vec::new(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line for which `done` holds (also among lines
    /// already seen by earlier waits, so markers are never missed), failing
    /// early on a line for which `fail` holds or when stdout closes.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
        fail: impl Fn(&str) -> bool,
    ) -> Result<String, WaitError> {
        if let Some(l) = self.seen.iter().find(|l| done(l)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if done(&l) {
                        return Ok(l);
                    }
                    if fail(&l) {
                        return Err(WaitError::Failed(l));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(WaitError::TimedOut),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(WaitError::Exited),
            }
        }
    }

    /// Like `wait_for` without a failure predicate; panics naming `what`.
    pub fn expect_line(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        match self.wait_for(timeout, done, |_| false) {
            Ok(l) => l,
            Err(e) => panic!(
                "{} never printed {what} ({e:?}); stdout:\n{}",
                self.name,
                self.seen.join("\n")
            ),
        }
    }

    /// The stdout lines seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics naming `what`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
