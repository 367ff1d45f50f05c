//! One host's reconciler: a task that owns everything about the host — its
//! desired [`HostSpec`], its BMC ([`PowerControl`] and the probe that
//! notices a silent one), its console [`Capture`], its provisioning and
//! reclaim ([`Machine`], whose actions it carries out) and its power
//! commands in flight.
//!
//! The task never waits on its BMC: every BMC call (a provisioning step,
//! the probe, a power command) is a future it polls beside its inbox, so a
//! slow or dead BMC delays nothing but that call. Name resolution and
//! console log set-up run on blocking threads; a report that must be on
//! disk before the next step (a claimed lease, before the power is
//! switched) is waited for on this task only. Nothing here holds a lock
//! across I/O, and no other host ever waits for this one.

use super::provision::{Action, BmcFailure, Event, Machine, Reclaim, ReclaimFailure, Start};
use super::report::{Provisioning, Reports};
use super::spec::{BmcSpec, ConsoleSpec, HostSpec};
use super::{CommandError, ErrorKind, PowerFactory, RackConfig, resolve};
use crate::console::{
    Capture, ConsoleHost, ConsoleLog, Hub, HubConfig, RecordKind, TcpSource, Viewer, ViewerEvent,
    XenDebugKeys, send_keys, xen_debug_sequence,
};
use crate::ipmi::PowerAction;
use crate::power::{PowerControl, PowerError, PowerFuture};
use lab_types::{HostName, LeaseId, ProfileName};
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, info, info_span, warn};

/// What every host task shares.
pub(super) struct Context {
    pub cfg: RackConfig,
    pub power_factory: PowerFactory,
    pub consoles: Consoles,
    pub reports: Reports,
}

/// Where console captures come from.
pub(crate) enum Consoles {
    /// The sources the specs name: TCP, the BMC's SOL, a serial device.
    Real,
    /// In-memory consoles the tests play.
    #[cfg(test)]
    Fake(super::tests::FakeConsoles),
}

/// What the rack asks of a host.
pub(super) enum Request {
    Power {
        action: Option<PowerAction>,
        reply: oneshot::Sender<Result<bool, CommandError>>,
    },
    Reclaim {
        lease: LeaseId,
        profile: Option<ProfileName>,
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    Hub {
        reply: oneshot::Sender<Option<Hub>>,
    },
    /// Flush the console capture to its log (before a log read).
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// The rack's handle on a host's task. Dropping it stops the task (after
/// its console capture is flushed and synced).
pub(super) struct HostHandle {
    spec: watch::Sender<HostSpec>,
    requests: mpsc::Sender<Request>,
    task: JoinHandle<()>,
}

impl HostHandle {
    /// Starts the task of a host; it first waits for `predecessor` (the
    /// task of a host of the same name that is still stopping).
    pub fn spawn(ctx: Arc<Context>, spec: HostSpec, predecessor: Option<JoinHandle<()>>) -> Self {
        let name = spec.name.clone();
        let (spec_tx, spec_rx) = watch::channel(spec);
        let (requests, requests_rx) = mpsc::channel(64);
        let host = Host {
            name: name.clone(),
            ctx,
            spec: None,
            power: None,
            capture: None,
            probe: None,
            machine: Machine::default(),
            io: RunIo::default(),
            reclaims: Vec::new(),
            commands: JoinSet::new(),
        };
        let task = tokio::spawn(
            host.run(spec_rx, requests_rx, predecessor)
                .instrument(info_span!("host", host = %name)),
        );
        HostHandle {
            spec: spec_tx,
            requests,
            task,
        }
    }

    /// The desired state (reconciled even if unchanged).
    pub fn set_spec(&self, spec: HostSpec) {
        self.spec.send_replace(spec);
    }

    pub fn spec(&self) -> HostSpec {
        self.spec.borrow().clone()
    }

    /// Where requests to the task go.
    pub fn requests(&self) -> mpsc::Sender<Request> {
        self.requests.clone()
    }

    /// Stops the task; its handle, to wait for it.
    pub fn stop(self) -> JoinHandle<()> {
        self.task
    }
}

type Op = Pin<Box<dyn Future<Output = Event> + Send>>;

/// The resources of the machine's current run: the BMC and console as they
/// were when it began, its one operation in flight, its console view and
/// its deadline.
#[derive(Default)]
struct RunIo {
    power: Option<Arc<dyn PowerControl>>,
    hub: Option<Hub>,
    viewer: Option<Viewer>,
    /// Output before this offset never counts.
    head: u64,
    op: Option<Op>,
    /// Set while watching the console.
    deadline: Option<Instant>,
}

impl RunIo {
    /// Starts a BMC operation; its error becomes [`Event::BmcFailed`].
    fn start<F, Fut>(&mut self, f: F)
    where
        F: FnOnce(Arc<dyn PowerControl>) -> Fut,
        Fut: Future<Output = Result<Event, PowerError>> + Send + 'static,
    {
        let Some(power) = self.power.clone() else {
            // Plans only have BMC steps when there is a BMC.
            self.op = Some(Box::pin(std::future::ready(Event::BmcFailed(BmcFailure {
                unreachable: false,
                error: "no BMC".into(),
            }))));
            return;
        };
        let call = f(power);
        self.op = Some(Box::pin(async move {
            call.await
                .unwrap_or_else(|e| Event::BmcFailed(bmc_failure(&e)))
        }));
    }

    /// The next event of the run: its operation's outcome, console output
    /// (while watching) or the watch's deadline.
    async fn next(&mut self) -> Event {
        loop {
            let watching = self.deadline.is_some();
            let deadline = self.deadline.unwrap_or_else(Instant::now);
            tokio::select! {
                ev = async { self.op.as_mut().expect("guarded").await }, if self.op.is_some() => {
                    self.op = None;
                    return ev;
                }
                ev = async { self.viewer.as_mut().expect("guarded").next().await },
                    if watching && self.viewer.is_some() =>
                {
                    match ev {
                        None => {
                            self.viewer = None;
                            return Event::ConsoleClosed;
                        }
                        Some(ViewerEvent::Lagged { .. }) => {}
                        Some(ViewerEvent::Data(chunk)) => {
                            let end = chunk.offset + chunk.data.len() as u64;
                            if end > self.head {
                                let skip = self.head.saturating_sub(chunk.offset) as usize;
                                return Event::Output(chunk.data[skip..].to_vec());
                            }
                        }
                    }
                }
                () = sleep_until(deadline), if watching => {
                    self.deadline = None;
                    return Event::Timeout;
                }
                else => std::future::pending::<()>().await,
            }
        }
    }
}

fn bmc_failure(e: &PowerError) -> BmcFailure {
    BmcFailure {
        unreachable: matches!(e, PowerError::Unreachable { .. }),
        error: crate::error_chain(e),
    }
}

/// The BMC probe: reads the power state every `every` (the first at once).
struct Probe {
    power: Arc<dyn PowerControl>,
    every: Duration,
    next: Instant,
    call: Option<PowerFuture<'static, bool>>,
}

impl Probe {
    /// The next reading: `None` if the BMC answered (even with a refusal),
    /// else why it is unreachable.
    async fn next(&mut self) -> Option<String> {
        if self.call.is_none() {
            sleep_until(self.next).await;
            let power = self.power.clone();
            self.call = Some(Box::pin(async move { power.is_on().await }));
        }
        let r = self.call.as_mut().expect("set").await;
        self.call = None;
        self.next = Instant::now() + self.every;
        match r {
            Err(e @ PowerError::Unreachable { .. }) => Some(crate::error_chain(&e)),
            Ok(_) | Err(PowerError::Refused { .. }) => None,
        }
    }
}

type PowerDone = (
    Result<bool, PowerError>,
    oneshot::Sender<Result<bool, CommandError>>,
);

/// The task's state.
struct Host {
    name: HostName,
    ctx: Arc<Context>,
    spec: Option<HostSpec>,
    power: Option<Arc<dyn PowerControl>>,
    capture: Option<Capture>,
    probe: Option<Probe>,
    machine: Machine,
    io: RunIo,
    /// Reclaim commands waiting for the reclaim in progress.
    reclaims: Vec<oneshot::Sender<Result<(), CommandError>>>,
    /// Power commands in flight.
    commands: JoinSet<PowerDone>,
}

impl Host {
    async fn run(
        mut self,
        mut spec: watch::Receiver<HostSpec>,
        mut requests: mpsc::Receiver<Request>,
        predecessor: Option<JoinHandle<()>>,
    ) {
        if let Some(p) = predecessor {
            let _ = p.await;
        }
        spec.mark_changed();
        loop {
            tokio::select! {
                // The desired state first: a request sent after a desired
                // state finds it applied (the link applies the rack's state,
                // then answers the commands that follow it).
                biased;
                changed = spec.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let s = spec.borrow_and_update().clone();
                    self.reconcile(s).await;
                }
                r = requests.recv() => match r {
                    Some(r) => self.request(r).await,
                    None => break,
                },
                ev = self.io.next() => {
                    let actions = self.machine.on(ev, Instant::now());
                    self.execute(actions).await;
                }
                why = async { self.probe.as_mut().expect("guarded").next().await },
                    if self.probe.is_some() =>
                {
                    self.set_reachable(why);
                }
                Some(done) = self.commands.join_next() => match done {
                    Ok((result, reply)) => self.power_done(result, reply),
                    Err(e) => warn!(error = %e, "power command task failed"),
                },
            }
        }
        // The run first: a capture that stops under a watch must not be
        // reported as a failed boot.
        self.io = RunIo::default();
        self.probe = None;
        self.commands.abort_all();
        if let Some(c) = self.capture.take() {
            let _ = c.stop().await;
        }
    }

    fn set_reachable(&self, unreachable: Option<String>) {
        // Reachability is not persisted: no ticket.
        let _ = self
            .ctx
            .reports
            .update(&self.name, |r| r.unreachable = unreachable);
    }

    /// Brings the host to `spec`: a changed BMC gets a new power control and
    /// probe, a changed console (or BMC, for SOL) a new capture, a lease not
    /// provisioned yet a provisioning, and a boot under way that this task
    /// has not started (the agent restarted) a watch.
    async fn reconcile(&mut self, spec: HostSpec) {
        let prev = self.spec.replace(spec.clone());
        let bmc_changed = prev.as_ref().map(|p| &p.bmc) != Some(&spec.bmc);
        let console_changed =
            prev.as_ref().map(|p| (&p.console, &p.bmc)) != Some((&spec.console, &spec.bmc));
        if bmc_changed {
            self.probe = None;
            self.power = match &spec.bmc {
                None => None,
                Some(b) => match power_control(&self.ctx, &self.name, b).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(error = %e, "cannot set up the BMC");
                        self.set_reachable(Some(e));
                        None
                    }
                },
            };
            if let Some(p) = &self.power {
                self.probe = Some(Probe {
                    power: p.clone(),
                    every: self.ctx.cfg.bmc_probe_interval,
                    next: Instant::now(),
                    call: None,
                });
            } else if spec.bmc.is_none() {
                self.set_reachable(None);
            }
        }
        if console_changed {
            // A provisioning watching the old capture would see it stop.
            let actions = self.machine.on(Event::ConsoleReplaced, Instant::now());
            self.execute(actions).await;
            if let Some(c) = self.capture.take() {
                let _ = c.stop().await;
            }
            self.capture = start_capture(&self.ctx, &self.name, &spec).await;
        }
        let Some(lease) = &spec.lease else {
            // Nothing to do in the machine but forget a lease it queued.
            let actions = self.machine.on(Event::NoLease, Instant::now());
            return self.execute(actions).await;
        };
        let known = self.ctx.reports.provisioning(&self.name);
        let resume = match &known {
            // A lease this agent has not provisioned yet (a restarted agent
            // remembers which it has).
            Some(p) if p.lease == lease.id => {
                if self.machine.has_provisioning() || !p.phase.is_under_way() {
                    return;
                }
                // The agent restarted while the host was booting: no power
                // action again, but watch for the ready text anew.
                true
            }
            _ => false,
        };
        let start = Start {
            lease: lease.id,
            settings: self
                .ctx
                .cfg
                .settings(spec.profile(&self.ctx.cfg.default_profile)),
            efi: spec.efi(),
            bmc: self.power.is_some(),
            console: self.capture.is_some(),
            resume,
        };
        let actions = self.machine.on(Event::Provision(start), Instant::now());
        self.execute(actions).await;
    }

    async fn request(&mut self, r: Request) {
        match r {
            Request::Power { action, reply } => {
                let Some(power) = self.power.clone() else {
                    let _ = reply.send(Err(CommandError::new(
                        ErrorKind::FailedPrecondition,
                        format!("host {} has no usable BMC", self.name),
                    )));
                    return;
                };
                self.commands.spawn(
                    async move {
                        let result = async {
                            if let Some(a) = action {
                                power.set_power(a).await?;
                            }
                            power.is_on().await
                        }
                        .await;
                        (result, reply)
                    }
                    .in_current_span(),
                );
            }
            Request::Reclaim {
                lease,
                profile,
                reply,
            } => {
                let settings = profile
                    .map(|p| self.ctx.cfg.settings(p.as_str()))
                    .unwrap_or_default();
                self.reclaims.push(reply);
                let reclaim = Reclaim {
                    lease,
                    debug_keys: settings.xen_debug_keys,
                    bmc: self.power.is_some(),
                    console: self.capture.is_some(),
                };
                let actions = self.machine.on(Event::Reclaim(reclaim), Instant::now());
                self.execute(actions).await;
            }
            Request::Hub { reply } => {
                let _ = reply.send(self.capture.as_ref().map(|c| c.hub().clone()));
            }
            Request::Flush { reply } => {
                if let Some(c) = &self.capture {
                    c.flush(Duration::from_secs(1)).await;
                }
                let _ = reply.send(());
            }
        }
    }

    fn power_done(
        &self,
        result: Result<bool, PowerError>,
        reply: oneshot::Sender<Result<bool, CommandError>>,
    ) {
        let answer = match result {
            Ok(on) => {
                self.set_reachable(None);
                Ok(on)
            }
            Err(e) => {
                if matches!(e, PowerError::Unreachable { .. }) {
                    self.set_reachable(Some(crate::error_chain(&e)));
                }
                Err(CommandError::power(&e))
            }
        };
        let _ = reply.send(answer);
    }

    /// Carries out the machine's actions, in order.
    async fn execute(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Begin => {
                    self.io = RunIo {
                        power: self.power.clone(),
                        hub: self.capture.as_ref().map(|c| c.hub().clone()),
                        ..RunIo::default()
                    };
                }
                Action::Subscribe => {
                    if let Some(h) = &self.io.hub {
                        self.io.viewer = Some(h.subscribe());
                        self.io.head = h.head();
                    }
                }
                Action::MarkHead => {
                    if let Some(h) = &self.io.hub {
                        self.io.head = h.head();
                    }
                }
                Action::SetBootDevice {
                    device,
                    efi,
                    persistent,
                } => self.io.start(move |p| async move {
                    p.set_boot_device(device, efi, persistent)
                        .await
                        .map(|()| Event::BootDeviceSet)
                }),
                Action::ReadPower => self
                    .io
                    .start(|p| async move { p.is_on().await.map(|on| Event::Power { on }) }),
                Action::PollPower { after } => self.io.start(move |p| async move {
                    tokio::time::sleep(after).await;
                    p.is_on().await.map(|on| Event::Power { on })
                }),
                Action::SetPower(action) => self.io.start(move |p| async move {
                    p.set_power(action).await.map(|()| Event::PowerSet)
                }),
                Action::SendDebugKeys(keys) => {
                    info!(keys = %String::from_utf8_lossy(&keys), "capturing Xen debug output");
                    let steps = xen_debug_sequence(&XenDebugKeys {
                        keys,
                        key_interval: Duration::from_millis(500),
                        switch_back: true,
                    });
                    let hub = self.io.hub.clone();
                    self.io.op = Some(Box::pin(async move {
                        if let Some(hub) = hub
                            && let Err(e) = send_keys(&hub, &steps).await
                        {
                            warn!(error = %e, "cannot send the Xen debug keys");
                        }
                        Event::KeysSent
                    }));
                }
                Action::Watch { deadline } => self.io.deadline = Some(deadline),
                Action::StopWatch => self.io.deadline = None,
                Action::Report {
                    lease,
                    phase,
                    stage,
                    tail,
                    percent,
                    ready_line,
                } => {
                    if phase == super::report::Phase::Installing {
                        info!(%lease, %phase, stage, percent, "provisioning");
                    } else if !ready_line.is_empty() {
                        info!(%lease, %phase, stage, ready_line, "provisioning");
                    } else {
                        info!(%lease, %phase, stage, "provisioning");
                    }
                    let ticket = self.ctx.reports.update(&self.name, |r| {
                        r.provisioning = Some(Provisioning {
                            lease,
                            phase,
                            stage,
                            console_tail: tail,
                            percent,
                            ready_line,
                        });
                    });
                    if let Some(t) = ticket {
                        self.ctx.reports.durable(t).await;
                    }
                }
                Action::Reachable(why) => self.set_reachable(why),
                Action::Reclaimed { lease } => {
                    info!(%lease, "reclaimed: powered off, boot device reset");
                    let ticket = self.ctx.reports.update(&self.name, |r| {
                        if r.provisioning.as_ref().is_some_and(|p| p.lease == lease) {
                            r.provisioning = None;
                        }
                    });
                    if let Some(t) = ticket {
                        self.ctx.reports.durable(t).await;
                    }
                    for reply in self.reclaims.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Action::ReclaimFailed(f) => {
                    let e = match f {
                        ReclaimFailure::Bmc(b) => CommandError::new(
                            if b.unreachable {
                                ErrorKind::Unavailable
                            } else {
                                ErrorKind::FailedPrecondition
                            },
                            b.error,
                        ),
                        ReclaimFailure::StillOn => CommandError::new(
                            ErrorKind::Unavailable,
                            format!("host {} is still on after power off", self.name),
                        ),
                    };
                    for reply in self.reclaims.drain(..) {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Action::End => self.io = RunIo::default(),
            }
        }
    }
}

/// The power control of a BMC, built on a blocking thread (it may
/// resolve a DNS name).
async fn power_control(
    ctx: &Context,
    name: &HostName,
    bmc: &BmcSpec,
) -> Result<Arc<dyn PowerControl>, String> {
    let factory = ctx.power_factory.clone();
    let (name, bmc) = (name.to_string(), bmc.clone());
    match tokio::task::spawn_blocking(move || factory(&name, &bmc)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(format!("BMC set-up interrupted: {e}")),
    }
}

/// Starts capturing the console `spec` names, if any. Resolution and
/// the log's opening run on a blocking thread.
async fn start_capture(ctx: &Context, name: &HostName, spec: &HostSpec) -> Option<Capture> {
    let host = match ConsoleHost::new(name.as_str()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "no console capture");
            return None;
        }
    };
    let source = match &spec.console {
        ConsoleSpec::None => return None,
        ConsoleSpec::Tcp { target } => Source::Tcp(target.clone()),
        ConsoleSpec::IpmiSol => Source::Sol(spec.bmc.clone()?),
        ConsoleSpec::Serial { device, baud } => Source::Serial(device.clone(), *baud),
    };
    let fake = !matches!(ctx.consoles, Consoles::Real);
    let root = ctx.cfg.console_root();
    let limits = ctx.cfg.console_limits;
    let span = tracing::Span::current();
    let opened = tokio::task::spawn_blocking(move || {
        span.in_scope(|| {
            let resolved = if fake {
                Resolved::Fake
            } else {
                source.resolve()?
            };
            Some((open_log(&root, &host, limits)?, resolved))
        })
    })
    .await;
    let (log, resolved) = match opened {
        Ok(Some(o)) => o,
        Ok(None) => return None,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => return None,
    };
    let (hub, input) = Hub::new(HubConfig::default());
    let cfg = ctx.cfg.capture;
    Some(match resolved {
        Resolved::Tcp(addr) => Capture::spawn(TcpSource::new(addr), log, hub, input, cfg),
        Resolved::Sol(endpoint, bmc) => {
            let source = crate::console::sol::SolSource::new(
                endpoint,
                bmc.user,
                bmc.password,
                ctx.cfg.ipmi.clone(),
            );
            Capture::spawn(source, log, hub, input, cfg)
        }
        Resolved::Serial(path, baud) => {
            let source = crate::console::serial::SerialSource::new(path, baud);
            Capture::spawn(source, log, hub, input, cfg)
        }
        Resolved::Fake => match &ctx.consoles {
            #[cfg(test)]
            Consoles::Fake(f) => Capture::spawn(f.source(name), log, hub, input, cfg),
            Consoles::Real => unreachable!("real consoles are resolved"),
        },
    })
}

/// A console source before resolution.
enum Source {
    Tcp(String),
    Sol(BmcSpec),
    Serial(PathBuf, u32),
}

/// A console source ready to connect.
enum Resolved {
    Tcp(SocketAddr),
    Sol(SocketAddr, BmcSpec),
    Serial(PathBuf, u32),
    Fake,
}

impl Source {
    /// Blocking (DNS).
    fn resolve(self) -> Option<Resolved> {
        match self {
            Source::Tcp(target) => match target.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => Some(Resolved::Tcp(a)),
                _ => {
                    warn!(%target, "cannot resolve the console address");
                    None
                }
            },
            Source::Sol(bmc) => match resolve(&bmc.address, bmc.port) {
                Ok(e) => Some(Resolved::Sol(e, bmc)),
                Err(e) => {
                    warn!(error = %e, "no SOL capture");
                    None
                }
            },
            Source::Serial(path, baud) => Some(Resolved::Serial(path, baud)),
        }
    }
}

/// Opens a host's console log (blocking). A log from an earlier run gets a
/// gap marker: whatever the host printed while no agent captured it is
/// missing.
fn open_log(
    root: &std::path::Path,
    host: &ConsoleHost,
    limits: crate::console::LogLimits,
) -> Option<ConsoleLog> {
    let dir = crate::console::log::host_dir(root, host);
    let resumed = crate::console::log::list_files(&dir).is_ok_and(|f| !f.is_empty());
    let mut log = match ConsoleLog::open(root, host, limits) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "cannot open the console log");
            return None;
        }
    };
    if resumed {
        let at = std::time::SystemTime::now();
        let text = format!(
            "\r\n[lab: console capture started at {}; output since the previous capture stopped is missing]\r\n",
            humantime::format_rfc3339_millis(at)
        );
        let ms = crate::console::source::epoch_ms(at);
        if let Err(e) = log.append(RecordKind::Gap, ms, text.as_bytes()) {
            warn!(error = %crate::error_chain(&e), "cannot write the gap marker");
        }
    }
    Some(log)
}
