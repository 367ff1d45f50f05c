//! boot-bench: how long a Xen dom0 boot takes through the whole lab,
//! compared with the hand-tuned peer and with the floor, side by side in
//! one run (alternating, one VM at a time).
//!
//! * (a) the whole lab: `lab lease acquire --host h1 --profile xen` →
//!   lab-server → lab-agent sets the boot device to PXE and powers the host
//!   on over IPMI → the agent's DHCP, iPXE script and artifacts → Xen + dom0
//!   → `LAB-DOM0-OK` in the host's console file; then `lab lease release`.
//! * (b) the hand-tuned peer a lab admin would script: `dnsmasq` (DHCP +
//!   TFTP, no ping before offers, iPXE's no-pxedhcp option, router
//!   advertisements) with a per-host iPXE script loading the same images,
//!   driven by `ipmitool -I lanplus -C 3 … chassis bootdev pxe` +
//!   `chassis power on`; from the first ipmitool call to the marker.
//! * (c) the floor: QEMU boots the same images directly (`-kernel` Xen,
//!   `-initrd` dom0 kernel + initrd as multiboot modules) with the same
//!   command lines; from QEMU's start to the marker.
//!
//! With aarch64 hosts (`--arch aarch64|all`), two more rows:
//!
//! * aarch64 (a): the same lease through the whole lab for an aarch64 UEFI
//!   host (a `qemu-system-aarch64` virt VM with AAVMF behind its `ipmi_sim`
//!   BMC): UEFI PXE → the agent's DHCP (option 93 = 11) → GRUB → the
//!   per-host `hosts/<mac>.grub` → Xen, the dom0 kernel and the initrd
//!   (all over TFTP: the box's agent leaves `[http] grub` off) → Xen on
//!   ARM + dom0 → the marker.
//! * aarch64 (c): the floor, QEMU boots the same images directly
//!   (`-kernel` Xen, the dom0 kernel and initrd as two `guest-loader`
//!   devices) with the command lines of `pxe-assets/profiles/xen.grub.j2`.
//!
//! With `--install`, instead, the install-to-disk rows (profile
//! `xen-install`, docs/netboot.md "Installing to disk"):
//!
//! * install (a): `lab lease acquire --host h1 --profile xen-install
//!   --wait-ready` → the agent PXE-boots the installer, which streams the
//!   disk image over the agent's HTTP onto the host's disk and powers off →
//!   the agent sets boot device disk and powers on → GRUB → Xen → dom0 from
//!   the disk → sshd answers (its `SSH-2.0-` banner, polled every 250 ms
//!   from inside the box). By phase: installer (its first line), writing
//!   (the stream starts), written (`stage=done`: streamed, written,
//!   verified), grub (the disk boot: the installer's power-off, the agent's
//!   boot device and power-on, BIOS), xen, dom0 (its `/init`), ready
//!   (`LAB-DISK-READY`), ssh; and when `lab … --wait-ready` returned. The
//!   installer's own figures (MB/s written) are printed per run.
//! * install (c): the floor, QEMU booting a fresh copy of the same image
//!   straight from its disk (no lab, no install: `zstd -d` once, then
//!   `snapshot=on` so every run is a first boot), QEMU's user-mode network
//!   (`restrict=on`: DHCP only, sshd reached by a `hostfwd` on the
//!   loopback of a namespace of its own); phases grub, xen, dom0, ready,
//!   ssh from QEMU's start.
//!
//! (a) and (b) each have their own lab in a box (tests/labbox/bmc.rs: a
//! network namespace, a bridge, a QEMU host behind an `ipmi_sim` BMC, the
//! console captured by a persistent relay), so the two DHCP servers never
//! share a link. The kernel command lines come from
//! `pxe-assets/profiles/xen.ipxe.j2`.
//!
//! Run (root; see tests/labbox/README.md):
//!   cargo build --release --workspace
//!   cargo run --release -p lab-tests --bin boot-bench -- [--runs N] [--skip-lab] [--timeout SECS] [--arch x86_64|aarch64|all] [--install]
//! `--skip-lab` leaves out (a) (which needs lab-agent's IPMI power-on);
//! `--arch` picks the rows (default all: x86_64 (a) (b) (c), aarch64 (a) (c));
//! `--install` runs the install rows only (x86_64; needs the disk image,
//! `pxe-assets/build-image.sh`; `--timeout` is then per install-and-boot,
//! default 600).

#[path = "../../labbox/mod.rs"]
mod labbox;

use anyhow::{Context, Result, bail};
use lab_tests::bin_path;
use labbox::bmc::{self, Arch, BoxHost, LabBox};
use labbox::lab::RunningLab;
use labbox::{LogDir, Proc, WaitError};
use std::path::Path;
use std::time::{Duration, Instant};

const MARKER: &str = "LAB-DOM0-OK";
const FAILURES: [&str; 2] = ["LAB-DOM0-FAIL", "LAB-BOOT-FAILED"];
const START_TIMEOUT: Duration = Duration::from_secs(20);
const RA_ADDR: &str = "fd00:1ab:b0c5::1/64";

struct Args {
    runs: usize,
    skip_lab: bool,
    timeout: Duration,
    x86: bool,
    aarch64: bool,
    install: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        runs: 3,
        skip_lab: false,
        timeout: Duration::from_secs(120),
        x86: true,
        aarch64: true,
        install: false,
    };
    let mut timeout_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                a.runs = it
                    .next()
                    .context("--runs needs a number")?
                    .parse()
                    .context("--runs needs a number")?;
                if a.runs == 0 {
                    bail!("--runs must be at least 1");
                }
            }
            "--skip-lab" => a.skip_lab = true,
            "--timeout" => {
                let s: u64 = it
                    .next()
                    .context("--timeout needs seconds")?
                    .parse()
                    .context("--timeout needs seconds")?;
                a.timeout = Duration::from_secs(s);
                timeout_given = true;
            }
            "--install" => a.install = true,
            "--arch" => {
                (a.x86, a.aarch64) = match it.next().as_deref() {
                    Some("x86_64") => (true, false),
                    Some("aarch64") => (false, true),
                    Some("all") => (true, true),
                    _ => bail!("--arch needs x86_64, aarch64 or all"),
                };
            }
            "-h" | "--help" => {
                println!(
                    "usage: boot-bench [--runs N (default 3)] [--skip-lab] [--timeout SECS (per boot, default 120)]\n\
                     \x20                 [--arch x86_64|aarch64|all (default all)] [--install]\n\
                     Times a Xen dom0 boot (a) through lab lease acquire, (b) with dnsmasq + ipmitool,\n\
                     (c) by QEMU direct -kernel boot; for aarch64 (a) and (c) (guest-loader).\n\
                     --install: instead, lease → SSH in dom0 from the disk with profile xen-install,\n\
                     by phase, beside QEMU booting the same image from its disk (timeout default 600).\n\
                     See tests/labbox/README.md. Needs root."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if a.install && !timeout_given {
        a.timeout = Duration::from_secs(600);
    }
    Ok(a)
}

// ------------------------------------------------------- the xen profile

/// The Xen boot of the `xen` profile: file names in the artifacts cache and
/// the command lines, read from `pxe-assets/profiles/xen.ipxe.j2` so that
/// (b) and (c) boot exactly what the lab boots.
struct XenBoot {
    xen: (String, String),
    modules: Vec<(String, String)>,
}

fn xen_boot() -> Result<XenBoot> {
    let (xen, modules) = profile_boot("xen.ipxe.j2", "kernel {{ artifacts_url }}/…", |line| {
        let (kind, rest) = line.split_once(' ')?;
        let hypervisor = match kind {
            "kernel" => true,
            "module" => false,
            _ => return None,
        };
        let rest = rest.strip_prefix("{{ artifacts_url }}/")?;
        Some((hypervisor, rest.split(" || ").next().unwrap_or(rest).trim()))
    })?;
    Ok(XenBoot { xen, modules })
}

type Item = (String, String);

/// Reads the hypervisor and its two modules (dom0 kernel, initrd), each as
/// (file, command line), from a profile template; `classify` maps a line to
/// (is it the hypervisor, "FILE ARGS") or skips it.
fn profile_boot(
    template: &str,
    hypervisor_line: &str,
    classify: impl Fn(&str) -> Option<(bool, &str)>,
) -> Result<(Item, Vec<Item>)> {
    let path = labbox::repo_root()
        .join("pxe-assets/profiles")
        .join(template);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut xen = None;
    let mut modules = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some((hypervisor, rest)) = classify(line) else {
            continue;
        };
        let (file, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let item = (file.to_owned(), args.trim().to_owned());
        if hypervisor {
            xen.get_or_insert(item);
        } else {
            modules.push(item);
        }
    }
    let xen = xen.with_context(|| format!("no `{hypervisor_line}` line in {}", path.display()))?;
    if modules.len() != 2 {
        bail!(
            "expected the dom0 kernel and initrd as two modules in {}, found {modules:?}",
            path.display()
        );
    }
    Ok((xen, modules))
}

impl XenBoot {
    /// The per-host iPXE script of the peer: the profile's lines over TFTP.
    fn ipxe_script(&self, host: &str) -> String {
        let mut s = format!("#!ipxe\necho LAB-IPXE profile=xen host={host} peer=dnsmasq\n");
        s.push_str(&format!(
            "kernel tftp://${{next-server}}/{} {}\n",
            self.xen.0, self.xen.1
        ));
        for (f, a) in &self.modules {
            s.push_str(&format!("module tftp://${{next-server}}/{f} {a}\n").replace(" \n", "\n"));
        }
        s.push_str("boot\n");
        s
    }

    /// QEMU's multiboot arguments: `-kernel`, `-append`, `-initrd`.
    fn qemu_args(&self, artifacts: &Path) -> Vec<String> {
        let initrd = self
            .modules
            .iter()
            .map(|(f, a)| {
                let one = format!("{} {a}", artifacts.join(f).display());
                one.trim().replace(',', ",,")
            })
            .collect::<Vec<_>>()
            .join(",");
        vec![
            "-kernel".into(),
            artifacts.join(&self.xen.0).display().to_string(),
            "-append".into(),
            self.xen.1.clone(),
            "-initrd".into(),
            initrd,
        ]
    }

    fn files(&self) -> Vec<&str> {
        std::iter::once(self.xen.0.as_str())
            .chain(self.modules.iter().map(|(f, _)| f.as_str()))
            .collect()
    }
}

/// The aarch64 Xen boot of the `xen` profile, read from
/// `pxe-assets/profiles/xen.grub.j2` (its `xen_hypervisor` and two
/// `xen_module` lines) so that (c) boots exactly what the lab boots.
struct ArmBoot {
    xen: (String, String),
    /// The dom0 kernel (gzipped: Xen unpacks it) and the initrd.
    modules: Vec<(String, String)>,
}

fn arm_boot() -> Result<ArmBoot> {
    let (xen, modules) = profile_boot(
        "xen.grub.j2",
        "xen_hypervisor {{ grub_artifacts }}/…",
        |line| {
            // `if xen_module --nounzip {{ grub_artifacts }}/FILE ARGS; then`
            let line = line.strip_prefix("if ").unwrap_or(line);
            let line = line.strip_suffix("; then").unwrap_or(line);
            let (kind, rest) = line.split_once(' ')?;
            let hypervisor = match kind {
                "xen_hypervisor" => true,
                "xen_module" => false,
                _ => return None,
            };
            rest.trim_start_matches("--nounzip")
                .trim()
                .strip_prefix("{{ grub_artifacts }}/")
                .map(|r| (hypervisor, r))
        },
    )?;
    Ok(ArmBoot { xen, modules })
}

impl ArmBoot {
    /// QEMU's direct boot: `-kernel` Xen with its command line, and the
    /// dom0 kernel and initrd as `guest-loader` devices (Xen's boot modules
    /// in the device tree's /chosen), as in lab-in-a-box's xen-direct.sh.
    fn qemu_args(&self, artifacts: &Path) -> Vec<String> {
        let (kernel, bootargs) = &self.modules[0];
        let (initrd, _) = &self.modules[1];
        vec![
            "-kernel".into(),
            artifacts.join(&self.xen.0).display().to_string(),
            "-append".into(),
            self.xen.1.clone(),
            "-device".into(),
            format!(
                "guest-loader,addr=0x42000000,kernel={},bootargs={bootargs}",
                artifacts.join(kernel).display()
            ),
            "-device".into(),
            format!(
                "guest-loader,addr=0x47000000,initrd={}",
                artifacts.join(initrd).display()
            ),
        ]
    }

    /// With GRUB, which the lab's DHCP hands out.
    fn files(&self) -> Vec<&str> {
        ["grubnetaa64-lab.efi", self.xen.0.as_str()]
            .into_iter()
            .chain(self.modules.iter().map(|(f, _)| f.as_str()))
            .collect()
    }
}

// ---------------------------------------------------- console phases

/// Console lines that mark the phases of a PXE boot, in order: the iPXE
/// ROM runs, DHCP starts (after the ROM's fixed banner), the per-host
/// script runs, Xen starts (images loaded), the dom0 kernel starts, its
/// init runs, the marker.
const PHASES: [(&str, &str); 7] = [
    ("rom", "iPXE initialising devices"),
    ("dhcp", "Configuring (net0"),
    ("script", "LAB-IPXE"),
    ("xen", "(XEN) Xen version"),
    ("dom0", "Linux version"),
    ("init", "LAB-BOOTED"),
    ("marker", MARKER),
];

/// The phases of an aarch64 UEFI PXE boot through GRUB, in order: the
/// firmware starts PXE over IPv4 (after its fixed ~3.8 s of collecting DHCP
/// offers comes the download), GRUB runs `grub/grub.cfg`, the per-host
/// config of the profile runs, Xen starts, the dom0 kernel starts, its init
/// runs, the marker.
const ARM_PHASES: [(&str, &str); 7] = [
    ("pxe", "Start PXE over IPv4"),
    ("grub", "LAB-GRUB mac="),
    ("config", "LAB-GRUB profile="),
    ("xen", "Xen version"),
    ("dom0", "Linux version"),
    ("init", "LAB-BOOTED"),
    ("marker", MARKER),
];

/// A table of phases: (name, console text), the marker last.
type PhaseTable = [(&'static str, &'static str)];

/// When each phase of a [`PhaseTable`] first appeared (seconds after `t0`).
type Phases = Vec<Option<f64>>;

/// Polls the host's console file (every 10 ms) from byte `from` until the
/// marker, noting when each phase of `table` appears; fails on a failure
/// marker or after `timeout` with the console's tail.
fn wait_phases(
    lab: &LabBox,
    h: &BoxHost,
    table: &PhaseTable,
    from: u64,
    t0: Instant,
    timeout: Duration,
) -> Result<(Duration, Phases)> {
    let mut seen: Phases = vec![None; table.len()];
    loop {
        let bytes = std::fs::read(lab.console_path(h)).unwrap_or_default();
        let now = Instant::now();
        let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
        for (i, (_, needle)) in table.iter().enumerate() {
            if seen[i].is_none() && text.contains(needle) {
                seen[i] = Some(now.duration_since(t0).as_secs_f64());
            }
        }
        if let Some(f) = FAILURES.iter().find(|f| text.contains(*f)) {
            bail!("{} reported {f}; console tail:\n{}", h.name, tail(&text));
        }
        if seen[table.len() - 1].is_some() {
            return Ok((now.duration_since(t0), seen));
        }
        if now.duration_since(t0) > timeout {
            bail!(
                "no {MARKER} on {}'s console within {timeout:?}; console tail:\n{}",
                h.name,
                tail(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn phases_line(table: &PhaseTable, p: &Phases) -> String {
    table
        .iter()
        .zip(p)
        .filter(|((name, _), _)| *name != "marker")
        .map(|((name, _), t)| match t {
            Some(t) => format!("{name} {t:.2}"),
            None => format!("{name} -"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ------------------------------------------------------ (b) the peer

/// dnsmasq serving DHCP + TFTP in its own lab box.
struct Peer {
    // Dropped first: dnsmasq, then the box.
    _dnsmasq: Proc,
    lab: LabBox,
}

fn dnsmasq_conf(lab: &LabBox, tftp: &Path) -> String {
    let logs = lab.logs();
    let mut s = format!(
        "# boot-bench's hand-tuned peer: DHCP + TFTP only, on br0 inside the box's namespace\n\
         port=0\n\
         user=root\n\
         interface={br}\n\
         bind-interfaces\n\
         except-interface=lo\n\
         dhcp-authoritative\n\
         dhcp-range={net},static,255.255.255.0,1h\n\
         # iPXE identifies itself with option 175 and user class iPXE\n\
         dhcp-match=set:ipxe,175\n\
         dhcp-userclass=set:ipxe,iPXE\n\
         # iPXE option 175.176 (no-pxedhcp): don't wait ~3 s for ProxyDHCP offers\n\
         dhcp-option=tag:ipxe,encap:175,176,1b\n\
         # no ~3 s ICMP probe before each offer\n\
         no-ping\n\
         # answer iPXE's router solicitation (else it waits ~13 s for IPv6)\n\
         enable-ra\n\
         dhcp-range=::,constructor:{br},ra-only\n\
         enable-tftp\n\
         tftp-root={tftp}\n\
         log-dhcp\n\
         pid-file={pid}\n\
         log-facility={log}\n\
         dhcp-leasefile={leases}\n",
        br = bmc::BRIDGE,
        net = "198.18.0.0",
        tftp = tftp.display(),
        pid = logs.join("dnsmasq.pid").display(),
        log = logs.join("dnsmasq.log").display(),
        leases = logs.join("dnsmasq.leases").display(),
    );
    for h in lab.hosts() {
        s.push_str(&format!(
            "dhcp-host={},{},{},set:{}\ndhcp-boot=tag:ipxe,tag:{},hosts/{}.ipxe,,{}\n",
            h.mac,
            h.ipv4,
            h.name,
            h.name,
            h.name,
            h.name,
            bmc::SERVER_IP
        ));
    }
    s
}

fn start_peer(boot: &XenBoot, artifacts: &Path) -> Result<Peer> {
    let lab = LabBox::start("bench-peer", 1);
    let ns = lab.netns();
    ns.ip(&["addr", "add", RA_ADDR, "dev", bmc::BRIDGE, "nodad"]);
    let tftp = lab.logs().join("tftp");
    std::fs::create_dir_all(tftp.join("hosts"))?;
    for f in boot.files() {
        let (src, dst) = (artifacts.join(f), tftp.join(f));
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).with_context(|| format!("copy {}", src.display()))?;
        }
    }
    for h in lab.hosts() {
        std::fs::write(
            tftp.join(format!("hosts/{}.ipxe", h.name)),
            boot.ipxe_script(&h.name),
        )?;
    }
    let conf = lab.logs().join("dnsmasq.conf");
    std::fs::write(&conf, dnsmasq_conf(&lab, &tftp))?;
    let mut cmd = ns.command("dnsmasq");
    cmd.arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()));
    let dnsmasq = Proc::spawn("dnsmasq", cmd, lab.logs());
    let log = lab.logs().join("dnsmasq.log");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("TFTP root is") {
            break;
        }
        let stderr =
            std::fs::read_to_string(lab.logs().join("dnsmasq.stderr.log")).unwrap_or_default();
        if Instant::now() > deadline || stderr.contains("dnsmasq:") {
            bail!("dnsmasq did not start:\n{stderr}\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Peer {
        _dnsmasq: dnsmasq,
        lab,
    })
}

/// Powers the host off over IPMI and waits until its VM is gone.
fn power_off(lab: &LabBox, h: &BoxHost) -> Result<()> {
    lab.ipmitool(h, &["chassis", "power", "off"])
        .map_err(anyhow::Error::msg)?;
    if !lab.wait_vm(h, false, Duration::from_secs(15)) {
        bail!("{}'s VM still runs after IPMI power off", h.name);
    }
    Ok(())
}

fn run_peer(peer: &Peer, timeout: Duration) -> Result<(Duration, Phases)> {
    let lab = &peer.lab;
    let h = &lab.hosts()[0];
    if lab.vm_running(h) {
        power_off(lab, h)?;
    }
    let from = lab.console_len(h);
    let t0 = Instant::now();
    let out = lab
        .ipmitool(h, &["chassis", "bootdev", "pxe"])
        .map_err(anyhow::Error::msg)?;
    if !out.contains("pxe") {
        bail!("chassis bootdev pxe refused: {out}");
    }
    lab.ipmitool(h, &["chassis", "power", "on"])
        .map_err(anyhow::Error::msg)?;
    let r = wait_phases(lab, h, &PHASES, from, t0, timeout).context("(b) dnsmasq + ipmitool")?;
    power_off(lab, h)?;
    Ok(r)
}

// ---------------------------------------------------- (c) the floor

fn run_direct(
    boot: &XenBoot,
    artifacts: &Path,
    logs: &LogDir,
    n: usize,
    timeout: Duration,
) -> Result<Duration> {
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "qemu64", "-m", bmc::VM_MEM])
        .args([
            "-nodefaults",
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .args(boot.qemu_args(artifacts));
    time_to_marker(cmd, &format!("direct-{n}"), "(c)", logs, timeout)
}

/// Starts `cmd` (a QEMU with its serial console on stdout) and times it to
/// the dom0 marker.
fn time_to_marker(
    cmd: std::process::Command,
    name: &str,
    row: &str,
    logs: &LogDir,
    timeout: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    let mut vm = Proc::spawn(name, cmd, logs);
    let r = vm.wait_for(
        timeout,
        |l| l.contains(MARKER),
        |l| FAILURES.iter().any(|f| l.contains(f)),
    );
    let dt = t0.elapsed();
    vm.kill();
    match r {
        Ok(_) => Ok(dt),
        Err(WaitError::Failed(l)) => bail!("{row} direct boot failed: {l}"),
        Err(e) => bail!(
            "{row} no {MARKER} from the direct boot within {timeout:?} ({e:?}); see {}",
            vm.log_path().display()
        ),
    }
}

/// aarch64 (c): QEMU virt boots Xen and dom0 directly (no firmware).
fn run_direct_arm(
    boot: &ArmBoot,
    artifacts: &Path,
    logs: &LogDir,
    n: usize,
    timeout: Duration,
) -> Result<Duration> {
    let mut cmd = std::process::Command::new("qemu-system-aarch64");
    cmd.args(["-accel", "tcg"])
        .args(["-M", "virt,virtualization=on,gic-version=3,acpi=off"])
        .args(["-cpu", "cortex-a57", "-m", bmc::VM_MEM])
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .args(boot.qemu_args(artifacts));
    time_to_marker(
        cmd,
        &format!("direct-arm-{n}"),
        "aarch64 (c)",
        logs,
        timeout,
    )
}

// ------------------------------------------------- (a) the whole lab

/// lab-server and lab-agent in their own lab box (the same set-up as the
/// end-to-end test and the demo).
type Lab = RunningLab;

fn start_lab(artifacts: &Path) -> Result<Lab> {
    bins_built()?;
    Ok(RunningLab::start("bench-lab", 1, artifacts, "180s"))
}

/// (a) runs the workspace's binaries of the bench's own profile.
fn bins_built() -> Result<()> {
    for bin in ["lab-server", "lab-agent", "lab"] {
        let p = bin_path(bin);
        if !p.is_file() {
            bail!(
                "{} is not built: run `cargo build --release --workspace` first (or pass --skip-lab)",
                p.display()
            );
        }
    }
    Ok(())
}

/// Like [`start_lab`] with one aarch64 UEFI host: the steps of
/// `RunningLab::start` on a box from `LabBox::start_mixed`.
fn start_arm_lab(artifacts: &Path) -> Result<Lab> {
    bins_built()?;
    let lab = LabBox::start_mixed("bench-arm", &[Arch::Aarch64]);
    Ok(RunningLab::start_in(lab, artifacts, "180s"))
}

/// `lab --json …` inside the box's namespace: its stdout as JSON.
fn lab_cli(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let out = lab
        .lab
        .netns()
        .command(bin_path("lab"))
        .arg("--json")
        .args(args)
        .env("LAB_SERVER", format!("http://{}", lab.addr))
        .env("LAB_TOKEN", "bench")
        .output()
        .context("run lab")?;
    if !out.status.success() {
        bail!(
            "lab {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("lab {args:?} printed no JSON"))
}

/// One lease of the lab's first host (x86_64 or aarch64: `table` names the
/// phases of its boot) to the marker, then its release.
fn run_lab(
    lab: &Lab,
    table: &PhaseTable,
    timeout: Duration,
    warned: &mut bool,
) -> Result<(Duration, Phases)> {
    let b = &lab.lab;
    let h = &b.hosts()[0];
    if b.vm_running(h) {
        power_off(b, h)?;
    }
    let from = b.console_len(h);
    let t0 = Instant::now();
    let lease = lab_cli(
        lab,
        &[
            "lease",
            "acquire",
            "--host",
            &h.name,
            "--profile",
            "xen",
            "--ttl",
            "10m",
        ],
    )?;
    let id = lease["id"]
        .as_str()
        .with_context(|| format!("no lease id in {lease}"))?
        .to_owned();
    let r = wait_phases(b, h, table, from, t0, timeout);
    let released = lab_cli(lab, &["lease", "release", &id]);
    let r = r.with_context(|| {
        format!(
            "(a) lease {id} (does lab-agent power hosts on over IPMI when a lease starts? \
             pass --skip-lab until it does)"
        )
    })?;
    released?;
    // The release should power the host off (issue 5); make sure it is off
    // before the next boot either way.
    if !b.wait_vm(h, false, Duration::from_secs(20)) {
        if !*warned {
            eprintln!(
                "boot-bench: (a) the release left {} powered on; powering it off over IPMI",
                h.name
            );
            *warned = true;
        }
        power_off(b, h)?;
    }
    Ok(r)
}

// ------------------------------------------------------------ output

struct Series {
    label: &'static str,
    runs: Vec<Duration>,
}

impl Series {
    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.runs.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self) -> Option<f64> {
        let v = self.sorted();
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    fn row(&self) -> String {
        let v = self.sorted();
        if v.is_empty() {
            return format!(
                "{:<46} {:>7} {:>7} {:>7}   (skipped)",
                self.label, "-", "-", "-"
            );
        }
        let each: Vec<String> = self
            .runs
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        format!(
            "{:<46} {:>7.2} {:>7.2} {:>7.2}   {}",
            self.label,
            v[0],
            self.median().unwrap_or(0.0),
            v[v.len() - 1],
            each.join(" ")
        )
    }
}

fn ratio(a: &Series, b: &Series) -> String {
    match (a.median(), b.median()) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.3}", x / y),
        _ => "-".into(),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.install {
        return install_main(&args);
    }
    let archs: Vec<Arch> = [(args.x86, Arch::X86_64), (args.aarch64, Arch::Aarch64)]
        .into_iter()
        .filter_map(|(on, arch)| on.then_some(arch))
        .collect();
    let mut pre = LabBox::prereqs_for(&archs);
    if args.x86 {
        pre.tool("dnsmasq", &["--version"], "apt-get install -y --no-install-recommends dnsmasq-base (the binary only; it runs only inside the box)");
    }
    pre.tool("curl", &["--version"], "apt-get install -y curl")
        .assert_all();
    let artifacts = labbox::artifacts_dir();
    let boot = if args.x86 { Some(xen_boot()?) } else { None };
    let arm = if args.aarch64 {
        Some(arm_boot()?)
    } else {
        None
    };
    let files: Vec<&str> = boot
        .iter()
        .flat_map(XenBoot::files)
        .chain(arm.iter().flat_map(ArmBoot::files))
        .collect();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &files) {
        bail!("{why}");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let machines: Vec<&str> = [
        (args.x86, "-cpu qemu64"),
        (args.aarch64, "aarch64 -M virt -cpu cortex-a57"),
    ]
    .into_iter()
    .filter_map(|(on, m)| on.then_some(m))
    .collect();
    println!(
        "boot-bench: {} run(s) of each, alternating, one VM at a time; QEMU TCG {} -m {}; {} CPUs; load {}",
        args.runs,
        machines.join(", "),
        bmc::VM_MEM,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("boot-bench: artifacts {}", artifacts.display());

    let mut a = Series {
        label: "(a) lab lease acquire → LAB-DOM0-OK",
        runs: vec![],
    };
    let mut b = Series {
        label: "(b) dnsmasq + ipmitool → LAB-DOM0-OK",
        runs: vec![],
    };
    let mut c = Series {
        label: "(c) QEMU direct -kernel → LAB-DOM0-OK",
        runs: vec![],
    };
    let mut arm_a = Series {
        label: "aarch64 (a) lab lease acquire → LAB-DOM0-OK",
        runs: vec![],
    };
    let mut arm_c = Series {
        label: "aarch64 (c) direct, guest-loader → LAB-DOM0-OK",
        runs: vec![],
    };

    let lab = if args.skip_lab || !args.x86 {
        None
    } else {
        Some(start_lab(&artifacts)?)
    };
    let arm_lab = if args.skip_lab || !args.aarch64 {
        None
    } else {
        Some(start_arm_lab(&artifacts)?)
    };
    let peer = match &boot {
        Some(boot) => Some(start_peer(boot, &artifacts)?),
        None => None,
    };
    let direct_logs = LogDir::new("bench-direct-");
    let mut warned = false;
    if args.x86 {
        println!(
            "boot-bench: [phases] = seconds after the start when the console first shows: rom (iPXE ROM runs), \
             dhcp (iPXE starts DHCP), script (the per-host iPXE script runs), xen (Xen starts), \
             dom0 (the dom0 kernel starts), init (its init runs)"
        );
    }
    if args.aarch64 {
        println!(
            "boot-bench: aarch64 [phases]: pxe (the firmware starts PXE over IPv4), grub (GRUB runs grub/grub.cfg), \
             config (the per-host GRUB config runs), xen, dom0, init"
        );
    }
    for n in 1..=args.runs {
        if let (Some(boot), Some(peer)) = (&boot, &peer) {
            if let Some(lab) = &lab {
                let (d, p) =
                    run_lab(lab, &PHASES, args.timeout, &mut warned).unwrap_or_else(|e| fail(e));
                println!(
                    "run {n}: (a) {:.2} s  [{}]",
                    d.as_secs_f64(),
                    phases_line(&PHASES, &p)
                );
                a.runs.push(d);
            }
            let (d, p) = run_peer(peer, args.timeout).unwrap_or_else(|e| fail(e));
            println!(
                "run {n}: (b) {:.2} s  [{}]",
                d.as_secs_f64(),
                phases_line(&PHASES, &p)
            );
            b.runs.push(d);
            let d = run_direct(boot, &artifacts, &direct_logs, n, args.timeout)
                .unwrap_or_else(|e| fail(e));
            println!("run {n}: (c) {:.2} s", d.as_secs_f64());
            c.runs.push(d);
        }
        if let Some(arm) = &arm {
            if let Some(lab) = &arm_lab {
                let (d, p) = run_lab(lab, &ARM_PHASES, args.timeout, &mut warned)
                    .unwrap_or_else(|e| fail(e));
                println!(
                    "run {n}: aarch64 (a) {:.2} s  [{}]",
                    d.as_secs_f64(),
                    phases_line(&ARM_PHASES, &p)
                );
                arm_a.runs.push(d);
            }
            let d = run_direct_arm(arm, &artifacts, &direct_logs, n, args.timeout)
                .unwrap_or_else(|e| fail(e));
            println!("run {n}: aarch64 (c) {:.2} s", d.as_secs_f64());
            arm_c.runs.push(d);
        }
    }

    println!();
    println!(
        "{:<46} {:>7} {:>7} {:>7}   runs (s)",
        "time to the dom0 marker", "min", "median", "max"
    );
    if args.x86 {
        for s in [&a, &b, &c] {
            println!("{}", s.row());
        }
    }
    if args.aarch64 {
        for s in [&arm_a, &arm_c] {
            println!("{}", s.row());
        }
    }
    println!();
    if args.x86 {
        println!("(a)/(b) median: {}   (goal ≤ 1.05)", ratio(&a, &b));
        println!("(b)/(c) median: {}", ratio(&b, &c));
    }
    if args.aarch64 {
        println!("aarch64 (a)/(c) median: {}", ratio(&arm_a, &arm_c));
    }
    Ok(())
}

// ------------------------------------------------- install to disk

/// The install image and its checksum in the artifacts cache.
const IMAGE: &str = "xenlab-amd64.img.zst";
const IMAGE_SHA256: &str = "xenlab-amd64.img.zst.sha256";
/// What the installer's PXE boot loads.
const INSTALLER: [&str; 2] = ["vmlinuz-amd64", "initrd-install-amd64.gz"];

/// The console phases of a disk boot, in order (each searched for after
/// the previous one; `|` separates alternatives): GRUB runs, Xen starts,
/// the dom0 kernel runs its `/init`, the ready line.
const DISK_PHASES: [(&str, &str); 4] = [
    ("grub", "GNU GRUB|Booting `Debian|Booting 'Debian"),
    ("xen", "(XEN) Xen version"),
    ("dom0", "Run /init as init process|Freeing unused kernel"),
    ("ready", "LAB-DISK-READY"),
];

/// The install's phases before the disk boot: the installer's first line,
/// the stream starts, `stage=done` (streamed, written, verified).
const INSTALL_PHASES: [(&str, &str); 3] = [
    ("installer", "LAB-INSTALL stage=start"),
    ("writing", "LAB-INSTALL stage=writing percent=0 "),
    ("written", "LAB-INSTALL stage=done"),
];

const INSTALL_FAILURES: [&str; 3] = [
    "LAB-INSTALL stage=failed",
    "LAB-DISK-FAILED",
    "LAB-BOOT-FAILED",
];

/// When sshd first answered, and when each console phase appeared
/// (seconds after the start).
struct DiskRun {
    phases: Phases,
    ssh: f64,
}

/// Polls `console` from byte `from` until every phase of `table` has
/// appeared, each after the previous one, and `ssh_up` holds (polled every
/// 250 ms once the phase `ssh_from` was seen); fails on a failure line or
/// after `timeout`. A check blocks up to 2 s (no answer while the host has
/// no address yet), so the phases after `ssh_from` are seen up to 2 s late.
fn wait_disk_run(
    console: &Path,
    from: u64,
    table: &PhaseTable,
    ssh_from: &str,
    t0: Instant,
    timeout: Duration,
    ssh_up: &dyn Fn() -> bool,
) -> Result<DiskRun> {
    let mut seen: Phases = vec![None; table.len()];
    // Where in the text the next phase is searched from.
    let mut at = 0;
    let mut ssh = None;
    let mut last_ssh_poll: Option<Instant> = None;
    let ssh_index = table
        .iter()
        .position(|(n, _)| *n == ssh_from)
        .context("ssh_from names a phase")?;
    loop {
        let bytes = std::fs::read(console).unwrap_or_default();
        let now = Instant::now();
        let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
        for (i, (_, needles)) in table.iter().enumerate() {
            if seen[i].is_some() {
                continue;
            }
            let hit = needles
                .split('|')
                .filter_map(|n| text.get(at..)?.find(n).map(|p| at + p + n.len()))
                .min();
            match hit {
                Some(end) => {
                    seen[i] = Some(now.duration_since(t0).as_secs_f64());
                    at = end;
                }
                None => break,
            }
        }
        if let Some(f) = INSTALL_FAILURES.iter().find(|f| text.contains(*f)) {
            bail!("{f} on the console; its tail:\n{}", tail(&text));
        }
        if ssh.is_none()
            && seen[ssh_index].is_some()
            && last_ssh_poll.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(250))
        {
            last_ssh_poll = Some(now);
            if ssh_up() {
                ssh = Some(Instant::now().duration_since(t0).as_secs_f64());
            }
        }
        if let (Some(ssh), true) = (ssh, seen.iter().all(Option::is_some)) {
            return Ok(DiskRun { phases: seen, ssh });
        }
        if now.duration_since(t0) > timeout {
            bail!(
                "not through every phase with sshd answering within {timeout:?} ({}); console tail:\n{}",
                phases_line_all(table, &seen),
                tail(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every phase, the last one too.
fn phases_line_all(table: &PhaseTable, p: &Phases) -> String {
    table
        .iter()
        .zip(p)
        .map(|((name, _), t)| match t {
            Some(t) => format!("{name} {t:.1}"),
            None => format!("{name} -"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether sshd answers at `addr` inside `ns` (its `SSH-2.0-` banner within
/// 2 s).
fn ssh_banner(ns: &labbox::Netns, addr: &str) -> bool {
    let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, "22"));
    ns.command("timeout")
        .args([
            "2",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{ip}/{port} && head -c 8 <&3"),
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .map(|o| o.stdout.starts_with(b"SSH-2.0-"))
        .unwrap_or(false)
}

/// The installer's `stage=done` words: (bytes, seconds, MB/s).
fn install_figures(console: &str) -> Option<(u64, f64, f64)> {
    let line = console
        .lines()
        .find(|l| l.contains("LAB-INSTALL stage=done"))?;
    let word = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    Some((
        word("bytes")?.parse().ok()?,
        word("seconds")?.parse().ok()?,
        word("mbps")?.parse().ok()?,
    ))
}

/// One install (a): lease with `xen-install` and `--wait-ready` → SSH in
/// dom0 from the disk; then the release. Returns the run, the installer's
/// figures and when `lab --wait-ready` returned.
fn run_install_lab(
    lab: &Lab,
    table: &PhaseTable,
    timeout: Duration,
) -> Result<(DiskRun, (u64, f64, f64), f64)> {
    let b = &lab.lab;
    let h = &b.hosts()[0];
    if b.vm_running(h) {
        power_off(b, h)?;
    }
    let from = b.console_len(h);
    let t0 = Instant::now();
    let child = lab
        .lab
        .netns()
        .command(bin_path("lab"))
        .args(["--json", "lease", "acquire", "--host", &h.name])
        .args([
            "--profile",
            "xen-install",
            "--ttl",
            "20m",
            "--ssh-key",
            "none",
        ])
        .arg(format!("--wait-ready={}s", timeout.as_secs()))
        .env("LAB_SERVER", format!("http://{}", lab.addr))
        .env("LAB_TOKEN", "bench")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run lab lease acquire")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send((Instant::now(), out));
    });
    let addr = format!("{}:22", h.ipv4);
    let run = wait_disk_run(b.console_path(h), from, table, "dom0", t0, timeout, &|| {
        ssh_banner(b.netns(), &addr)
    });
    // The CLI returns once the server has READY (or failed, or its own
    // timeout): the lease id is on its stdout either way.
    let (when, out) = rx
        .recv_timeout(timeout)
        .context("lab lease acquire --wait-ready did not return")?;
    let out = out.context("lab lease acquire")?;
    let lease: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "lab lease acquire printed no lease: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let id = lease["id"]
        .as_str()
        .with_context(|| format!("no lease id in {lease}"))?
        .to_owned();
    let released = lab_cli(lab, &["lease", "release", &id]);
    let run = run.with_context(|| format!("install (a) lease {id}"))?;
    if !out.status.success() {
        bail!(
            "lab lease acquire --wait-ready failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    released?;
    if !b.wait_vm(h, false, Duration::from_secs(60)) {
        bail!("the release left {} powered on", h.name);
    }
    let console = String::from_utf8_lossy(
        std::fs::read(b.console_path(h))
            .unwrap_or_default()
            .get(from as usize..)
            .unwrap_or_default(),
    )
    .into_owned();
    let figures = install_figures(&console).context("no stage=done figures on the console")?;
    Ok((run, figures, when.duration_since(t0).as_secs_f64()))
}

/// The durations between the phases at `marks` (indices into the run's
/// phases, in order) and then to sshd answering; the first is from the
/// start.
fn steps(run: &DiskRun, marks: &[usize]) -> Vec<f64> {
    let mut out = Vec::new();
    let mut prev = 0.0;
    for &i in marks {
        let t = run.phases[i].unwrap_or(prev);
        out.push(t - prev);
        prev = t;
    }
    out.push(run.ssh - prev);
    out
}

/// The floor's disk: the image decompressed once (sparse), removed at the
/// end.
struct FloorDisk(std::path::PathBuf);

impl FloorDisk {
    fn make(artifacts: &Path, dir: &Path) -> Result<FloorDisk> {
        let path = dir.join("floor.img");
        let out = std::process::Command::new("zstd")
            .args(["-d", "-q", "-f", "--sparse", "-o"])
            .arg(&path)
            .arg(artifacts.join(IMAGE))
            .output()
            .context("run zstd")?;
        if !out.status.success() {
            bail!("zstd -d {IMAGE}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(FloorDisk(path))
    }
}

impl Drop for FloorDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One install (c): QEMU boots the image's disk (a first boot: writes go
/// to a snapshot) in a namespace of its own → sshd answers on a hostfwd.
fn run_floor(disk: &FloorDisk, logs: &LogDir, n: usize, timeout: Duration) -> Result<DiskRun> {
    let ns = labbox::Netns::new("bench-floor");
    let mut cmd = ns.command("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "qemu64", "-m", bmc::VM_MEM])
        .args(["-nodefaults", "-nographic", "-monitor", "none"])
        .args(["-serial", "stdio"])
        .args([
            "-netdev",
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
            "-device",
            "virtio-net-pci,disable-legacy=on,netdev=n0,romfile=",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=disk0,format=raw,snapshot=on",
            disk.0.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=disk0,bootindex=1"])
        .args(["-boot", "strict=on"]);
    let t0 = Instant::now();
    let mut vm = Proc::spawn(&format!("floor-{n}"), cmd, logs);
    let r = wait_disk_run(vm.log_path(), 0, &DISK_PHASES, "dom0", t0, timeout, &|| {
        ssh_banner(&ns, "127.0.0.1:2222")
    });
    vm.kill();
    r.context("install (c) QEMU from the image's disk")
}

fn install_main(args: &Args) -> Result<()> {
    let mut pre = LabBox::prereqs();
    pre.tool("zstd", &["--version"], "apt-get install -y zstd")
        .tool("timeout", &["--version"], "apt-get install -y coreutils");
    let artifacts = labbox::artifacts_dir();
    for f in [IMAGE, IMAGE_SHA256] {
        pre.file(
            &artifacts.join(f),
            "the disk image is built by `sudo pxe-assets/build-image.sh` (scripts/deps.sh runs it)",
        );
    }
    pre.assert_all();
    if let Some(why) = labbox::ensure_artifacts(&artifacts, &INSTALLER) {
        bail!("{why}");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let info = std::fs::read_to_string(artifacts.join("xenlab-amd64.img.info")).unwrap_or_default();
    let info_word = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or("?")
            .to_owned()
    };
    println!(
        "boot-bench --install: {} run(s) of each, alternating, one VM at a time; QEMU TCG -cpu qemu64 -m {}; {} CPUs; load {}",
        args.runs,
        bmc::VM_MEM,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "boot-bench: image {} ({} bytes compressed, {} bytes written), artifacts {}",
        IMAGE,
        info_word("compressed_bytes"),
        info_word("image_bytes"),
        artifacts.display()
    );
    println!(
        "boot-bench: [phases] = seconds after the start when the console first shows: installer (its first line), \
         writing (the image stream starts), written (stage=done: streamed, written, verified), grub (the disk boots), \
         xen (Xen starts), dom0 (its /init runs), ready (LAB-DISK-READY); ssh = sshd's banner answers; \
         cli = lab lease acquire --wait-ready returned"
    );
    let table: Vec<(&str, &str)> = INSTALL_PHASES
        .iter()
        .chain(DISK_PHASES.iter())
        .copied()
        .collect();
    let lab = if args.skip_lab {
        None
    } else {
        Some(start_lab(&artifacts)?)
    };
    let floor_logs = LogDir::new("bench-floor-");
    let disk = FloorDisk::make(&artifacts, floor_logs.path())?;
    let mut a = Series {
        label: "install (a) lease → SSH in dom0 from disk",
        runs: vec![],
    };
    let mut c = Series {
        label: "install (c) QEMU, the image's disk → SSH",
        runs: vec![],
    };
    // (a) from the disk boot on: the install's end (stage=done) → SSH.
    let mut a_boot = Series {
        label: "install (a) stage=done → SSH (reboot, boot)",
        runs: vec![],
    };
    let mut mbps = Vec::new();
    // Phase durations (s) of every run: (a) and (c).
    let mut a_steps: Vec<Vec<f64>> = Vec::new();
    let mut c_steps: Vec<Vec<f64>> = Vec::new();
    for n in 1..=args.runs {
        if let Some(lab) = &lab {
            let (run, (bytes, secs, rate), cli) =
                run_install_lab(lab, &table, args.timeout).unwrap_or_else(|e| fail(e));
            println!(
                "run {n}: install (a) {:.1} s  [{}, ssh {:.1}, cli {:.1}]  installer: {} bytes in {secs} s, {rate} MB/s",
                run.ssh,
                phases_line_all(&table, &run.phases),
                run.ssh,
                cli,
                bytes
            );
            a.runs.push(Duration::from_secs_f64(run.ssh));
            let written = run.phases[2].unwrap_or(0.0);
            a_boot.runs.push(Duration::from_secs_f64(run.ssh - written));
            mbps.push(rate);
            a_steps.push(steps(&run, &[0, 1, 2, 3, 4, 5]));
        }
        let run = run_floor(&disk, &floor_logs, n, args.timeout).unwrap_or_else(|e| fail(e));
        println!(
            "run {n}: install (c) {:.1} s  [{}, ssh {:.1}]",
            run.ssh,
            phases_line_all(&DISK_PHASES, &run.phases),
            run.ssh
        );
        c.runs.push(Duration::from_secs_f64(run.ssh));
        c_steps.push(steps(&run, &[0, 1, 2]));
    }
    println!();
    println!(
        "{:<46} {:>7} {:>7} {:>7}   runs (s)",
        "time to sshd answering in dom0", "min", "median", "max"
    );
    for s in [&a, &a_boot, &c] {
        println!("{}", s.row());
    }
    println!();
    println!(
        "{:<46} {:>9} {:>9}",
        "by phase (median s)", "(a) lab", "(c) floor"
    );
    let med = |runs: &[Vec<f64>], i: Option<usize>| -> String {
        let Some(i) = i else { return "-".into() };
        let mut v: Vec<f64> = runs.iter().filter_map(|r| r.get(i).copied()).collect();
        if v.is_empty() {
            return "-".into();
        }
        v.sort_by(f64::total_cmp);
        format!("{:.1}", (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0)
    };
    for (label, ai, ci) in [
        ("lease → installer's first line (PXE)", Some(0), None),
        ("installer: DHCP, metadata, disk", Some(1), None),
        ("image streamed, written, verified", Some(2), None),
        ("reboot: power-off, boot device disk, on", Some(3), None),
        ("QEMU start → GRUB", None, Some(0)),
        ("GRUB → Xen", Some(4), Some(1)),
        ("Xen → dom0 /init", Some(5), Some(2)),
        ("dom0 /init → sshd answering", Some(6), Some(3)),
    ] {
        println!(
            "{label:<46} {:>9} {:>9}",
            med(&a_steps, ai),
            med(&c_steps, ci)
        );
    }
    println!();
    println!("install (a)/(c) median: {}", ratio(&a, &c));
    println!(
        "install (a) stage=done → SSH / (c) median: {}",
        ratio(&a_boot, &c)
    );
    if !mbps.is_empty() {
        mbps.sort_by(f64::total_cmp);
        println!(
            "install throughput (installer, MB/s of image written): min {:.1} median {:.1} max {:.1}",
            mbps[0],
            (mbps[(mbps.len() - 1) / 2] + mbps[mbps.len() / 2]) / 2.0,
            mbps[mbps.len() - 1]
        );
    }
    Ok(())
}

/// A failed boot: panic so that the lab boxes keep their logs (consoles,
/// BMC, dnsmasq, agent) and print them while they are torn down.
fn fail(e: anyhow::Error) -> ! {
    panic!("boot-bench: {e:#}")
}
