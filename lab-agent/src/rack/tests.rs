//! The rack's host reconcilers on paused time, with simulated BMCs
//! ([`SimPower`]) and in-memory consoles the test plays (the host's side
//! of each serial line).

use super::*;
use crate::console::{ConsoleSource, SourceError};
use crate::hosts::{Arch, Firmware};
use crate::ipmi::BootDevice;
use crate::power::{Responsiveness, SimPower};
use std::collections::HashMap;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Consoles whose every connection is an in-memory pipe; the test gets
/// the host's end.
#[derive(Clone)]
pub(crate) struct FakeConsoles {
    tx: mpsc::UnboundedSender<(HostName, DuplexStream)>,
}

impl FakeConsoles {
    pub(crate) fn source(&self, host: &HostName) -> FakeSource {
        FakeSource {
            host: host.clone(),
            tx: self.tx.clone(),
        }
    }
}

pub(crate) struct FakeSource {
    host: HostName,
    tx: mpsc::UnboundedSender<(HostName, DuplexStream)>,
}

impl ConsoleSource for FakeSource {
    type Conn = DuplexStream;

    async fn connect(&self) -> Result<DuplexStream, SourceError> {
        let (agent, host) = tokio::io::duplex(64 * 1024);
        self.tx
            .send((self.host.clone(), host))
            .map_err(|_| SourceError::Connect {
                target: self.describe(),
                source: std::io::Error::other("the test is gone"),
            })?;
        Ok(agent)
    }

    fn describe(&self) -> String {
        format!("fake:{}", self.host)
    }
}

type Bmcs = Arc<Mutex<HashMap<String, Arc<SimPower>>>>;

const READY: &str = "LAB-DOM0-OK";

fn config(dir: &Path) -> RackConfig {
    let mut profiles = BTreeMap::new();
    profiles.insert(
        "xen".to_owned(),
        ProfileSettings {
            ready: Some(READY.into()),
            fail: vec!["LAB-DOM0-FAIL".into()],
            timeout: Duration::from_secs(30),
            xen_debug_keys: b"q".to_vec(),
            install: None,
        },
    );
    profiles.insert(
        "health-check".to_owned(),
        ProfileSettings {
            ready: Some("LAB-HEALTH-OK".into()),
            fail: vec!["LAB-BOOT-FAILED".into(), "No bootable device".into()],
            timeout: Duration::from_secs(180),
            xen_debug_keys: Vec::new(),
            install: None,
        },
    );
    profiles.insert(
        "xen-install".to_owned(),
        ProfileSettings {
            ready: Some("LAB-DISK-READY".into()),
            fail: vec!["LAB-DISK-FAILED".into(), "LAB-BOOT-FAILED".into()],
            timeout: Duration::from_secs(300),
            xen_debug_keys: b"q".to_vec(),
            install: Some(crate::config::InstallSettings::default()),
        },
    );
    RackConfig {
        default_profile: "local-disk".into(),
        profiles,
        data_dir: dir.to_owned(),
        console_limits: Default::default(),
        bmc_probe_interval: Duration::from_secs(30),
        ipmi: Default::default(),
        capture: Default::default(),
    }
}

fn name(n: &str) -> HostName {
    HostName::new(n).unwrap()
}

/// A host with a BMC and a (fake) console, leased or not (profile `xen`).
fn spec(host: &str, n: u8, lease: Option<LeaseId>) -> HostSpec {
    spec_with(host, n, lease, "xen")
}

fn spec_with(host: &str, n: u8, lease: Option<LeaseId>, profile: &str) -> HostSpec {
    HostSpec {
        name: name(host),
        boot: Ok(BootIdentity {
            mac: format!("52:54:00:00:00:{n:02x}").parse().unwrap(),
            ipv4: None,
            arch: Arch::X86_64,
            firmware: Firmware::Bios,
        }),
        lease: lease.map(|id| LeaseSpec {
            id,
            profile: Some(ProfileName::new(profile).unwrap()),
            holder: None,
            ssh_public_key: None,
        }),
        bmc: Some(BmcSpec {
            address: "127.0.0.1".into(),
            port: 623,
            user: "admin".into(),
            password: lab_types::Secret::new(b"pw".to_vec()),
        }),
        console: ConsoleSpec::Tcp {
            target: "fake".into(),
        },
    }
}

/// A rack over simulated BMCs (shared with the test, surviving agent
/// restarts like real hardware) and fake consoles, with every report it
/// sends.
struct Lab {
    rack: Rack,
    table: HostTable,
    bmcs: Bmcs,
    reports: mpsc::UnboundedReceiver<Report>,
    seen: Vec<Report>,
    consoles: mpsc::UnboundedReceiver<(HostName, DuplexStream)>,
    waiting: Vec<(HostName, DuplexStream)>,
}

impl Lab {
    fn new(dir: &Path, bmcs: Bmcs) -> Lab {
        Lab::with_factory(dir, bmcs.clone(), sim_factory(bmcs))
    }

    fn with_factory(dir: &Path, bmcs: Bmcs, factory: PowerFactory) -> Lab {
        let (ctx, consoles) = mpsc::unbounded_channel();
        let table = HostTable::default();
        let rack = Rack::with_consoles(
            config(dir),
            table.clone(),
            factory,
            Consoles::Fake(FakeConsoles { tx: ctx }),
        );
        let (tx, reports) = mpsc::unbounded_channel();
        rack.set_outbound(Some(Box::new(move |r: &Report| tx.send(r.clone()).is_ok())));
        Lab {
            rack,
            table,
            bmcs,
            reports,
            seen: Vec::new(),
            consoles,
            waiting: Vec::new(),
        }
    }

    fn bmc(&self, host: &str) -> Arc<SimPower> {
        self.bmcs.lock().unwrap()[host].clone()
    }

    /// The host's end of the next console connection of `host`.
    async fn console(&mut self, host: &str) -> DuplexStream {
        if let Some(i) = self.waiting.iter().position(|(h, _)| h.as_str() == host) {
            return self.waiting.remove(i).1;
        }
        loop {
            let (h, c) = tokio::time::timeout(Duration::from_secs(3600), self.consoles.recv())
                .await
                .expect("a console connection")
                .expect("consoles open");
            if h.as_str() == host {
                return c;
            }
            self.waiting.push((h, c));
        }
    }

    /// The next report of `host` that satisfies `f` (every report is kept
    /// in `seen`).
    async fn until(&mut self, host: &str, what: &str, f: impl Fn(&Report) -> bool) -> Report {
        loop {
            let r = tokio::time::timeout(Duration::from_secs(3 * 3600), self.reports.recv())
                .await
                .unwrap_or_else(|_| panic!("{host}: no report {what}; seen {:#?}", self.seen))
                .expect("reports open");
            self.seen.push(r.clone());
            if r.host.as_str() == host && f(&r) {
                return r;
            }
        }
    }

    async fn until_phase(&mut self, host: &str, phase: Phase) -> Provisioning {
        self.until(host, &phase.to_string(), |r| {
            r.provisioning.as_ref().is_some_and(|p| p.phase == phase)
        })
        .await
        .provisioning
        .unwrap()
    }

    /// The provisioning (phase, stage, percent) `host` reported so far.
    fn progress(&self, host: &str) -> Vec<(Phase, String, u32)> {
        self.seen
            .iter()
            .filter(|r| r.host.as_str() == host)
            .filter_map(|r| r.provisioning.as_ref())
            .map(|p| (p.phase, p.stage.clone(), p.percent))
            .collect()
    }

    /// The provisioning stages `host` reported so far, in order.
    fn stages(&self, host: &str) -> Vec<(Phase, String)> {
        self.seen
            .iter()
            .filter(|r| r.host.as_str() == host)
            .filter_map(|r| r.provisioning.as_ref())
            .map(|p| (p.phase, p.stage.clone()))
            .collect()
    }
}

fn sim_factory(bmcs: Bmcs) -> PowerFactory {
    Arc::new(move |host, bmc| {
        assert_eq!(bmc.password.expose(), b"pw", "the BMC gets the password");
        let sim = bmcs
            .lock()
            .unwrap()
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(SimPower::new(host)))
            .clone();
        Ok(sim as Arc<dyn PowerControl>)
    })
}

fn stage(phase: Phase, s: &str) -> (Phase, String) {
    (phase, s.to_owned())
}

#[tokio::test(start_paused = true)]
async fn a_lease_boots_over_pxe_powers_on_and_is_ready_on_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    lab.rack.apply_rack(vec![spec("h0", 0, None)]);
    let mut serial = lab.console("h0").await;
    // Output from before the power-on never counts.
    serial
        .write_all(format!("{READY}\r\n").as_bytes())
        .await
        .unwrap();
    let hub = lab.rack.hub("h0").await.unwrap();
    while hub.head() < READY.len() as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let lease = LeaseId::random();
    lab.rack.apply_host(spec("h0", 0, Some(lease)));
    let served = lab.table.all();
    assert_eq!(served.len(), 1);
    assert_eq!(
        (served[0].profile.as_str(), served[0].lease.clone()),
        ("xen", Some(lease.to_string()))
    );
    let booting = lab.until_phase("h0", Phase::Booting).await;
    assert_eq!(
        (booting.lease, booting.stage.as_str()),
        (lease, "powered on")
    );
    let sim = lab.bmc("h0");
    assert_eq!(sim.log(), ["boot Pxe", "On"]);
    assert_eq!(sim.boot(), Some((BootDevice::Pxe, false, false)));
    let t_on = Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    serial
        .write_all(format!("Xen 4.17\r\n{READY} hypervisor=xen\r\n").as_bytes())
        .await
        .unwrap();
    let ready = lab.until_phase("h0", Phase::Ready).await;
    assert_eq!(Instant::now() - t_on, Duration::from_secs(12));
    assert_eq!(
        lab.stages("h0"),
        [
            stage(Phase::Pending, "starting"),
            stage(Phase::Pending, "boot device PXE"),
            stage(Phase::Booting, "powered on"),
            stage(
                Phase::Ready,
                &format!("{READY:?} on the console 12.0s after the lease reached the agent")
            ),
        ]
    );
    assert!(ready.console_tail.is_empty());
    assert!(lab.seen.iter().all(|r| r.unreachable.is_none()));
    // What a restarted agent would read.
    lab.rack.shutdown().await;
    let saved = persist::load(dir.path());
    assert_eq!(saved[&name("h0")].phase, Phase::Ready);
    assert_eq!(saved[&name("h0")].lease, lease);
}

#[tokio::test(start_paused = true)]
async fn a_health_check_is_ready_with_its_facts_line_and_may_power_itself_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    let lease = LeaseId::random();
    lab.rack
        .apply_rack(vec![spec_with("h0", 0, Some(lease), "health-check")]);
    let mut serial = lab.console("h0").await;
    lab.until_phase("h0", Phase::Booting).await;
    // The facts line arrives in pieces; the ready text before its end.
    let facts = "LAB-HEALTH-OK arch=x86_64 cpus=1 mem_kb=503000 model=QEMU_Virtual_CPU \
                 macs=52:54:00:00:00:00 disks=vda:4294967296 virt=svm iommu=no kernel=6.1.0-57-amd64";
    let (head, rest) = facts.split_at(20);
    serial
        .write_all(format!("LAB-BOOTED uptime=2.51\r\n\x1b[0m{head}").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        lab.progress("h0")
            .iter()
            .all(|(p, _, _)| *p != Phase::Ready),
        "not READY before the line ends"
    );
    serial
        .write_all(format!("{rest}\r\nLAB-POWEROFF\r\n").as_bytes())
        .await
        .unwrap();
    let ready = lab.until_phase("h0", Phase::Ready).await;
    assert_eq!((ready.lease, ready.ready_line.as_str()), (lease, facts));
    // The initramfs powers the host off and its console goes quiet: the
    // provisioning stays READY (no failure, no timeout), whatever the
    // BMC probes see for the rest of the lease.
    let sim = lab.bmc("h0");
    sim.set_power(crate::ipmi::PowerAction::Off).await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    // What the agent holds now (sent again, as after an attach).
    lab.rack.resend_reports();
    while let Ok(r) = lab.reports.try_recv() {
        lab.seen.push(r);
    }
    let last = lab.progress("h0").last().cloned().unwrap();
    assert_eq!(last.0, Phase::Ready, "{:?}", lab.progress("h0"));
    assert!(
        lab.progress("h0")
            .iter()
            .all(|(p, _, _)| *p != Phase::Failed),
        "{:?}",
        lab.progress("h0")
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_text_fails_the_boot_with_the_console_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    // Already on: a hard reset instead of a power-on.
    let sim = Arc::new(SimPower::new("h0"));
    sim.set_power(crate::ipmi::PowerAction::On).await.unwrap();
    lab.bmcs.lock().unwrap().insert("h0".into(), sim.clone());
    lab.rack
        .apply_rack(vec![spec("h0", 0, Some(LeaseId::random()))]);
    let mut serial = lab.console("h0").await;
    let booting = lab.until_phase("h0", Phase::Booting).await;
    assert_eq!(booting.stage, "reset (it was on)");
    assert_eq!(sim.log(), ["On", "boot Pxe", "HardReset"]);
    serial
        .write_all(b"(XEN) panic: no dom0\r\nLAB-DOM0-FAIL\r\n")
        .await
        .unwrap();
    let failed = lab.until_phase("h0", Phase::Failed).await;
    assert_eq!(
        failed.stage,
        "failure text \"LAB-DOM0-FAIL\" on the console"
    );
    assert_eq!(failed.console_tail, "(XEN) panic: no dom0\nLAB-DOM0-FAIL");
}

#[tokio::test(start_paused = true)]
async fn no_ready_text_within_the_timeout_fails_the_boot() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    lab.rack
        .apply_rack(vec![spec("h0", 0, Some(LeaseId::random()))]);
    let mut serial = lab.console("h0").await;
    lab.until_phase("h0", Phase::Booting).await;
    let t_on = Instant::now();
    serial
        .write_all(b"kernel panic: no init\r\n")
        .await
        .unwrap();
    let failed = lab.until_phase("h0", Phase::Failed).await;
    assert_eq!(Instant::now() - t_on, Duration::from_secs(30));
    assert_eq!(
        failed.stage,
        format!("no {READY:?} on the console within 30s")
    );
    assert_eq!(failed.console_tail, "kernel panic: no init");
}

#[tokio::test(start_paused = true)]
async fn reclaim_plays_the_debug_keys_powers_off_and_clears_the_boot_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    let lease = LeaseId::random();
    lab.rack.apply_rack(vec![spec("h0", 0, Some(lease))]);
    let mut serial = lab.console("h0").await;
    lab.until_phase("h0", Phase::Booting).await;
    serial.write_all(READY.as_bytes()).await.unwrap();
    lab.until_phase("h0", Phase::Ready).await;
    // The lease ends: the server's desired state drops it, then reclaims.
    lab.rack.apply_host(spec("h0", 0, None));
    let host_side = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while !got.ends_with(b"\x01\x01\x01") || !got.contains(&b'q') {
            let n = serial.read(&mut buf).await.unwrap();
            assert!(n > 0, "console closed; got {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        serial
            .write_all(b"(XEN) 'q' pressed -> dumping domain info\r\n")
            .await
            .unwrap();
        (got, serial)
    });
    let t0 = Instant::now();
    lab.rack
        .reclaim("h0", lease, Some(ProfileName::new("xen").unwrap()))
        .await
        .unwrap();
    // Ctrl-A ×3, 'q', Ctrl-A ×3, 500 ms apart.
    assert_eq!(Instant::now() - t0, Duration::from_millis(1000));
    let (keys, _serial) = host_side.await.unwrap();
    assert_eq!(keys, b"\x01\x01\x01q\x01\x01\x01");
    let sim = lab.bmc("h0");
    assert!(!sim.powered_on());
    assert_eq!(sim.boot(), Some((BootDevice::None, false, false)));
    assert_eq!(sim.log(), ["boot Pxe", "On", "Off", "boot None"]);
    let cleared = lab
        .until("h0", "cleared", |r| r.provisioning.is_none())
        .await;
    assert!(cleared.unreachable.is_none());
    lab.rack.shutdown().await;
    assert!(
        persist::load(dir.path()).is_empty(),
        "nothing left to resume"
    );
    // A reclaim of an unknown host says so.
    let e = lab.rack.reclaim("h9", lease, None).await.unwrap_err();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::NotFound, "no host h9 in this rack")
    );
}

#[tokio::test(start_paused = true)]
async fn a_dead_bmc_on_one_host_delays_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let bmcs = Bmcs::default();
    // hA's BMC set-up hangs (a DNS name that takes its time) until the test
    // lets it go; then its BMC never answers.
    let (gate, gate_rx) = std::sync::mpsc::channel::<()>();
    let gate_rx = Mutex::new(gate_rx);
    let sims = sim_factory(bmcs.clone());
    let factory: PowerFactory = Arc::new(move |host, bmc| {
        if host == "hA" {
            gate_rx.lock().unwrap().recv().unwrap();
        }
        sims(host, bmc)
    });
    let dead = Arc::new(SimPower::new("hA"));
    dead.set_responsiveness(Responsiveness::Unresponsive {
        timeout: Duration::from_secs(60),
    });
    bmcs.lock().unwrap().insert("hA".into(), dead.clone());
    let mut lab = Lab::with_factory(dir.path(), bmcs, factory);
    let t0 = Instant::now();
    lab.rack.apply_rack(vec![
        spec("hA", 1, Some(LeaseId::random())),
        spec("hB", 2, Some(LeaseId::random())),
    ]);
    // While hA's BMC set-up hangs, hB is provisioned and driven.
    let mut serial_b = lab.console("hB").await;
    lab.until_phase("hB", Phase::Booting).await;
    serial_b
        .write_all(format!("{READY}\r\n").as_bytes())
        .await
        .unwrap();
    lab.until_phase("hB", Phase::Ready).await;
    assert!(lab.rack.power("hB", None).await.unwrap());
    assert_eq!(lab.table.all().len(), 2, "both are served");
    gate.send(()).unwrap();
    // hA's provisioning now waits on its silent BMC: hB's commands, hA's
    // console and the rest of the rack do not.
    lab.until("hA", "pending", |r| {
        r.provisioning
            .as_ref()
            .is_some_and(|p| p.stage == "starting")
    })
    .await;
    assert!(lab.rack.hub("hA").await.is_some());
    assert!(
        lab.rack
            .power("hB", Some(crate::ipmi::PowerAction::Off))
            .await
            .is_ok()
    );
    assert!(!lab.bmc("hB").powered_on());
    assert_eq!(
        Instant::now() - t0,
        Duration::ZERO,
        "nobody waited for hA's BMC"
    );
    let failed = lab.until_phase("hA", Phase::Failed).await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(60));
    assert_eq!(
        failed.stage,
        "setting the boot device to PXE: BMC hA unreachable: no answer"
    );
    // Reported unreachable before the failure.
    assert!(
        lab.seen.iter().any(|r| r.host.as_str() == "hA"
            && r.unreachable.as_deref() == Some("BMC hA unreachable: no answer")),
        "{:#?}",
        lab.seen
    );
    // A power command on the silent host fails as unavailable.
    let e = lab.rack.power("hA", None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_watches_a_boot_under_way_without_powering_again() {
    let dir = tempfile::tempdir().unwrap();
    let bmcs = Bmcs::default();
    let lease = LeaseId::random();
    let mut first = Lab::new(dir.path(), bmcs.clone());
    first.rack.apply_rack(vec![spec("h0", 0, Some(lease))]);
    let _serial = first.console("h0").await;
    first.until_phase("h0", Phase::Booting).await;
    first.rack.shutdown().await;
    let text = std::fs::read_to_string(persist::state_path(dir.path())).unwrap();
    assert!(text.contains("phase = \"booting\""), "{text}");
    let ops = first.bmc("h0").log();
    assert_eq!(ops, ["boot Pxe", "On"]);

    let mut second = Lab::new(dir.path(), bmcs);
    // Before the desired state arrives, the persisted report goes out.
    second.rack.resend_reports();
    let again = second.until_phase("h0", Phase::Booting).await;
    assert_eq!((again.lease, again.stage.as_str()), (lease, "powered on"));
    second.rack.apply_rack(vec![spec("h0", 0, Some(lease))]);
    let mut serial = second.console("h0").await;
    let resumed = second
        .until("h0", "resumed", |r| {
            r.provisioning
                .as_ref()
                .is_some_and(|p| p.stage == provision::RESUMED)
        })
        .await;
    assert_eq!(resumed.provisioning.unwrap().phase, Phase::Booting);
    serial.write_all(READY.as_bytes()).await.unwrap();
    second.until_phase("h0", Phase::Ready).await;
    assert_eq!(second.bmc("h0").log(), ops, "no power action again");
    // A finished provisioning is neither repeated nor resumed.
    second.rack.apply_host(spec("h0", 0, Some(lease)));
    second.rack.shutdown().await;
    assert_eq!(second.bmc("h0").log(), ops);
    while let Ok(r) = second.reports.try_recv() {
        assert_ne!(
            r.provisioning.map(|p| p.phase),
            Some(Phase::Pending),
            "provisioned again"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_find_the_desired_state_sent_before_them_applied() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::new(dir.path(), Bmcs::default());
    for round in 0..20 {
        let host = format!("h{round}");
        lab.rack.apply_rack(vec![spec(&host, round, None)]);
        assert!(
            lab.rack.hub(&host).await.is_some(),
            "{host}: the console is captured once its desired state is"
        );
        assert!(!lab.rack.power(&host, None).await.unwrap());
    }
    // The host of the last round only: the others left the rack.
    let e = lab.rack.power("h0", None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(lab.table.all().len(), 1);
    lab.rack.shutdown().await;
}

/// Waits (on paused time) until `sim`'s log has `n` entries.
async fn until_ops(sim: &SimPower, n: usize) {
    while sim.log().len() < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_install_follows_the_installer_then_boots_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::new(dir.path(), Bmcs::default());
    let lease = LeaseId::random();
    lab.rack
        .apply_rack(vec![spec_with("h0", 0, Some(lease), "xen-install")]);
    let mut serial = lab.console("h0").await;
    lab.until_phase("h0", Phase::Booting).await;
    let sim = lab.bmc("h0");
    assert_eq!(sim.log(), ["boot Pxe", "On"]);
    let t_on = Instant::now();
    let mut lines = String::from("LAB-INSTALL stage=start version=1 kernel=6.1.0 image=u\r\n");
    for p in (0..=100).step_by(25) {
        lines.push_str(&format!("LAB-INSTALL stage=writing percent={p}\r\n"));
    }
    serial.write_all(lines.as_bytes()).await.unwrap();
    lab.until("h0", "100 %", |r| {
        r.provisioning.as_ref().is_some_and(|p| p.percent == 100)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    serial
        .write_all(
            b"LAB-INSTALL stage=done sha256=ok bytes=9 seconds=25 mbps=28.0 then=poweroff\r\n",
        )
        .await
        .unwrap();
    lab.until("h0", "rebooting", |r| {
        r.provisioning
            .as_ref()
            .is_some_and(|p| p.stage == provision::REBOOTING)
    })
    .await;
    // The installer powers the host off 3 s later; the agent notices within
    // its poll, sets the disk (persistently) and powers on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.set_power(crate::ipmi::PowerAction::Off).await.unwrap();
    let from_disk = lab
        .until("h0", "booting from disk", |r| {
            r.provisioning
                .as_ref()
                .is_some_and(|p| p.stage == provision::FROM_DISK)
        })
        .await;
    assert_eq!(from_disk.provisioning.unwrap().phase, Phase::Booting);
    assert_eq!(sim.log(), ["boot Pxe", "On", "Off", "boot Disk", "On"]);
    assert_eq!(sim.boot(), Some((BootDevice::Disk, false, true)));
    assert!(
        Instant::now() - t_on <= Duration::from_secs(25 + 3 + 1),
        "{:?}",
        Instant::now() - t_on
    );
    // Lines the installer printed before the power-off never count.
    serial
        .write_all(
            format!(
                "GRUB\r\n(XEN) Xen version 4.17\r\nLAB-DISK-READY host=h0 lease={lease} xen=4.17.7 \
                 sshd=active ip=198.18.0.11 hostkey=SHA256:abc\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let ready = lab.until_phase("h0", Phase::Ready).await;
    assert!(
        ready
            .stage
            .ends_with(": xen 4.17.7, ssh root@198.18.0.11, host key SHA256:abc"),
        "{}",
        ready.stage
    );
    let progress = lab.progress("h0");
    let installing: Vec<(String, u32)> = progress
        .iter()
        .filter(|(phase, ..)| *phase == Phase::Installing)
        .map(|(_, stage, p)| (stage.clone(), *p))
        .collect();
    assert_eq!(
        installing,
        [
            ("installer started".to_owned(), 0),
            ("writing the image".to_owned(), 0),
            ("writing the image".to_owned(), 25),
            ("writing the image".to_owned(), 50),
            ("writing the image".to_owned(), 75),
            ("writing the image".to_owned(), 100),
            (
                "image written and checked in 25 s (28.0 MB/s)".to_owned(),
                100
            ),
        ]
    );
    let stages: Vec<(Phase, String)> = lab
        .stages("h0")
        .into_iter()
        .filter(|(phase, _)| *phase != Phase::Installing)
        .collect();
    assert_eq!(
        stages[..stages.len() - 1],
        [
            stage(Phase::Pending, "starting"),
            stage(Phase::Pending, "boot device PXE"),
            stage(Phase::Booting, "powered on"),
            stage(Phase::Booting, provision::REBOOTING),
            stage(Phase::Booting, "boot device disk (persistent)"),
            stage(Phase::Booting, provision::FROM_DISK),
        ]
    );
    // The reclaim clears the persistent override: the next lease
    // PXE-boots as before.
    lab.rack.apply_host(spec_with("h0", 0, None, "xen-install"));
    lab.rack
        .reclaim("h0", lease, Some(ProfileName::new("xen-install").unwrap()))
        .await
        .unwrap();
    assert!(!sim.powered_on());
    assert_eq!(sim.boot(), Some((BootDevice::None, false, false)));
    let next = LeaseId::random();
    lab.rack.apply_host(spec("h0", 0, Some(next)));
    until_ops(&sim, 9).await;
    assert_eq!(sim.boot(), Some((BootDevice::Pxe, false, false)));
}

#[tokio::test(start_paused = true)]
async fn an_install_that_fails_says_why_and_a_restarted_agent_installs_again() {
    let dir = tempfile::tempdir().unwrap();
    let bmcs = Bmcs::default();
    let lease = LeaseId::random();
    let mut first = Lab::new(dir.path(), bmcs.clone());
    first
        .rack
        .apply_rack(vec![spec_with("h0", 0, Some(lease), "xen-install")]);
    let mut serial = first.console("h0").await;
    first.until_phase("h0", Phase::Booting).await;
    serial
        .write_all(b"LAB-INSTALL stage=writing percent=40\r\n")
        .await
        .unwrap();
    first.until_phase("h0", Phase::Installing).await;
    first.rack.shutdown().await;
    let text = std::fs::read_to_string(persist::state_path(dir.path())).unwrap();
    assert!(text.contains("phase = \"installing\""), "{text}");
    assert_eq!(first.bmc("h0").log(), ["boot Pxe", "On"]);

    // The restarted agent cannot know how far the install got: it starts
    // it again (a reset: the host is on).
    let mut second = Lab::new(dir.path(), bmcs);
    second
        .rack
        .apply_rack(vec![spec_with("h0", 0, Some(lease), "xen-install")]);
    let mut serial = second.console("h0").await;
    second.until_phase("h0", Phase::Booting).await;
    assert_eq!(
        second.stages("h0")[0],
        stage(Phase::Pending, provision::RESUMED_INSTALL)
    );
    assert_eq!(
        second.bmc("h0").log(),
        ["boot Pxe", "On", "boot Pxe", "HardReset"]
    );
    // The installer's failure line is the reason.
    serial
        .write_all(
            b"LAB-INSTALL stage=failed reason=sha256-mismatch detail=got 00, expected ab\r\n",
        )
        .await
        .unwrap();
    let failed = second.until_phase("h0", Phase::Failed).await;
    assert_eq!(
        failed.stage,
        "install failed: sha256-mismatch: got 00, expected ab"
    );
    assert!(failed.console_tail.contains("stage=failed"), "{failed:?}");
    second.rack.shutdown().await;
}
