//! The end-to-end proof, through the public interfaces only (the `lab`
//! CLI): lease an x86_64 host with profile `xen` → lab-server tells the rack
//! agent → the agent sets the boot device to PXE and powers the host on over
//! IPMI (an `ipmi_sim` BMC per QEMU VM) → DHCP → iPXE → per-host script →
//! Xen + dom0 → the dom0 marker on the console, captured by the agent over
//! Serial-over-LAN → `lab console --lease` shows it → release → the agent
//! captures Xen debug output, powers the host off (ipmitool confirms) and
//! resets its boot device → the host is available again.
//!
//! Also: two hosts leased as a pair boot in parallel; a lease that expires
//! mid-boot is reclaimed cleanly; a BMC that stops answering makes its host
//! unreachable and the queue moves on to another host.
//!
//! Needs root, QEMU, ipmi_sim, ipmitool and the artifacts cache (built here
//! if missing); a missing prerequisite fails the test naming the install
//! command. Everything runs in a fresh network namespace that is removed at
//! the end, even on failure (logs of a failed run are kept).

#[path = "../labbox/mod.rs"]
mod labbox;

use labbox::lab::RunningLab;
use std::time::{Duration, Instant};

/// The tests of this file run one at a time: each boots VMs, and a 2-core
/// machine runs at most two at once without slowing both down.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn artifacts() -> std::path::PathBuf {
    let dir = labbox::artifacts_dir();
    if let Some(why) = labbox::ensure_artifacts(&dir, &labbox::XEN_ARTIFACTS) {
        panic!("prerequisites missing:\n  - {why}");
    }
    dir
}

/// `tests/browser/host_console.py`: signs in to the lab's dashboard, sees
/// `host` leased and healthy on the hosts page, and `marker` in the host
/// page's live console. Screenshots in `$CARGO_TARGET_TMPDIR/e2e-dashboard/`.
fn dashboard_shows_the_boot(l: &RunningLab, host: &str, marker: &str) {
    let web = l
        .lab
        .netns()
        .forward_to_loopback(l.web.parse().expect("the web address"));
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-dashboard");
    std::fs::create_dir_all(&out).unwrap();
    let (passed, said) = lab_tests::browser::run_script(
        "host_console.py",
        &[
            ("WEB_URL", &format!("http://{web}")),
            ("TOKEN", "ci"),
            ("HOST", host),
            ("MARKER", marker),
            ("OUT", out.to_str().unwrap()),
        ],
    );
    eprint!("{said}");
    assert!(
        passed,
        "the dashboard's host page did not show {marker} (screenshots in {}):\n{said}",
        out.display()
    );
}

#[test]
fn a_leased_host_boots_xen_through_ipmi_pxe_and_sol_and_comes_back_clean() {
    if !labbox::is_root() {
        panic!("prerequisites missing: root is needed (network namespaces, tap devices)");
    }
    let _one = serial();
    let artifacts = artifacts();
    let l = RunningLab::start("lab-e2e", 2, &artifacts, "180s");
    for h in ["h1", "h2"] {
        l.wait_host(h, "reachable hosts", |v| v["reachable"] == true);
        assert!(l.ipmi_power(h).contains("off"), "{h} starts powered off");
    }

    // ------------------------------------------------ one host, all the way
    let t0 = Instant::now();
    let lease = l.lab_ok(&[
        "lease",
        "acquire",
        "--host",
        "h1",
        "--profile",
        "xen",
        "--ttl",
        "10m",
        "--wait-ready=240s",
    ]);
    let took = t0.elapsed();
    let id = lease["id"].as_str().expect("lease id").to_owned();
    eprintln!(
        "e2e: lab lease acquire --wait-ready → READY in {:.1} s",
        took.as_secs_f64()
    );
    // The ground truth: the host's serial console (recorded by the relay
    // between QEMU and its BMC) shows dom0's proof.
    let hit = l
        .lab
        .wait_console(l.lab.host("h1"), "LAB-DOM0-OK", Duration::from_secs(5))
        .expect("the dom0 marker on h1's serial console");
    assert!(hit.line.contains("hypervisor=xen"), "{}", hit.line);
    assert!(hit.line.contains("control_d"), "{}", hit.line);
    assert!(l.ipmi_power("h1").contains("on"));
    let shown = l.lab_ok(&["lease", "show", &id]);
    assert_eq!(
        shown["provisioning"][0]["phase"], "ready",
        "provisioning as the server reports it: {shown}"
    );
    // The agent's capture (over SOL) of this lease has the marker.
    let log = l.console_log(&id);
    assert!(
        log.contains("LAB-DOM0-OK hypervisor=xen") && log.contains("control_d"),
        "lab console --lease {id} lacks the dom0 marker:\n{log}"
    );
    // The dashboard's host page shows the same boot, live, in a real
    // browser (headless Chromium outside the namespace, through a forward
    // of the web port to loopback, as lab-demo does).
    dashboard_shows_the_boot(&l, "h1", "LAB-DOM0-OK");
    // Type on the console: `lab console h1` (stdin not a terminal: bytes
    // go as they are) reaches dom0's shell over SOL and its answer comes
    // back through the agent and the server.
    let typed = {
        use std::io::Write;
        let mut child = l
            .lab_command()
            .args(["console", "h1", "--replay", "1"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run lab console");
        let mut stdin = child.stdin.take().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        stdin
            .write_all(b"echo LAB-TYPED-$((6*7)) $(cat /proc/xen/capabilities)\r")
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        drop(stdin);
        let out = child
            .wait_with_output()
            .expect("lab console ends after stdin");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        typed.contains("LAB-TYPED-42 control_d"),
        "what was typed on h1's console did not run in dom0:\n{typed}"
    );
    let power = l.lab_ok(&["power", "status", "h1"]);
    assert_eq!(power["on"], true, "{power}");

    // ------------------------------------------------ release → clean host
    l.lab_ok(&["lease", "release", &id]);
    l.assert_reclaimed("h1");
    let log = l.console_log(&id);
    assert!(
        log.contains("'q' pressed"),
        "the end-of-lease Xen debug keys (sent over SOL) were not captured in the lease's log:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );

    // ------------------------------------------------ a pair in parallel
    let t0 = Instant::now();
    let pair = l.lab_ok(&[
        "lease",
        "acquire",
        "--host",
        "h1",
        "--host",
        "h2",
        "--count",
        "2",
        "--profile",
        "xen",
        "--wait-ready=300s",
    ]);
    eprintln!(
        "e2e: a pair leased together → both READY in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let pid = pair["id"].as_str().expect("lease id").to_owned();
    for p in pair["provisioning"].as_array().expect("provisioning") {
        assert_eq!(p["phase"], "ready", "{pair}");
    }
    let log = l.console_log(&pid);
    assert_eq!(
        log.matches("LAB-DOM0-OK").count(),
        2,
        "both hosts' markers in the pair's log:\n{log}"
    );
    l.lab_ok(&["lease", "release", &pid]);
    for h in ["h1", "h2"] {
        l.wait_host(h, "pair hosts available", |v| v["state"] == "available");
        assert!(l.ipmi_power(h).contains("off"));
    }
}

#[test]
fn an_expiring_lease_is_reclaimed_mid_boot_and_a_dead_bmc_moves_the_queue_on() {
    if !labbox::is_root() {
        panic!("prerequisites missing: root is needed (network namespaces, tap devices)");
    }
    let _one = serial();
    let artifacts = artifacts();
    let mut l = RunningLab::start("lab-e2e-fail", 2, &artifacts, "180s");
    for h in ["h1", "h2"] {
        l.wait_host(h, "reachable hosts", |v| v["reachable"] == true);
    }

    // A 4 s lease expires while its host is booting: reclaimed cleanly.
    let lease = l.lab_ok(&[
        "lease",
        "acquire",
        "--host",
        "h1",
        "--profile",
        "xen",
        "--ttl",
        "4s",
    ]);
    let id = lease["id"].as_str().unwrap().to_owned();
    assert!(
        l.lab
            .wait_vm(l.lab.host("h1"), true, Duration::from_secs(20)),
        "h1 powered on for the lease"
    );
    l.assert_reclaimed("h1");
    let ended = l.lab_ok(&["lease", "show", &id]);
    assert_eq!(ended["state"], "expired", "{ended}");

    // h1's BMC dies: h1 becomes unreachable, is not granted, and a request
    // for either host gets h2.
    let h1 = l.lab.host("h1").clone();
    l.lab.kill_bmc(&h1);
    l.wait_host("h1", "h1 unreachable", |v| v["reachable"] == false);
    let (code, _, err) = l.lab_json(&["power", "status", "h1"]);
    assert_eq!(
        code, 7,
        "power status of a dead BMC is UNAVAILABLE (7): {err}"
    );
    let got = l.lab_ok(&[
        "lease",
        "acquire",
        "--host",
        "h1",
        "--host",
        "h2",
        "--no-wait",
    ]);
    assert_eq!(got["hosts"], serde_json::json!(["h2"]), "{got}");
    // The event log says why (one JSON object per line).
    let out = l
        .lab_command()
        .args(["--json", "events", "--host", "h1"])
        .output()
        .expect("run lab events");
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(
        events.contains("host-unreachable"),
        "no host-unreachable event for h1:\n{events}"
    );
    l.lab_ok(&["lease", "release", got["id"].as_str().unwrap()]);
    l.wait_host("h2", "h2 available", |v| v["state"] == "available");
}
