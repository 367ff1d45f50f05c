//! Install to disk end to end, through the `lab` CLI only, as a CI job
//! would use it: `lab run --host h1 --profile xen-install --ssh-key K
//! --artifacts D -- sh -c 'lab ssh h1 -- xl info'` in the lab in a box →
//! the agent PXE-boots h1 into the installer, which streams the disk image
//! (`pxe-assets/build-image.sh`) over the agent's HTTP onto h1's qcow2
//! disk with the lease's metadata (the key K), and powers off → the agent
//! sets the boot device to disk over IPMI and powers h1 on → GRUB → Xen →
//! Debian dom0 from the disk prints its ready line with sshd running →
//! `lab run` runs the command, whose `lab ssh` reaches dom0 through
//! lab-server and the agent → `xl info` says Xen 4.17 → `lab run` releases
//! the lease, the agent powers h1 off (ipmitool confirms), and `D/h1.console`
//! holds the install and the disk boot.
//!
//! What `lab run` does on a CMD that exits 3, on SIGTERM, with
//! `--hold-on-failure`, and the refusal of a non-holder's `lab forward` /
//! `lab ssh` and a forward cut at release are in `forward.rs` (no VM).
//!
//! Needs root, QEMU, ipmi_sim, ipmitool, ssh, the artifacts cache (the
//! installer; built here if missing) and the disk image, which only
//! `pxe-assets/build-image.sh` builds (`scripts/deps.sh` runs it): a
//! missing one fails the test naming the command. One VM; ~3–4 min under
//! TCG.

#[path = "../labbox/mod.rs"]
mod labbox;

use labbox::lab::RunningLab;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

/// What the installer needs from the cache, beside the image.
const INSTALL_ARTIFACTS: [&str; 2] = ["vmlinuz-amd64", "initrd-install-amd64.gz"];
/// The disk image and its checksum (`build-image.sh`).
const IMAGE: [&str; 2] = ["xenlab-amd64.img.zst", "xenlab-amd64.img.zst.sha256"];

/// `key : value` lines (as `xl info` prints them) as pairs.
fn colon_pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// An ed25519 key pair at `home/.ssh/id_ed25519{,.pub}` (where `lab ssh`
/// looks by default); returns the public key's path.
fn keygen(home: &Path) -> std::path::PathBuf {
    let ssh = home.join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let key = ssh.join("id_ed25519");
    labbox::run_ok(
        std::process::Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "ci@e2e-install",
                "-f",
            ])
            .arg(&key),
    );
    ssh.join("id_ed25519.pub")
}

#[test]
fn lab_run_installs_xen_on_the_disk_reaches_dom0_over_ssh_and_gives_the_host_back() {
    let artifacts = labbox::artifacts_dir();
    let mut pre = labbox::bmc::LabBox::prereqs();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &INSTALL_ARTIFACTS) {
        pre.check(false, why);
    }
    for f in IMAGE {
        pre.file(
            &artifacts.join(f),
            "the disk image is built by `sudo pxe-assets/build-image.sh` (scripts/deps.sh runs it)",
        );
    }
    pre.tool("ssh", &["-V"], "apt-get install -y openssh-client")
        .tool(
            "ssh-keygen",
            &["--help"],
            "apt-get install -y openssh-client",
        );
    pre.assert_all();
    let image_sha256 = std::fs::read_to_string(artifacts.join(IMAGE[1]))
        .unwrap()
        .split_whitespace()
        .next()
        .expect("a sha256 in the image's checksum file")
        .to_owned();

    let l = RunningLab::start("lab-inst", 1, &artifacts, "180s");
    l.wait_host("h1", "h1 reachable", |v| v["reachable"] == true);
    assert!(l.ipmi_power("h1").contains("off"), "h1 starts powered off");

    // The job's environment: a home with the CI key, `lab` on PATH.
    let home = l.lab.logs().join("home");
    let public = keygen(&home);
    let out_dir = l.lab.logs().join("job-artifacts");
    let lab_dir = lab_tests::bin_path("lab").parent().unwrap().to_owned();
    let path = std::env::join_paths(std::iter::once(lab_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();

    // ------------------------------------------------ the CI job
    let t0 = Instant::now();
    let job = l
        .lab_command()
        .env("HOME", &home)
        .env("PATH", &path)
        .args([
            "run",
            "--host",
            "h1",
            "--profile",
            "xen-install",
            "--ttl",
            "10m",
            "--wait-ready=480s",
            "--ssh-key",
        ])
        .arg(&public)
        .arg("--artifacts")
        .arg(&out_dir)
        .args([
            "--",
            "sh",
            "-c",
            // The command, then where dom0's root is and what the
            // installer wrote for this lease.
            "lab ssh h1 -- xl info && echo LAB-JOB-SPLIT && \
             lab ssh h1 -- 'findmnt -n -o SOURCE /; cat /etc/lab/lease.env'",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run lab run");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&job.stdout);
    let stderr = String::from_utf8_lossy(&job.stderr);
    eprintln!(
        "e2e-install: lab run (install, disk boot, 2 × lab ssh, release, reclaim) took {:.1} s; it said:\n{stderr}",
        took.as_secs_f64()
    );
    assert_eq!(
        job.status.code(),
        Some(0),
        "lab run failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let (xl_info, disk) = stdout
        .split_once("LAB-JOB-SPLIT")
        .unwrap_or_else(|| panic!("no output of the second ssh:\n{stdout}"));

    // Xen 4.17 answers in dom0.
    let xl = colon_pairs(xl_info);
    assert_eq!(value(&xl, "xen_major"), Some("4"), "{xl_info}");
    assert_eq!(value(&xl, "xen_minor"), Some("17"), "{xl_info}");
    assert!(
        xl_info
            .lines()
            .any(|l| l.starts_with("xen_major") && l.trim_end().ends_with(": 4")),
        "xl info prints `xen_major : 4`:\n{xl_info}"
    );

    // The lease, from stderr ("lab: lease L granted: h1").
    let id = stderr
        .lines()
        .find_map(|l| l.strip_prefix("lab: lease ")?.split_once(" granted: "))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("no grant line:\n{stderr}"));

    // dom0 runs from h1's disk, installed for this lease with this image
    // and this key.
    let mut disk_lines = disk.lines().map(str::trim).filter(|l| !l.is_empty());
    let root = disk_lines.next().unwrap_or_default();
    assert!(
        root.starts_with("/dev/vda"),
        "dom0's root is on h1's (virtio) disk, not {root:?}:\n{disk}"
    );
    let env: Vec<&str> = disk_lines.collect();
    let key = std::fs::read_to_string(&public).unwrap();
    for want in [
        "LAB_HOST=h1".to_owned(),
        format!("LAB_LEASE={id}"),
        format!("LAB_IMAGE_SHA256={image_sha256}"),
        format!("LAB_SSH_KEY={}", key.trim()),
    ] {
        assert!(
            env.contains(&want.as_str()),
            "/etc/lab/lease.env lacks {want:?}:\n{disk}"
        );
    }

    // --wait-ready showed the stages.
    for stage in ["h1: installing ", "booting from disk", "h1: ready"] {
        assert!(
            stderr.contains(stage),
            "`lab run` did not show {stage:?}:\n{stderr}"
        );
    }
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("h1: installing ") && l.contains(" % ")),
        "an install percentage:\n{stderr}"
    );

    // ------------------------------------------------ given back
    let lease = l.lab_ok(&["lease", "show", &id]);
    assert_eq!(lease["state"], "released", "{lease}");
    l.assert_reclaimed("h1");

    // The job's console artifact: the install, then the disk's ready line
    // naming this lease.
    let console = std::fs::read_to_string(out_dir.join("h1.console"))
        .unwrap_or_else(|e| panic!("{}/h1.console: {e}\n{stderr}", out_dir.display()));
    let at = |what: &str| {
        console
            .find(what)
            .unwrap_or_else(|| panic!("h1.console lacks {what:?}:\n{console}"))
    };
    let start = at("LAB-INSTALL stage=start");
    let written = at("LAB-INSTALL stage=writing percent=100");
    let done = at("LAB-INSTALL stage=done sha256=ok");
    let ready = at(&format!("LAB-DISK-READY host=h1 lease={id} xen=4.17"));
    assert!(
        start < written && written < done && done < ready,
        "install lines, then the disk boot's ready line, in order"
    );
    assert!(
        console[ready..]
            .lines()
            .next()
            .unwrap()
            .contains("sshd=active"),
        "{}",
        &console[ready..]
    );
}
