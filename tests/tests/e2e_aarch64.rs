//! The end-to-end proof for aarch64, through the public interfaces only
//! (the `lab` CLI), on the same machinery as the x86 one (`e2e_xen.rs`):
//! lease `--arch aarch64 --profile xen` → lab-server tells the rack agent →
//! the agent sets the boot device to PXE (EFI flag: the host is UEFI) and
//! powers the host on over IPMI (an `ipmi_sim` BMC whose chassis program
//! starts a `qemu-system-aarch64` virt VM with AAVMF) → UEFI PXE → DHCP
//! (option 93 = 11 → GRUB) → `grub/grub.cfg` → the per-host
//! `hosts/<mac>.grub` of the lease's profile → Xen on ARM → dom0 → the dom0
//! marker on the console, captured by the agent over Serial-over-LAN →
//! `lab console --lease` shows it → release → Xen debug keys, power off
//! (ipmitool confirms, the VM is gone) → the host is available again.
//!
//! Then a mixed lease: an x86_64 and the aarch64 host together
//! (`--host h2 --host h1 --count 2`), both booted in parallel to READY —
//! one aarch64 guest at a time (each takes a whole core under TCG).
//!
//! Needs root, QEMU for both arches, AAVMF, ipmi_sim, ipmitool, the
//! workspace binaries and the artifacts cache (fetched if missing); a
//! missing prerequisite fails the test naming the install command.
//! Everything runs in a fresh network namespace, removed at the end even on
//! failure (logs of a failed run are kept). ~10–30 s per aarch64 boot.

#[path = "../labbox/mod.rs"]
mod labbox;

use labbox::bmc::{Arch, LabBox};
use labbox::lab::RunningLab;
use std::path::Path;
use std::time::{Duration, Instant};

/// The x86 Xen artifacts and the arm64 ones (GRUB first: the agent's DHCP
/// hands it to arch-11 clients).
const ARTIFACTS: [&str; 7] = [
    "grubnetaa64-lab.efi",
    "xen-4.17-arm64",
    "vmlinuz-arm64.gz",
    "initrd-labbox-arm64.gz",
    "xen-4.17-amd64",
    "vmlinuz-amd64",
    "initrd-labbox-amd64.gz",
];
/// Generous: a busy 2-core machine stretches an aarch64 boot to ~30 s.
const XEN_TIMEOUT: &str = "300s";
/// h1 is the aarch64 host, h2 the x86_64 one.
const ARM: &str = "h1";
const X86: &str = "h2";

/// The box (h1 aarch64, h2 x86_64) with lab-server and lab-agent in it.
fn start_lab(artifacts: &Path) -> RunningLab {
    let lab = LabBox::start_mixed("lab-e2e-arm", &[Arch::Aarch64, Arch::X86_64]);
    RunningLab::start_in(lab, artifacts, XEN_TIMEOUT)
}

/// After a release: the host is available, ipmitool says off, no VM.
#[test]
fn an_aarch64_host_boots_xen_through_ipmi_uefi_pxe_grub_and_sol() {
    let mut pre = LabBox::prereqs_for(&[Arch::Aarch64, Arch::X86_64]);
    for bin in ["lab-server", "lab-agent", "lab"] {
        pre.file(
            &lab_tests::bin_path(bin),
            "run `cargo build --workspace` first (the test runs the real binaries)",
        );
    }
    pre.assert_all();
    let artifacts = labbox::artifacts_dir();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &ARTIFACTS) {
        panic!("prerequisites missing:\n  - {why}");
    }
    let l = start_lab(&artifacts);
    let inv = l.lab_ok(&["host", "show", ARM]);
    assert_eq!(inv["arch"], "aarch64", "{inv}");
    for h in [ARM, X86] {
        l.wait_host(h, "reachable hosts", |v| v["reachable"] == true);
        assert!(l.ipmi_power(h).contains("off"), "{h} starts powered off");
    }

    // ------------------------------------- the aarch64 host, all the way
    let console_from = l.lab.console_len(l.lab.host(ARM));
    let t0 = Instant::now();
    let lease = l.lab_ok(&[
        "lease",
        "acquire",
        "--arch",
        "aarch64",
        "--profile",
        "xen",
        "--ttl",
        "10m",
        "--wait-ready=300s",
    ]);
    let took = t0.elapsed();
    let id = lease["id"].as_str().expect("lease id").to_owned();
    assert_eq!(lease["hosts"], serde_json::json!([ARM]), "{lease}");
    assert_eq!(
        lease["provisioning"][0]["phase"], "ready",
        "provisioning as the server reports it: {lease}"
    );
    eprintln!(
        "e2e_aarch64: lab lease acquire --arch aarch64 --wait-ready → READY in {:.1} s",
        took.as_secs_f64()
    );
    // The ground truth: the host's serial console (recorded by the relay
    // between QEMU's PL011 and its BMC) went through GRUB with this lease's
    // per-host config and shows dom0's proof.
    let arm = l.lab.host(ARM);
    let hit = l
        .lab
        .wait_console_from(
            arm,
            console_from,
            &["LAB-DOM0-OK"],
            &[],
            Duration::from_secs(5),
        )
        .expect("the dom0 marker on h1's serial console");
    eprintln!("e2e_aarch64: {}", hit.line.trim());
    assert!(hit.line.contains("hypervisor=xen"), "{}", hit.line);
    assert!(hit.line.contains("control_d"), "{}", hit.line);
    let text = l.lab.console_text(arm);
    assert!(
        text.lines()
            .any(|line| line.contains("LAB-GRUB profile=xen") && line.contains(&id)),
        "no LAB-GRUB line of the xen profile for {id} on h1's console"
    );
    assert!(l.ipmi_power(ARM).contains("on"));
    assert!(l.lab.vm_running(arm), "h1's VM runs while leased");
    let power = l.lab_ok(&["power", "status", ARM]);
    assert_eq!(power["on"], true, "{power}");
    // The agent's capture (over SOL) of this lease has the marker.
    let log = l.console_log(&id);
    assert!(
        log.contains("LAB-DOM0-OK hypervisor=xen") && log.contains("control_d"),
        "lab console --lease {id} lacks the dom0 marker:\n{log}"
    );

    // ------------------------------------------------ release → clean host
    l.lab_ok(&["lease", "release", &id]);
    l.assert_reclaimed(ARM);
    let log = l.console_log(&id);
    assert!(
        log.contains("'q' pressed"),
        "the end-of-lease Xen debug keys (sent over SOL) were not captured in the lease's log:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );

    // ------------------------- a mixed lease: x86_64 + aarch64 in parallel
    let t0 = Instant::now();
    let pair = l.lab_ok(&[
        "lease",
        "acquire",
        "--host",
        X86,
        "--host",
        ARM,
        "--count",
        "2",
        "--profile",
        "xen",
        "--wait-ready=300s",
    ]);
    eprintln!(
        "e2e_aarch64: an x86_64 + aarch64 lease → both READY in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let pid = pair["id"].as_str().expect("lease id").to_owned();
    let mut hosts: Vec<&str> = pair["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    hosts.sort();
    assert_eq!(hosts, [ARM, X86], "{pair}");
    for p in pair["provisioning"].as_array().expect("provisioning") {
        assert_eq!(p["phase"], "ready", "{pair}");
    }
    let log = l.console_log(&pid);
    assert_eq!(
        log.matches("LAB-DOM0-OK hypervisor=xen").count(),
        2,
        "both hosts' markers in the mixed lease's log:\n{log}"
    );
    l.lab_ok(&["lease", "release", &pid]);
    for h in [ARM, X86] {
        l.assert_reclaimed(h);
    }
}
