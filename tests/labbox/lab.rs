//! The whole lab in a box: a [`LabBox`] (namespace, BMCs, VMs) with the
//! real `lab-server` (embedded store in the box's log directory, inventory
//! generated for the box's hosts) and the real `lab-agent` (DHCP/TFTP/HTTP
//! on the box's bridge, IPMI to the box's BMCs, consoles over SOL) running
//! inside it. Used by the end-to-end test, the boot benchmark and the demo.

use super::bmc::{self, LabBox};
use super::{LogDir, Netns, Proc, repo_root};
use std::path::Path;
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's configuration for a box: its bridge, the artifacts cache
/// (with GRUB for aarch64 UEFI hosts), the xen profile's ready text and
/// end-of-lease debug keys, and the install-to-disk profile `xen-install`.
pub fn agent_toml(server: &str, artifacts: &Path, data: &Path, xen_timeout: &str) -> String {
    let assets = repo_root().join("pxe-assets");
    let ip = bmc::SERVER_IP;
    format!(
        r#"rack = "r1"
server = "http://{server}"
default_profile = "local-disk"
data_dir = "{data}"
bmc_probe_interval = "2s"

[dhcp]
mode = "authoritative"
interface = "{br}"
server_ip = "{ip}"
subnet_mask = "255.255.255.0"
router = "{ip}"
lease_secs = 600
script_url = "http://{{server_ip}}:8080/hosts/{{mac}}.ipxe"
# aarch64 UEFI hosts (option 93 = 11) get GRUB; x86 hosts are unaffected.
boot_efi_arm64 = "artifacts/grubnetaa64-lab.efi"

[tftp]
listen = "{ip}:69"

[http]
listen = "{ip}:8080"
url = "http://{ip}:8080"

[assets]
root = "{assets}"
artifacts = "{artifacts}"

# ipmi_sim offers suite 3 only and never answers the suite probe.
[ipmi]
cipher_suites = [3]

[profiles.xen]
ready = "LAB-DOM0-OK"
fail = ["LAB-DOM0-FAIL", "LAB-BOOT-FAILED"]
timeout = "{xen_timeout}"
xen_debug_keys = "q"

# One facts line, then the host powers itself off. A NIC without PXE
# (fault nic) ends in SeaBIOS's "No bootable device".
[profiles.health-check]
ready = "LAB-HEALTH-OK"
fail = ["LAB-BOOT-FAILED", "No bootable device", "Kernel panic"]
timeout = "180s"

# Install to disk (x86 hosts: each has a qcow2 disk), then boot it.
[profiles.xen-install]
install = true
ready = "LAB-DISK-READY"
fail = ["LAB-DISK-FAILED", "LAB-BOOT-FAILED"]
timeout = "300s"
install_timeout = "10m"
install_stage_timeout = "3m"
poweroff_timeout = "60s"
xen_debug_keys = "q"
"#,
        data = data.display(),
        assets = assets.display(),
        artifacts = artifacts.display(),
        br = bmc::BRIDGE,
    )
}

/// Real tokens for a lab with authentication: a tokens file made with
/// `lab-server token new` in the log directory, with the agent of rack
/// `r1` (principal `agent-r1`), an ordinary user (`alice`, role
/// `developer`) and an operator (`ops`).
#[derive(Debug, Clone)]
pub struct Tokens {
    pub file: std::path::PathBuf,
    pub agent: String,
    pub user: String,
    pub operator: String,
}

impl Tokens {
    /// Makes the three tokens in `<logs>/tokens.toml`.
    pub fn new(logs: &LogDir) -> Tokens {
        let file = logs.join("tokens.toml");
        let token = |principal: &str, role: &str| -> String {
            let out = std::process::Command::new(lab_tests::bin_path("lab-server"))
                .args(["token", "new", "--principal", principal, "--role", role])
                .arg("--tokens-file")
                .arg(&file)
                .output()
                .expect("run lab-server token new");
            assert!(
                out.status.success(),
                "lab-server token new --principal {principal}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        Tokens {
            agent: token("agent-r1", "agent"),
            user: token("alice", "developer"),
            operator: token("ops", "operator"),
            file,
        }
    }
}

/// Starts the real lab-server (development mode, store under `logs`) with
/// `inventory` and `env`, then the real lab-agent with the configuration
/// `agent_toml(server address)`, both inside `ns`; waits until the agent has
/// attached. Returns (server, agent, server address, web port address).
pub fn start_server_and_agent(
    ns: &Netns,
    logs: &LogDir,
    inventory: &str,
    env: &[(&str, &str)],
    agent_toml: impl FnOnce(&str) -> String,
) -> (Proc, Proc, String, String) {
    start_server_and_agent_with(ns, logs, inventory, env, None, agent_toml)
}

/// [`start_server_and_agent`], with authentication by `tokens` instead of
/// development mode when given.
pub fn start_server_and_agent_with(
    ns: &Netns,
    logs: &LogDir,
    inventory: &str,
    env: &[(&str, &str)],
    tokens: Option<&Tokens>,
    agent_toml: impl FnOnce(&str) -> String,
) -> (Proc, Proc, String, String) {
    let inv = logs.join("inventory.toml");
    std::fs::write(&inv, inventory).expect("write inventory");
    let mut cmd = ns.command(lab_tests::bin_path("lab-server"));
    match tokens {
        Some(t) => cmd.arg("--tokens").arg(&t.file),
        None => cmd.arg("--dev-insecure-no-auth"),
    };
    cmd.args(["--listen", "127.0.0.1:0"])
        .args(["--web-listen", "127.0.0.1:0"])
        .arg("--inventory")
        .arg(&inv)
        .arg("--data-dir")
        .arg(logs.join("server-data"))
        .env("LAB_LOG", "info")
        .envs(env.iter().copied());
    let mut server = Proc::spawn("lab-server", cmd, logs);
    let line = server.expect_line("its address", START_TIMEOUT, |l| {
        l.starts_with("lab-server listening on ")
    });
    let addr = line["lab-server listening on ".len()..].trim().to_owned();
    let line = server.expect_line("its web address", START_TIMEOUT, |l| {
        l.starts_with("lab-server web listening on ")
    });
    let web = line["lab-server web listening on ".len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let config = logs.join("agent.toml");
    std::fs::write(&config, agent_toml(&addr)).expect("write agent.toml");
    let mut cmd = ns.command(lab_tests::bin_path("lab-agent"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--token")
        .arg(tokens.map_or("agent-r1", |t| t.agent.as_str()))
        .env("LAB_LOG", "info,lab_agent=debug");
    let mut agent = Proc::spawn("lab-agent", cmd, logs);
    agent.expect_line("its attach to lab-server", START_TIMEOUT, |l| {
        l.starts_with("lab-agent attached to ")
    });
    (server, agent, addr, web)
}

/// lab-server and lab-agent running in a box. Drop order: agent, server,
/// then the box (VMs, BMCs, namespace, logs).
pub struct RunningLab {
    pub agent: Proc,
    pub server: Proc,
    /// lab-server's address (inside the namespace: 127.0.0.1:port).
    pub addr: String,
    /// lab-server's web port (dashboard, /metrics), inside the namespace.
    pub web: String,
    /// The tokens, for a lab started with authentication
    /// ([`Self::start_authenticated`]); else development mode.
    pub tokens: Option<Tokens>,
    pub lab: LabBox,
}

impl RunningLab {
    /// Starts a box of `hosts` x86 hosts with the lab in it, and waits
    /// until the agent has attached.
    pub fn start(prefix: &str, hosts: usize, artifacts: &Path, xen_timeout: &str) -> RunningLab {
        Self::start_in(LabBox::start(prefix, hosts), artifacts, xen_timeout)
    }

    /// Starts lab-server and lab-agent in a box (any mix of hosts), and
    /// waits until the agent has attached.
    pub fn start_in(lab: LabBox, artifacts: &Path, xen_timeout: &str) -> RunningLab {
        Self::start_in_with(lab, artifacts, xen_timeout, false)
    }

    /// Like [`Self::start`], with authentication: real tokens ([`Tokens`])
    /// instead of development mode; `lab` commands run as the ordinary
    /// user `alice` ([`Self::lab_command_as`] for the operator).
    pub fn start_authenticated(
        prefix: &str,
        hosts: usize,
        artifacts: &Path,
        xen_timeout: &str,
    ) -> RunningLab {
        Self::start_in_with(LabBox::start(prefix, hosts), artifacts, xen_timeout, true)
    }

    fn start_in_with(lab: LabBox, artifacts: &Path, xen_timeout: &str, auth: bool) -> RunningLab {
        let tokens = auth.then(|| Tokens::new(lab.logs()));
        let (server, agent, addr, web) = start_server_and_agent_with(
            lab.netns(),
            lab.logs(),
            &lab.inventory_toml("r1"),
            &[(bmc::PASSWORD_ENV, lab.password())],
            tokens.as_ref(),
            |addr| agent_toml(addr, artifacts, &lab.logs().join("agent-data"), xen_timeout),
        );
        RunningLab {
            agent,
            server,
            addr,
            web,
            tokens,
            lab,
        }
    }

    /// `lab --json ARGS`: (exit code, stdout as JSON or Null, stderr).
    pub fn lab_json(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let out = self
            .lab_command()
            .arg("--json")
            .args(args)
            .output()
            .expect("run lab");
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `lab --json ARGS`, which must succeed.
    pub fn lab_ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, json, err) = self.lab_json(args);
        assert_eq!(code, 0, "lab {args:?} failed: {err}");
        json
    }

    /// `lab console --lease ID` (plain output), which must succeed.
    pub fn console_log(&self, lease: &str) -> String {
        let out = self
            .lab_command()
            .args(["console", "--lease", lease])
            .output()
            .expect("run lab console");
        assert!(
            out.status.success(),
            "lab console --lease failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to a minute) until `lab host show HOST` satisfies `f`.
    pub fn wait_host(&self, host: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
        super::eventually(what, Duration::from_secs(60), || {
            f(&self.lab_ok(&["host", "show", host])).then_some(())
        });
    }

    /// After a lease on `host` ended: the host comes back available, its
    /// BMC says off (ipmitool) and its VM is gone.
    pub fn assert_reclaimed(&self, host: &str) {
        self.wait_host(host, &format!("{host} available after its reclaim"), |v| {
            v["state"] == "available"
        });
        let power = self.ipmi_power(host);
        assert!(
            power.contains("off"),
            "the reclaim powers {host} off (ipmitool says {power:?})"
        );
        assert!(
            !self.lab.vm_running(self.lab.host(host)),
            "{host}'s VM still runs after the reclaim"
        );
    }

    /// `ipmitool chassis power status` of a host's BMC (the reference).
    pub fn ipmi_power(&self, host: &str) -> String {
        self.lab
            .ipmitool(self.lab.host(host), &["chassis", "power", "status"])
            .unwrap_or_else(|e| panic!("ipmitool power status of {host}: {e}"))
    }

    /// A `lab` command inside the namespace, pointed at the server: as
    /// `ci` (an operator) in development mode, as the ordinary user
    /// `alice` with authentication.
    pub fn lab_command(&self) -> std::process::Command {
        let token = self.tokens.as_ref().map_or("ci", |t| t.user.as_str());
        self.lab_command_as(token)
    }

    /// A `lab` command inside the namespace with this token.
    pub fn lab_command_as(&self, token: &str) -> std::process::Command {
        let mut cmd = self.lab.netns().command(lab_tests::bin_path("lab"));
        cmd.env("LAB_SERVER", format!("http://{}", self.addr))
            .env("LAB_TOKEN", token);
        cmd
    }
}
