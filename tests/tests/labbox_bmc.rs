//! The lab-in-a-box BMC harness itself (tests/labbox/bmc.rs), driven with
//! the reference client `ipmitool` against the simulated BMCs (`ipmi_sim`):
//! `chassis bootdev pxe` + `power on` start the host's QEMU VM, whose
//! firmware banner (SeaBIOS, iPXE) arrives in the console file through the
//! serial relay; `power status` follows; a reset keeps the VM, unless the
//! boot device changed (`bootdev disk`: the VM restarts and SeaBIOS boots
//! the host's disk, without iPXE); `power off` stops the VM; and teardown
//! leaves no namespace, process or file (disks included) behind.
//!
//! No DHCP server runs: the VM's iPXE just fails to PXE-boot, which is fine
//! here. Needs root, ipmi_sim + ipmitool (openipmi, ipmitool), QEMU with its
//! iPXE ROMs, python3; a missing prerequisite fails the test, naming the
//! install command. ~5 s. See tests/labbox/README.md.

#[path = "../labbox/mod.rs"]
mod labbox;

use labbox::bmc::{self, BoxHost, LabBox};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

fn power_status(lab: &LabBox, host: &BoxHost) -> String {
    lab.ipmitool(host, &["chassis", "power", "status"])
        .expect("power status")
        .trim()
        .to_owned()
}

#[test]
fn ipmitool_powers_a_vm_on_and_off_and_its_console_is_captured() {
    let lab = LabBox::start("lab-bmc", 2);
    let (h1, h2) = (&lab.hosts()[0], &lab.hosts()[1]);
    eprintln!(
        "labbox_bmc: namespace {}, files in {}",
        lab.netns().name(),
        lab.logs().path().display()
    );
    assert_eq!(power_status(&lab, h1), "Chassis Power is off");
    assert!(!lab.vm_running(h1));

    // Boot device, then power on: the VM appears and its console is captured.
    let out = lab
        .ipmitool(h1, &["chassis", "bootdev", "pxe"])
        .expect("bootdev pxe");
    assert!(
        out.contains("Set Boot Device to pxe"),
        "bootdev pxe not accepted: {out:?}"
    );
    let boot_flags = lab
        .ipmitool(h1, &["chassis", "bootparam", "get", "5"])
        .expect("bootparam get 5");
    assert!(
        boot_flags.contains("PXE"),
        "the BMC does not report PXE as the boot device: {boot_flags}"
    );
    let t = Instant::now();
    lab.ipmitool(h1, &["chassis", "power", "on"])
        .expect("power on");
    assert!(
        lab.wait_vm(h1, true, Duration::from_secs(10)),
        "no QEMU for h1 after power on; chassis log:\n{}",
        std::fs::read_to_string(lab.logs().join("h1-chassis.log")).unwrap_or_default()
    );
    let vm_pid = lab.vm_pid(h1).expect("running");
    assert_eq!(power_status(&lab, h1), "Chassis Power is on");
    // The iPXE ROM ran: only `bootdev pxe` gives the NIC its ROM.
    let hit = lab
        .wait_console(h1, "iPXE", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "labbox_bmc: power on → iPXE banner on the console in {:.2} s: {}",
        hit.at.duration_since(t).as_secs_f64(),
        hit.line.trim()
    );
    let console = lab.console_text(h1);
    assert!(
        console.contains("SeaBIOS"),
        "no SeaBIOS banner on the console:\n{console}"
    );
    // The other host was never touched.
    assert!(!lab.vm_running(h2));
    assert_eq!(power_status(&lab, h2), "Chassis Power is off");
    assert_eq!(lab.console_len(h2), 0);

    // Without `bootdev pxe` the NIC has no boot ROM: SeaBIOS tries the
    // (empty) disk and finds nothing to boot (the second, and last, VM
    // running at once).
    lab.ipmitool(h2, &["chassis", "power", "on"])
        .expect("power on h2");
    assert!(lab.wait_vm(h2, true, Duration::from_secs(10)));
    let h2_pid = lab.vm_pid(h2).expect("h2 runs");
    lab.wait_console(h2, "No bootable device", TIMEOUT)
        .unwrap_or_else(|e| panic!("h2 without bootdev pxe: {e}"));
    assert!(
        !lab.console_text(h2).contains("iPXE"),
        "h2 ran the iPXE ROM without bootdev pxe"
    );
    assert!(
        lab.console_text(h2).contains("Booting from Hard Disk"),
        "h2 has no disk to boot from:\n{}",
        lab.console_text(h2)
    );
    lab.ipmitool(h2, &["chassis", "power", "off"])
        .expect("power off h2");
    assert!(lab.wait_vm(h2, false, Duration::from_secs(10)));

    // A reset with the same boot device is QEMU's own reset: the same
    // process boots iPXE again.
    let before = lab.console_len(h1);
    lab.ipmitool(h1, &["chassis", "power", "reset"])
        .expect("power reset");
    lab.wait_console_from(h1, before, &["iPXE"], &[], TIMEOUT)
        .unwrap_or_else(|e| panic!("reset: {e}"));
    assert_eq!(lab.vm_pid(h1), Some(vm_pid), "a plain reset restarted QEMU");

    // After `bootdev disk` ("default" to ipmi_sim's chassis program) a
    // reset restarts the VM with its disk first and no boot ROM.
    let out = lab
        .ipmitool(h1, &["chassis", "bootdev", "disk"])
        .expect("bootdev disk");
    assert!(
        out.contains("Set Boot Device to disk"),
        "bootdev disk not accepted: {out:?}"
    );
    let before = lab.console_len(h1);
    lab.ipmitool(h1, &["chassis", "power", "reset"])
        .expect("power reset after bootdev disk");
    lab.wait_console_from(h1, before, &["Booting from Hard Disk"], &[], TIMEOUT)
        .unwrap_or_else(|e| panic!("reset after bootdev disk: {e}"));
    // The PXE VM may still print its iPXE lines after `before` until it is
    // stopped, so judge only the new VM's boot: from its SeaBIOS banner to
    // the disk boot, no boot ROM ran.
    let bytes = std::fs::read(lab.console_path(h1)).expect("read h1 console");
    let tail = String::from_utf8_lossy(bytes.get(before as usize..).unwrap_or_default());
    let disk_at = tail.find("Booting from Hard Disk").expect("seen above");
    let bios_at = tail[..disk_at]
        .rfind("SeaBIOS")
        .unwrap_or_else(|| panic!("no SeaBIOS banner before the disk boot:\n{tail}"));
    assert!(
        !tail[bios_at..disk_at].contains("iPXE"),
        "the VM after bootdev disk ran the iPXE ROM:\n{}",
        &tail[bios_at..]
    );
    let disk_pid = lab.vm_pid(h1).expect("h1 runs after the reset");
    assert_ne!(disk_pid, vm_pid, "bootdev disk + reset kept the PXE VM");
    assert!(!pid_alive(vm_pid), "the PXE VM {vm_pid} still runs");

    // Power off: the VM is gone and the BMC says so.
    lab.ipmitool(h1, &["chassis", "power", "off"])
        .expect("power off");
    assert!(
        lab.wait_vm(h1, false, Duration::from_secs(10)),
        "QEMU of h1 still runs after power off"
    );
    assert!(!pid_alive(disk_pid), "QEMU pid {disk_pid} still exists");
    assert_eq!(power_status(&lab, h1), "Chassis Power is off");

    // Power on again: the same console file keeps growing (the relay
    // persists across power cycles).
    let before = lab.console_len(h1);
    lab.ipmitool(h1, &["chassis", "power", "on"])
        .expect("power on again");
    lab.wait_console_from(h1, before, &["SeaBIOS"], &[], TIMEOUT)
        .unwrap_or_else(|e| panic!("second boot: {e}"));
    let vm_pid_2 = lab.vm_pid(h1).expect("h1 runs again");
    assert_eq!(power_status(&lab, h1), "Chassis Power is on");

    // Teardown with the VM still on: nothing may remain.
    let name = lab.netns().name().to_owned();
    let dir = lab.logs().path().to_owned();
    let pids = lab.pids();
    let disks: Vec<std::path::PathBuf> =
        lab.hosts().iter().filter_map(|h| h.disk.clone()).collect();
    assert_eq!(disks.len(), 2, "every x86_64 host has a disk");
    for d in &disks {
        assert!(d.exists(), "{} missing", d.display());
    }
    assert!(
        pids.len() >= 5,
        "expected 2 relays, 2 BMCs and 1 VM: {pids:?}"
    );
    drop(lab);
    let namespaces = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    assert!(
        !namespaces.split_whitespace().any(|n| n == name),
        "namespace {name} left behind: {namespaces}"
    );
    let left: Vec<u32> = pids.into_iter().filter(|&p| pid_alive(p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // The daemonized QEMUs were reaped too (the box is their subreaper):
    // not even a zombie remains.
    if std::env::var_os("LAB_KEEP_DISKS").is_none() {
        for d in &disks {
            assert!(!d.exists(), "disk {} left behind", d.display());
        }
    }
    for pid in [vm_pid, h2_pid, disk_pid, vm_pid_2] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "QEMU {pid} left behind (zombie?)"
        );
    }
    if std::env::var_os("LAB_KEEP_LOGS").is_none() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// The inventory the box generates is one lab-server accepts, with a BMC
/// and an IPMI SOL console per host (no root needed).
#[test]
fn the_generated_inventory_loads() {
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<BoxHost> = (1..=2).map(|i| BoxHost::new(i, dir.path())).collect();
    let text = bmc::inventory_toml("r1", &hosts);
    let inv = lab_server::inventory::Inventory::parse(&text, &dir.path().join("inventory.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(inv.hosts.len(), 2);
    let h1 = &inv.hosts[0];
    assert_eq!(h1.name.to_string(), "h1");
    assert_eq!(h1.ipv4, Some("198.18.0.11".parse().unwrap()));
    let b = h1.bmc.as_ref().expect("bmc");
    assert_eq!(b.endpoint.to_string(), "198.18.0.101:623");
    assert_eq!(b.user, "admin");
    assert_eq!(
        h1.console,
        lab_server::inventory::ConsoleSource::IpmiSol,
        "{text}"
    );
    assert_eq!(hosts[1].mac, "52:54:00:00:01:02");
}

/// A pid that exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(") ")
                .and_then(|(_, r)| r.split(' ').next()),
            Some("Z") | Some("X")
        ),
        Err(_) => false,
    }
}
