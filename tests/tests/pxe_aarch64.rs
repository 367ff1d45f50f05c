//! End to end with a real aarch64 VM: a lease `--arch aarch64 --profile
//! xen`, taken with the `lab` CLI from the real `lab-server`, makes the real
//! `lab-agent` boot a QEMU `virt` machine with UEFI firmware (AAVMF) through
//! UEFI PXE → GRUB (`grubnetaa64-lab.efi`) → Xen on ARM → Debian dom0. DHCP
//! (option 93 = 11 → the GRUB image), GRUB's `grub/grub.cfg` and the
//! per-host `hosts/<mac>.grub` rendered from the lease's profile come from
//! the agent over TFTP; Xen, the dom0 kernel and the initrd from the
//! agent's HTTP server, through GRUB's `http` module (`[http] grub = true`;
//! the agent's log shows the host's GETs; `e2e_aarch64` boots the default,
//! all over TFTP); the release puts the host back on the default profile. A second test leases an x86_64 and an aarch64 host
//! together (API level, no VM).
//!
//! Everything runs inside a fresh network namespace `lab-arm-<pid>-<n>`
//! (198.18.0.0/24 on a bridge `br0`, the VM on `tap0`), deleted at the end
//! even on failure; nothing serves DHCP in the root namespace. Needs root,
//! `ip`, `curl`, `qemu-system-aarch64` and AAVMF, and the arm64 artifacts
//! (fetched once here if missing). A missing prerequisite fails the test,
//! naming the install command. ~10–15 s of boot under software emulation
//! (more on a busy machine). One VM at a time: aarch64 TCG guests take a
//! whole core.

#[path = "../labbox/mod.rs"]
mod labbox;

use lab_tests::{ServerProcess, bin_path};
use labbox::{LogDir, Netns, Prereqs, Proc, WaitError};
use std::path::Path;
use std::time::{Duration, Instant};

/// The MAC of the captured AAVMF DISCOVER in lab-agent's DHCP fixtures.
const MAC: &str = "52:54:00:aa:00:01";
const HOST: &str = "arm1";
const SERVER_IP: &str = "198.18.0.1";
const HOST_IP: &str = "198.18.0.11";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(20);

const QEMU_ARM_INSTALL: &str = "apt-get install -y --no-install-recommends qemu-system-arm";
const AAVMF_INSTALL: &str = "apt-get install -y --no-install-recommends qemu-efi-aarch64";
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// What the agent hands arch-11 clients and what the `xen` GRUB config loads.
const GRUB_IMAGE: &str = "grubnetaa64-lab.efi";
const ARM_ARTIFACTS: [&str; 4] = [
    GRUB_IMAGE,
    "xen-4.17-arm64",
    "vmlinuz-arm64.gz",
    "initrd-labbox-arm64.gz",
];

fn inventory() -> String {
    format!(
        "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n\
         [[host]]\nname = \"{HOST}\"\narch = \"aarch64\"\nfirmware = \"uefi\"\nrack = \"r1\"\nmac = \"{MAC}\"\nipv4 = \"{HOST_IP}\"\n"
    )
}

fn agent_toml(server: &str, artifacts: &Path) -> String {
    let assets = labbox::repo_root().join("pxe-assets");
    format!(
        r#"rack = "r1"
server = "http://{server}"
default_profile = "local-disk"

[dhcp]
mode = "authoritative"
interface = "br0"
server_ip = "{SERVER_IP}"
subnet_mask = "255.255.255.0"
router = "{SERVER_IP}"
lease_secs = 600
script_url = "http://{{server_ip}}:8080/hosts/{{mac}}.ipxe"
boot_efi_arm64 = "artifacts/{GRUB_IMAGE}"

[tftp]
listen = "{SERVER_IP}:69"

[http]
listen = "{SERVER_IP}:8080"
url = "http://{SERVER_IP}:8080"
grub = true

[assets]
root = "{}"
artifacts = "{}"
"#,
        assets.display(),
        artifacts.display()
    )
}

/// `lab --json …` (inside `ns` if given); panics with its stderr on failure.
fn lab(ns: Option<&Netns>, server: &str, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => ns.command(bin_path("lab")),
        None => std::process::Command::new(bin_path("lab")),
    };
    let out = cmd
        .arg("--json")
        .args(args)
        .env("LAB_SERVER", format!("http://{server}"))
        .env("LAB_TOKEN", "ci")
        .output()
        .expect("run lab");
    assert!(
        out.status.success(),
        "lab {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until lab-server sees every host as reachable (its agent attached):
/// only then are hosts granted.
fn wait_reachable(ns: Option<&Netns>, server: &str) {
    labbox::eventually(
        "every host reachable (the rack's agent attached)",
        START_TIMEOUT,
        || {
            let v: serde_json::Value =
                serde_json::from_str(&lab(ns, server, &["hosts"])).expect("hosts --json");
            v.as_array()
                .is_some_and(|hs| hs.iter().all(|h| h["reachable"] == true))
                .then_some(())
        },
    );
}

/// GRUB names the per-host file by `$net_default_mac` (colons); the agent
/// serves it over HTTP too, which is how the test reads it.
fn grub_url() -> String {
    format!("http://{SERVER_IP}:8080/hosts/{MAC}.grub")
}

#[test]
fn a_xen_lease_boots_an_aarch64_vm_through_grub_into_dom0() {
    // ------------------------------------------------------ prerequisites
    let artifacts = labbox::artifacts_dir();
    let mut pre = Prereqs::default();
    pre.check(
        labbox::is_root(),
        "root is needed (network namespaces, tap devices): run the test as root",
    )
    .tool("ip", &["-V"], "apt-get install -y iproute2")
    .tool("curl", &["--version"], "apt-get install -y curl")
    .tool("qemu-system-aarch64", &["--version"], QEMU_ARM_INSTALL)
    .file(Path::new(AAVMF_CODE), AAVMF_INSTALL)
    .file(Path::new(AAVMF_VARS), AAVMF_INSTALL);
    for bin in ["lab-server", "lab-agent", "lab"] {
        pre.file(
            &bin_path(bin),
            "run `cargo build --workspace` first (the test runs the real binaries)",
        );
    }
    pre.assert_all();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &ARM_ARTIFACTS) {
        panic!("prerequisites missing:\n  - {why}");
    }

    // ---------------------------------------------- namespace and network
    // Drop order (reverse of declaration): processes, then the namespace
    // (kills leftovers, deletes it), then the logs (printed on failure).
    let logs = LogDir::new("lab-arm-");
    let ns = Netns::new("lab-arm");
    ns.bridge("br0", &format!("{SERVER_IP}/24"));
    ns.tap("tap0", "br0");
    eprintln!(
        "pxe_aarch64: namespace {}, logs in {}",
        ns.name(),
        logs.path().display()
    );

    // ----------------------------------------------- lab-server, lab-agent
    let (server, agent, server_addr, _web) =
        labbox::lab::start_server_and_agent(&ns, &logs, &inventory(), &[], |addr| {
            agent_toml(addr, &artifacts)
        });
    labbox::eventually(
        "the agent serves the host's default (local-disk) GRUB config",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&grub_url(), &[]);
            (code == 200 && body.contains("profile=local-disk")).then_some(())
        },
    );
    // GRUB's first stage and the GRUB image are served too.
    for path in ["grub/grub.cfg", &format!("artifacts/{GRUB_IMAGE}")] {
        let (code, _) = ns.curl(&format!("http://{SERVER_IP}:8080/{path}"), &["-I"]);
        assert_eq!(code, 200, "the agent does not serve {path}");
    }

    wait_reachable(Some(&ns), &server_addr);

    // -------------------------------------------------- lease and boot
    let t_acquire = Instant::now();
    let lease: serde_json::Value = serde_json::from_str(&lab(
        Some(&ns),
        &server_addr,
        &[
            "lease",
            "acquire",
            "--arch",
            "aarch64",
            "--profile",
            "xen",
            "--ttl",
            "10m",
            "--no-wait",
        ],
    ))
    .expect("lease acquire --json prints JSON");
    let lease_id = lease["id"].as_str().expect("lease id").to_owned();
    assert_eq!(lease["hosts"], serde_json::json!([HOST]), "{lease}");
    let grub = labbox::eventually(
        "the agent serves the xen GRUB config for the lease",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&grub_url(), &[]);
            (code == 200 && body.contains("profile=xen") && body.contains(&lease_id))
                .then_some(body)
        },
    );
    let t_config = t_acquire.elapsed();
    // The config loads Xen, the kernel and the initrd from the agent's HTTP
    // root through GRUB's http device, and every one of them is served (a
    // clear message here beats a VM that silently fails to boot).
    let http_root = format!("(http,{SERVER_IP}:8080)/artifacts/");
    let loaded: Vec<&str> = grub
        .split_whitespace()
        .map(|w| w.trim_end_matches(';'))
        .filter(|w| w.contains("/artifacts/"))
        .collect();
    assert_eq!(loaded.len(), 3, "xen, kernel, initrd in:\n{grub}");
    for word in &loaded {
        let file = word.strip_prefix(&http_root).unwrap_or_else(|| {
            panic!("the xen GRUB config loads {word}, not from {http_root}:\n{grub}")
        });
        let (code, _) = ns.curl(
            &format!("http://{SERVER_IP}:8080/artifacts/{file}"),
            &["-I"],
        );
        assert_eq!(
            code,
            200,
            "the xen GRUB config loads {word}, which the agent does not serve (is it in {}?)\nconfig:\n{grub}",
            artifacts.display()
        );
    }

    // AAVMF with a fresh copy of its variable store; the boot menu shown
    // for 0 s (saves ~5 s before DHCP); no IPv6 PXE (a failed PXEv4 would
    // otherwise cost ~60 s per remaining boot option); ACPI off (Debian's
    // arm64 Xen hangs silently with it); virtio-net without option ROM (the
    // firmware has its own driver).
    let vars = logs.join("AAVMF_VARS.fd");
    std::fs::copy(AAVMF_VARS, &vars).expect("copy AAVMF_VARS.fd");
    let mut cmd = ns.command("qemu-system-aarch64");
    cmd.args(["-accel", "tcg"])
        .args(["-M", "virt,virtualization=on,gic-version=3,acpi=off"])
        .args(["-cpu", "cortex-a57", "-m", "1G"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-no-reboot")
        .args([
            "-drive",
            &format!("if=pflash,format=raw,readonly=on,file={AAVMF_CODE}"),
        ])
        .args([
            "-drive",
            &format!("if=pflash,format=raw,file={}", vars.display()),
        ])
        .args(["-boot", "menu=on,splash-time=0"])
        .args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"])
        .args([
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device",
        ])
        .arg(format!("virtio-net-pci,netdev=n0,mac={MAC},romfile="));
    let t_qemu = Instant::now();
    let mut vm = Proc::spawn("serial", cmd, &logs);
    // Markers as substrings: GRUB and the firmware wrap and decorate lines.
    let marker = match vm.wait_for(
        BOOT_TIMEOUT,
        |l| l.contains("LAB-DOM0-OK"),
        |l| l.contains("LAB-DOM0-FAIL") || l.contains("LAB-BOOT-FAILED") || l.contains("PXE-E"),
    ) {
        Ok(l) => l,
        Err(WaitError::Failed(l)) => panic!("the VM reported a failure: {l}"),
        Err(e) => {
            panic!("no LAB-DOM0-OK on the VM's serial console within {BOOT_TIMEOUT:?} ({e:?})")
        }
    };
    let to_marker = t_acquire.elapsed();
    let boot = t_qemu.elapsed();
    eprintln!(
        "pxe_aarch64: lease acquire → LAB-DOM0-OK {:.1} s (acquire → xen GRUB config served {:.2} s; QEMU start → marker {:.1} s)",
        to_marker.as_secs_f64(),
        t_config.as_secs_f64(),
        boot.as_secs_f64()
    );
    eprintln!("pxe_aarch64: {}", marker.trim());
    assert!(marker.contains("hypervisor=xen"), "{marker}");
    assert!(marker.contains("control_d"), "{marker}");
    // GRUB sourced the per-host config of this lease, and dom0 got the
    // command line from it.
    assert!(
        vm.seen()
            .iter()
            .any(|l| l.contains("LAB-GRUB profile=xen") && l.contains(&lease_id)),
        "no LAB-GRUB line of the xen profile for {lease_id} on the console"
    );
    assert!(
        vm.seen()
            .iter()
            .any(|l| l.contains("LAB-CMDLINE") && l.contains("lab.expect=dom0")),
        "no dom0 command line from the xen profile on the console"
    );
    vm.kill();
    // GRUB fetched them over HTTP: the agent logged the host's GETs
    // (lab_agent=debug), each answered 200.
    let agent_log =
        std::fs::read_to_string(logs.join("lab-agent.stderr.log")).expect("read the agent's log");
    for word in &loaded {
        let path = &word[word.find("/artifacts/").expect("an artifacts path")..];
        assert!(
            agent_log.lines().any(|l| l.contains("http request")
                && l.contains(&format!("client={HOST_IP}"))
                && l.contains(&format!("path={path}}}"))
                && l.contains("method=GET")
                && l.contains("status=200")),
            "no HTTP GET of {path} from {HOST_IP} answered 200 in the agent's log"
        );
    }

    // ------------------------------------------------------- release
    let released: serde_json::Value = serde_json::from_str(&lab(
        Some(&ns),
        &server_addr,
        &["lease", "release", &lease_id],
    ))
    .expect("lease release --json prints JSON");
    assert_eq!(released["id"], lease_id.as_str(), "{released}");
    assert_eq!(released["state"], "released", "{released}");
    labbox::eventually(
        "the host's GRUB config back to the default profile (local-disk)",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&grub_url(), &[]);
            (code == 200
                && body.contains("profile=local-disk")
                && body.lines().any(|l| l == "exit")
                && !body.contains("xen_hypervisor"))
            .then_some(())
        },
    );
    drop(agent);
    drop(server);
}

/// One lease holding an x86_64 and an aarch64 host. The request has one
/// `arch` field, so "one of each architecture" is asked for by naming the
/// hosts (`--host x1 --host a1 --count 2`, any arch); an anonymous "any one
/// x86_64 plus any one aarch64" would need two leases (or a proto change).
#[test]
fn a_lease_can_hold_an_x86_64_and_an_aarch64_host() {
    let logs = LogDir::new("lab-mixed-");
    let dir = logs.path();
    let inventory = "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n\
        [[host]]\nname = \"x1\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:12:34:56\"\n\n\
        [[host]]\nname = \"x2\"\narch = \"x86_64\"\nfirmware = \"uefi\"\nrack = \"r1\"\nmac = \"52:54:00:12:34:57\"\n\n\
        [[host]]\nname = \"a1\"\narch = \"aarch64\"\nfirmware = \"uefi\"\nrack = \"r1\"\nmac = \"52:54:00:aa:00:01\"\n";
    let server = ServerProcess::spawn_dev(dir, inventory).expect("lab-server starts");
    let addr = server.addr.to_string();
    // The rack's agent, without DHCP/TFTP/HTTP: hosts are granted only
    // while their agent is attached.
    let config = logs.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "rack = \"r1\"\nserver = \"http://{addr}\"\n[assets]\nroot = \"{}\"\n",
            labbox::repo_root().join("pxe-assets").display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin_path("lab-agent"));
    cmd.arg("--config")
        .arg(&config)
        .args(["--token", "agent-r1"])
        .env("LAB_LOG", "info");
    let mut agent = Proc::spawn("lab-agent", cmd, &logs);
    agent.expect_line("that it runs", START_TIMEOUT, |l| {
        l.starts_with("lab-agent running for rack r1")
    });
    wait_reachable(None, &addr);

    let lease: serde_json::Value = serde_json::from_str(&lab(
        None,
        &addr,
        &[
            "lease",
            "acquire",
            "--host",
            "x1",
            "--host",
            "a1",
            "--count",
            "2",
            "--profile",
            "xen",
            "--no-wait",
        ],
    ))
    .expect("lease acquire --json prints JSON");
    let mut hosts: Vec<&str> = lease["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h.as_str())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["a1", "x1"], "{lease}");
    assert_eq!(lease["profile"], "xen", "{lease}");

    // With a1 taken, no aarch64 host is free; the x86_64 one still is.
    let out = std::process::Command::new(bin_path("lab"))
        .args([
            "--json",
            "lease",
            "acquire",
            "--arch",
            "aarch64",
            "--no-wait",
        ])
        .env("LAB_SERVER", format!("http://{addr}"))
        .env("LAB_TOKEN", "ci")
        .output()
        .expect("run lab");
    assert_eq!(
        out.status.code(),
        Some(5),
        "no free aarch64 host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other: serde_json::Value = serde_json::from_str(&lab(
        None,
        &addr,
        &["lease", "acquire", "--arch", "x86_64", "--no-wait"],
    ))
    .unwrap();
    assert_eq!(other["hosts"], serde_json::json!(["x2"]), "{other}");

    let id = lease["id"].as_str().expect("lease id");
    let released: serde_json::Value =
        serde_json::from_str(&lab(None, &addr, &["lease", "release", id])).unwrap();
    assert_eq!(released["state"], "released", "{released}");
}
