//! End to end with a real VM (no IPMI yet): a lease with profile `xen`,
//! taken with the `lab` CLI from the real `lab-server`, makes the real
//! `lab-agent` PXE-boot a QEMU VM into Xen dom0 — DHCP, the per-host iPXE
//! script and the artifacts all come from the agent — and the release puts
//! the host back on the default profile.
//!
//! Everything runs inside a fresh network namespace `lab-qemu-<pid>-<n>`
//! (198.18.0.0/24 on a bridge `br0`, the VM on `tap0`), deleted at the end
//! even on failure; nothing serves DHCP in the root namespace. Needs root,
//! `ip`, `curl`, QEMU with QEMU's iPXE ROMs, and the artifacts cache (run
//! once here if empty). A missing prerequisite fails the test, naming the
//! install command. ~10–20 s under software emulation. See tests/labbox/README.md.

#[path = "../labbox/mod.rs"]
mod labbox;

use lab_tests::bin_path;
use labbox::{LogDir, Netns, Prereqs, Proc, WaitError};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:12:34:56";
const MAC_HYPHEN: &str = "52-54-00-12-34-56";
const HOST: &str = "vm1";
const SERVER_IP: &str = "198.18.0.1";
const HOST_IP: &str = "198.18.0.10";
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn inventory() -> String {
    format!(
        "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n\
         [[host]]\nname = \"{HOST}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"{MAC}\"\nipv4 = \"{HOST_IP}\"\n"
    )
}

fn agent_toml(server: &str, artifacts: &std::path::Path) -> String {
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

[tftp]
listen = "{SERVER_IP}:69"

[http]
listen = "{SERVER_IP}:8080"
url = "http://{SERVER_IP}:8080"

[assets]
root = "{}"
artifacts = "{}"
"#,
        assets.display(),
        artifacts.display()
    )
}

/// `lab --json …` inside the namespace; panics with its stderr on failure.
fn lab(ns: &Netns, server: &str, args: &[&str]) -> String {
    let out = ns
        .command(bin_path("lab"))
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

#[test]
fn a_xen_lease_pxe_boots_a_qemu_vm_into_dom0() {
    // ------------------------------------------------------ prerequisites
    let rom = labbox::ipxe_virtio_rom();
    let artifacts = labbox::artifacts_dir();
    let mut pre = Prereqs::default();
    pre.check(
        labbox::is_root(),
        "root is needed (network namespaces, tap devices): run the test as root",
    )
    .tool("ip", &["-V"], "apt-get install -y iproute2")
    .tool("curl", &["--version"], "apt-get install -y curl")
    .tool(
        "qemu-system-x86_64",
        &["--version"],
        labbox::QEMU_INSTALL,
    )
    .check(
        rom.is_some(),
        format!(
            "QEMU's iPXE ROM pxe-virtio.rom/efi-virtio.rom (in /usr/lib/ipxe/qemu or /usr/share/qemu) is missing: {}",
            labbox::QEMU_INSTALL
        ),
    );
    for bin in ["lab-server", "lab-agent", "lab"] {
        pre.file(
            &bin_path(bin),
            "run `cargo build --workspace` first (the test runs the real binaries)",
        );
    }
    pre.assert_all();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &labbox::XEN_ARTIFACTS) {
        panic!("prerequisites missing:\n  - {why}");
    }
    let rom = rom.expect("checked");

    // ---------------------------------------------- namespace and network
    // Drop order (reverse of declaration): processes, then the namespace
    // (kills leftovers, deletes it), then the logs (printed on failure).
    let logs = LogDir::new("lab-qemu-");
    let ns = Netns::new("lab-qemu");
    ns.bridge("br0", &format!("{SERVER_IP}/24"));
    ns.tap("tap0", "br0");
    eprintln!(
        "pxe_qemu: namespace {}, logs in {}",
        ns.name(),
        logs.path().display()
    );

    // ----------------------------------------------- lab-server, lab-agent
    let (server, agent, server_addr, _web) =
        labbox::lab::start_server_and_agent(&ns, &logs, &inventory(), &[], |addr| {
            agent_toml(addr, &artifacts)
        });
    let script_url = format!("http://{SERVER_IP}:8080/hosts/{MAC_HYPHEN}.ipxe");
    labbox::eventually(
        "the agent serves the host's default (local-disk) script",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&script_url, &[]);
            (code == 200 && body.contains("profile=local-disk")).then_some(())
        },
    );

    // -------------------------------------------------- lease and boot
    let t_acquire = Instant::now();
    let lease: serde_json::Value = serde_json::from_str(&lab(
        &ns,
        &server_addr,
        &[
            "lease",
            "acquire",
            "--host",
            HOST,
            "--profile",
            "xen",
            "--ttl",
            "10m",
        ],
    ))
    .expect("lease acquire --json prints JSON");
    let lease_id = lease["id"].as_str().expect("lease id").to_owned();
    assert_eq!(lease["hosts"], serde_json::json!([HOST]), "{lease}");
    let script = labbox::eventually(
        "the agent serves the xen script for the lease",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&script_url, &[]);
            (code == 200 && body.contains("profile=xen") && body.contains(&lease_id))
                .then_some(body)
        },
    );
    let t_script = t_acquire.elapsed();
    // Every artifact the rendered script loads must be served (a clear
    // message here beats a VM that silently fails to boot).
    for url in script
        .split_whitespace()
        .filter(|w| w.starts_with("http://") && w.contains("/artifacts/"))
    {
        let (code, _) = ns.curl(url, &["-I"]);
        assert_eq!(
            code,
            200,
            "the xen profile loads {url}, which the agent does not serve (is it in {}?)\nscript:\n{script}",
            artifacts.display()
        );
    }

    // virtio-net as a modern-only device (PCI id 1af4:1041): the iPXE ROMs
    // of Debian's ipxe-qemu carry that id, and SeaBIOS runs a ROM only for a
    // device whose id matches; QEMU's default transitional virtio-net
    // (1af4:1000) would get no ROM and never network-boot.
    let mut cmd = ns.command("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "qemu64", "-m", "1G"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-no-reboot", "-boot", "n"])
        .args([
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device",
        ])
        .arg(format!(
            "virtio-net-pci,disable-legacy=on,netdev=n0,mac={MAC},romfile={}",
            rom.display()
        ));
    let t_qemu = Instant::now();
    let mut vm = Proc::spawn("serial", cmd, &logs);
    let marker = match vm.wait_for(
        BOOT_TIMEOUT,
        |l| l.contains("LAB-DOM0-OK"),
        |l| l.contains("LAB-DOM0-FAIL") || l.contains("LAB-BOOT-FAILED"),
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
        "pxe_qemu: lease acquire → LAB-DOM0-OK {:.1} s (acquire → xen script served {:.2} s; QEMU start → marker {:.1} s)",
        to_marker.as_secs_f64(),
        t_script.as_secs_f64(),
        boot.as_secs_f64()
    );
    eprintln!("pxe_qemu: {marker}");
    assert!(marker.contains("hypervisor=xen"), "{marker}");
    assert!(marker.contains("control_d"), "{marker}");
    // The dom0 command line shows the rendered xen script was the one run.
    assert!(
        vm.seen()
            .iter()
            .any(|l| l.contains("LAB-CMDLINE") && l.contains("lab.expect=dom0")),
        "no dom0 command line from the xen profile on the console"
    );
    vm.kill();
    // The VM fetched its script from the static address of the inventory
    // (the agent's debug log names each HTTP client).
    let agent_log = std::fs::read_to_string(logs.join("lab-agent.stderr.log")).unwrap_or_default();
    assert!(
        agent_log.contains(&format!("client={HOST_IP} path=/hosts/{MAC_HYPHEN}.ipxe")),
        "the VM did not fetch its script from {HOST_IP} (DHCP static address)"
    );

    // ------------------------------------------------------- release
    let released: serde_json::Value =
        serde_json::from_str(&lab(&ns, &server_addr, &["lease", "release", &lease_id]))
            .expect("lease release --json prints JSON");
    assert_eq!(released["id"], lease_id.as_str(), "{released}");
    labbox::eventually(
        "the host's script back to the default profile (local-disk)",
        START_TIMEOUT,
        || {
            let (code, body) = ns.curl(&script_url, &[]);
            (code == 200 && body.contains("profile=local-disk") && !body.contains("dom0_mem="))
                .then_some(())
        },
    );
    assert_eq!(released["state"], "released", "{released}");
    // Tear down in order: VM (done), agent, server; the namespace and the
    // logs go when their guards drop.
    drop(agent);
    drop(server);
}
