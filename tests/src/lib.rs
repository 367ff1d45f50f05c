//! The test harness shared by the cross-process suites and the benchmarks:
//! generated inventories and tokens files, lab-server in-process (port 0,
//! temporary store) or as a real child process (killed on drop, logs kept),
//! and authenticated gRPC clients; [`history`], the checker that replays an
//! event log; [`crash_loop`], SIGKILLs under load with everything
//! acknowledged checked afterwards; [`etcd`], a throwaway etcd cluster; [`netns`]: network namespaces and the
//! clients run in them; [`sites`], sites in namespaces (etcd member,
//! lab-server replica, rack agent each) joined by links a test cuts.

pub mod agent;
pub mod bench;
pub mod browser;
pub mod console_lab;
pub mod crash_loop;
pub mod etcd;
pub mod history;
pub mod netns;
pub mod sites;

use anyhow::{Context, Result, bail};
use lab_proto::v1::admin_service_client::AdminServiceClient;
use lab_proto::v1::event_service_client::EventServiceClient;
use lab_proto::v1::host_service_client::HostServiceClient;
use lab_proto::v1::lease_service_client::LeaseServiceClient;
use lab_server::auth::{Authenticator, digest};
use lab_server::core::clock::TokioClock;
use lab_server::core::reclaim::Immediate;
use lab_server::core::{Core, CoreConfig};
use lab_server::grpc::{self, Api};
use lab_server::inventory::Inventory;
use lab_server::racks::{ForwardLimits, RackRegistry};
use lab_server::store::redb::RedbStore;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// An inventory TOML with `n` x86_64 hosts `h00`… in one rack without an
/// agent (hosts driven by hand: always reachable, reclaimed at once); every
/// fourth host has the flag `iommu`, odd ones are UEFI.
pub fn inventory_toml(n: usize) -> String {
    inventory_toml_for(n, None)
}

/// Like [`inventory_toml`], with rack `r1` served by agent `agent-r1`.
pub fn inventory_toml_with_agent(n: usize) -> String {
    inventory_toml_for(n, Some("agent-r1"))
}

fn inventory_toml_for(n: usize, agent: Option<&str>) -> String {
    let mut s = String::from("[[rack]]\nname = \"r1\"\n");
    if let Some(a) = agent {
        s.push_str(&format!("agent = \"{a}\"\n"));
    }
    for i in 0..n {
        s.push_str(&format!(
            "\n[[host]]\nname = \"h{i:02}\"\narch = \"x86_64\"\nfirmware = \"{}\"\nrack = \"r1\"\nmac = \"52:54:00:00:{:02x}:{:02x}\"\nflags = [{}]\n",
            if i % 2 == 1 { "uefi" } else { "bios" },
            i / 256,
            i % 256,
            if i % 4 == 0 { "\"iommu\"" } else { "" },
        ));
    }
    s
}

/// A tokens file with the given (token, principal, role) entries.
pub fn tokens_toml(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(t, p, r)| {
            format!(
                "[[token]]\nprincipal = \"{p}\"\nrole = \"{r}\"\nsha256 = \"{}\"\n",
                hex::encode(digest(t))
            )
        })
        .collect()
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Bearer>;

/// Clients of every service over one channel.
#[derive(Clone)]
pub struct Clients {
    pub hosts: HostServiceClient<Svc>,
    pub leases: LeaseServiceClient<Svc>,
    pub events: EventServiceClient<Svc>,
    pub admin: AdminServiceClient<Svc>,
}

impl Clients {
    /// Acquire with `no_wait`: the granted lease, or the status that refused it.
    pub async fn grant_now(
        &mut self,
        req: lab_proto::v1::LeaseRequest,
    ) -> Result<lab_proto::v1::Lease, tonic::Status> {
        use lab_proto::v1::{AcquireRequest, AcquireUpdate, acquire_update::Update};
        let mut s = self
            .leases
            .acquire(AcquireRequest {
                request: Some(req),
                no_wait: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        loop {
            match s.message().await? {
                Some(AcquireUpdate {
                    update: Some(Update::Granted(l)),
                }) => return Ok(l),
                Some(_) => continue,
                None => return Err(tonic::Status::internal("stream ended without a grant")),
            }
        }
    }

    pub async fn connect(addr: SocketAddr, token: Option<&str>) -> Result<Clients> {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connect to {addr}"))?;
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")));
        Ok(Clients {
            hosts: HostServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            leases: LeaseServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            events: EventServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            admin: AdminServiceClient::with_interceptor(channel, bearer),
        })
    }
}

/// Options of an in-process server.
pub struct ServerOptions {
    pub hosts: usize,
    pub auth: Authenticator,
    pub default_ttl: Duration,
    /// The inventory instead of `inventory_toml(hosts)`.
    pub inventory: Option<String>,
    /// Reclaim through the rack agents (as the real server does) instead of
    /// at once.
    pub agents: bool,
    /// Limits on forwards (the server's `--forward-*` flags).
    pub forward_limits: ForwardLimits,
    /// Changes to the core's limits (the defaults of `CoreConfig::new`).
    pub configure: fn(&mut CoreConfig),
    /// The text of a `policy.toml` (projects, shares, quotas) in force from
    /// the start, as `lab-server --policy` loads it.
    pub policy: Option<String>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            hosts: 8,
            auth: Authenticator::InsecureDev,
            default_ttl: Duration::from_secs(600),
            inventory: None,
            agents: false,
            forward_limits: ForwardLimits::default(),
            configure: |_| {},
            policy: None,
        }
    }
}

/// lab-server running inside this process on 127.0.0.1:0 with a redb store
/// in a temporary directory.
pub struct InProcessServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub core: Core,
    /// The store, for its counters (`rows_read`) and its file.
    pub store: Arc<RedbStore>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessServer {
    pub async fn start(opts: ServerOptions) -> Result<InProcessServer> {
        let dir = tempfile::tempdir()?;
        let inv_path = dir.path().join("inventory.toml");
        let text = opts
            .inventory
            .clone()
            .unwrap_or_else(|| inventory_toml(opts.hosts));
        std::fs::write(&inv_path, text)?;
        let inventory = Inventory::load(&inv_path)?;
        let store = Arc::new(RedbStore::open(&dir.path().join("lab.redb"))?);
        let mut config = CoreConfig::new(inv_path);
        if let Some(text) = &opts.policy {
            let path = dir.path().join("policy.toml");
            std::fs::write(&path, text)?;
            config.policy = Arc::new(
                lab_server::projects::Policy::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?,
            );
        }
        (opts.configure)(&mut config);
        let clock = Arc::new(TokioClock::new());
        let racks = RackRegistry::new(clock.clone());
        racks.set_forward_limits(opts.forward_limits);
        let reclaimer: Arc<dyn lab_server::core::reclaim::Reclaimer> = if opts.agents {
            racks.reclaimer()
        } else {
            Arc::new(Immediate)
        };
        let (core, _actor) = Core::start(config, store.clone(), inventory, reclaimer, clock)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let api = Api::with_racks(
            core.clone(),
            Arc::new(std::sync::RwLock::new(opts.auth)),
            opts.default_ttl,
            racks,
        );
        let task = tokio::spawn(async move {
            if let Err(e) = grpc::serve(listener, api, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("server failed: {e}");
            }
        });
        Ok(InProcessServer {
            addr,
            dir,
            core,
            store,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub async fn clients(&self, token: &str) -> Result<Clients> {
        Clients::connect(self.addr, Some(token)).await
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut t) = self.task.take() {
            // Like the real server: open streams (an agent's Attach, a
            // follower) get a grace period, then the server stops anyway.
            if tokio::time::timeout(Duration::from_secs(2), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}

/// Path of a workspace binary built by cargo (tests are run by cargo, which
/// builds the workspace's binaries first when asked with `--workspace`).
pub fn bin_path(name: &str) -> PathBuf {
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A real `lab-server` child process; killed on drop. Its stderr goes to a
/// log file in its directory, printed when a test fails.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The web port (`/metrics`, the dashboard), from its line on stdout.
    pub web: Option<SocketAddr>,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Spawn `lab-server` with `args` (add `--listen 127.0.0.1:0` and
    /// `--web-listen 127.0.0.1:0`) and wait
    /// until it says where it listens.
    pub fn spawn(args: &[&str], log: &Path) -> Result<ServerProcess> {
        Self::spawn_in(None, args, log)
    }

    /// [`ServerProcess::spawn`] inside the network namespace `netns`
    /// (`ip netns exec`, which becomes lab-server: its pid is the server's).
    pub fn spawn_in(netns: Option<&str>, args: &[&str], log: &Path) -> Result<ServerProcess> {
        let bin = bin_path("lab-server");
        if !bin.exists() {
            bail!(
                "{} is not built: run `cargo build --workspace` first",
                bin.display()
            );
        }
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut command = match netns {
            None => Command::new(&bin),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
        };
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf))
            .env("LAB_LOG", "info")
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        reader.read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("lab-server listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "lab-server did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        let addr = addr.parse()?;
        // The web port's line follows at once.
        let mut web_line = String::new();
        reader.read_line(&mut web_line)?;
        let web = web_line
            .trim()
            .strip_prefix("lab-server web listening on ")
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        Ok(ServerProcess {
            child,
            addr,
            web,
            log: log.to_owned(),
        })
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- lab-server log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl ServerProcess {
    /// `lab-server` in development mode on 127.0.0.1:0 with `dir/inventory.toml`
    /// (written from `inventory` unless it exists, so a restart keeps it),
    /// its store in `dir/data` and its log in `dir/server.log`.
    pub fn spawn_dev(dir: &Path, inventory: &str) -> Result<ServerProcess> {
        ServerProcess::spawn_dev_with(dir, inventory, &[], "server.log")
    }

    /// [`ServerProcess::spawn_dev`] with `extra` arguments after the
    /// common ones (`--store etcd …`, `--webhooks …`) and its log in
    /// `dir/log`.
    pub fn spawn_dev_with(
        dir: &Path,
        inventory: &str,
        extra: &[&str],
        log: &str,
    ) -> Result<ServerProcess> {
        let inv = dir.join("inventory.toml");
        if !inv.exists() {
            std::fs::write(&inv, inventory)?;
        }
        let (inv, data) = (inv.to_string_lossy(), dir.join("data"));
        let data = data.to_string_lossy();
        let mut args = vec![
            "--dev-insecure-no-auth",
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            &inv,
            "--data-dir",
            &data,
        ];
        args.extend_from_slice(extra);
        ServerProcess::spawn(&args, &dir.join(log))
    }
}

/// Runs the `lab` CLI against `server` with `token`: (exit code, stdout,
/// stderr).
pub fn lab_cli(server: &ServerProcess, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin_path("lab"))
        .args(args)
        .env("LAB_SERVER", format!("http://{}", server.addr))
        .env("LAB_TOKEN", token)
        .output()
        .expect("run lab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `s` as JSON, or a panic quoting it.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Poll `f` every 10 ms until it holds; panic naming `what` after `timeout`.
/// (Readiness by polling, never a fixed sleep.)
pub async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
