//! A lab in a box with a simulated BMC per host: N hosts in one fresh
//! network namespace — x86_64 BIOS hosts and aarch64 UEFI hosts ([`Arch`](crate::labbox::bmc::Arch)) —
//! each a QEMU VM that its own OpenIPMI `ipmi_sim` powers on and off, with a
//! persistent serial console.
//!
//! Inside the namespace: a bridge `br0` with 198.18.0.1/24; per host `hI`
//! (I = 1, 2, …) a tap `tapI` on the bridge for the VM (MAC
//! 52:54:00:00:01:0I, static address 198.18.0.(10+I) for the inventory), and
//! a BMC: `ipmi_sim` listening on 198.18.0.(100+I):623 (IPMI 2.0 / lanplus,
//! user `admin`, the box's password) whose `chassis_control` program
//! (`bmc-chassis.sh`) starts, stops and resets the VM (`-daemonize`, pidfile)
//! and keeps the boot device, and whose SOL reaches the host's serial relay
//! (`serial-relay.py`). The relay is where the VM's serial port connects; it
//! appends every console byte to `<logs>/hI-console.log`, across power
//! cycles: the ground truth of the console for tests and benchmarks.
//!
//! Each x86_64 host has a disk: a qcow2 file (`<logs>/hI/disk.qcow2`, of
//! [`DISK_SIZE`](crate::labbox::bmc::DISK_SIZE), created empty by
//! `qemu-img` when the box starts, deleted at teardown) that its VM sees as
//! a virtio-blk disk. The boot device the
//! BMC keeps decides what boots: `pxe` the NIC's iPXE ROM, then the disk;
//! `disk` (and any other) the disk alone. A reset after the boot device
//! changed restarts the VM with the new one, as a real BMC's next boot
//! would.
//!
//! Everything runs inside the namespace (`ipmi_sim` is started with
//! `ip netns exec`, so the QEMU it starts inherits it); the relays listen on
//! the namespace's own loopback. No DHCP server is started here: a test adds
//! its own (lab-agent, dnsmasq) inside the namespace, on `br0`.
//!
//! A host can carry a hardware fault (`Fault`: half the memory, a NIC
//! that drops PXE, no disk), read by `bmc-chassis.sh` at every power-on
//! from `<host dir>/fault` (`LabBox::set_fault`).
//!
//! Teardown ([`Drop`]) kills the VMs (by pidfile), the BMCs and the relays,
//! deletes the namespace (its bridge and taps go with it) and removes the
//! log directory — or keeps it, printing every `*.log`, when the thread is
//! panicking (see [`LogDir`]). The process becomes a child subreaper so that
//! the daemonized QEMUs are reaped by it rather than left as zombies.

use super::{LogDir, Netns, Prereqs, Proc, QEMU_INSTALL, ipxe_virtio_rom, is_root, repo_root};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The bridge every VM and BMC is on.
pub const BRIDGE: &str = "br0";
/// The address of the bridge: where a DHCP/TFTP/HTTP server of the box listens.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The prefix length of the box's network (198.18.0.0/24).
pub const PREFIX_LEN: u8 = 24;
/// IPMI over LAN.
pub const BMC_PORT: u16 = 623;
/// The BMC user with administrator privilege.
pub const BMC_USER: &str = "admin";
/// The environment variable that holds the BMCs' password for lab-server
/// (and lab-agent) in [`LabBox::inventory_toml`].
pub const PASSWORD_ENV: &str = "LAB_BMC_PASSWORD";
/// Memory of each VM (Xen + dom0 with `dom0_mem=512M`).
pub const VM_MEM: &str = "1G";
/// The most hosts a box can have (addresses 198.18.0.11… and .101…).
pub const MAX_HOSTS: usize = 80;
/// The virtual size of each x86_64 host's disk (a sparse qcow2: it takes
/// room only for what is written, ~0.7–0.9 GiB after an install).
pub const DISK_SIZE: &str = "4G";
/// Where `qemu-img` comes from.
pub const QEMU_IMG_INSTALL: &str = "apt-get install -y --no-install-recommends qemu-utils (or qemu-utils/bookworm beside bookworm's qemu-system-x86)";

/// The apt line for the BMC side.
pub const IPMI_INSTALL: &str = "apt-get install -y --no-install-recommends openipmi ipmitool";
/// The apt line for aarch64 hosts' QEMU.
pub const QEMU_ARM_INSTALL: &str = "apt-get install -y --no-install-recommends qemu-system-arm";
/// The apt line for aarch64 hosts' UEFI firmware (AAVMF).
pub const AAVMF_INSTALL: &str = "apt-get install -y --no-install-recommends qemu-efi-aarch64";
/// AAVMF's code (read-only flash of every aarch64 VM).
pub const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
/// AAVMF's variable store template: each aarch64 power-on gets a fresh copy.
pub const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// What a box host is: its architecture, and with it its firmware and the
/// QEMU machine that `bmc-chassis.sh` starts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `qemu-system-x86_64 -cpu qemu64`, SeaBIOS, a virtio-blk disk;
    /// `bootdev pxe` gives the NIC QEMU's iPXE ROM (then the disk),
    /// `bootdev disk` boots the disk.
    X86_64,
    /// `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3,acpi=off
    /// -cpu cortex-a57` with AAVMF (UEFI; a fresh VARS copy per power-on),
    /// whose own virtio-net driver PXE-boots; `bootdev pxe` attaches the NIC.
    Aarch64,
}

impl Arch {
    /// The inventory's `arch`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The inventory's `firmware`.
    pub fn firmware(self) -> &'static str {
        match self {
            Arch::X86_64 => "bios",
            Arch::Aarch64 => "uefi",
        }
    }
}

/// A hardware fault a box host can carry: `bmc-chassis.sh` reads it from
/// `<host dir>/fault` at every power-on (and a reset after it changed
/// restarts the VM with it), so it shows from the host's next boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The VM gets half of [`VM_MEM`].
    Memory,
    /// The NIC drops PXE: an x86_64 VM's NIC has no boot ROM (SeaBIOS
    /// ends in "No bootable device"), an aarch64 VM's NIC reaches nothing
    /// (no DHCP reply).
    Nic,
    /// No disk attached.
    Disk,
}

impl Fault {
    /// Every fault, in the order `lab-demo` lists them.
    pub const ALL: [Fault; 3] = [Fault::Memory, Fault::Nic, Fault::Disk];

    /// Its word in the fault file and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Memory => "memory",
            Fault::Nic => "nic",
            Fault::Disk => "disk",
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown fault {s:?}: memory, nic or disk"))
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One simulated host of the box and how to reach its BMC.
#[derive(Debug, Clone)]
pub struct BoxHost {
    /// 1-based.
    pub index: usize,
    /// `h1`, `h2`, …
    pub name: String,
    /// Its architecture (and so its firmware).
    pub arch: Arch,
    /// `52:54:00:00:01:0I` (lower-case, ':'-separated).
    pub mac: String,
    /// The static address for the inventory: 198.18.0.(10+I).
    pub ipv4: Ipv4Addr,
    /// The tap device of its VM on the bridge.
    pub tap: String,
    /// Where its BMC listens: 198.18.0.(100+I).
    pub bmc_addr: Ipv4Addr,
    pub bmc_port: u16,
    pub bmc_user: String,
    /// Its files: vm.env, the ipmi_sim config and state, pidfile, QMP socket,
    /// the disk.
    pub dir: PathBuf,
    /// Its disk (`<dir>/disk.qcow2`, x86_64 hosts), or `None` (aarch64
    /// hosts: there is no arm64 disk image to install).
    pub disk: Option<PathBuf>,
    /// The console file (every byte from its serial port).
    pub console: PathBuf,
    /// Loopback ports (inside the namespace) of its serial relay: where the
    /// VM connects, and where the BMC's SOL connects.
    pub relay_vm_port: u16,
    pub relay_sol_port: u16,
}

impl BoxHost {
    /// x86_64 BIOS host `index` (1-based) with its files under `logs`.
    pub fn new(index: usize, logs: &Path) -> BoxHost {
        BoxHost::with_arch(index, Arch::X86_64, logs)
    }

    /// Host `index` (1-based) of `arch` with its files under `logs`; its
    /// name, MAC and addresses depend on the index only.
    pub fn with_arch(index: usize, arch: Arch, logs: &Path) -> BoxHost {
        assert!(
            (1..=MAX_HOSTS).contains(&index),
            "host index {index} out of 1..={MAX_HOSTS}"
        );
        let name = format!("h{index}");
        BoxHost {
            index,
            arch,
            mac: format!("52:54:00:00:01:{index:02x}"),
            ipv4: Ipv4Addr::new(198, 18, 0, 10 + index as u8),
            tap: format!("tap{index}"),
            bmc_addr: Ipv4Addr::new(198, 18, 0, 100 + index as u8),
            bmc_port: BMC_PORT,
            bmc_user: BMC_USER.to_owned(),
            dir: logs.join(&name),
            disk: (arch == Arch::X86_64).then(|| logs.join(&name).join("disk.qcow2")),
            console: logs.join(format!("{name}-console.log")),
            relay_vm_port: 7000 + 2 * index as u16,
            relay_sol_port: 7001 + 2 * index as u16,
            name,
        }
    }

    /// The MAC with '-' separators (as in lab-agent's per-host script URLs).
    pub fn mac_hyphen(&self) -> String {
        self.mac.replace(':', "-")
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The file `bmc-chassis.sh` reads the host's fault from.
    pub fn fault_file(&self) -> PathBuf {
        self.dir.join("fault")
    }
}

/// The inventory for lab-server of `hosts` in one rack `rack` served by
/// agent `agent-<rack>`: each host with its arch and firmware (x86_64 BIOS,
/// aarch64 UEFI) and static address, a `[host.bmc]` whose password is in
/// `$LAB_BMC_PASSWORD`, and the console over IPMI SOL.
/// What the generated inventory expects of every host's memory: the
/// VM's ([`VM_MEM`]). A health check of a host with the `memory` fault
/// (half of it) fails.
pub const MEMORY_MB: u32 = 1024;

pub fn inventory_toml(rack: &str, hosts: &[BoxHost]) -> String {
    let mut s = format!(
        "# generated by tests/labbox/bmc.rs\n[[rack]]\nname = \"{rack}\"\nagent = \"agent-{rack}\"\n"
    );
    for h in hosts {
        s.push_str(&format!(
            "\n[[host]]\nname = \"{}\"\narch = \"{}\"\nfirmware = \"{}\"\nrack = \"{rack}\"\nmac = \"{}\"\nipv4 = \"{}\"\n\
             [host.bmc]\naddress = \"{}\"\nport = {}\nuser = \"{}\"\npassword_env = \"{PASSWORD_ENV}\"\n\
             [host.console]\nkind = \"ipmi-sol\"\n\
             [host.expect]\nmemory_mb = {MEMORY_MB}\n",
            h.name,
            h.arch.name(),
            h.arch.firmware(),
            h.mac,
            h.ipv4,
            h.bmc_addr,
            h.bmc_port,
            h.bmc_user
        ));
    }
    s
}

/// When a console marker was first seen, and its line.
#[derive(Debug, Clone)]
pub struct ConsoleHit {
    /// The line holding the marker (lossy UTF-8, `\r` removed); complete if
    /// its end arrived within a second of the marker.
    pub line: String,
    /// The moment the marker was first seen in the console file (polled
    /// every 10 ms).
    pub at: Instant,
}

/// The lab in a box. See the module documentation.
pub struct LabBox {
    hosts: Vec<BoxHost>,
    password: String,
    // Dropped in this order (after `Drop::drop` killed the VMs): the BMCs
    // and relays, then the namespace (with anything left in it), then the
    // logs (printed if panicking).
    procs: Vec<Proc>,
    ns: Netns,
    logs: LogDir,
}

impl LabBox {
    /// What a box of x86_64 hosts needs, with what is missing named and how
    /// to install it.
    pub fn prereqs() -> Prereqs {
        LabBox::prereqs_for(&[Arch::X86_64])
    }

    /// What a box with hosts of `archs` needs: the BMC side, plus QEMU and
    /// the iPXE ROM for x86_64 hosts, `qemu-system-aarch64` and AAVMF for
    /// aarch64 hosts.
    pub fn prereqs_for(archs: &[Arch]) -> Prereqs {
        let mut pre = Prereqs::default();
        pre.check(
            is_root(),
            "root is needed (network namespaces, tap devices): run as root",
        )
        .tool("ip", &["-V"], "apt-get install -y iproute2")
        .tool("bash", &["--version"], "apt-get install -y bash")
        .tool("python3", &["--version"], "apt-get install -y python3")
        .tool("ipmi_sim", &["--version"], IPMI_INSTALL)
        .tool("ipmitool", &["-V"], IPMI_INSTALL);
        if archs.contains(&Arch::X86_64) {
            pre.tool("qemu-system-x86_64", &["--version"], QEMU_INSTALL)
                .tool("qemu-img", &["--version"], QEMU_IMG_INSTALL)
                .check(
                    ipxe_virtio_rom().is_some(),
                    format!(
                        "QEMU's iPXE ROM pxe-virtio.rom (in /usr/lib/ipxe/qemu or /usr/share/qemu) is missing: {QEMU_INSTALL}"
                    ),
                );
        }
        if archs.contains(&Arch::Aarch64) {
            pre.tool("qemu-system-aarch64", &["--version"], QEMU_ARM_INSTALL)
                .file(Path::new(AAVMF_CODE), AAVMF_INSTALL)
                .file(Path::new(AAVMF_VARS), AAVMF_INSTALL);
        }
        pre.file(
            &chassis_script(),
            "tests/labbox/bmc-chassis.sh is part of the repository",
        )
        .file(
            &relay_script(),
            "tests/labbox/serial-relay.py is part of the repository",
        );
        pre
    }

    /// Checks the prerequisites (panicking with all that is missing), then
    /// builds the box with `n_hosts` x86_64 hosts, every VM powered off, and
    /// waits until every BMC answers `chassis power status`. The namespace
    /// is `<prefix>-<pid>-<n>`, the log directory `/tmp/<prefix>-…`.
    pub fn start(prefix: &str, n_hosts: usize) -> LabBox {
        LabBox::start_mixed(prefix, &vec![Arch::X86_64; n_hosts])
    }

    /// Like [`Self::start`], with one host per entry of `archs`, in order:
    /// `archs[0]` is `h1`, and so on. Runs aarch64 guests one at a time on a
    /// small machine: each takes a whole core under TCG.
    pub fn start_mixed(prefix: &str, archs: &[Arch]) -> LabBox {
        let n_hosts = archs.len();
        assert!(
            (1..=MAX_HOSTS).contains(&n_hosts),
            "a lab box has 1..={MAX_HOSTS} hosts, not {n_hosts}"
        );
        LabBox::prereqs_for(archs).assert_all();
        // Daemonized QEMUs are orphans: be their reaper (no zombies).
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("labbox: cannot become a child subreaper ({e}); exited VMs stay zombies");
        }
        // Only x86_64 hosts use it (checked if there is one).
        let rom = ipxe_virtio_rom();
        // Locals drop in reverse order if a step panics: procs, ns, logs.
        let logs = LogDir::new(&format!("{prefix}-"));
        let ns = Netns::new(prefix);
        let mut procs = Vec::new();
        ns.bridge(BRIDGE, &format!("{SERVER_IP}/{PREFIX_LEN}"));
        let password = format!(
            "lb-{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ std::process::id())
                .unwrap_or(0)
        );
        let hosts: Vec<BoxHost> = archs
            .iter()
            .enumerate()
            .map(|(i, &arch)| BoxHost::with_arch(i + 1, arch, logs.path()))
            .collect();
        for h in &hosts {
            std::fs::create_dir_all(h.dir.join("state")).expect("host directory");
            std::fs::File::create(&h.console).expect("console file");
            if let Some(disk) = &h.disk {
                create_disk(disk);
            }
            write_host_files(h, rom.as_deref(), &logs, &password);
            ns.tap(&h.tap, BRIDGE);
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/{PREFIX_LEN}", h.bmc_addr),
                "dev",
                BRIDGE,
            ]);

            let mut cmd = ns.command("python3");
            cmd.arg(relay_script())
                .arg(h.relay_vm_port.to_string())
                .arg(h.relay_sol_port.to_string())
                .arg(&h.console);
            let mut relay = Proc::spawn(&format!("{}-relay", h.name), cmd, &logs);
            relay.expect_line("that it listens", Duration::from_secs(10), |l| {
                l.starts_with("serial-relay ready")
            });
            procs.push(relay);

            let mut cmd = ns.command("ipmi_sim");
            cmd.arg("-c")
                .arg(h.dir.join("lan.conf"))
                .arg("-f")
                .arg(h.dir.join("bmc.emu"))
                .arg("-s")
                .arg(h.dir.join("state"))
                .arg("-n");
            procs.push(Proc::spawn(&format!("{}-ipmi_sim", h.name), cmd, &logs));
        }
        let lab = LabBox {
            hosts,
            password,
            procs,
            ns,
            logs,
        };
        for h in &lab.hosts {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match lab.ipmitool(h, &["-N", "1", "-R", "1", "chassis", "power", "status"]) {
                    Ok(s) if s.contains("Chassis Power is off") => break,
                    Ok(s) => panic!("BMC of {} says {s:?} before any power on", h.name),
                    Err(e) => assert!(
                        Instant::now() < deadline,
                        "the BMC of {} ({}:{}) never answered: {e}",
                        h.name,
                        h.bmc_addr,
                        h.bmc_port
                    ),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        lab
    }

    pub fn hosts(&self) -> &[BoxHost] {
        &self.hosts
    }

    /// The host named `name` (`h1`, …); panics if there is none.
    pub fn host(&self, name: &str) -> &BoxHost {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the box"))
    }

    /// The password of every BMC (user [`BMC_USER`]); give it to lab-server
    /// as `$LAB_BMC_PASSWORD`.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The namespace (to start servers in it with `netns().command(…)`).
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The log directory (console files, BMC and relay logs, generated files).
    pub fn logs(&self) -> &LogDir {
        &self.logs
    }

    /// See [`inventory_toml`].
    pub fn inventory_toml(&self, rack: &str) -> String {
        inventory_toml(rack, &self.hosts)
    }

    // ------------------------------------------------------------ console

    pub fn console_path<'a>(&self, host: &'a BoxHost) -> &'a Path {
        &host.console
    }

    /// The console file's length now: pass it to [`Self::wait_console_from`]
    /// to wait only for what comes next.
    pub fn console_len(&self, host: &BoxHost) -> u64 {
        std::fs::metadata(&host.console)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The whole console so far (lossy UTF-8).
    pub fn console_text(&self, host: &BoxHost) -> String {
        String::from_utf8_lossy(&std::fs::read(&host.console).unwrap_or_default()).into_owned()
    }

    /// Waits until `marker` appears anywhere in the console file.
    pub fn wait_console(
        &self,
        host: &BoxHost,
        marker: &str,
        timeout: Duration,
    ) -> Result<ConsoleHit, String> {
        self.wait_console_from(host, 0, &[marker], &[], timeout)
    }

    /// Waits until one of `done` appears in the console file after byte
    /// `from`; fails early when one of `fail` does. The error says why and
    /// ends with the console's last lines.
    pub fn wait_console_from(
        &self,
        host: &BoxHost,
        from: u64,
        done: &[&str],
        fail: &[&str],
        timeout: Duration,
    ) -> Result<ConsoleHit, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let bytes = std::fs::read(&host.console).unwrap_or_default();
            let now = Instant::now();
            let tail = bytes.get(from as usize..).unwrap_or_default();
            if let Some(i) = find_any(tail, fail) {
                return Err(format!(
                    "{} console shows a failure: {}\n{}",
                    host.name,
                    line_at(tail, i),
                    console_tail(&bytes, 30)
                ));
            }
            if let Some(i) = find_any(tail, done) {
                let offset = from as usize + i;
                return Ok(ConsoleHit {
                    line: self.complete_line(host, offset, Duration::from_secs(1)),
                    at: now,
                });
            }
            if now >= deadline {
                return Err(format!(
                    "no {done:?} on {}'s console within {timeout:?}; last lines:\n{}",
                    host.name,
                    console_tail(&bytes, 30)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The line around byte `offset`, waiting up to `patience` for its end.
    fn complete_line(&self, host: &BoxHost, offset: usize, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            let bytes = std::fs::read(&host.console).unwrap_or_default();
            let ended = bytes[offset.min(bytes.len())..].contains(&b'\n');
            if ended || Instant::now() >= deadline {
                return line_at(&bytes, offset);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    // ------------------------------------------------------------- faults

    /// Gives the host a hardware fault (`None`: clears it), from its next
    /// power-on (or a reset, which then restarts the VM).
    pub fn set_fault(&self, host: &BoxHost, fault: Option<Fault>) {
        let path = host.fault_file();
        match fault {
            Some(f) => std::fs::write(&path, format!("{f}\n"))
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display())),
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("remove {}: {e}", path.display()),
            },
        }
    }

    /// The host's fault (what its next power-on gets).
    pub fn fault(&self, host: &BoxHost) -> Option<Fault> {
        std::fs::read_to_string(host.fault_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    // ---------------------------------------------------------------- VMs

    /// The pid of the host's QEMU if it runs (not exited, not a zombie).
    pub fn vm_pid(&self, host: &BoxHost) -> Option<u32> {
        reap_daemons();
        let pidfile = host.pidfile();
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(") ")?.1.split(' ').next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        // A recycled pid is not our VM: its command line names the pidfile.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = pidfile.to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == needle)
            .then_some(pid)
    }

    /// Whether the host's VM (QEMU) runs.
    pub fn vm_running(&self, host: &BoxHost) -> bool {
        self.vm_pid(host).is_some()
    }

    /// Waits until the VM runs (`true`) or is gone (`false`); whether it
    /// got there within `timeout`.
    pub fn wait_vm(&self, host: &BoxHost, running: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.vm_running(host) == running {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // --------------------------------------------------------------- IPMI

    /// `ipmitool -I lanplus -C 3 -H <bmc> -p <port> -U admin -E` inside the
    /// namespace, the password in `$IPMI_PASSWORD` (never on a command
    /// line). `-C 3`: ipmi_sim never answers Get Channel Cipher Suites, so
    /// without it every call waits 10 s.
    pub fn ipmitool_command(&self, host: &BoxHost) -> Command {
        let mut c = self.ns.command("ipmitool");
        c.args(["-I", "lanplus", "-C", "3", "-H"])
            .arg(host.bmc_addr.to_string())
            .arg("-p")
            .arg(host.bmc_port.to_string())
            .args(["-U", &host.bmc_user, "-E"])
            .env("IPMI_PASSWORD", &self.password);
        c
    }

    /// Runs ipmitool against the host's BMC with `args` (global options
    /// such as `-N 1` first, then the command): its stdout, or an error with
    /// the exit status and stderr. Note that ipmitool exits 0 for some
    /// refusals (e.g. "Invalid data field"): check the output.
    pub fn ipmitool(&self, host: &BoxHost, args: &[&str]) -> Result<String, String> {
        let out: Output = self
            .ipmitool_command(host)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ipmitool: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ipmitool {args:?} on {} failed ({}): {}",
                host.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    // ----------------------------------------------------------- teardown

    /// Pids of everything the box runs now: relays, BMCs, live VMs.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.procs.iter().map(|p| p.pid()).collect();
        v.extend(self.hosts.iter().filter_map(|h| self.vm_pid(h)));
        v
    }

    /// Kills a host's BMC (its `ipmi_sim`): a BMC that stops answering.
    pub fn kill_bmc(&mut self, host: &BoxHost) {
        let name = format!("{}-ipmi_sim", host.name);
        for p in self.procs.iter_mut().filter(|p| p.name == name) {
            p.kill();
        }
    }

    /// Kills the host's VM at once (SIGKILL) and reaps it.
    pub fn kill_vm(&self, host: &BoxHost) {
        if let Some(pid) = self.vm_pid(host) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Until it is reaped, not only until `vm_running` says no: an
            // exiting process loses its command line before it becomes a
            // zombie, so a single reap right then would miss it.
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while proc_dir.exists() && Instant::now() < deadline {
                reap_daemons();
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for LabBox {
    fn drop(&mut self) {
        for h in &self.hosts {
            self.kill_vm(h);
        }
        reap_daemons();
        // The disks go even when the logs are kept (up to ~1 GiB each),
        // unless asked for.
        if std::env::var_os("LAB_KEEP_DISKS").is_none() {
            for disk in self.hosts.iter().filter_map(|h| h.disk.as_ref()) {
                let _ = std::fs::remove_file(disk);
            }
        }
        // Then the fields: relays and BMCs, the namespace, the logs.
    }
}

/// An empty qcow2 disk of [`DISK_SIZE`] at `path`.
fn create_disk(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(DISK_SIZE)
        .output()
        .expect("run qemu-img (checked by prereqs_for)");
    assert!(
        out.status.success(),
        "qemu-img create {} failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Reaps the exited daemonized QEMUs that were handed to us as their
/// subreaper: zombie children of this process in another session (QEMU's
/// `-daemonize` forks twice and calls `setsid`). Children started with
/// `std::process::Command` stay in our session and are left to their
/// `Child` handles, whose exit status must not be stolen.
pub fn reap_daemons() {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    // (state, ppid, session) of /proc/<pid>/stat.
    fn stat(pid: &str) -> Option<(String, u32, u32)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut f = text.rsplit_once(") ")?.1.split(' ');
        let state = f.next()?.to_owned();
        let ppid = f.next()?.parse().ok()?;
        let _pgrp = f.next()?;
        let session = f.next()?.parse().ok()?;
        Some((state, ppid, session))
    }
    let me = std::process::id();
    let Some((_, _, my_session)) = stat("self") else {
        return;
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((state, ppid, session)) = stat(&pid.to_string())
            && state == "Z"
            && ppid == me
            && session != my_session
        {
            let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// `tests/labbox/bmc-chassis.sh` in the repository.
pub fn chassis_script() -> PathBuf {
    repo_root().join("tests/labbox/bmc-chassis.sh")
}

/// `tests/labbox/serial-relay.py` in the repository.
pub fn relay_script() -> PathBuf {
    repo_root().join("tests/labbox/serial-relay.py")
}

/// A minimal BMC for ipmi_sim: one MC at 0x20 with a SEL, no sensors.
const BMC_EMU: &str = "mc_setbmc 0x20\n\
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
sel_enable 0x20 1000 0x0a\n\
mc_enable 0x20\n";

/// Writes the host's vm.env (for bmc-chassis.sh), lan.conf and bmc.emu
/// (for ipmi_sim). `rom` (the iPXE ROM) is needed for x86_64 hosts only.
fn write_host_files(h: &BoxHost, rom: Option<&Path>, logs: &LogDir, password: &str) {
    let q = |p: &Path| -> String {
        let s = p.to_string_lossy().into_owned();
        assert!(
            !s.contains(['\'', '"', ' ', '\n']),
            "path {s:?} must not hold quotes or spaces (ipmi_sim and bash read it)"
        );
        s
    };
    let (rom, qemu) = match h.arch {
        Arch::X86_64 => (
            q(rom.expect("x86_64 hosts need the iPXE ROM (checked by prereqs_for)")),
            "qemu-system-x86_64",
        ),
        Arch::Aarch64 => (String::new(), "qemu-system-aarch64"),
    };
    let mut env = format!(
        "NAME='{}'\nMAC='{}'\nTAP='{}'\nSERIAL_PORT={}\nMEM='{VM_MEM}'\nROM='{}'\nQEMU='{qemu}'\n\
         CHASSIS_LOG='{}'\nQEMU_LOG='{}'\nEXTRA_QEMU_ARGS=''\n",
        h.name,
        h.mac,
        h.tap,
        h.relay_vm_port,
        rom,
        q(&logs.join(&format!("{}-chassis.log", h.name))),
        q(&logs.join(&format!("{}-qemu.log", h.name))),
    );
    if let Some(disk) = &h.disk {
        env.push_str(&format!("DISK='{}'\n", q(disk)));
    }
    // x86_64 hosts' vm.env has no ARCH: bmc-chassis.sh defaults it.
    if h.arch == Arch::Aarch64 {
        env.push_str(&format!(
            "ARCH='aarch64'\nAAVMF_CODE='{}'\nAAVMF_VARS='{}'\n",
            q(Path::new(AAVMF_CODE)),
            q(Path::new(AAVMF_VARS)),
        ));
    }
    std::fs::write(h.dir.join("vm.env"), env).expect("write vm.env");
    let auths = "none md2 md5 straight";
    let conf = format!(
        "# ipmi_sim for lab-in-a-box host {name} (generated by tests/labbox/bmc.rs)\n\
         name \"{name}\"\n\
         set_working_mc 0x20\n\
         \x20 startlan 1\n\
         \x20   addr {addr} {port}\n\
         \x20   priv_limit admin\n\
         \x20   allowed_auths_callback {auths}\n\
         \x20   allowed_auths_user {auths}\n\
         \x20   allowed_auths_operator {auths}\n\
         \x20   allowed_auths_admin {auths}\n\
         \x20   guid {guid:032x}\n\
         \x20 endlan\n\
         \x20 chassis_control \"/bin/bash {script} {dir}\"\n\
         \x20 sol \"tcp:127.0.0.1:{sol}\" 115200\n\
         \x20 user 2 true \"{user}\" \"{password}\" admin 10 {auths}\n",
        name = h.name,
        addr = h.bmc_addr,
        port = h.bmc_port,
        guid = (0x00a1_b0c5_u128 << 64) | h.index as u128,
        script = q(&chassis_script()),
        dir = q(&h.dir),
        sol = h.relay_sol_port,
        user = h.bmc_user,
    );
    std::fs::write(h.dir.join("lan.conf"), conf).expect("write lan.conf");
    std::fs::write(h.dir.join("bmc.emu"), BMC_EMU).expect("write bmc.emu");
}

/// Index of the first of `needles` in `hay` (the earliest one).
fn find_any(hay: &[u8], needles: &[&str]) -> Option<usize> {
    needles
        .iter()
        .filter(|n| !n.is_empty())
        .filter_map(|n| hay.windows(n.len()).position(|w| w == n.as_bytes()))
        .min()
}

/// The line of `bytes` holding byte `i` (lossy UTF-8, `\r` removed).
fn line_at(bytes: &[u8], i: usize) -> String {
    let i = i.min(bytes.len());
    let start = bytes[..i]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let end = bytes[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |p| i + p);
    String::from_utf8_lossy(&bytes[start..end]).replace('\r', "")
}

/// The last `n` lines of `bytes`.
fn console_tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
