//! A throwaway etcd cluster for the tests: 1 or 3 members of Debian's
//! `etcd-server` (3.4) on loopback, random free ports, data in a tempdir,
//! each member in its own process group, SIGKILLed on drop. Members can
//! also be placed in network namespaces, one per site ([`EtcdCluster::start_placed`],
//! used by [`crate::sites`]). Readiness and
//! the leader are read from etcd's HTTP gateway (`/health`,
//! `/v3/maintenance/status`) by polling, never a fixed sleep.
//!
//! Members run with the settings docs/multi-site.md asks operators for:
//! `--max-txn-ops 16384` and `--max-request-bytes 10485760` (a batch is one
//! transaction), heartbeat 100 ms and election timeout 1 s (the defaults).

use crate::crash_loop::free_port;
use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// etcd's binary, or a panic naming the package that has it.
pub fn require_etcd() -> PathBuf {
    let bin = PathBuf::from(std::env::var_os("LAB_ETCD").unwrap_or_else(|| "etcd".into()));
    match Command::new(&bin).arg("--version").output() {
        Ok(out) if out.status.success() => bin,
        _ => panic!(
            "{} is needed for the etcd tests: apt-get install etcd-server (scripts/deps.sh)",
            bin.display()
        ),
    }
}

/// Where a member runs: its name, the namespace it runs in (None: this
/// one), the address it listens on and its ports.
#[derive(Debug, Clone)]
pub struct Place {
    pub name: String,
    pub netns: Option<String>,
    pub ip: String,
    pub client_port: u16,
    pub peer_port: u16,
}

impl Place {
    /// `http://ip:client_port`.
    pub fn client_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }
}

struct Member {
    place: Place,
    child: Option<Child>,
}

/// A running cluster; dropped, every member is killed.
pub struct EtcdCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Start `n` members on loopback and wait until they have a leader.
    pub fn start(n: usize) -> Result<EtcdCluster> {
        let seed = u64::from(std::process::id()) << 8;
        let mut used = Vec::new();
        let mut places = Vec::new();
        for i in 0..n {
            let mut port = |k: u64| -> Result<u16> {
                for attempt in 0..50 {
                    let p = free_port(seed ^ (k * 7919 + attempt) ^ nanos())?;
                    if !used.contains(&p) {
                        used.push(p);
                        return Ok(p);
                    }
                }
                bail!("no free port")
            };
            places.push(Place {
                name: format!("m{i}"),
                netns: None,
                ip: "127.0.0.1".to_owned(),
                client_port: port(2 * i as u64)?,
                peer_port: port(2 * i as u64 + 1)?,
            });
        }
        Self::start_placed(places)
    }

    /// Start one member at each of `places` and wait until they have a
    /// leader.
    pub fn start_placed(places: Vec<Place>) -> Result<EtcdCluster> {
        let bin = require_etcd();
        let dir = tempfile::Builder::new().prefix("lab-etcd-").tempdir()?;
        let n = places.len();
        let mut cluster = EtcdCluster {
            bin,
            token: format!("lab-test-{}-{}", std::process::id(), nanos()),
            dir,
            members: places
                .into_iter()
                .map(|place| Member { place, child: None })
                .collect(),
        };
        for i in 0..n {
            cluster.spawn(i, true)?;
        }
        cluster.wait_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, new: bool) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.place.name, m.place.peer_url()))
            .collect();
        let m = &self.members[i].place;
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))?;
        let (client, peer) = (m.client_url(), m.peer_url());
        let mut command = match &m.netns {
            None => Command::new(&self.bin),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
        };
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args([
                "--initial-cluster-state",
                if new { "new" } else { "existing" },
            ])
            .args(["--max-txn-ops", "16384"])
            .args(["--max-request-bytes", "10485760"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Until every running member reports healthy (it sees a leader).
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let healthy = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                http_post(&m.place, "GET", "/health", "")
                    .is_ok_and(|b| b.contains("\"health\":\"true\""))
            });
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client URLs, comma-separated (`--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.urls().join(",")
    }

    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.place.client_url()).collect()
    }

    /// Whether member `i` runs (not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Index of the member that leads now (asked of the running members).
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(body) = http_post(&m.place, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            let leader = v["leader"].as_str().unwrap_or_default().to_owned();
            if leader.is_empty() || leader == "0" {
                continue;
            }
            // Which member has that id: ask each its own.
            for (i, other) in self.members.iter().enumerate() {
                if other.child.is_none() {
                    continue;
                }
                if let Ok(b) = http_post(&other.place, "POST", "/v3/maintenance/status", "{}")
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&b)
                    && v["header"]["member_id"].as_str() == Some(leader.as_str())
                {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Revoke the etcd lease the key `key` is attached to (what happens to
    /// a leader cut off from etcd for a TTL, at once). Returns the lease id.
    pub fn revoke_lease_of(&self, key: &str) -> Result<String> {
        let place = &self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .context("no member runs")?
            .place;
        let body = http_post(
            place,
            "POST",
            "/v3/kv/range",
            &format!("{{\"key\":\"{}\"}}", base64(key.as_bytes())),
        )?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let lease = v["kvs"][0]["lease"]
            .as_str()
            .with_context(|| format!("{key} has no lease: {body}"))?
            .to_owned();
        http_post(
            place,
            "POST",
            "/v3/lease/revoke",
            &format!("{{\"ID\":\"{lease}\"}}"),
        )?;
        Ok(lease)
    }

    /// SIGKILL member `i` (its process group).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Start a killed member again on its data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].child.is_none() {
            self.spawn(i, false)?;
        }
        Ok(())
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for m in &self.members {
            let p = self.dir.path().join(format!("{}.log", m.place.name));
            s.push_str(&format!(
                "--- {} ---\n{}\n",
                m.place.name,
                std::fs::read_to_string(p).unwrap_or_default()
            ));
        }
        s
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// A one-shot HTTP/1.0 request (no chunked answer) to the member's client
/// URL, from inside its namespace; the body.
fn http_post(place: &Place, method: &str, path: &str, body: &str) -> Result<String> {
    let request = || -> Result<String> {
        let addr: std::net::SocketAddr = format!("{}:{}", place.ip, place.client_port).parse()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            place.ip,
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    };
    match &place.netns {
        None => request(),
        Some(ns) => crate::netns::in_netns(ns, request)?,
    }
}

/// Standard base64 (the HTTP gateway's encoding of bytes).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_as_the_gateway_wants() {
        assert_eq!(super::base64(b"/lab/e"), "L2xhYi9l");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"a"), "YQ==");
    }
}
