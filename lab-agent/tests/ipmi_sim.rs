//! Process tests of the RMCP+ client against OpenIPMI's `ipmi_sim` on
//! loopback, with `ipmitool -I lanplus -C 3` beside it as the reference
//! implementation. Needs the Debian packages `openipmi` and `ipmitool`;
//! without them these tests fail and say so.

use std::time::{Duration, Instant};

use lab_agent::ipmi::{
    BootDevice, CipherSuite, ConnectOptions, IpmiClient, IpmiError, PowerAction, Secret,
};

mod common;
use common::{PASSWORD, Sim, USER};

impl Sim {
    /// A ready `ipmi_sim` without SOL.
    fn start() -> Sim {
        let mut sim = Sim::spawn("");
        sim.wait_ready(Duration::from_secs(15));
        sim
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
