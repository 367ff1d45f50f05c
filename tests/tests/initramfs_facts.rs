//! The facts line of the test initramfs (`pxe-assets/initramfs/init`, the
//! `health-check` profile's ready line): `init --facts ROOT` run by busybox
//! against fake `/sys` and `/proc` trees in a temporary directory, for an
//! x86_64 and an aarch64 host and a host with no NIC or disk. The line is
//! the contract with lab-server's facts parser: one line, `key=value`
//! words, values without spaces, lists comma-separated.

use std::path::Path;
use std::process::Command;

fn init() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("pxe-assets/initramfs/init")
}

/// Writes `text` at `root/rel`, making its directories.
fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn dir(root: &Path, rel: &str) {
    std::fs::create_dir_all(root.join(rel)).unwrap();
}

/// `busybox sh init --facts ROOT`: its stdout (must succeed).
fn facts(root: &Path) -> String {
    let out = Command::new("busybox")
        .arg("sh")
        .arg(init())
        .arg("--facts")
        .arg(root)
        .output()
        .expect("busybox runs (apt-get install -y busybox-static)");
    assert!(
        out.status.success(),
        "init --facts failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

const X86_CPU: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: QEMU Virtual CPU   version 2.5+\n\
flags\t\t: fpu vme de pse msr vmx sse2 hypervisor\n\nprocessor\t: 1\n\
model name\t: QEMU Virtual CPU   version 2.5+\nflags\t\t: fpu vme de pse msr vmx sse2 hypervisor\n\n";

#[test]
fn x86_64_facts_line_has_every_key_in_order() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    put(r, "proc/sys/kernel/arch", "x86_64\n");
    put(r, "proc/sys/kernel/osrelease", "6.1.0-27-amd64\n");
    put(r, "proc/cpuinfo", X86_CPU);
    put(
        r,
        "proc/meminfo",
        "MemTotal:        1012345 kB\nMemFree:          900000 kB\n",
    );
    put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    put(r, "sys/class/net/eth0/address", "52:54:00:12:34:01\n");
    put(r, "sys/class/net/eth1/address", "52:54:00:12:34:02\n");
    put(r, "sys/block/vda/size", "16777216\n");
    put(r, "sys/block/vdb/size", "2097152\n");
    // Not disks: loop, ram, zram and CD-ROM devices.
    for d in ["loop0", "ram0", "zram0", "sr0"] {
        put(r, &format!("sys/block/{d}/size"), "2048\n");
    }
    dir(r, "sys/kernel/iommu_groups");
    dir(r, "sys/class/iommu");
    assert_eq!(
        facts(r),
        "LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=1012345 model=QEMU_Virtual_CPU_version_2.5+ \
         macs=52:54:00:12:34:01,52:54:00:12:34:02 disks=vda:8589934592,vdb:1073741824 \
         virt=vmx iommu=no kernel=6.1.0-27-amd64\n"
    );
    // An IOMMU group makes iommu=yes; svm is AMD's virtualisation flag.
    dir(r, "sys/kernel/iommu_groups/0");
    put(r, "proc/cpuinfo", &X86_CPU.replace(" vmx ", " svm "));
    let line = facts(r);
    assert!(line.contains(" virt=svm iommu=yes "), "{line}");
}

#[test]
fn aarch64_facts_line_reads_model_and_el2() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    put(r, "proc/sys/kernel/arch", "aarch64\n");
    put(r, "proc/sys/kernel/osrelease", "6.1.0-27-arm64\n");
    // arm64's cpuinfo has no model name: the device tree names the core.
    put(
        r,
        "proc/cpuinfo",
        "processor\t: 0\nBogoMIPS\t: 125.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd07\n\n",
    );
    put(r, "proc/meminfo", "MemTotal:        1000964 kB\n");
    put(
        r,
        "sys/firmware/devicetree/base/cpus/cpu@0/compatible",
        "arm,cortex-a57\0arm,armv8\0",
    );
    put(r, "sys/class/net/eth0/address", "52:54:00:00:01:01\n");
    put(r, "sys/block/nvme0n1/size", "2048\n");
    put(r, "sys/class/iommu/smmu3.0x09050000/x", "");
    put(
        r,
        "dmesg",
        "[    0.000000] CPU: All CPU(s) started at EL2\n",
    );
    assert_eq!(
        facts(r),
        "LAB-HEALTH-OK arch=aarch64 cpus=1 mem_kb=1000964 model=arm,cortex-a57 \
         macs=52:54:00:00:01:01 disks=nvme0n1:1048576 virt=el2 iommu=yes kernel=6.1.0-27-arm64\n"
    );
    // No device tree (ACPI): the implementer and part numbers; no EL2.
    std::fs::remove_dir_all(r.join("sys/firmware")).unwrap();
    put(
        r,
        "dmesg",
        "[    0.000000] CPU: All CPU(s) started at EL1\n",
    );
    let line = facts(r);
    assert!(line.contains(" model=0x41:0xd07 "), "{line}");
    assert!(line.contains(" virt=none "), "{line}");
}

#[test]
fn a_host_without_nic_or_disk_has_empty_lists() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    put(r, "proc/sys/kernel/arch", "x86_64\n");
    put(r, "proc/sys/kernel/osrelease", "6.1.0-27-amd64\n");
    put(r, "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu sse2\n\n");
    put(r, "proc/meminfo", "MemTotal:        503000 kB\n");
    put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
    dir(r, "sys/block");
    let line = facts(r);
    assert_eq!(
        line,
        "LAB-HEALTH-OK arch=x86_64 cpus=1 mem_kb=503000 model=unknown macs= disks= \
         virt=none iommu=no kernel=6.1.0-27-amd64\n"
    );
    // One line, and no value holds a space: every word is key=value.
    assert_eq!(line.lines().count(), 1);
    for w in line.trim_end().split(' ').skip(1) {
        assert!(w.contains('='), "{w:?} in {line}");
    }
}
