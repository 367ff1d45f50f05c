//! The agent's model of its rack, driven by the desired state lab-server
//! sends (see [`crate::link`]): for every host, its boot entry in the
//! [`HostTable`] (what DHCP/TFTP/HTTP serve it), its BMC behind
//! [`PowerControl`], its always-on console [`Capture`], a BMC probe that
//! notices a silent BMC, and the provisioning of each new lease.
//!
//! Provisioning a lease: boot device PXE (once, EFI flag per firmware),
//! power on (or hard reset if already on), then watch the console for the
//! profile's ready text (or failure text) within its timeout. Every step is
//! reported to the server as a [`pb::HostReport`]; a failure carries the
//! console tail. What was provisioned is kept in `provisioning.toml` in the
//! data directory, so that an agent restart neither repeats nor forgets it
//! (a restarted agent never power-cycles a leased host again).
//!
//! Reclaiming a host after its lease: the profile's Xen debug keys (if any)
//! are played into the console and their output captured, then the host is
//! powered off and its boot device override cleared.

use crate::config::ProfileSettings;
use crate::console::{
    Capture, CaptureConfig, ConsoleHost, ConsoleLog, Hub, HubConfig, LogLimits, RecordKind,
    TcpSource, ViewerEvent, XenDebugKeys, send_keys, xen_debug_sequence,
};
use crate::hosts::{Arch, BootHost, Firmware, HostTable, MacAddr};
use crate::ipmi::{BootDevice, ConnectOptions, PowerAction, Secret};
use crate::power::{IpmiPower, PowerControl, PowerError};
use lab_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

/// Settings of the rack model.
#[derive(Debug, Clone)]
pub struct RackConfig {
    pub default_profile: String,
    pub profiles: BTreeMap<String, ProfileSettings>,
    /// Console logs go to `data_dir/console`; provisioning state to
    /// `data_dir/provisioning.toml`.
    pub data_dir: PathBuf,
    pub console_limits: LogLimits,
    pub bmc_probe_interval: Duration,
    pub ipmi: ConnectOptions,
    pub capture: CaptureConfig,
}

/// Builds the power control of a BMC (tests substitute simulators).
pub type PowerFactory =
    Arc<dyn Fn(&str, &pb::Bmc) -> Result<Arc<dyn PowerControl>, String> + Send + Sync>;

/// The IPMI implementation of [`PowerFactory`].
pub fn ipmi_power_factory(options: ConnectOptions) -> PowerFactory {
    Arc::new(move |_host, bmc| {
        let endpoint = resolve(&bmc.address, bmc.port)?;
        Ok(Arc::new(IpmiPower::new(
            endpoint,
            bmc.user.clone(),
            Secret::from_bytes(&bmc.password),
            options.clone(),
        )) as Arc<dyn PowerControl>)
    })
}

fn resolve(address: &str, port: u32) -> Result<SocketAddr, String> {
    let port = u16::try_from(if port == 0 { 623 } else { port })
        .map_err(|_| format!("BMC port {port} out of range"))?;
    (address, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve BMC address {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("BMC address {address} resolves to nothing"))
}

/// What a finished command answers.
#[derive(Debug)]
pub struct CommandError {
    /// What kind of failure, for the user's gRPC status.
    pub code: pb::CommandErrorKind,
    pub message: String,
}

impl CommandError {
    fn new(code: pb::CommandErrorKind, message: impl Into<String>) -> Self {
        CommandError {
            code,
            message: message.into(),
        }
    }

    fn power(e: &PowerError) -> Self {
        let code = match e {
            PowerError::Unreachable { .. } => pb::CommandErrorKind::Unavailable,
            PowerError::Refused { .. } => pb::CommandErrorKind::FailedPrecondition,
        };
        CommandError::new(code, crate::error_chain(e))
    }
}

/// How to provision: the host's firmware, the profile's expectations, and
/// whether this is a restarted agent resuming (no power action).
struct How<'a> {
    efi: bool,
    resume: bool,
    settings: &'a ProfileSettings,
}

/// What is persisted per host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Persisted {
    lease: String,
    phase: i32,
    stage: String,
}

struct HostCtl {
    desired: pb::AgentHost,
    power: Option<Arc<dyn PowerControl>>,
    capture: Option<Capture>,
    provision: Option<JoinHandle<()>>,
    probe: Option<JoinHandle<()>>,
}

impl Drop for HostCtl {
    fn drop(&mut self) {
        if let Some(t) = self.provision.take() {
            t.abort();
        }
        if let Some(t) = self.probe.take() {
            t.abort();
        }
    }
}

/// The rack; cheap to clone.
#[derive(Clone)]
pub struct Rack(Arc<Inner>);

struct Inner {
    cfg: RackConfig,
    table: HostTable,
    power_factory: PowerFactory,
    hosts: tokio::sync::Mutex<HashMap<String, HostCtl>>,
    /// The last report per host (sent again after every re-attach).
    reports: Mutex<BTreeMap<String, pb::HostReport>>,
    /// The current link to the server, if attached.
    out: Mutex<Option<mpsc::Sender<pb::AgentMessage>>>,
}

impl Rack {
    /// A rack with no hosts yet; loads the persisted provisioning state.
    pub fn new(cfg: RackConfig, table: HostTable, power_factory: PowerFactory) -> Rack {
        let mut reports = BTreeMap::new();
        for (host, p) in load_persisted(&cfg.data_dir) {
            reports.insert(
                host.clone(),
                pb::HostReport {
                    host,
                    reachable: true,
                    lease_id: p.lease,
                    phase: p.phase,
                    stage: p.stage,
                    ..Default::default()
                },
            );
        }
        Rack(Arc::new(Inner {
            cfg,
            table,
            power_factory,
            hosts: tokio::sync::Mutex::new(HashMap::new()),
            reports: Mutex::new(reports),
            out: Mutex::new(None),
        }))
    }

    /// Stops everything the rack runs (captures, probes, provisioning)
    /// and detaches it from the link: what a process exit does.
    pub async fn shutdown(&self) {
        self.set_outbound(None);
        let hosts: Vec<HostCtl> = self.0.hosts.lock().await.drain().map(|(_, c)| c).collect();
        // Provisioning tasks first: a capture that stops under a watching
        // task must not be reported as a failed boot.
        for ctl in &hosts {
            if let Some(t) = &ctl.provision {
                t.abort();
            }
            if let Some(t) = &ctl.probe {
                t.abort();
            }
        }
        for mut ctl in hosts {
            if let Some(c) = ctl.capture.take() {
                let _ = c.stop().await;
            }
        }
    }

    pub fn console_root(&self) -> PathBuf {
        self.0.cfg.data_dir.join("console")
    }

    /// Sets (or clears) the link reports go to.
    pub fn set_outbound(&self, tx: Option<mpsc::Sender<pb::AgentMessage>>) {
        *self.0.out.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    /// Sends every host's last report again (after an attach).
    pub fn resend_reports(&self) {
        let reports: Vec<pb::HostReport> = self
            .0
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for r in reports {
            self.send(r);
        }
    }

    fn send(&self, r: pb::HostReport) {
        let out = self.0.out.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(tx) = out {
            let msg = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Report(r)),
            };
            if tx.try_send(msg).is_err() {
                debug!("link busy or gone; the report goes out again after the next attach");
            }
        }
    }

    /// Updates one host's report with `f`, persists provisioning, sends it.
    fn update_report(&self, host: &str, f: impl FnOnce(&mut pb::HostReport)) {
        let report = {
            let mut reports = self.0.reports.lock().unwrap_or_else(|p| p.into_inner());
            let r = reports
                .entry(host.to_owned())
                .or_insert_with(|| pb::HostReport {
                    host: host.to_owned(),
                    reachable: true,
                    ..Default::default()
                });
            let before = r.clone();
            f(r);
            if *r == before {
                return;
            }
            let persist =
                r.lease_id != before.lease_id || r.phase != before.phase || r.stage != before.stage;
            // Saved under the lock: two hosts' tasks never interleave their
            // writes, and the file never goes back to an older state.
            if persist {
                save_persisted(&self.0.cfg.data_dir, &snapshot_persisted(&reports));
            }
            reports[host].clone()
        };
        self.send(report);
    }

    fn set_reachable(&self, host: &str, reachable: Result<(), String>) {
        self.update_report(host, |r| match reachable {
            Ok(()) => {
                r.reachable = true;
                r.unreachable_reason.clear();
            }
            Err(why) => {
                r.reachable = false;
                r.unreachable_reason = why;
            }
        });
    }

    fn set_phase(
        &self,
        host: &str,
        lease: &str,
        phase: pb::ProvisionPhase,
        stage: &str,
        tail: &str,
    ) {
        info!(host, lease, phase = ?phase, stage, "provisioning");
        self.update_report(host, |r| {
            r.lease_id = lease.to_owned();
            r.phase = phase as i32;
            r.stage = stage.to_owned();
            r.console_tail = tail.to_owned();
        });
    }

    fn provisioned_lease(&self, host: &str) -> Option<String> {
        self.0
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .map(|r| r.lease_id.clone())
            .filter(|l| !l.is_empty())
    }

    /// Flushes a host's console capture to its log (before a log read).
    pub async fn flush_console(&self, host: &str) {
        let hosts = self.0.hosts.lock().await;
        if let Some(c) = hosts.get(host).and_then(|h| h.capture.as_ref()) {
            c.flush(Duration::from_secs(1)).await;
        }
    }

    /// The console hub of a host, if its console is captured.
    pub async fn hub(&self, host: &str) -> Option<Hub> {
        let hosts = self.0.hosts.lock().await;
        hosts
            .get(host)
            .and_then(|h| h.capture.as_ref().map(|c| c.hub().clone()))
    }

    fn settings(&self, profile: &str) -> ProfileSettings {
        self.0
            .cfg
            .profiles
            .get(profile)
            .cloned()
            .unwrap_or_default()
    }

    // ------------------------------------------------------------ desired state

    /// Replaces the whole rack.
    pub async fn apply_rack(&self, state: pb::RackState) {
        let names: Vec<String> = state.hosts.iter().map(|h| h.name.clone()).collect();
        for h in state.hosts {
            self.reconcile_host(h).await;
        }
        let mut gone = Vec::new();
        {
            let mut hosts = self.0.hosts.lock().await;
            let stale: Vec<String> = hosts
                .keys()
                .filter(|k| !names.contains(k))
                .cloned()
                .collect();
            for k in stale {
                if let Some(ctl) = hosts.remove(&k) {
                    gone.push(ctl);
                }
            }
        }
        for mut ctl in gone {
            info!(host = %ctl.desired.name, "host no longer in the rack");
            if let Some(c) = ctl.capture.take() {
                let _ = c.stop().await;
            }
        }
        self.refresh_table().await;
    }

    /// Applies one host's desired state.
    pub async fn apply_host(&self, h: pb::AgentHost) {
        self.reconcile_host(h).await;
        self.refresh_table().await;
    }

    /// One host's BMC, console capture and provisioning (the boot table is
    /// refreshed by the caller, once per message).
    async fn reconcile_host(&self, h: pb::AgentHost) {
        let name = h.name.clone();
        let span = info_span!("host", host = %name);
        async {
            let mut hosts = self.0.hosts.lock().await;
            let prev = hosts.get(&name).map(|c| c.desired.clone());
            let bmc_changed = prev.as_ref().map(|p| &p.bmc) != Some(&h.bmc);
            let console_changed =
                prev.as_ref().map(|p| (&p.console, &p.bmc)) != Some((&h.console, &h.bmc));
            let ctl = hosts.entry(name.clone()).or_insert_with(|| HostCtl {
                desired: h.clone(),
                power: None,
                capture: None,
                provision: None,
                probe: None,
            });
            ctl.desired = h.clone();
            if bmc_changed {
                if let Some(t) = ctl.probe.take() {
                    t.abort();
                }
                ctl.power = match &h.bmc {
                    None => None,
                    Some(b) => match (self.0.power_factory)(&name, b) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            warn!(error = %e, "cannot set up the BMC");
                            self.set_reachable(&name, Err(e));
                            None
                        }
                    },
                };
                if let Some(p) = &ctl.power {
                    ctl.probe = Some(self.spawn_probe(&name, p.clone()));
                } else if h.bmc.is_none() {
                    self.set_reachable(&name, Ok(()));
                }
            }
            if console_changed {
                // A provisioning watching the old capture would see it stop.
                if let Some(t) = ctl.provision.take() {
                    t.abort();
                }
                if let Some(c) = ctl.capture.take() {
                    let _ = c.stop().await;
                }
                ctl.capture = self.start_capture(&h);
            }
            // A new lease to provision (an agent restart remembers which
            // leases it has already provisioned).
            if !h.lease_id.is_empty()
                && self.provisioned_lease(&name).as_deref() != Some(h.lease_id.as_str())
            {
                if let Some(t) = ctl.provision.take() {
                    t.abort();
                }
                let hub = ctl.capture.as_ref().map(|c| c.hub().clone());
                ctl.provision = Some(self.spawn_provision(&h, ctl.power.clone(), hub, false));
            } else if !h.lease_id.is_empty() && ctl.provision.is_none() && self.was_booting(&name) {
                // The agent restarted while this lease's host was booting:
                // no power action again, but watch for the ready text anew.
                let hub = ctl.capture.as_ref().map(|c| c.hub().clone());
                ctl.provision = Some(self.spawn_provision(&h, ctl.power.clone(), hub, true));
            }
        }
        .instrument(span)
        .await;
    }

    async fn refresh_table(&self) {
        let hosts = self.0.hosts.lock().await;
        let boot: Vec<BootHost> = hosts
            .values()
            .filter_map(
                |c| match boot_host(&c.desired, &self.0.cfg.default_profile) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        warn!(host = %c.desired.name, error = %e, "host not served");
                        None
                    }
                },
            )
            .collect();
        self.0.table.replace(boot);
    }

    fn start_capture(&self, h: &pb::AgentHost) -> Option<Capture> {
        let spec = h.console.clone().unwrap_or_default();
        let kind = pb::ConsoleKind::try_from(spec.kind).unwrap_or(pb::ConsoleKind::None);
        let host = match ConsoleHost::new(&h.name) {
            Ok(c) => c,
            Err(e) => {
                warn!(host = %h.name, error = %e, "no console capture");
                return None;
            }
        };
        let open = || -> Option<(ConsoleLog, Hub, crate::console::InputRx)> {
            let dir = crate::console::log::host_dir(&self.console_root(), &host);
            let resumed = crate::console::log::list_files(&dir).is_ok_and(|f| !f.is_empty());
            let log = match ConsoleLog::open(&self.console_root(), &host, self.0.cfg.console_limits)
            {
                Ok(mut l) => {
                    // A log from an earlier run: whatever the host printed
                    // while no agent captured it is missing; say so.
                    if resumed {
                        let at = std::time::SystemTime::now();
                        let text = format!(
                            "\r\n[lab: console capture started at {}; output since the previous capture stopped is missing]\r\n",
                            humantime::format_rfc3339_millis(at)
                        );
                        let ms = crate::console::source::epoch_ms(at);
                        if let Err(e) = l.append(RecordKind::Gap, ms, text.as_bytes()) {
                            warn!(host = %h.name, error = %crate::error_chain(&e), "cannot write the gap marker");
                        }
                    }
                    l
                }
                Err(e) => {
                    warn!(host = %h.name, error = %crate::error_chain(&e), "cannot open the console log");
                    return None;
                }
            };
            let (hub, input) = Hub::new(HubConfig::default());
            Some((log, hub, input))
        };
        let cfg = self.0.cfg.capture;
        match kind {
            pb::ConsoleKind::Tcp => {
                let addr = match spec.target.to_socket_addrs().map(|mut a| a.next()) {
                    Ok(Some(a)) => a,
                    _ => {
                        warn!(host = %h.name, target = %spec.target, "cannot resolve the console address");
                        return None;
                    }
                };
                let (log, hub, input) = open()?;
                Some(Capture::spawn(TcpSource::new(addr), log, hub, input, cfg))
            }
            pb::ConsoleKind::IpmiSol => {
                let bmc = h.bmc.as_ref()?;
                let endpoint = match resolve(&bmc.address, bmc.port) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(host = %h.name, error = %e, "no SOL capture");
                        return None;
                    }
                };
                let (log, hub, input) = open()?;
                let source = crate::console::sol::SolSource::new(
                    endpoint,
                    bmc.user.clone(),
                    Secret::from_bytes(&bmc.password),
                    self.0.cfg.ipmi.clone(),
                );
                Some(Capture::spawn(source, log, hub, input, cfg))
            }
            pb::ConsoleKind::Serial => {
                let (log, hub, input) = open()?;
                let baud = if spec.baud == 0 { 115_200 } else { spec.baud };
                let source =
                    crate::console::serial::SerialSource::new(PathBuf::from(&spec.target), baud);
                Some(Capture::spawn(source, log, hub, input, cfg))
            }
            pb::ConsoleKind::None | pb::ConsoleKind::Unspecified => None,
        }
    }

    fn spawn_probe(&self, host: &str, power: Arc<dyn PowerControl>) -> JoinHandle<()> {
        let me = self.clone();
        let host = host.to_owned();
        let every = self.0.cfg.bmc_probe_interval;
        tokio::spawn(async move {
            loop {
                match power.is_on().await {
                    Ok(_) => me.set_reachable(&host, Ok(())),
                    Err(e @ PowerError::Unreachable { .. }) => {
                        me.set_reachable(&host, Err(crate::error_chain(&e)));
                    }
                    // It answered: reachable, even if it refused.
                    Err(PowerError::Refused { .. }) => me.set_reachable(&host, Ok(())),
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Whether the host's last known provisioning is still under way.
    fn was_booting(&self, host: &str) -> bool {
        self.0
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .is_some_and(|r| {
                r.phase == pb::ProvisionPhase::Pending as i32
                    || r.phase == pb::ProvisionPhase::Booting as i32
            })
    }

    fn spawn_provision(
        &self,
        h: &pb::AgentHost,
        power: Option<Arc<dyn PowerControl>>,
        hub: Option<Hub>,
        resume: bool,
    ) -> JoinHandle<()> {
        let me = self.clone();
        let host = h.name.clone();
        let lease = h.lease_id.clone();
        let profile = if h.profile.is_empty() {
            self.0.cfg.default_profile.clone()
        } else {
            h.profile.clone()
        };
        let efi = h.firmware == pb::Firmware::Uefi as i32;
        let settings = self.settings(&profile);
        let span = info_span!("provision", host = %host, lease = %lease, profile = %profile);
        tokio::spawn(
            async move {
                let how = How {
                    efi,
                    resume,
                    settings: &settings,
                };
                me.provision(&host, &lease, power, hub, how).await;
            }
            .instrument(span),
        )
    }

    async fn provision(
        &self,
        host: &str,
        lease: &str,
        power: Option<Arc<dyn PowerControl>>,
        hub: Option<Hub>,
        how: How<'_>,
    ) {
        use pb::ProvisionPhase as P;
        let How {
            efi,
            resume,
            settings,
        } = how;
        let started = Instant::now();
        // Output from before the power-on never counts.
        let mut watch = hub.as_ref().map(|h| (h.subscribe(), h.head()));
        let what = if resume {
            let what = "the agent restarted; watching the console again";
            self.set_phase(host, lease, P::Booting, what, "");
            what
        } else {
            match self
                .power_up(host, lease, power, hub.as_ref(), efi, &mut watch)
                .await
            {
                Some(what) => what,
                None => return,
            }
        };
        self.watch_ready(host, lease, watch, settings, what, started)
            .await;
    }

    /// Boot device PXE, then power on (or reset): the power half of a
    /// provisioning. `None` when it failed (already reported).
    async fn power_up(
        &self,
        host: &str,
        lease: &str,
        power: Option<Arc<dyn PowerControl>>,
        hub: Option<&Hub>,
        efi: bool,
        watch: &mut Option<(crate::console::Viewer, u64)>,
    ) -> Option<&'static str> {
        use pb::ProvisionPhase as P;
        self.set_phase(host, lease, P::Pending, "starting", "");
        let Some(power) = power else {
            self.set_phase(
                host,
                lease,
                P::Booting,
                "no BMC: power the host on by hand",
                "",
            );
            return None;
        };
        let fail = |me: &Rack, what: &str, e: &PowerError| {
            let why = format!("{what}: {}", crate::error_chain(e));
            if matches!(e, PowerError::Unreachable { .. }) {
                me.set_reachable(host, Err(crate::error_chain(e)));
            }
            me.set_phase(host, lease, P::Failed, &why, "");
        };
        if let Err(e) = power.set_boot_device(BootDevice::Pxe, efi, false).await {
            fail(self, "setting the boot device to PXE", &e);
            return None;
        }
        self.set_phase(host, lease, P::Pending, "boot device PXE", "");
        let action = match power.is_on().await {
            Ok(true) => PowerAction::HardReset,
            Ok(false) => PowerAction::On,
            Err(e) => {
                fail(self, "reading the power state", &e);
                return None;
            }
        };
        if let Some((_, head)) = watch.as_mut()
            && let Some(h) = hub
        {
            *head = h.head();
        }
        if let Err(e) = power.set_power(action).await {
            fail(self, "switching the power on", &e);
            return None;
        }
        self.set_reachable(host, Ok(()));
        let what = if action == PowerAction::On {
            "powered on"
        } else {
            "reset (it was on)"
        };
        self.set_phase(host, lease, P::Booting, what, "");
        Some(what)
    }

    /// Watches the console for the profile's ready or failure text.
    async fn watch_ready(
        &self,
        host: &str,
        lease: &str,
        watch: Option<(crate::console::Viewer, u64)>,
        settings: &ProfileSettings,
        what: &str,
        started: Instant,
    ) {
        use pb::ProvisionPhase as P;
        let Some(ready) = &settings.ready else {
            self.set_phase(
                host,
                lease,
                P::Ready,
                &format!("{what}; the profile has no ready text"),
                "",
            );
            return;
        };
        let Some((mut viewer, head)) = watch else {
            self.set_phase(
                host,
                lease,
                P::Booting,
                &format!("{what}; no console to watch for {ready:?}"),
                "",
            );
            return;
        };
        // A sliding window of recent output: long enough for the markers
        // and for a useful tail.
        let mut recent: Vec<u8> = Vec::new();
        let keep = 8192 + ready.len() + settings.fail.iter().map(String::len).sum::<usize>();
        let deadline = tokio::time::Instant::now() + settings.timeout;
        loop {
            let ev = tokio::select! {
                ev = viewer.next() => ev,
                () = tokio::time::sleep_until(deadline) => {
                    let why = format!("no {ready:?} on the console within {:?}", settings.timeout);
                    self.set_phase(host, lease, P::Failed, &why, &tail(&recent));
                    return;
                }
            };
            match ev {
                None => {
                    self.set_phase(
                        host,
                        lease,
                        P::Failed,
                        "the console capture stopped",
                        &tail(&recent),
                    );
                    return;
                }
                Some(ViewerEvent::Lagged { .. }) => {}
                Some(ViewerEvent::Data(chunk)) => {
                    let end = chunk.offset + chunk.data.len() as u64;
                    if end <= head {
                        continue;
                    }
                    let skip = head.saturating_sub(chunk.offset) as usize;
                    recent.extend_from_slice(&chunk.data[skip..]);
                    if let Some(f) = settings
                        .fail
                        .iter()
                        .find(|f| contains(&recent, f.as_bytes()))
                    {
                        let why = format!("failure text {f:?} on the console");
                        self.set_phase(host, lease, P::Failed, &why, &tail(&recent));
                        return;
                    }
                    if contains(&recent, ready.as_bytes()) {
                        let why = format!(
                            "{ready:?} on the console {:.1}s after the lease reached the agent",
                            started.elapsed().as_secs_f64()
                        );
                        self.set_phase(host, lease, P::Ready, &why, "");
                        return;
                    }
                    if recent.len() > 2 * keep {
                        recent.drain(..recent.len() - keep);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ commands

    async fn host_parts(
        &self,
        host: &str,
    ) -> Result<(pb::AgentHost, Option<Arc<dyn PowerControl>>, Option<Hub>), CommandError> {
        let hosts = self.0.hosts.lock().await;
        let ctl = hosts.get(host).ok_or_else(|| {
            CommandError::new(
                pb::CommandErrorKind::NotFound,
                format!("no host {host} in this rack"),
            )
        })?;
        Ok((
            ctl.desired.clone(),
            ctl.power.clone(),
            ctl.capture.as_ref().map(|c| c.hub().clone()),
        ))
    }

    /// A power command; answers the power state read back.
    pub async fn power(&self, host: &str, action: pb::PowerAction) -> Result<bool, CommandError> {
        let (_, power, _) = self.host_parts(host).await?;
        let power = power.ok_or_else(|| {
            CommandError::new(
                pb::CommandErrorKind::FailedPrecondition,
                format!("host {host} has no usable BMC"),
            )
        })?;
        let act = match action {
            pb::PowerAction::Status | pb::PowerAction::Unspecified => None,
            pb::PowerAction::On => Some(PowerAction::On),
            pb::PowerAction::Off => Some(PowerAction::Off),
            pb::PowerAction::Cycle => Some(PowerAction::Cycle),
            pb::PowerAction::Reset => Some(PowerAction::HardReset),
        };
        let result = async {
            if let Some(a) = act {
                power.set_power(a).await?;
            }
            power.is_on().await
        }
        .await;
        match result {
            Ok(on) => {
                self.set_reachable(host, Ok(()));
                Ok(on)
            }
            Err(e) => {
                if matches!(e, PowerError::Unreachable { .. }) {
                    self.set_reachable(host, Err(crate::error_chain(&e)));
                }
                Err(CommandError::power(&e))
            }
        }
    }

    /// The reclaim step after `lease`: debug keys, power off, boot device
    /// override cleared.
    pub async fn reclaim(
        &self,
        host: &str,
        lease: &str,
        profile: &str,
    ) -> Result<(), CommandError> {
        {
            let mut hosts = self.0.hosts.lock().await;
            if let Some(t) = hosts.get_mut(host).and_then(|c| c.provision.take()) {
                t.abort();
            }
        }
        let (_, power, hub) = self.host_parts(host).await?;
        let settings = self.settings(profile);
        let on = match &power {
            Some(p) => p.is_on().await.map_err(|e| CommandError::power(&e))?,
            None => false,
        };
        if on
            && !settings.xen_debug_keys.is_empty()
            && let Some(hub) = &hub
        {
            info!(host, lease, keys = %String::from_utf8_lossy(&settings.xen_debug_keys), "capturing Xen debug output");
            let seq = xen_debug_sequence(&XenDebugKeys {
                keys: settings.xen_debug_keys.clone(),
                key_interval: Duration::from_millis(500),
                switch_back: true,
            });
            if let Err(e) = send_keys(hub, &seq).await {
                warn!(host, error = %e, "cannot send the Xen debug keys");
            }
        }
        if let Some(p) = &power {
            if on {
                p.set_power(PowerAction::Off)
                    .await
                    .map_err(|e| CommandError::power(&e))?;
                if p.is_on().await.map_err(|e| CommandError::power(&e))? {
                    return Err(CommandError::new(
                        pb::CommandErrorKind::Unavailable,
                        format!("host {host} is still on after power off"),
                    ));
                }
            }
            p.set_boot_device(BootDevice::None, false, false)
                .await
                .map_err(|e| CommandError::power(&e))?;
        }
        info!(host, lease, "reclaimed: powered off, boot device reset");
        self.update_report(host, |r| {
            if r.lease_id == lease {
                r.lease_id.clear();
                r.phase = pb::ProvisionPhase::Unspecified as i32;
                r.stage.clear();
                r.console_tail.clear();
            }
        });
        Ok(())
    }
}

/// The last lines of console output, for failure reports.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    lines[from..].join("\n")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A desired host as the boot services need it.
pub fn boot_host(h: &pb::AgentHost, default_profile: &str) -> Result<BootHost, String> {
    let mac: MacAddr = h.mac.parse().map_err(|_| format!("bad mac {:?}", h.mac))?;
    let ipv4 = if h.ipv4.is_empty() {
        None
    } else {
        Some(
            h.ipv4
                .parse()
                .map_err(|_| format!("bad ipv4 {:?}", h.ipv4))?,
        )
    };
    let arch = match pb::Arch::try_from(h.arch) {
        Ok(pb::Arch::X8664) => Arch::X86_64,
        Ok(pb::Arch::Aarch64) => Arch::Aarch64,
        _ => return Err(format!("bad arch {}", h.arch)),
    };
    let firmware = match pb::Firmware::try_from(h.firmware) {
        Ok(pb::Firmware::Bios) => Firmware::Bios,
        Ok(pb::Firmware::Uefi) => Firmware::Uefi,
        _ => return Err(format!("bad firmware {}", h.firmware)),
    };
    let leased = !h.lease_id.is_empty();
    Ok(BootHost {
        name: h.name.clone(),
        mac,
        ipv4,
        arch,
        firmware,
        profile: if leased && !h.profile.is_empty() {
            h.profile.clone()
        } else {
            default_profile.to_owned()
        },
        lease: leased.then(|| h.lease_id.clone()),
    })
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("provisioning.toml")
}

fn load_persisted(dir: &Path) -> BTreeMap<String, Persisted> {
    let path = state_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable provisioning state");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

fn snapshot_persisted(reports: &BTreeMap<String, pb::HostReport>) -> BTreeMap<String, Persisted> {
    reports
        .iter()
        .filter(|(_, r)| !r.lease_id.is_empty())
        .map(|(h, r)| {
            (
                h.clone(),
                Persisted {
                    lease: r.lease_id.clone(),
                    phase: r.phase,
                    stage: r.stage.clone(),
                },
            )
        })
        .collect()
}

/// Written to a temporary file and renamed: never half a file.
fn save_persisted(dir: &Path, state: &BTreeMap<String, Persisted>) {
    let path = state_path(dir);
    let result = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let text = toml::to_string(state).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot save the provisioning state");
    }
}
