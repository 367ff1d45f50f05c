//! What the `ipmi_sim` process tests share: one OpenIPMI `ipmi_sim` on a
//! free loopback port (from `tests/fixtures/ipmi/`), `ipmitool -I lanplus
//! -C 3` beside it as the reference, killed on drop with its logs printed
//! on failure. Included by `ipmi_sim.rs` and `ipmi_sol.rs` as `mod common;`.

#![allow(dead_code)] // each test file uses a different part

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab_agent::ipmi::{ConnectOptions, IpmiClient, Secret};

pub const USER: &str = "admin";
pub const PASSWORD: &str = "labpass";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ipmi")
}

fn require(bin: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{bin}` not found: install the Debian package `{package}` (apt-get install -y openipmi ipmitool)"
    );
}

/// One running `ipmi_sim`. Its output and the chassis log stay in `dir`.
pub struct Sim {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Sim {
    /// Starts `ipmi_sim` with `extra_conf` appended to its LAN
    /// configuration (e.g. a `sol` line); does not wait for it.
    pub fn spawn(extra_conf: &str) -> Sim {
        require("ipmi_sim", "openipmi");
        require("ipmitool", "ipmitool");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
            s.local_addr().expect("local addr").port()
        };
        std::fs::copy(fixtures().join("chassis.sh"), dir.path().join("chassis.sh"))
            .expect("copy chassis.sh");
        std::fs::copy(fixtures().join("bmc.emu"), dir.path().join("bmc.emu"))
            .expect("copy bmc.emu");
        let mut conf = std::fs::read_to_string(fixtures().join("lan.conf.in"))
            .expect("read lan.conf.in")
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", &dir.path().display().to_string());
        conf.push_str(extra_conf);
        std::fs::write(dir.path().join("lan.conf"), conf).expect("write lan.conf");
        std::fs::create_dir(dir.path().join("state")).expect("state dir");
        let log = std::fs::File::create(dir.path().join("ipmi_sim.log")).expect("log file");
        let child = Command::new("ipmi_sim")
            .current_dir(dir.path())
            .args(["-c", "lan.conf", "-f", "bmc.emu", "-n", "-s", "state"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn ipmi_sim");
        Sim { child, dir, port }
    }

    /// Waits until ipmitool gets an answer (panics with the logs if
    /// `ipmi_sim` exits or stays silent for `timeout`).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("ipmi_sim exited early ({st}):\n{}", self.logs());
            }
            if self.ipmitool_ok(&["chassis", "power", "status"]).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim never answered:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "--- ipmi_sim.log\n{}--- chassis.log\n{}",
            read("ipmi_sim.log"),
            read("chassis.log")
        )
    }

    pub fn chassis_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chassis.log")).unwrap_or_default()
    }

    /// `ipmitool` aimed at this BMC, arguments still to add.
    pub fn ipmitool_cmd(&self) -> Command {
        let mut c = Command::new("ipmitool");
        c.args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-P", PASSWORD, "-N", "1", "-R", "2"]);
        c
    }

    pub fn ipmitool_ok(&self, args: &[&str]) -> Option<String> {
        let out = self
            .ipmitool_cmd()
            .args(args)
            .output()
            .expect("run ipmitool");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs ipmitool; panics with the logs if it fails.
    pub fn ipmitool(&self, args: &[&str]) -> String {
        self.ipmitool_ok(args)
            .unwrap_or_else(|| panic!("ipmitool {args:?} failed\n{}", self.logs()))
    }

    /// A session of ours with the default options.
    pub async fn connect(&self) -> IpmiClient {
        IpmiClient::connect(
            self.endpoint(),
            USER,
            Secret::from_bytes(PASSWORD.as_bytes()),
            ConnectOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("connect: {}\n{}", lab_agent::error_chain(&e), self.logs()))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
