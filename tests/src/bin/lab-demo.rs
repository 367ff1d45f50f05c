//! `lab-demo`: the lab in a box, for a person to watch and use. Brings up
//! lab-server (embedded store), a rack agent and two simulated hosts (QEMU
//! VMs, each behind its own `ipmi_sim` BMC) in a fresh network namespace,
//! takes a guided tour through the `lab` CLI (lease a host with profile
//! `xen`, watch it boot to dom0 on its console, release it and see it
//! powered off), then keeps the lab up and prints what to type next —
//! including profile `xen-install` (Debian + Xen installed on the host's
//! disk, then `lab ssh` into its dom0) — until Enter is pressed (or at once
//! with `--tour-only`). Everything it made is
//! removed when it stops. Needs root; `scripts/demo.sh` builds and runs it.
//!
//! `--fault HOST=KIND` (repeatable; KIND `memory`, `nic` or `disk`) starts a
//! host with a hardware fault (half the memory, a NIC that drops PXE, no
//! disk); the `fault` command beside the `lab` wrapper sets or clears one
//! while the lab runs (`fault h2 nic`, `fault h2 clear`, `fault` lists).

#[path = "../../labbox/mod.rs"]
mod labbox;

use labbox::bmc::Fault;
use labbox::lab::RunningLab;
use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Instant;

fn main() {
    let tour_only = std::env::args().any(|a| a == "--tour-only");
    let skip_tour = std::env::args().any(|a| a == "--no-tour");
    let faults = match faults_from_args() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lab-demo: {e}");
            std::process::exit(2);
        }
    };
    if !labbox::is_root() {
        eprintln!("lab-demo: run as root (it creates a network namespace and tap devices)");
        std::process::exit(2);
    }
    let artifacts = labbox::artifacts_dir();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &labbox::XEN_ARTIFACTS) {
        eprintln!("lab-demo: {why}");
        std::process::exit(2);
    }
    println!("==> starting the lab in a box: lab-server, one rack agent, two hosts with BMCs");
    let l = RunningLab::start("lab-demo", HOSTS.len(), &artifacts, "180s");
    // A `lab` that runs inside the namespace, for the person at the keyboard.
    let wrapper = l.lab.logs().join("lab");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {ns} env LAB_SERVER=http://{addr} LAB_TOKEN=${{LAB_TOKEN:-you}} {lab} \"$@\"\n",
            ns = l.lab.netns().name(),
            addr = l.addr,
            lab = lab_tests::bin_path("lab").display()
        ),
    )
    .expect("write the lab wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lab = wrapper.display().to_string();
    // `fault HOST KIND|clear` beside it: what bmc-chassis.sh reads at the
    // host's next power-on.
    let fault_cmd = l.lab.logs().join("fault");
    std::fs::write(&fault_cmd, fault_script(l.lab.logs().path())).expect("write the fault command");
    std::fs::set_permissions(&fault_cmd, std::fs::Permissions::from_mode(0o755)).unwrap();
    println!(
        "    namespace {}, lab-server at {} (inside it), logs in {}",
        l.lab.netns().name(),
        l.addr,
        l.lab.logs().path().display()
    );
    for (host, fault) in &faults {
        l.lab.set_fault(l.lab.host(host), Some(*fault));
        println!("    {host} starts with fault {fault}");
    }

    // The dashboard, forwarded to the root namespace's loopback for a
    // browser on this machine (dev mode: sign in with any name as token).
    let dashboard = l
        .web
        .parse()
        .ok()
        .map(|web| l.lab.netns().forward_to_loopback(web));
    if let Some(d) = dashboard {
        println!("    dashboard at http://{d}/ (sign in with any name as the token)");
    }

    if !skip_tour {
        tour(&lab);
    }
    if tour_only {
        return;
    }
    println!();
    println!("The lab is up. In another terminal, try:");
    println!("  {lab} hosts");
    println!("  {lab} lease acquire --profile xen --wait-ready");
    println!("  {lab} console h1            # Ctrl-E c . to detach");
    println!("  {lab} power status h1");
    println!("  {lab} console --lease LEASE_ID");
    println!("  {lab} lease release LEASE_ID");
    println!("  {lab} events --follow");
    println!(
        "  {} h2 memory|nic|disk|clear   # a hardware fault from h2's next power-on; alone it lists them",
        fault_cmd.display()
    );
    if let Some(d) = dashboard {
        println!("  open http://{d}/ in a browser (the dashboard; metrics at http://{d}/metrics)");
    }
    println!("Profiles: xen (Xen + a test dom0 over the network), health-check, local-disk, and");
    println!(
        "xen-install (Debian 12 + Xen 4.17 installed on the host's disk, then booted from it, ~3-4 min):"
    );
    println!(
        "  {lab} lease acquire --host h1 --profile xen-install --ssh-key ~/.ssh/id_ed25519.pub --wait-ready=600s"
    );
    println!("  {lab} ssh h1 -- xl info      # root in dom0 from the disk, with that key");
    println!();
    print!("Press Enter to stop the lab and remove everything it made. ");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().lock().read_line(&mut String::new());
    drop(l);
    println!("lab-demo: stopped; namespace, processes and files removed");
}

/// The demo's hosts.
const HOSTS: [&str; 2] = ["h1", "h2"];

/// The `--fault HOST=KIND` options (also `--fault=HOST=KIND`).
fn faults_from_args() -> Result<Vec<(String, Fault)>, String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = if a == "--fault" {
            args.next()
                .ok_or("--fault needs HOST=KIND (e.g. h2=memory)")?
        } else if let Some(v) = a.strip_prefix("--fault=") {
            v.to_owned()
        } else {
            continue;
        };
        let (host, kind) = value
            .split_once('=')
            .ok_or_else(|| format!("--fault {value}: HOST=KIND (e.g. h2=memory)"))?;
        if !HOSTS.contains(&host) {
            return Err(format!(
                "--fault {value}: no host {host} (the lab has h1 and h2)"
            ));
        }
        out.push((host.to_owned(), kind.parse::<Fault>()?));
    }
    Ok(out)
}

/// The demo's `fault` command: `fault HOST memory|nic|disk|clear` writes or
/// removes the host's fault file; `fault` lists every host's fault.
fn fault_script(logs: &std::path::Path) -> String {
    format!(
        r#"#!/bin/sh
# fault HOST memory|nic|disk|clear: a hardware fault of a lab-demo host, from
# its next power-on (memory: half the memory; nic: the NIC drops PXE; disk:
# no disk). fault alone: every host's fault.
logs='{logs}'
usage() {{ echo "usage: fault [HOST memory|nic|disk|clear]" >&2; exit 2; }}
case $# in
  0) for d in "$logs"/h*/; do
       [ -f "$d/vm.env" ] || continue
       h=$(basename "$d"); f=$(cat "$d/fault" 2>/dev/null)
       echo "$h ${{f:-none}}"
     done ;;
  2) d=$logs/$1
     case "$1" in */*|.*|'') usage ;; esac
     [ -f "$d/vm.env" ] || {{ echo "fault: no host $1" >&2; exit 2; }}
     case "$2" in
       memory|nic|disk) echo "$2" > "$d/fault"; echo "$1: fault $2 from its next power-on" ;;
       clear) rm -f "$d/fault"; echo "$1: no fault from its next power-on" ;;
       *) usage ;;
     esac ;;
  *) usage ;;
esac
"#,
        logs = logs.display()
    )
}

/// Runs `lab ARGS` showing the command and its output; returns stdout.
fn step(lab: &str, args: &[&str]) -> String {
    println!();
    println!("$ lab {}", args.join(" "));
    let t0 = Instant::now();
    let out = Command::new(lab).args(args).output().expect("run lab");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        eprintln!("lab-demo: `lab {}` failed ({})", args.join(" "), out.status);
        std::process::exit(1);
    }
    println!("    ({:.1} s)", t0.elapsed().as_secs_f64());
    stdout
}

fn tour(lab: &str) {
    println!();
    println!("==> the tour: lease a host, boot it into Xen, read its console, release it");
    step(lab, &["hosts"]);
    let json = step(
        lab,
        &[
            "--json",
            "lease",
            "acquire",
            "--host",
            "h1",
            "--profile",
            "xen",
            "--ttl",
            "15m",
            "--wait-ready=300s",
        ],
    );
    let lease: serde_json::Value = serde_json::from_str(&json).expect("lease JSON");
    let id = lease["id"].as_str().expect("lease id").to_owned();
    step(lab, &["lease", "show", &id]);
    step(lab, &["power", "status", "h1"]);
    let log = Command::new(lab)
        .args(["console", "--lease", &id])
        .output()
        .expect("run lab console");
    let text = String::from_utf8_lossy(&log.stdout);
    println!();
    println!("$ lab console --lease {id} | tail -n 8");
    let lines: Vec<&str> = text.lines().collect();
    for l in &lines[lines.len().saturating_sub(8)..] {
        println!("{l}");
    }
    step(lab, &["lease", "release", &id]);
    // The reclaim (Xen debug keys, power off, boot device reset) takes a
    // few seconds.
    for _ in 0..60 {
        let out = Command::new(lab)
            .args(["--json", "host", "show", "h1"])
            .output()
            .expect("run lab");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["state"] == "available" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    step(lab, &["power", "status", "h1"]);
    step(lab, &["hosts"]);
}
