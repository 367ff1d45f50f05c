//! Sites in the lab in a box: two or three "sites", each a network
//! namespace this module creates, holding an etcd member, a lab-server
//! replica (`--store etcd`; every replica reads the same inventory and
//! tokens file) and the rack agent of the site's rack with its hosts
//! (no BMCs: the agent serves their boot files, nothing is powered).
//! The sites are joined by a "wan" namespace: a bridge with one veth per
//! site. [`Sites::cut`] sets the site's port on the wan side down (nothing
//! goes in or out of the site, whichever way), [`Sites::heal`] sets it up.
//!
//! ```text
//!                      namespace "wan": bridge `wan`
//!          port site-a ─────────── port site-b ─────────── port site-c
//!               │  (cut = down)         │                       │
//!   site a: wan0 10.231.0.1   site b: wan0 10.231.0.2   site c: wan0 10.231.0.3
//!     etcd a :2379/:2380        etcd b                    etcd c
//!     lab-server :7621 (web :7622), --advertise http://10.231.0.1:7621
//!     lab-agent rack a (TFTP :6969, HTTP :8080), hosts a0, a1, …
//!     server list: its own site's replica first, then the others
//! ```
//!
//! The addresses exist only in these namespaces; nothing touches the root
//! namespace's network, and no DHCP server runs. Processes are started with
//! `ip netns exec` (which becomes the process: its pid is the daemon's).
//! Dropped — also when a test panics — every process is SIGKILLed, then
//! the namespaces are deleted; on a panic the logs are printed.
//!
//! Tests talk to a site from inside it: [`Site::lab`] runs the `lab` CLI
//! there with every replica in `LAB_SERVER` (its own first), [`Site::curl`]
//! fetches a URL there, [`Site::block_on`] runs a Rust gRPC client on a
//! thread that entered the site's namespace.

use crate::agent::{AgentOptions, AgentProcess};
use crate::etcd::{EtcdCluster, Place};
use crate::netns::{Netns, in_netns};
use crate::{Clients, ServerProcess, bin_path, tokens_toml};
use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The sites' names, in order.
pub const SITE_NAMES: [&str; 3] = ["a", "b", "c"];
/// lab-server's gRPC port on every site.
pub const SERVER_PORT: u16 = 7621;
/// The agent's HTTP and TFTP ports on every site.
pub const AGENT_HTTP_PORT: u16 = 8080;
pub const AGENT_TFTP_PORT: u16 = 6969;

/// Principals of the tokens file besides the agents (`agent-<site>`, role
/// agent): these with role `ci`, and `operator` (role operator). A token
/// is its principal's name.
pub const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "mallory"];

/// The shape of the topology.
#[derive(Debug, Clone, Copy)]
pub struct SitesOptions {
    /// 2 or 3.
    pub sites: usize,
    /// Hosts in each site's rack: `<site>0`, `<site>1`, …
    pub hosts_per_site: usize,
}

impl Default for SitesOptions {
    fn default() -> Self {
        SitesOptions {
            sites: 3,
            hosts_per_site: 2,
        }
    }
}

/// One site: its namespace, address, and the replica and agent running in
/// it.
pub struct Site {
    pub name: String,
    /// Its address on the wan (the only address it has besides loopback).
    pub ip: String,
    // Processes first: fields drop in order, the namespace last.
    server: Option<ServerProcess>,
    agent: Option<AgentProcess>,
    /// Every replica's URL, this site's first (`LAB_SERVER`, the agent's
    /// `server`).
    pub servers: String,
    dir: PathBuf,
    pub ns: Netns,
}

/// The topology, running.
pub struct Sites {
    /// The etcd cluster, one member per site (member `i` is site `i`'s).
    pub etcd: EtcdCluster,
    pub sites: Vec<Site>,
    /// The hosts of the inventory with their flags (for the history checker).
    pub hosts: Vec<(String, Vec<String>)>,
    wan: Netns,
    dir: tempfile::TempDir,
}

impl Sites {
    /// Create the namespaces and links, start the etcd members, lab-server
    /// of site a (and wait until it leads), the other replicas (until they
    /// stand by, naming it), and the agents (until every host is reachable).
    pub fn start(o: SitesOptions) -> Result<Sites> {
        ensure!(
            (2..=SITE_NAMES.len()).contains(&o.sites),
            "2 or 3 sites, not {}",
            o.sites
        );
        let dir = tempfile::Builder::new().prefix("lab-sites-").tempdir()?;
        let wan = Netns::new("wan");
        wan.ip(&["link", "add", "wan", "type", "bridge"]);
        wan.ip(&["link", "set", "wan", "up"]);
        let mut sites = Vec::new();
        for name in &SITE_NAMES[..o.sites] {
            let ns = Netns::new(&format!("site{name}"));
            let ip = format!("10.231.0.{}", sites.len() + 1);
            let port = format!("site-{name}");
            wan.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "wan0", "netns", &ns.0,
            ]);
            wan.ip(&["link", "set", &port, "master", "wan", "up"]);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "wan0"]);
            ns.ip(&["link", "set", "wan0", "up"]);
            let site_dir = dir.path().join(format!("site-{name}"));
            std::fs::create_dir_all(&site_dir)?;
            sites.push(Site {
                name: (*name).to_owned(),
                ip,
                server: None,
                agent: None,
                servers: String::new(),
                dir: site_dir,
                ns,
            });
        }
        let urls: Vec<String> = sites
            .iter()
            .map(|s| format!("http://{}:{SERVER_PORT}", s.ip))
            .collect();
        for (i, s) in sites.iter_mut().enumerate() {
            s.servers = local_first(&urls, i).join(",");
        }

        let mut inventory = String::new();
        let mut hosts = Vec::new();
        let mut tokens: Vec<(String, String, String)> = Vec::new();
        for (k, s) in sites.iter().enumerate() {
            inventory.push_str(&format!(
                "[[rack]]\nname = \"{0}\"\nagent = \"agent-{0}\"\n\n",
                s.name
            ));
            for h in 0..o.hosts_per_site {
                inventory.push_str(&format!(
                    "[[host]]\nname = \"{0}{h}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"{0}\"\nmac = \"{1}\"\n\n",
                    s.name,
                    host_mac(k, h)
                ));
                hosts.push((format!("{}{h}", s.name), vec![]));
            }
            let agent = format!("agent-{}", s.name);
            tokens.push((agent.clone(), agent, "agent".into()));
        }
        for u in USERS {
            tokens.push((u.into(), u.into(), "ci".into()));
        }
        tokens.push(("operator".into(), "operator".into(), "operator".into()));
        let tokens: Vec<(&str, &str, &str)> = tokens
            .iter()
            .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
            .collect();
        std::fs::write(dir.path().join("inventory.toml"), inventory)?;
        std::fs::write(dir.path().join("tokens.toml"), tokens_toml(&tokens))?;

        let etcd = EtcdCluster::start_placed(
            sites
                .iter()
                .map(|s| Place {
                    name: s.name.clone(),
                    netns: Some(s.ns.0.clone()),
                    ip: s.ip.clone(),
                    client_port: 2379,
                    peer_port: 2380,
                })
                .collect(),
        )?;
        let mut me = Sites {
            etcd,
            sites,
            hosts,
            wan,
            dir,
        };
        me.start_server(0)?;
        me.wait("site a's lab-server leads", Duration::from_secs(30), |m| {
            m.sites[0].ask("operator").is_ok()
        })
        .map_err(|e| with_logs(e, &me))?;
        for i in 1..me.sites.len() {
            me.start_server(i)?;
        }
        let leader = format!("http://{}:{SERVER_PORT}", me.sites[0].ip);
        me.wait(
            "the other replicas stand by, naming site a's",
            Duration::from_secs(30),
            |m| {
                m.sites[1..]
                    .iter()
                    .all(|s| s.ask("operator").err().as_deref() == Some(leader.as_str()))
            },
        )
        .map_err(|e| with_logs(e, &me))?;
        for i in 0..me.sites.len() {
            me.start_agent(i)?;
        }
        me.wait("every host is reachable", Duration::from_secs(30), |m| {
            m.reachable(0).is_ok_and(|r| r.len() == m.hosts.len())
        })
        .map_err(|e| with_logs(e, &me))?;
        Ok(me)
    }

    /// Start site `i`'s lab-server (again, after [`Sites::kill_server`]
    /// or its exit, as its service manager would).
    pub fn start_server(&mut self, i: usize) -> Result<()> {
        let root = self.dir.path();
        let endpoints = local_first(&self.etcd.urls(), i).join(",");
        let s = &mut self.sites[i];
        if let Some(mut old) = s.server.take() {
            old.kill();
        }
        let listen = format!("{}:{SERVER_PORT}", s.ip);
        let web = format!("{}:{}", s.ip, SERVER_PORT + 1);
        let advertise = format!("http://{listen}");
        let (inv, tok, data) = (
            root.join("inventory.toml"),
            root.join("tokens.toml"),
            s.dir.join("data"),
        );
        let args = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--inventory",
            path(&inv)?,
            "--tokens",
            path(&tok)?,
            "--data-dir",
            path(&data)?,
            "--listen",
            &listen,
            "--web-listen",
            &web,
            "--advertise",
            &advertise,
        ];
        s.server = Some(ServerProcess::spawn_in(
            Some(&s.ns.0),
            &args,
            &s.dir.join("lab-server.log"),
        )?);
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> Result<()> {
        let s = &mut self.sites[i];
        let agent_dir = s.dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let token = format!("agent-{}", s.name);
        s.agent = Some(AgentProcess::spawn_with(&AgentOptions {
            rack: &s.name,
            token: &token,
            ip: &s.ip,
            tftp_port: AGENT_TFTP_PORT,
            http_port: AGENT_HTTP_PORT,
            netns: Some(&s.ns.0),
            ..AgentOptions::new(&agent_dir, &s.servers)
        })?);
        Ok(())
    }

    /// SIGKILL site `i`'s lab-server.
    pub fn kill_server(&mut self, i: usize) {
        if let Some(mut p) = self.sites[i].server.take() {
            p.kill();
        }
    }

    /// Site `i`'s lab-server process, while it runs.
    pub fn server(&mut self, i: usize) -> Option<&mut ServerProcess> {
        self.sites[i].server.as_mut()
    }

    /// Cut site `i` off: its port on the wan side down.
    pub fn cut(&self, i: usize) {
        self.wan.ip(&[
            "link",
            "set",
            &format!("site-{}", self.sites[i].name),
            "down",
        ]);
    }

    /// Join site `i` again.
    pub fn heal(&self, i: usize) {
        self.wan
            .ip(&["link", "set", &format!("site-{}", self.sites[i].name), "up"]);
    }

    /// Whether site `i`'s port on the wan side is down (as the kernel says).
    pub fn is_cut(&self, i: usize) -> bool {
        let (_, out, _) = self.wan.output(&[
            "ip",
            "-o",
            "link",
            "show",
            &format!("site-{}", self.sites[i].name),
        ]);
        !out.contains(",UP")
    }

    /// Which of the sites `among` has the replica that leads: the first
    /// whose replica answers a call. (A leader cut off from etcd answers
    /// reads from its memory until it stops: leave a cut site out.)
    pub fn leader(&self, among: &[usize]) -> Option<usize> {
        among
            .iter()
            .copied()
            .find(|&i| self.sites[i].ask("operator").is_ok())
    }

    /// The hosts reachable, as site `i`'s replica says (it must lead).
    pub fn reachable(&self, i: usize) -> Result<Vec<String>> {
        self.sites[i].block_on(|| async {
            let mut c = self.sites[i].clients("operator").await?;
            let hosts = tokio::time::timeout(
                Duration::from_secs(3),
                c.hosts
                    .list_hosts(lab_proto::v1::ListHostsRequest::default()),
            )
            .await
            .context("ListHosts timed out")??
            .into_inner()
            .hosts;
            Ok(hosts
                .into_iter()
                .filter(|h| h.reachable)
                .map(|h| h.name)
                .collect())
        })
    }

    /// Poll `f` every 50 ms until it holds; an error naming `what` (and
    /// the logs) after `within`.
    pub fn wait(
        &self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&Sites) -> bool,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        while !f(self) {
            if t0.elapsed() > within {
                bail!("{what}: not within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t0.elapsed())
    }

    /// Every log: etcd members, lab-servers, agents.
    pub fn logs(&self) -> String {
        let mut s = self.etcd.logs();
        for site in &self.sites {
            for f in ["lab-server.log", "agent/agent.log"] {
                s.push_str(&format!(
                    "--- site {} {f} ---\n{}\n",
                    site.name,
                    std::fs::read_to_string(site.dir.join(f)).unwrap_or_default()
                ));
            }
        }
        s
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for s in &mut self.sites {
            s.agent.take();
            if let Some(mut p) = s.server.take() {
                p.kill();
            }
        }
        if std::thread::panicking() {
            for s in &self.sites {
                eprintln!(
                    "--- site {} agent log ---\n{}",
                    s.name,
                    std::fs::read_to_string(s.dir.join("agent/agent.log")).unwrap_or_default()
                );
            }
        }
        // (The servers printed their logs as they were dropped.) Then the
        // etcd members (their own Drop, logs on a panic), the sites'
        // namespaces, the wan's, the files.
    }
}

impl Site {
    /// `http://<ip>:7621`, this site's replica.
    pub fn url(&self) -> String {
        format!("http://{}:{SERVER_PORT}", self.ip)
    }

    /// The `lab` CLI run in this site with every replica (its own first):
    /// (exit code, stdout, stderr).
    pub fn lab(&self, token: &str, args: &[&str]) -> (i32, String, String) {
        self.lab_to(&self.servers, token, args)
    }

    /// The `lab` CLI run in this site against `servers`.
    pub fn lab_to(&self, servers: &str, token: &str, args: &[&str]) -> (i32, String, String) {
        let out = self
            .lab_command(servers, token, args)
            .output()
            .expect("run lab");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The command [`Site::lab_to`] runs, to spawn.
    pub fn lab_command(&self, servers: &str, token: &str, args: &[&str]) -> Command {
        let mut argv = vec![bin_path("lab").to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let mut c = self.ns.command(&argv);
        c.env("LAB_SERVER", servers).env("LAB_TOKEN", token);
        c
    }

    /// `curl -fsS --max-time 5 url` in this site: (success, body).
    pub fn curl(&self, url: &str) -> (bool, String) {
        let (ok, out, _) = self.ns.output(&["curl", "-fsS", "--max-time", "5", url]);
        (ok, out)
    }

    /// The URL of `file` on this site's agent's HTTP server.
    pub fn agent_http(&self, file: &str) -> String {
        format!("http://{}:{AGENT_HTTP_PORT}/{file}", self.ip)
    }

    /// The URL of `file` on this site's agent's TFTP server.
    pub fn agent_tftp(&self, file: &str) -> String {
        format!("tftp://{}:{AGENT_TFTP_PORT}/{file}", self.ip)
    }

    /// Run the future `f` makes on a current-thread runtime, on a thread
    /// inside this site's namespace.
    pub fn block_on<T: Send, Fut: std::future::Future<Output = T>>(
        &self,
        f: impl FnOnce() -> Fut + Send,
    ) -> T {
        in_netns(&self.ns.0, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(f())
        })
        .expect("enter the site's namespace")
    }

    /// gRPC clients of this site's replica (call inside [`Site::block_on`]).
    pub async fn clients(&self, token: &str) -> Result<Clients> {
        let addr = format!("{}:{SERVER_PORT}", self.ip).parse()?;
        tokio::time::timeout(Duration::from_secs(3), Clients::connect(addr, Some(token)))
            .await
            .context("connect timed out")?
    }

    /// Ask this site's replica `WhoAmI`: Ok if it serves; else the leader
    /// it names (`lab-leader`), or the error's text.
    pub fn ask(&self, token: &str) -> Result<(), String> {
        self.block_on(|| async {
            let mut c = self.clients(token).await.map_err(|e| format!("{e:#}"))?;
            match tokio::time::timeout(
                Duration::from_secs(3),
                c.admin.who_am_i(lab_proto::v1::WhoAmIRequest::default()),
            )
            .await
            {
                Err(_) => Err("WhoAmI timed out".to_owned()),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err(s
                    .metadata()
                    .get("lab-leader")
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| s.to_string(), str::to_owned)),
            }
        })
    }

    /// Whether this site's agent's log mentions `text`.
    pub fn agent_log_contains(&self, text: &str) -> bool {
        self.agent
            .as_ref()
            .is_some_and(|a| a.log_text_contains(text))
    }

    /// This site's lab-server log.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lab-server.log")).unwrap_or_default()
    }
}

/// `e` with every log of the sites (a start-up that failed).
fn with_logs(e: anyhow::Error, sites: &Sites) -> anyhow::Error {
    anyhow::anyhow!("{e:#}\n{}", sites.logs())
}

/// The MAC of host `h` of site `k`.
pub fn host_mac(k: usize, h: usize) -> String {
    format!("52:54:00:{:02x}:00:{h:02x}", k + 1)
}

/// The file name the agent serves a host's iPXE script under.
pub fn ipxe_script(k: usize, h: usize) -> String {
    format!("hosts/{}.ipxe", host_mac(k, h).replace(':', "-"))
}

/// `urls` with the `i`th first.
fn local_first(urls: &[String], i: usize) -> Vec<String> {
    let mut v = vec![urls[i].clone()];
    v.extend(
        urls.iter()
            .enumerate()
            .filter(|&(k, _)| k != i)
            .map(|(_, u)| u.clone()),
    );
    v
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}
