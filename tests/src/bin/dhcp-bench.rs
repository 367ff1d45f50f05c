//! DHCP throughput and CPU cost, side by side: this agent's DHCP server and
//! ISC Kea's `kea-dhcp4` (memfile, one thread), each loaded by Kea's
//! `perfdhcp` (`-g single`) with full DORA exchanges from the same set of
//! known MACs. Not a test: run it as root with
//! `cargo build --release -p lab-tests --bin dhcp-bench && sudo ./target/release/dhcp-bench`.
//! See `tests/bench/dhcp-bench.md` for what it measures and how.
//!
//! Network: everything happens in two namespaces it creates,
//! `lab-dbench-<pid>-a` (server, `veth-a` 198.18.0.1/24) and
//! `lab-dbench-<pid>-b` (perfdhcp, `veth-b` 198.18.0.2/24), deleted on every
//! exit path (Drop guards, and a Ctrl-C handler). No server ever runs in the
//! root namespace. perfdhcp acts as a relay (giaddr = 198.18.0.2), so every
//! reply is unicast to 198.18.0.2:67; the handed-out addresses
//! (198.19.0.0/16, RFC 2544 benchmarking range) only appear inside DHCP
//! payloads and are never configured or sent to.
//!
//! Known MACs: perfdhcp with `-b mac=BASE -R N` adds a uniform random
//! r in [0, N) to BASE, octet by octet from the last one, without carry
//! (`TestControl::generateMacAddress`). With BASE ending in `00:00` and
//! N <= 65536 its clients are exactly BASE + r, so both servers know
//! exactly those N MACs: the agent as a host table with a static address
//! each, Kea as host reservations for the same MACs and addresses (and, as a
//! second Kea row, a pool of N addresses with no reservations).
//!
//! Needs the Debian packages `kea-admin` (perfdhcp), `kea-dhcp4-server`
//! (kea-dhcp4) and `iproute2` (ip).

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use lab_agent::dhcp::{DhcpConfig, DhcpServer, Mode};
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable, MacAddr};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SRV_IF: &str = "veth-a";
const CLI_IF: &str = "veth-b";
/// First handed-out address; host i gets FIRST + i.
const FIRST_LEASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const BASE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xdb, 0x00, 0x00];
const READY: &str = "LAB-DBENCH-READY";
const CHILD_ENV: &str = "LAB_DBENCH_CHILD";
/// A step passes when fewer than this share of DORAs were lost.
const MAX_LOSS_PCT: f64 = 1.0;

#[derive(Parser, Debug)]
#[command(about = "DHCP DORA/s and CPU per DORA: lab-agent vs kea-dhcp4, under perfdhcp")]
struct Args {
    /// Number of known MACs (perfdhcp -R); at most 65534.
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// Seconds per perfdhcp step of the rate ramp (perfdhcp -p).
    #[arg(long, default_value_t = 5)]
    period: u32,
    /// Rate (DORA/s) of the CPU-per-DORA run.
    #[arg(long, default_value_t = 5_000)]
    fixed_rate: u32,
    /// Seconds of the CPU-per-DORA run.
    #[arg(long, default_value_t = 10)]
    fixed_secs: u32,
    /// Highest rate the ramp tries.
    #[arg(long, default_value_t = 60_000)]
    max_rate: u32,
    /// Which servers to run (repeatable; default: all).
    #[arg(long, value_enum)]
    only: Vec<Which>,
    /// Kea's `dhcp-socket-type` (`raw` is Kea's default; all traffic here
    /// is relayed unicast, for which `udp` suffices).
    #[arg(long, value_enum, default_value_t = KeaSocket::Raw)]
    kea_socket: KeaSocket,
    /// The agent's tokio runtime (`current` is what lab-agent runs DHCP on).
    #[arg(long, value_enum, default_value_t = Runtime::Current)]
    agent_runtime: Runtime,
    /// Keep the work directory (perfdhcp outputs, Kea config and log).
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Agent,
    KeaReservations,
    KeaPool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KeaSocket {
    Raw,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Runtime {
    Multi,
    Current,
}

fn main() -> Result<()> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return agent_child();
    }
    let args = Args::parse();
    ensure!(
        (2..=65_534).contains(&args.clients),
        "--clients must be in 2..=65534"
    );
    if let Err(e) = run(args) {
        eprintln!("dhcp-bench: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

// ---------------------------------------------------------------- child --

fn env_var(k: &str) -> Result<String> {
    std::env::var(k).with_context(|| format!("{k} not set"))
}

/// The agent's DHCP server, run inside the server namespace by re-exec.
fn agent_child() -> Result<()> {
    let clients: u32 = env_var("LAB_DBENCH_CLIENTS")?.parse()?;
    let runtime = env_var("LAB_DBENCH_RUNTIME")?;
    let mut cfg = DhcpConfig::new(Mode::Authoritative, SERVER_IP);
    cfg.interface = Some(SRV_IF.to_owned());
    cfg.router = Some(SERVER_IP);
    let hosts = HostTable::new(known_hosts(clients));
    let rt = match runtime.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    rt.block_on(async move {
        let server = DhcpServer::bind(cfg, hosts)?;
        let stats = server.stats();
        println!("{READY}");
        tokio::spawn(async move {
            // Counters on stderr once a second while they change.
            let mut last = None;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = stats.snapshot();
                if last != Some(now) {
                    eprintln!(
                        "stats received={} replied={} ignored_unknown={} ignored_other={} malformed={} send_errors={}",
                        now.received,
                        now.replied,
                        now.ignored_unknown,
                        now.ignored_other,
                        now.malformed,
                        now.send_errors
                    );
                    last = Some(now);
                }
            }
        });
        server.run().await?;
        anyhow::Ok(())
    })
}

/// The N hosts perfdhcp will impersonate: BASE_MAC + i, address FIRST + i.
fn known_hosts(n: u32) -> impl Iterator<Item = BootHost> {
    (0..n).map(|i| BootHost {
        name: format!("bench{i}"),
        mac: mac_of(i),
        ipv4: Some(ip_of(i)),
        arch: Arch::X86_64,
        firmware: Firmware::Bios,
        profile: "bench".into(),
        lease: None,
        holder: None,
        ssh_key: None,
    })
}

fn mac_of(i: u32) -> MacAddr {
    let mut m = BASE_MAC;
    m[4] = (i >> 8) as u8;
    m[5] = i as u8;
    MacAddr::try_from(m).expect("a unicast MAC")
}

fn ip_of(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_LEASE) + i)
}

// --------------------------------------------------------------- guards --

/// Namespaces to delete if we are interrupted.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn delete_namespace(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// A network namespace, deleted (with its veth end) on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Self> {
        sh("ip", &["netns", "add", &name])?;
        NAMESPACES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name.clone());
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_namespace(&self.0);
        NAMESPACES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != &self.0);
    }
}

/// A server process, killed and reaped on drop.
struct ServerProc {
    child: Child,
    name: &'static str,
}

impl ServerProc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime of the whole process (all threads), in µs.
    fn cpu_us(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .with_context(|| format!("{} (pid {}) is gone", self.name, self.pid()))?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').context("bad /proc stat")? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        Ok(ticks as f64 * 1e6 / clock_ticks()? as f64)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early: {st}", self.name);
        }
        Ok(())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> Result<u64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// The work directory, removed on drop unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("work directory kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn which(tool: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("`{tool}` not found: install the Debian package `{package}` (apt-get install -y {package})")
        })
}

// ------------------------------------------------------------- perfdhcp --

/// What one perfdhcp run reported.
#[derive(Debug, Clone, Default)]
struct Perf {
    requested: u32,
    /// "Rate: X 4-way exchanges/second".
    rate: f64,
    discover_sent: u64,
    offer_received: u64,
    request_sent: u64,
    ack_received: u64,
    /// UDP receive-buffer overflows in the server namespace during the run.
    srv_rcvbuf_errors: u64,
    do_drop_pct: f64,
    ra_drop_pct: f64,
}

impl Perf {
    /// DORAs started (DISCOVERs) that did not end in an ACK, in %.
    fn loss_pct(&self) -> f64 {
        if self.discover_sent == 0 {
            return 100.0;
        }
        100.0 * self.discover_sent.saturating_sub(self.ack_received) as f64
            / self.discover_sent as f64
    }

    fn passes(&self) -> bool {
        self.discover_sent > 0 && self.loss_pct() < MAX_LOSS_PCT
    }

    fn line(&self) -> String {
        format!(
            "-r {:>6}: {:>9.0} DORA/s  loss {:>6.2} %  (DISCOVER {} OFFER {} drop {:.2} % | REQUEST {} ACK {} drop {:.2} %; server-ns UDP RcvbufErrors +{})",
            self.requested,
            self.rate,
            self.loss_pct(),
            self.discover_sent,
            self.offer_received,
            self.do_drop_pct,
            self.request_sent,
            self.ack_received,
            self.ra_drop_pct,
            self.srv_rcvbuf_errors
        )
    }
}

fn parse_perfdhcp(out: &str, requested: u32) -> Result<Perf> {
    let mut p = Perf {
        requested,
        ..Perf::default()
    };
    let mut section = 0; // 1 = DISCOVER-OFFER, 2 = REQUEST-ACK
    let num = |s: &str| -> f64 {
        s.split_whitespace()
            .next()
            .and_then(|t| t.trim_end_matches('%').parse().ok())
            .unwrap_or(f64::NAN)
    };
    let mut saw_rate = false;
    for line in out.lines() {
        let line = line.trim();
        if let Some(r) = line.strip_prefix("Rate:") {
            p.rate = num(r);
            saw_rate = true;
        } else if line.contains("Statistics for: DISCOVER-OFFER") {
            section = 1;
        } else if line.contains("Statistics for: REQUEST-ACK") {
            section = 2;
        } else if let Some(v) = line.strip_prefix("sent packets:") {
            let v = num(v) as u64;
            if section == 1 {
                p.discover_sent = v;
            } else if section == 2 {
                p.request_sent = v;
            }
        } else if let Some(v) = line.strip_prefix("received packets:") {
            let v = num(v) as u64;
            if section == 1 {
                p.offer_received = v;
            } else if section == 2 {
                p.ack_received = v;
            }
        } else if let Some(v) = line.strip_prefix("drops ratio:") {
            let v = num(v);
            if section == 1 {
                p.do_drop_pct = v;
            } else if section == 2 {
                p.ra_drop_pct = if v.is_nan() { 0.0 } else { v };
            }
        }
    }
    ensure!(
        saw_rate && section == 2,
        "unexpected perfdhcp output:\n{out}"
    );
    Ok(p)
}

struct Bench {
    args: Args,
    perfdhcp: PathBuf,
    kea: PathBuf,
    cli: Netns,
    srv: Netns,
    dir: WorkDir,
    log: std::fs::File,
    runs: u32,
}

impl Bench {
    fn say(&mut self, msg: &str) {
        println!("{msg}");
        use std::io::Write;
        let _ = writeln!(self.log, "{msg}");
    }

    /// One perfdhcp run at `rate` for `secs` seconds.
    fn perfdhcp(&mut self, server: &mut ServerProc, rate: u32, secs: u32) -> Result<Perf> {
        server.check_alive()?;
        self.runs += 1;
        let args = [
            "-4".to_owned(),
            "-l".into(),
            CLI_IF.into(),
            "-g".into(),
            "single".into(),
            "-r".into(),
            rate.to_string(),
            "-R".into(),
            self.args.clients.to_string(),
            "-p".into(),
            secs.to_string(),
            "-b".into(),
            format!(
                "mac={}",
                MacAddr::try_from(BASE_MAC).expect("a unicast MAC")
            ),
            SERVER_IP.to_string(),
        ];
        let rcvbuf_before = self.srv_rcvbuf_errors()?;
        let out = self
            .cli
            .command(&self.perfdhcp)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("run perfdhcp")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let file = self.dir.path.join(format!(
            "perfdhcp-{:03}-{}-r{rate}.txt",
            self.runs, server.name
        ));
        std::fs::write(&file, format!("perfdhcp {}\n\n{text}", args.join(" ")))?;
        // Exit status 3 = "some exchanges were unsuccessful": still a result.
        ensure!(
            matches!(out.status.code(), Some(0 | 3)),
            "perfdhcp failed ({}):\n{text}",
            out.status
        );
        server.check_alive()?;
        let mut p = parse_perfdhcp(&text, rate)?;
        p.srv_rcvbuf_errors = self.srv_rcvbuf_errors()?.saturating_sub(rcvbuf_before);
        Ok(p)
    }

    /// `Udp: RcvbufErrors` of the server namespace (/proc/net/snmp).
    fn srv_rcvbuf_errors(&self) -> Result<u64> {
        let out = self.srv.command("cat").arg("/proc/net/snmp").output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            bail!("no Udp lines in the server namespace's /proc/net/snmp");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RcvbufErrors")
            .and_then(|(_, v)| v.parse().ok())
            .context("no Udp RcvbufErrors")
    }

    /// Ramp the rate up, then bisect: the best passing step.
    fn ramp(&mut self, server: &mut ServerProc) -> Result<Option<Perf>> {
        let period = self.args.period;
        // Warm-up: every client once (Kea allocates or looks up its lease).
        let warm = self.perfdhcp(server, 2_000, 3)?;
        self.say(&format!("  warm-up {}", warm.line()));
        let mut ladder = vec![
            2_000, 4_000, 6_000, 8_000, 10_000, 12_000, 16_000, 20_000, 24_000, 28_000, 32_000,
            40_000, 50_000, 60_000, 80_000, 100_000,
        ];
        ladder.retain(|&r| r <= self.args.max_rate);
        let mut best: Option<Perf> = None;
        let mut fail_at = None;
        for rate in ladder {
            let p = self.perfdhcp(server, rate, period)?;
            self.say(&format!("  {}", p.line()));
            if p.passes() {
                best = Some(p);
            } else {
                // One retry, so a single noisy step does not end the ramp.
                let again = self.perfdhcp(server, rate, period)?;
                self.say(&format!("  {} (retry)", again.line()));
                if again.passes() {
                    best = Some(again);
                } else {
                    fail_at = Some(rate);
                    break;
                }
            }
        }
        // Bisect between the last passing and the first failing rate.
        if let (Some(fail), Some(b)) = (fail_at, best.as_ref()) {
            let (mut lo, mut hi) = (b.requested, fail);
            while hi - lo > (lo / 10).max(500) {
                let mid = (lo + hi) / 2 / 100 * 100;
                let p = self.perfdhcp(server, mid, period)?;
                self.say(&format!("  {} (bisect)", p.line()));
                if p.passes() {
                    lo = mid;
                    if best.as_ref().is_none_or(|b| p.rate > b.rate) {
                        best = Some(p);
                    }
                } else {
                    hi = mid;
                }
            }
        }
        Ok(best)
    }

    /// CPU µs per completed DORA at the fixed rate.
    fn cpu_per_dora(&mut self, server: &mut ServerProc) -> Result<(Perf, f64)> {
        let before = server.cpu_us()?;
        let p = self.perfdhcp(server, self.args.fixed_rate, self.args.fixed_secs)?;
        let used = server.cpu_us()? - before;
        let per = used / p.ack_received.max(1) as f64;
        self.say(&format!(
            "  fixed {}  server CPU {:.2} s -> {:.1} us/DORA",
            p.line(),
            used / 1e6,
            per
        ));
        Ok((p, per))
    }

    fn start_agent(&mut self) -> Result<ServerProc> {
        let exe = std::env::current_exe()?;
        let log = self.dir.path.join("agent.log");
        let runtime = match self.args.agent_runtime {
            Runtime::Multi => "multi",
            Runtime::Current => "current",
        };
        let mut child = self
            .srv
            .command(exe)
            .env(CHILD_ENV, "1")
            .env("LAB_DBENCH_CLIENTS", self.args.clients.to_string())
            .env("LAB_DBENCH_RUNTIME", runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("spawn the agent child")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut proc = ServerProc {
            child,
            name: "agent",
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            proc.check_alive()?;
            bail!(
                "the agent child never became ready; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(proc)
    }

    fn start_kea(&mut self, pool: bool) -> Result<ServerProc> {
        let dir = self
            .dir
            .path
            .join(if pool { "kea-pool" } else { "kea-res" });
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("kea-dhcp4.json");
        std::fs::write(
            &conf,
            kea_config(&dir, self.args.clients, pool, self.args.kea_socket),
        )?;
        let log = dir.join("kea.stdout");
        // `-t` inside the namespace: it checks that the interface exists.
        let check = self.srv.command(&self.kea).arg("-t").arg(&conf).output()?;
        ensure!(
            check.status.success(),
            "kea-dhcp4 -t rejected the generated config:\n{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let child = self
            .srv
            .command(&self.kea)
            .arg("-c")
            .arg(&conf)
            .env("KEA_PIDFILE_DIR", &dir)
            .env("KEA_LOCKFILE_DIR", &dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn kea-dhcp4")?;
        let mut proc = ServerProc {
            child,
            name: if pool { "kea-pool" } else { "kea-res" },
        };
        // Ready when its socket on port 67 is open in the namespace.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            proc.check_alive()?;
            let ss = self
                .srv
                .command("ss")
                .args(["-Hlnup", "sport", "= :67"])
                .output()?;
            if String::from_utf8_lossy(&ss.stdout).contains("kea-dhcp4") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "kea-dhcp4 did not open port 67 within 20 s; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(proc)
    }
}

fn kea_config(dir: &Path, clients: u32, pool: bool, socket: KeaSocket) -> String {
    let socket = match socket {
        KeaSocket::Raw => "raw",
        KeaSocket::Udp => "udp",
    };
    let mut subnet = format!(
        r#"{{"id": 1, "subnet": "198.19.0.0/16", "relay": {{"ip-addresses": ["{CLIENT_IP}"]}}, "option-data": [{{"name": "routers", "data": "{SERVER_IP}"}}], "next-server": "{SERVER_IP}", "boot-file-name": "undionly.kpxe""#
    );
    if pool {
        let _ = write!(
            subnet,
            r#", "pools": [{{"pool": "{} - {}"}}]"#,
            ip_of(0),
            ip_of(clients - 1)
        );
    } else {
        subnet.push_str(r#", "reservations": ["#);
        for i in 0..clients {
            if i > 0 {
                subnet.push(',');
            }
            let _ = write!(
                subnet,
                r#"{{"hw-address": "{}", "ip-address": "{}"}}"#,
                mac_of(i),
                ip_of(i)
            );
        }
        subnet.push(']');
    }
    subnet.push('}');
    format!(
        r#"{{"Dhcp4": {{
  "interfaces-config": {{"interfaces": ["{SRV_IF}"], "dhcp-socket-type": "{socket}"}},
  "lease-database": {{"type": "memfile", "persist": true, "name": "{}", "lfc-interval": 0}},
  "multi-threading": {{"enable-multi-threading": false}},
  "valid-lifetime": 3600,
  "host-reservation-identifiers": ["hw-address"],
  "subnet4": [{subnet}],
  "loggers": [{{"name": "kea-dhcp4", "output_options": [{{"output": "{}"}}], "severity": "WARN"}}]
}}}}
"#,
        dir.join("leases4.csv").display(),
        dir.join("kea.log").display()
    )
}

// ------------------------------------------------------------------ run --

struct Row {
    name: String,
    best: Option<Perf>,
    fixed: Option<(Perf, f64)>,
    note: String,
}

fn measure(b: &mut Bench, w: Which, name: &str) -> Result<Row> {
    let mut server = match w {
        Which::Agent => b.start_agent()?,
        Which::KeaReservations => b.start_kea(false)?,
        Which::KeaPool => b.start_kea(true)?,
    };
    b.say(&format!("\n== {name} (pid {}) ==", server.pid()));
    let best = b.ramp(&mut server)?;
    let fixed = b.cpu_per_dora(&mut server)?;
    if w == Which::Agent {
        let log = std::fs::read_to_string(b.dir.path.join("agent.log")).unwrap_or_default();
        if let Some(l) = log.lines().rev().find(|l| l.starts_with("stats ")) {
            b.say(&format!("  agent counters: {l}"));
        }
    }
    Ok(Row {
        name: name.to_owned(),
        best,
        fixed: Some(fixed),
        note: String::new(),
    })
}

fn run(args: Args) -> Result<()> {
    let ip = which("ip", "iproute2")?;
    let _ = ip;
    which("ss", "iproute2")?;
    let perfdhcp = which("perfdhcp", "kea-admin")?;
    let kea = which("kea-dhcp4", "kea-dhcp4-server")?;
    ensure!(
        std::fs::read_to_string("/proc/self/status")?
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")),
        "run as root (network namespaces, port 67)"
    );

    let pid = std::process::id();
    // Delete the namespaces on Ctrl-C / SIGTERM too.
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            for ns in NAMESPACES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                delete_namespace(ns);
            }
            eprintln!("interrupted: namespaces deleted");
            std::process::exit(130);
        });
    });

    let path = std::env::temp_dir().join(format!("lab-dbench-{pid}"));
    std::fs::create_dir_all(&path)?;
    let dir = WorkDir {
        path,
        keep: args.keep,
    };
    let srv = Netns::new(format!("lab-dbench-{pid}-a"))?;
    let cli = Netns::new(format!("lab-dbench-{pid}-b"))?;
    srv.ip(&[
        "link", "add", SRV_IF, "type", "veth", "peer", "name", CLI_IF, "netns", &cli.0,
    ])?;
    srv.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", SRV_IF])?;
    cli.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", CLI_IF])?;
    srv.ip(&["link", "set", "dev", SRV_IF, "up"])?;
    cli.ip(&["link", "set", "dev", CLI_IF, "up"])?;

    let log = std::fs::File::create(dir.path.join("summary.txt"))?;
    let mut b = Bench {
        perfdhcp,
        kea,
        cli,
        srv,
        dir,
        log,
        runs: 0,
        args,
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kea_version = Command::new(&b.kea)
        .arg("-V")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    let header = format!(
        "dhcp-bench: {} known MACs {}..{} (static addresses {}..{}), {cpus} CPUs, kea-dhcp4 {kea_version} ({} socket, memfile persist, 1 thread), perfdhcp -g single -p {} s per step, pass = DORA loss < {MAX_LOSS_PCT} %\nnamespaces {} / {}, work dir {}",
        b.args.clients,
        mac_of(0),
        mac_of(b.args.clients - 1),
        ip_of(0),
        ip_of(b.args.clients - 1),
        match b.args.kea_socket {
            KeaSocket::Raw => "raw",
            KeaSocket::Udp => "udp",
        },
        b.args.period,
        b.srv.0,
        b.cli.0,
        b.dir.path.display()
    );
    b.say(&header);

    let which_all = [Which::Agent, Which::KeaReservations, Which::KeaPool];
    let selected: Vec<Which> = which_all
        .into_iter()
        .filter(|w| b.args.only.is_empty() || b.args.only.contains(w))
        .collect();
    let mut rows = Vec::new();
    for w in selected {
        let name = match w {
            Which::Agent => "lab-agent",
            Which::KeaReservations => "kea-dhcp4 (reservations)",
            Which::KeaPool => "kea-dhcp4 (pool)",
        };
        match measure(&mut b, w, name) {
            Ok(row) => rows.push(row),
            Err(e) => {
                b.say(&format!("  {name} FAILED: {e:#}"));
                rows.push(Row {
                    name: name.to_owned(),
                    best: None,
                    fixed: None,
                    note: "failed (see above)".to_owned(),
                });
            }
        }
    }

    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n{:<26} | {:>22} | {:>18} | {:>28}",
        "server",
        "max DORA/s at <1% loss",
        "loss % at that rate",
        format!("CPU us/DORA at {}/s", b.args.fixed_rate)
    );
    let _ = writeln!(t, "{}", "-".repeat(26 + 22 + 18 + 28 + 9));
    for r in &rows {
        let (max, loss) = match &r.best {
            Some(p) => (
                format!("{:.0} (-r {})", p.rate, p.requested),
                format!("{:.2}", p.loss_pct()),
            ),
            None => ("none passed".to_owned(), "-".to_owned()),
        };
        let cpu = match &r.fixed {
            Some((p, us)) => format!("{us:.1} (loss {:.2} %)", p.loss_pct()),
            None => r.note.clone(),
        };
        let _ = writeln!(
            t,
            "{:<26} | {:>22} | {:>18} | {:>28}",
            r.name, max, loss, cpu
        );
    }
    b.say(&t);
    Ok(())
}
