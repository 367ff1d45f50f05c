//! The real `lab-agent` binary as a child process of a test: a config on
//! loopback (TFTP and HTTP on port 0, the repository's pxe-assets), started
//! and waited for until it prints where it listens, killed on drop.

use crate::bin_path;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How to start an agent: [`AgentOptions::new`] is rack `r1`, token
/// `agent-r1`, TFTP and HTTP on 127.0.0.1 port 0, in this namespace.
pub struct AgentOptions<'a> {
    /// Its files (agent.toml, agent.log, agent-data/).
    pub dir: &'a Path,
    /// agent.toml's `server`: one URL or several comma-separated.
    pub server: &'a str,
    pub rack: &'a str,
    pub token: &'a str,
    /// The address TFTP and HTTP listen on.
    pub ip: &'a str,
    pub tftp_port: u16,
    pub http_port: u16,
    /// The network namespace it runs in (`ip netns exec`); None: this one.
    pub netns: Option<&'a str>,
    /// Appended to agent.toml's top level.
    pub extra: &'a str,
}

impl<'a> AgentOptions<'a> {
    pub fn new(dir: &'a Path, server: &'a str) -> Self {
        AgentOptions {
            dir,
            server,
            rack: "r1",
            token: "agent-r1",
            ip: "127.0.0.1",
            tftp_port: 0,
            http_port: 0,
            netns: None,
            extra: "",
        }
    }
}

/// A running `lab-agent` process.
pub struct AgentProcess {
    pub child: Child,
    /// Its TFTP and HTTP addresses.
    pub tftp: String,
    pub http: String,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
    /// Its data directory (console logs, reports).
    pub data_dir: PathBuf,
}

impl AgentProcess {
    /// Spawns the agent of rack `r1` against the server at `server`, token
    /// `agent-r1`, files under `dir`; `extra` is appended to agent.toml.
    pub fn spawn(dir: &Path, server: SocketAddr, extra: &str) -> Result<AgentProcess> {
        Self::spawn_to(dir, &format!("http://{server}"), extra)
    }

    /// [`AgentProcess::spawn`] with `server` as agent.toml says it: a URL,
    /// or several comma-separated (lab-server replicas).
    pub fn spawn_to(dir: &Path, server: &str, extra: &str) -> Result<AgentProcess> {
        Self::spawn_with(&AgentOptions {
            extra,
            ..AgentOptions::new(dir, server)
        })
    }

    /// The agent as `o` says: its rack, token, addresses, namespace.
    pub fn spawn_with(o: &AgentOptions) -> Result<AgentProcess> {
        let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-assets");
        let dir = o.dir;
        let data_dir = dir.join("agent-data");
        let config = dir.join("agent.toml");
        let (ip, tftp, http) = (o.ip, o.tftp_port, o.http_port);
        std::fs::write(
            &config,
            format!(
                "rack = \"{}\"\nserver = \"{}\"\ndata_dir = \"{}\"\n{}\n[tftp]\nlisten = \"{ip}:{tftp}\"\n[http]\nlisten = \"{ip}:{http}\"\nurl = \"http://{ip}:{http}\"\n[assets]\nroot = \"{assets}\"\n",
                o.rack,
                o.server,
                data_dir.display(),
                o.extra,
            ),
        )?;
        let log = dir.join("agent.log");
        let mut command = match o.netns {
            None => Command::new(bin_path("lab-agent")),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin_path("lab-agent"));
                c
            }
        };
        let mut child = command
            .args(["--config", config.to_str().unwrap(), "--token", o.token])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()
            .context("lab-agent is built (cargo build --workspace)")?;
        let stdout = child.stdout.take().unwrap();
        let mut agent = AgentProcess {
            child,
            tftp: String::new(),
            http: String::new(),
            log,
            data_dir,
        };
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            if let Some(a) = line.strip_prefix("lab-agent tftp listening on ") {
                agent.tftp = a.to_owned();
            } else if let Some(a) = line.strip_prefix("lab-agent http listening on ") {
                agent.http = a.to_owned();
            } else if line.starts_with("lab-agent running") {
                break;
            }
        }
        if agent.tftp.is_empty() || agent.http.is_empty() {
            bail!(
                "agent did not start: {}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            );
        }
        Ok(agent)
    }

    /// Whether the agent's log mentions `text`.
    pub fn log_text_contains(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
