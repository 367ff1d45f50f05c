//! Process tests of the RMCP+ client against OpenIPMI's `ipmi_sim` on
//! loopback, with `ipmitool -I lanplus -C 3` beside it as the reference
//! implementation. Needs the Debian packages `openipmi` and `ipmitool`;
//! without them these tests fail and say so.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab_agent::ipmi::{
    BootDevice, CipherSuite, ConnectOptions, IpmiClient, IpmiError, PowerAction, Secret,
};

const USER: &str = "admin";
const PASSWORD: &str = "labpass";

fn fixtures() -> PathBuf {
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

/// One `ipmi_sim` on a free loopback port, killed on drop. Its output and
/// the chassis log stay in `dir` (printed on failure).
struct Sim {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sim {
    fn start() -> Sim {
        require("ipmi_sim", "openipmi");
        require("ipmitool", "ipmitool");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind probe socket");
            s.local_addr().expect("local addr").port()
        };
        let script = dir.path().join("chassis.sh");
        std::fs::copy(fixtures().join("chassis.sh"), &script).expect("copy chassis.sh");
        std::fs::copy(fixtures().join("bmc.emu"), dir.path().join("bmc.emu"))
            .expect("copy bmc.emu");
        let conf = std::fs::read_to_string(fixtures().join("lan.conf.in"))
            .expect("read lan.conf.in")
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", &dir.path().display().to_string());
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
        let mut sim = Sim { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = sim.child.try_wait() {
                panic!("ipmi_sim exited early ({st}):\n{}", sim.logs());
            }
            if sim.ipmitool_ok(&["chassis", "power", "status"]).is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim never answered:\n{}",
                sim.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sim
    }

    fn endpoint(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "--- ipmi_sim.log\n{}--- chassis.log\n{}",
            read("ipmi_sim.log"),
            read("chassis.log")
        )
    }

    fn ipmitool_ok(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ipmitool")
            .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-P", PASSWORD, "-N", "1", "-R", "2"])
            .args(args)
            .output()
            .expect("run ipmitool");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run ipmitool; panic with the logs if it fails.
    fn ipmitool(&self, args: &[&str]) -> String {
        self.ipmitool_ok(args)
            .unwrap_or_else(|| panic!("ipmitool {args:?} failed\n{}", self.logs()))
    }

    fn chassis_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chassis.log")).unwrap_or_default()
    }

    async fn connect(&self) -> IpmiClient {
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

/// Wait (polling, bounded) until ipmitool reports the wanted power state.
fn wait_reference_power(sim: &Sim, on: bool) {
    let want = if on {
        "Chassis Power is on"
    } else {
        "Chassis Power is off"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = sim.ipmitool(&["chassis", "power", "status"]);
        if s.contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ipmitool never saw `{want}`, last: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_falls_back_to_suite_3_and_closes() {
    let sim = Sim::start();
    let started = Instant::now();
    let client = sim.connect().await;
    // ipmi_sim ignores Get Channel Cipher Suites and rejects suite 17.
    assert_eq!(client.cipher_suite(), CipherSuite::Suite3);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "handshake stalled: {:?}",
        started.elapsed()
    );
    client.chassis_status().await.expect("status in session");
    client.close().await.expect("close session");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_reported_as_such() {
    let sim = Sim::start();
    let err = IpmiClient::connect(
        sim.endpoint(),
        USER,
        Secret::from_bytes(b"not-the-password"),
        ConnectOptions {
            cipher_suites: vec![CipherSuite::Suite3],
            timeout: Duration::from_millis(300),
            retries: 1,
            ..ConnectOptions::default()
        },
    )
    .await
    .expect_err("wrong password must fail");
    // ipmi_sim answers RAKP 2 with a code made from the real password,
    // which does not verify against ours.
    assert!(matches!(err, IpmiError::BadRakp2 { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn power_on_off_cycle_reset_soft_against_ipmitool() {
    let sim = Sim::start();
    let client = sim.connect().await;

    assert!(!client.chassis_status().await.expect("status").power_on);

    client.power(PowerAction::On).await.expect("power on");
    wait_reference_power(&sim, true);
    assert!(client.chassis_status().await.expect("status").power_on);

    // The reference switches it off; we see it.
    sim.ipmitool(&["chassis", "power", "off"]);
    assert!(!client.chassis_status().await.expect("status").power_on);

    client.power(PowerAction::On).await.expect("power on again");
    wait_reference_power(&sim, true);
    client.power(PowerAction::Off).await.expect("power off");
    wait_reference_power(&sim, false);

    client.power(PowerAction::On).await.expect("power on");
    client.power(PowerAction::Cycle).await.expect("power cycle");
    // A cycle ends powered on (ipmi_sim powers back on after a delay).
    wait_reference_power(&sim, true);

    client
        .power(PowerAction::HardReset)
        .await
        .expect("hard reset");
    client
        .power(PowerAction::SoftShutdown)
        .await
        .expect("soft shutdown");
    wait_reference_power(&sim, false);

    let log = sim.chassis_log();
    for line in [
        "set power 1",
        "set power 0",
        "set reset 1",
        "set shutdown 1",
    ] {
        assert!(log.contains(line), "chassis.log lacks `{line}`:\n{log}");
    }
    client.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn boot_device_round_trips_with_ipmitool() {
    let sim = Sim::start();
    let client = sim.connect().await;

    // Ours writes, the reference reads.
    client
        .set_boot_device(BootDevice::Pxe, false, false)
        .await
        .expect("set pxe");
    let s = sim.ipmitool(&["chassis", "bootparam", "get", "5"]);
    assert!(s.contains("Force PXE"), "{s}");
    assert!(sim.chassis_log().contains("set boot pxe"));

    client
        .set_boot_device(BootDevice::Disk, true, true)
        .await
        .expect("set disk");
    let s = sim.ipmitool(&["chassis", "bootparam", "get", "5"]);
    assert!(s.contains("Hard-Drive"), "{s}");

    // The reference writes, ours reads.
    sim.ipmitool(&["chassis", "bootdev", "bios"]);
    let flags = client.get_boot_device().await.expect("get boot");
    assert_eq!(flags.device, BootDevice::BiosSetup, "{flags:?}");

    sim.ipmitool(&["chassis", "bootdev", "pxe"]);
    let flags = client.get_boot_device().await.expect("get boot");
    assert_eq!(flags.device, BootDevice::Pxe, "{flags:?}");

    // Ours writes, ours reads.
    client
        .set_boot_device(BootDevice::BiosSetup, false, false)
        .await
        .expect("set bios");
    assert_eq!(
        client.get_boot_device().await.expect("get").device,
        BootDevice::BiosSetup
    );
    client.close().await.expect("close");
}

/// The `PowerControl` implementation over IPMI drives the same real peer,
/// and a BMC that is gone is reported unreachable.
#[tokio::test(flavor = "multi_thread")]
async fn power_control_trait_over_ipmi() {
    use lab_agent::power::{IpmiPower, PowerControl, PowerError};
    let sim = Sim::start();
    let bmc = IpmiPower::new(
        sim.endpoint(),
        USER.into(),
        Secret::from_bytes(PASSWORD.as_bytes()),
        ConnectOptions::default(),
    );
    bmc.set_boot_device(lab_agent::ipmi::BootDevice::Pxe, false, false)
        .await
        .expect("bootdev");
    bmc.set_power(PowerAction::On).await.expect("on");
    wait_reference_power(&sim, true);
    assert!(bmc.is_on().await.expect("status"));
    bmc.set_power(PowerAction::Off).await.expect("off");
    wait_reference_power(&sim, false);
    let endpoint = sim.endpoint();
    drop(sim);
    let gone = IpmiPower::new(
        endpoint,
        USER.into(),
        Secret::from_bytes(PASSWORD.as_bytes()),
        ConnectOptions::default(),
    );
    let e = gone.is_on().await.unwrap_err();
    assert!(
        matches!(e, PowerError::Unreachable { .. }),
        "{}",
        lab_agent::error_chain(&e)
    );
}
