//! Provisioning and reclaim as a pure machine: no I/O, no clock (`now`
//! comes with every event). The host's task ([`super::host`]) feeds it
//! events and carries out the actions it returns.
//!
//! A run is a plan: a list of [`Step`]s walked in order. Each step starts
//! one operation (an [`Action`] the host task performs) and says what its
//! outcome means; adding a flow is adding a plan, adding a phase is adding
//! a step.
//!
//! ```text
//! provision (new lease, BMC):  Announce(PENDING "starting") → BootDevice(PXE)
//!                              → ReadPower → PowerOn (on, or reset if on)
//!                              → WaitReady → READY | FAILED
//! provision (no BMC):          Announce(PENDING "starting")
//!                              → Announce(BOOTING "no BMC: power the host on by hand")
//! resume (agent restarted):    Announce(BOOTING "the agent restarted; …") → WaitReady
//! reclaim (lease ended):       ReadPower → DebugKeys → PowerOff → ConfirmOff
//!                              → BootDevice(none)    (the middle three only if on)
//! ```
//!
//! A provisioning reports every stage; a BMC error, a failure text, the
//! timeout or the console capture stopping make it FAILED (with the
//! console tail where there is one). A reclaim reports nothing but answers
//! its command: done (the lease's provisioning is cleared) or why not. A
//! new lease replaces a provisioning in progress; a reclaim stops it; a new
//! lease during a reclaim waits for the reclaim to end.

use super::report::Phase;
use crate::config::ProfileSettings;
use crate::ipmi::{BootDevice, PowerAction};
use lab_types::LeaseId;
use tokio::time::Instant;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Reports a stage; no operation.
    Announce { phase: Phase, stage: String },
    /// Sets the boot device for the next boot.
    BootDevice { device: BootDevice, efi: bool },
    /// Reads the power state (what `PowerOn` and the reclaim go by).
    ReadPower,
    /// Powers on, or hard resets a host that is on. Console output before
    /// this point never counts.
    PowerOn,
    /// Watches the console for the profile's ready text or a failure text
    /// within its timeout.
    WaitReady,
    /// If the host is on: plays the profile's Xen debug keys into the
    /// console (if it has any and the console is captured).
    DebugKeys,
    /// If the host is on: powers it off.
    PowerOff,
    /// If the host was on: reads back that it is off.
    ConfirmOff,
}

impl Step {
    /// What a failure of this step says it was doing.
    fn doing(&self) -> String {
        match self {
            Step::BootDevice { device, .. } => {
                format!("setting the boot device to {}", device_name(*device))
            }
            Step::ReadPower | Step::ConfirmOff => "reading the power state".into(),
            Step::PowerOn => "switching the power on".into(),
            Step::PowerOff => "switching the power off".into(),
            Step::Announce { .. } | Step::WaitReady | Step::DebugKeys => String::new(),
        }
    }
}

/// A boot device in stage texts ("boot device PXE").
pub fn device_name(d: BootDevice) -> String {
    match d {
        BootDevice::None => "none".into(),
        BootDevice::Pxe => "PXE".into(),
        BootDevice::Disk => "disk".into(),
        BootDevice::DiskSafe => "disk (safe mode)".into(),
        BootDevice::Diag => "diagnostic partition".into(),
        BootDevice::Cdrom => "CD/DVD".into(),
        BootDevice::BiosSetup => "BIOS setup".into(),
        BootDevice::Other(n) => format!("boot selector {n}"),
    }
}

/// The stage of a provisioning resumed by a restarted agent.
pub const RESUMED: &str = "the agent restarted; watching the console again";

/// What a provisioning needs to know, fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub lease: LeaseId,
    pub settings: ProfileSettings,
    /// The host's firmware is UEFI.
    pub efi: bool,
    /// The host has a usable BMC.
    pub bmc: bool,
    /// The host's console is captured.
    pub console: bool,
    /// A restarted agent resuming a boot under way: no power action, only
    /// the watch.
    pub resume: bool,
}

impl Start {
    /// The plan of this provisioning.
    pub fn plan(&self) -> Vec<Step> {
        if self.resume {
            return vec![
                Step::Announce {
                    phase: Phase::Booting,
                    stage: RESUMED.into(),
                },
                Step::WaitReady,
            ];
        }
        let starting = Step::Announce {
            phase: Phase::Pending,
            stage: "starting".into(),
        };
        if !self.bmc {
            return vec![
                starting,
                Step::Announce {
                    phase: Phase::Booting,
                    stage: "no BMC: power the host on by hand".into(),
                },
            ];
        }
        vec![
            starting,
            Step::BootDevice {
                device: BootDevice::Pxe,
                efi: self.efi,
            },
            Step::ReadPower,
            Step::PowerOn,
            Step::WaitReady,
        ]
    }
}

/// What a reclaim needs to know, fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaim {
    /// The lease that ended.
    pub lease: LeaseId,
    /// The ended lease's profile's Xen debug keys (empty: none).
    pub debug_keys: Vec<u8>,
    pub bmc: bool,
    pub console: bool,
}

impl Reclaim {
    /// The plan of this reclaim (nothing to do without a BMC).
    pub fn plan(&self) -> Vec<Step> {
        if !self.bmc {
            return Vec::new();
        }
        vec![
            Step::ReadPower,
            Step::DebugKeys,
            Step::PowerOff,
            Step::ConfirmOff,
            Step::BootDevice {
                device: BootDevice::None,
                efi: false,
            },
        ]
    }
}

/// A failed BMC operation, as the machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcFailure {
    /// The BMC did not answer (rather than refused): the host becomes
    /// unreachable.
    pub unreachable: bool,
    /// The error with its causes.
    pub error: String,
}

/// Why a reclaim failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReclaimFailure {
    Bmc(BmcFailure),
    /// The power state read back after power off is still on.
    StillOn,
}

/// What happens to a host's provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Provision a lease (a new lease in the desired state, or a boot under
    /// way found by a restarted agent).
    Provision(Start),
    /// The lease ended: reclaim the host (a command waits for the answer).
    Reclaim(Reclaim),
    /// The desired state has no lease: a provisioning waiting for a reclaim
    /// is dropped.
    NoLease,
    /// The console capture is being replaced: a provisioning watching it
    /// stops, unreported.
    ConsoleReplaced,
    /// The boot device was set.
    BootDeviceSet,
    /// The power state read.
    Power { on: bool },
    /// The power action was done.
    PowerSet,
    /// The debug keys were played (or could not be: logged, not fatal).
    KeysSent,
    /// The BMC operation of the current step failed.
    BmcFailed(BmcFailure),
    /// Console output since the power-on (or since the watch started).
    Output(Vec<u8>),
    /// The console capture stopped.
    ConsoleClosed,
    /// The watch's deadline passed.
    Timeout,
}

/// What the host task does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A run starts: drop the previous run's operation, console view and
    /// deadline; take the host's BMC and console as they are now.
    Begin,
    /// Follow the console from its head (a provisioning's output counts
    /// from its start).
    Subscribe,
    /// Output before this point never counts (just before the power-on).
    MarkHead,
    SetBootDevice {
        device: BootDevice,
        efi: bool,
    },
    ReadPower,
    SetPower(PowerAction),
    /// Play these Xen debug keys into the console.
    SendDebugKeys(Vec<u8>),
    /// Deliver console output as [`Event::Output`] (or
    /// [`Event::ConsoleClosed`]) and [`Event::Timeout`] at `deadline`.
    Watch {
        deadline: Instant,
    },
    /// Report the provisioning of `lease`.
    Report {
        lease: LeaseId,
        phase: Phase,
        stage: String,
        tail: String,
    },
    /// The host's BMC answered (`None`) or did not (why).
    Reachable(Option<String>),
    /// The reclaim of `lease` is done: clear its provisioning (if it is
    /// still the one reported) and answer the command.
    Reclaimed {
        lease: LeaseId,
    },
    /// The reclaim failed: answer the command.
    ReclaimFailed(ReclaimFailure),
    /// The run is over: drop its operation, console view and deadline.
    End,
}

/// The ready/failure text watch over a sliding window of recent output:
/// long enough for the markers and for a useful tail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    recent: Vec<u8>,
}

/// What the console showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first of the profile's failure texts that appeared.
    Fail(String),
    Ready,
}

impl Window {
    /// Adds output; failure texts win over the ready text. Only text that
    /// ends in the new output is looked for: anything older was seen before.
    pub fn feed(&mut self, data: &[u8], settings: &ProfileSettings) -> Option<Seen> {
        let ready = settings.ready.as_deref().unwrap_or_default();
        let old = self.recent.len();
        self.recent.extend_from_slice(data);
        let new = |needle: &str| {
            let from = old.saturating_sub(needle.len().saturating_sub(1));
            contains(&self.recent[from..], needle.as_bytes())
        };
        if let Some(f) = settings.fail.iter().find(|f| new(f)) {
            return Some(Seen::Fail(f.clone()));
        }
        if new(ready) {
            return Some(Seen::Ready);
        }
        let keep = 8192 + ready.len() + settings.fail.iter().map(String::len).sum::<usize>();
        if self.recent.len() > 2 * keep {
            self.recent.drain(..self.recent.len() - keep);
        }
        None
    }

    /// The last lines, for failure reports.
    pub fn tail(&self) -> String {
        tail(&self.recent)
    }
}

/// The last 20 lines of console output, for failure reports.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    lines[from..].join("\n")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Provision(Start),
    Reclaim(Reclaim),
}

/// A plan being walked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    purpose: Purpose,
    steps: Vec<Step>,
    at: usize,
    /// When the lease reached the agent (for the ready report).
    started: Instant,
    /// The power state `ReadPower` found.
    on: bool,
    /// The last BOOTING stage, which the watch's reports extend.
    booted: String,
    window: Window,
    done: bool,
}

/// A host's provisioning and reclaim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    /// The current run; a finished provisioning stays (so that it is not
    /// resumed), a finished reclaim does not.
    run: Option<Run>,
    /// A provisioning that waits for the reclaim in progress.
    queued: Option<Start>,
}

impl Machine {
    /// Whether a provisioning ran (or runs) since the host's task started,
    /// and was not stopped since (by a reclaim or a console change).
    pub fn has_provisioning(&self) -> bool {
        self.queued.is_some()
            || matches!(
                &self.run,
                Some(Run {
                    purpose: Purpose::Provision(_),
                    ..
                })
            )
    }

    /// Whether a reclaim is in progress.
    pub fn is_reclaiming(&self) -> bool {
        matches!(
            &self.run,
            Some(Run {
                purpose: Purpose::Reclaim(_),
                done: false,
                ..
            })
        )
    }

    /// The transition function.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Provision(start) => {
                if self.is_reclaiming() {
                    self.queued = Some(start);
                } else {
                    self.begin(Purpose::Provision(start), now, &mut out);
                }
            }
            Event::Reclaim(r) => {
                // A second reclaim joins the one in progress: same answer.
                if !self.is_reclaiming() {
                    self.queued = None;
                    self.begin(Purpose::Reclaim(r), now, &mut out);
                }
            }
            Event::NoLease => self.queued = None,
            Event::ConsoleReplaced => {
                if let Some(run) = &self.run
                    && matches!(run.purpose, Purpose::Provision(_))
                {
                    if !run.done {
                        out.push(Action::End);
                    }
                    self.run = None;
                }
            }
            event => {
                if let Some(run) = &mut self.run
                    && !run.done
                {
                    run.outcome(event, now, &mut out);
                    if run.done {
                        self.finished(now, &mut out);
                    }
                }
            }
        }
        out
    }

    fn begin(&mut self, purpose: Purpose, now: Instant, out: &mut Vec<Action>) {
        let steps = match &purpose {
            Purpose::Provision(s) => s.plan(),
            Purpose::Reclaim(r) => r.plan(),
        };
        out.push(Action::Begin);
        if matches!(purpose, Purpose::Provision(_)) {
            out.push(Action::Subscribe);
        }
        let mut run = Run {
            purpose,
            steps,
            at: 0,
            started: now,
            on: false,
            booted: String::new(),
            window: Window::default(),
            done: false,
        };
        run.advance(now, out);
        self.run = Some(run);
        if self.run.as_ref().is_some_and(|r| r.done) {
            self.finished(now, out);
        }
    }

    /// The run just finished.
    fn finished(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(run) = &self.run else { return };
        if let Purpose::Reclaim(r) = &run.purpose {
            let reclaimed = r.lease;
            self.run = None;
            // A new lease that came during the reclaim (never the one
            // reclaimed: that would power it up again).
            if let Some(start) = self.queued.take()
                && start.lease != reclaimed
            {
                self.begin(Purpose::Provision(start), now, out);
            }
        }
    }
}

impl Run {
    fn provisioning(&self) -> Option<&Start> {
        match &self.purpose {
            Purpose::Provision(s) => Some(s),
            Purpose::Reclaim(_) => None,
        }
    }

    fn report(&self, phase: Phase, stage: String, tail: String, out: &mut Vec<Action>) {
        if let Some(s) = self.provisioning() {
            out.push(Action::Report {
                lease: s.lease,
                phase,
                stage,
                tail,
            });
        }
    }

    /// Ends the run: a provisioning's last report is already out; a reclaim
    /// answers.
    fn finish(&mut self, out: &mut Vec<Action>, failure: Option<ReclaimFailure>) {
        if let Purpose::Reclaim(r) = &self.purpose {
            out.push(match failure {
                None => Action::Reclaimed { lease: r.lease },
                Some(f) => Action::ReclaimFailed(f),
            });
        }
        out.push(Action::End);
        self.done = true;
    }

    /// Starts the current step, skipping those with nothing to do.
    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some(step) = self.steps.get(self.at).cloned() {
            match step {
                Step::Announce { phase, stage } => {
                    if phase == Phase::Booting {
                        self.booted.clone_from(&stage);
                    }
                    self.report(phase, stage, String::new(), out);
                }
                Step::BootDevice { device, efi } => {
                    out.push(Action::SetBootDevice { device, efi });
                    return;
                }
                Step::ReadPower => {
                    out.push(Action::ReadPower);
                    return;
                }
                Step::PowerOn => {
                    out.push(Action::MarkHead);
                    out.push(Action::SetPower(if self.on {
                        PowerAction::HardReset
                    } else {
                        PowerAction::On
                    }));
                    return;
                }
                Step::WaitReady => {
                    let Some(s) = self.provisioning() else {
                        self.at += 1;
                        continue;
                    };
                    let (settings, console) = (&s.settings, s.console);
                    match &settings.ready {
                        None => {
                            let stage = format!("{}; the profile has no ready text", self.booted);
                            self.report(Phase::Ready, stage, String::new(), out);
                        }
                        Some(ready) if !console => {
                            let stage =
                                format!("{}; no console to watch for {ready:?}", self.booted);
                            self.report(Phase::Booting, stage, String::new(), out);
                        }
                        Some(_) => {
                            out.push(Action::Watch {
                                deadline: now + settings.timeout,
                            });
                            return;
                        }
                    }
                    // Nothing to watch: the provisioning ends here.
                    return self.finish(out, None);
                }
                Step::DebugKeys => {
                    if let Purpose::Reclaim(r) = &self.purpose
                        && self.on
                        && r.console
                        && !r.debug_keys.is_empty()
                    {
                        out.push(Action::SendDebugKeys(r.debug_keys.clone()));
                        return;
                    }
                }
                Step::PowerOff => {
                    if self.on {
                        out.push(Action::SetPower(PowerAction::Off));
                        return;
                    }
                }
                Step::ConfirmOff => {
                    if self.on {
                        out.push(Action::ReadPower);
                        return;
                    }
                }
            }
            self.at += 1;
        }
        self.finish(out, None);
    }

    /// The outcome of the current step's operation.
    fn outcome(&mut self, event: Event, now: Instant, out: &mut Vec<Action>) {
        let Some(step) = self.steps.get(self.at).cloned() else {
            return;
        };
        match (&step, event) {
            (Step::BootDevice { device, .. }, Event::BootDeviceSet) => {
                let stage = format!("boot device {}", device_name(*device));
                self.report(Phase::Pending, stage, String::new(), out);
            }
            (Step::ReadPower, Event::Power { on }) => self.on = on,
            (Step::PowerOn, Event::PowerSet) => {
                out.push(Action::Reachable(None));
                let stage = if self.on {
                    "reset (it was on)"
                } else {
                    "powered on"
                };
                self.booted = stage.into();
                self.report(Phase::Booting, stage.into(), String::new(), out);
            }
            (Step::DebugKeys, Event::KeysSent) | (Step::PowerOff, Event::PowerSet) => {}
            (Step::ConfirmOff, Event::Power { on }) => {
                if on {
                    return self.finish(out, Some(ReclaimFailure::StillOn));
                }
            }
            (
                Step::BootDevice { .. }
                | Step::ReadPower
                | Step::PowerOn
                | Step::PowerOff
                | Step::ConfirmOff,
                Event::BmcFailed(f),
            ) => {
                if self.provisioning().is_some() {
                    if f.unreachable {
                        out.push(Action::Reachable(Some(f.error.clone())));
                    }
                    let stage = format!("{}: {}", step.doing(), f.error);
                    self.report(Phase::Failed, stage, String::new(), out);
                    return self.finish(out, None);
                }
                return self.finish(out, Some(ReclaimFailure::Bmc(f)));
            }
            (Step::WaitReady, Event::Output(data)) => {
                let Some(s) = self.provisioning() else { return };
                let settings = s.settings.clone();
                let ready = settings.ready.clone().unwrap_or_default();
                match self.window.feed(&data, &settings) {
                    None => return,
                    Some(Seen::Fail(f)) => {
                        let stage = format!("failure text {f:?} on the console");
                        self.report(Phase::Failed, stage, self.window.tail(), out);
                    }
                    Some(Seen::Ready) => {
                        let stage = format!(
                            "{ready:?} on the console {:.1}s after the lease reached the agent",
                            (now - self.started).as_secs_f64()
                        );
                        self.report(Phase::Ready, stage, String::new(), out);
                    }
                }
                return self.finish(out, None);
            }
            (Step::WaitReady, Event::ConsoleClosed) => {
                let stage = "the console capture stopped".to_owned();
                self.report(Phase::Failed, stage, self.window.tail(), out);
                return self.finish(out, None);
            }
            (Step::WaitReady, Event::Timeout) => {
                let Some(s) = self.provisioning() else { return };
                let ready = s.settings.ready.clone().unwrap_or_default();
                let stage = format!(
                    "no {ready:?} on the console within {:?}",
                    s.settings.timeout
                );
                self.report(Phase::Failed, stage, self.window.tail(), out);
                return self.finish(out, None);
            }
            // Not this step's outcome (a late answer of a replaced
            // operation): nothing happens.
            _ => return,
        }
        self.at += 1;
        self.advance(now, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lease(n: u8) -> LeaseId {
        format!("00000000-0000-0000-0000-0000000000{n:02}")
            .parse()
            .unwrap()
    }

    fn settings() -> ProfileSettings {
        ProfileSettings {
            ready: Some("READY".into()),
            fail: vec!["FAIL".into()],
            timeout: Duration::from_secs(60),
            xen_debug_keys: b"q".to_vec(),
        }
    }

    fn start(l: u8) -> Start {
        Start {
            lease: lease(l),
            settings: settings(),
            efi: false,
            bmc: true,
            console: true,
            resume: false,
        }
    }

    fn reclaim(bmc: bool, keys: &[u8]) -> Reclaim {
        Reclaim {
            lease: lease(1),
            debug_keys: keys.to_vec(),
            bmc,
            console: true,
        }
    }

    fn report(phase: Phase, stage: &str) -> Action {
        report_of(1, phase, stage, "")
    }

    fn report_of(l: u8, phase: Phase, stage: &str, tail: &str) -> Action {
        Action::Report {
            lease: lease(l),
            phase,
            stage: stage.into(),
            tail: tail.into(),
        }
    }

    fn failure(unreachable: bool) -> BmcFailure {
        BmcFailure {
            unreachable,
            error: "BMC b unreachable: no answer".into(),
        }
    }

    use Event as E;

    fn provision(s: Start) -> Vec<Event> {
        vec![E::Provision(s)]
    }
    fn at_read_power() -> Vec<Event> {
        [provision(start(1)), vec![E::BootDeviceSet]].concat()
    }
    fn at_power_on(on: bool) -> Vec<Event> {
        [at_read_power(), vec![E::Power { on }]].concat()
    }
    fn watching() -> Vec<Event> {
        [at_power_on(false), vec![E::PowerSet]].concat()
    }
    fn ready() -> Vec<Event> {
        [watching(), vec![E::Output(b"READY".to_vec())]].concat()
    }
    fn reclaiming(on: bool, keys: &[u8]) -> Vec<Event> {
        vec![E::Reclaim(reclaim(true, keys)), E::Power { on }]
    }

    /// Every step of the plans × the outcomes that matter, and the events
    /// that start, replace or stop a run: (what, history, event after
    /// `dt`, the actions).
    #[test]
    fn step_event_table() {
        use Action as A;
        let t0 = Instant::now();
        let keys = b"q".as_slice();
        let no_ready = Start {
            settings: ProfileSettings {
                ready: None,
                ..settings()
            },
            ..start(1)
        };
        let no_console = Start {
            console: false,
            ..start(1)
        };
        let fail = |f: BmcFailure| E::BmcFailed(f);
        let e = "BMC b unreachable: no answer";
        // (what, history, event after `dt` seconds, the actions)
        type Row = (&'static str, Vec<Event>, Event, u64, Vec<Action>);
        let table: Vec<Row> = vec![
            // ---------------------------------------------- starts
            (
                "idle × new lease",
                vec![],
                E::Provision(start(1)),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: false,
                    },
                ],
            ),
            (
                "idle × new lease, UEFI",
                vec![],
                E::Provision(Start {
                    efi: true,
                    ..start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: true,
                    },
                ],
            ),
            (
                "idle × new lease, no BMC",
                vec![],
                E::Provision(Start {
                    bmc: false,
                    ..start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    report(Phase::Booting, "no BMC: power the host on by hand"),
                    A::End,
                ],
            ),
            (
                "idle × resume",
                vec![],
                E::Provision(Start {
                    resume: true,
                    ..start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Booting, RESUMED),
                    A::Watch {
                        deadline: t0 + Duration::from_secs(60),
                    },
                ],
            ),
            // ---------------------------------------------- boot device
            (
                "boot device × set",
                provision(start(1)),
                E::BootDeviceSet,
                0,
                vec![report(Phase::Pending, "boot device PXE"), A::ReadPower],
            ),
            (
                "boot device × BMC silent",
                provision(start(1)),
                fail(failure(true)),
                0,
                vec![
                    A::Reachable(Some(e.into())),
                    report(
                        Phase::Failed,
                        &format!("setting the boot device to PXE: {e}"),
                    ),
                    A::End,
                ],
            ),
            (
                "boot device × BMC refuses",
                provision(start(1)),
                fail(failure(false)),
                0,
                vec![
                    report(
                        Phase::Failed,
                        &format!("setting the boot device to PXE: {e}"),
                    ),
                    A::End,
                ],
            ),
            // ---------------------------------------------- power
            (
                "read power × off",
                at_read_power(),
                E::Power { on: false },
                0,
                vec![A::MarkHead, A::SetPower(PowerAction::On)],
            ),
            (
                "read power × on",
                at_read_power(),
                E::Power { on: true },
                0,
                vec![A::MarkHead, A::SetPower(PowerAction::HardReset)],
            ),
            (
                "read power × BMC fails",
                at_read_power(),
                fail(failure(false)),
                0,
                vec![
                    report(Phase::Failed, &format!("reading the power state: {e}")),
                    A::End,
                ],
            ),
            (
                "power on × done",
                at_power_on(false),
                E::PowerSet,
                5,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, "powered on"),
                    A::Watch {
                        deadline: t0 + Duration::from_secs(65),
                    },
                ],
            ),
            (
                "reset × done",
                at_power_on(true),
                E::PowerSet,
                0,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, "reset (it was on)"),
                    A::Watch {
                        deadline: t0 + Duration::from_secs(60),
                    },
                ],
            ),
            (
                "power on × BMC silent",
                at_power_on(false),
                fail(failure(true)),
                0,
                vec![
                    A::Reachable(Some(e.into())),
                    report(Phase::Failed, &format!("switching the power on: {e}")),
                    A::End,
                ],
            ),
            (
                "power on × done, no ready text",
                [
                    provision(no_ready),
                    vec![E::BootDeviceSet, E::Power { on: false }],
                ]
                .concat(),
                E::PowerSet,
                0,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, "powered on"),
                    report(Phase::Ready, "powered on; the profile has no ready text"),
                    A::End,
                ],
            ),
            (
                "power on × done, no console",
                [
                    provision(no_console),
                    vec![E::BootDeviceSet, E::Power { on: false }],
                ]
                .concat(),
                E::PowerSet,
                0,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, "powered on"),
                    report(
                        Phase::Booting,
                        "powered on; no console to watch for \"READY\"",
                    ),
                    A::End,
                ],
            ),
            // ---------------------------------------------- the watch
            (
                "watching × ready text",
                watching(),
                E::Output(b"boot\r\nREADY\r\n".to_vec()),
                12,
                vec![
                    report(
                        Phase::Ready,
                        "\"READY\" on the console 12.0s after the lease reached the agent",
                    ),
                    A::End,
                ],
            ),
            (
                "watching × failure text (wins over ready)",
                watching(),
                E::Output(b"panic\r\nFAIL READY\r\n".to_vec()),
                0,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "failure text \"FAIL\" on the console",
                        "panic\nFAIL READY",
                    ),
                    A::End,
                ],
            ),
            (
                "watching × other output",
                watching(),
                E::Output(b"REA".to_vec()),
                0,
                vec![],
            ),
            (
                "watching × the ready text split over two outputs",
                [watching(), vec![E::Output(b"xx REA".to_vec())]].concat(),
                E::Output(b"DY".to_vec()),
                0,
                vec![
                    report(
                        Phase::Ready,
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                    ),
                    A::End,
                ],
            ),
            (
                "watching × timeout",
                [watching(), vec![E::Output(b"kernel panic\r\n".to_vec())]].concat(),
                E::Timeout,
                60,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "no \"READY\" on the console within 60s",
                        "kernel panic",
                    ),
                    A::End,
                ],
            ),
            (
                "watching × capture stopped",
                watching(),
                E::ConsoleClosed,
                0,
                vec![report(Phase::Failed, "the console capture stopped"), A::End],
            ),
            (
                "watching × console replaced",
                watching(),
                E::ConsoleReplaced,
                0,
                vec![A::End],
            ),
            (
                "watching × another lease",
                watching(),
                E::Provision(start(2)),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report_of(2, Phase::Pending, "starting", ""),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: false,
                    },
                ],
            ),
            (
                "ready × late output",
                ready(),
                E::Output(b"FAIL".to_vec()),
                0,
                vec![],
            ),
            (
                "ready × console replaced",
                ready(),
                E::ConsoleReplaced,
                0,
                vec![],
            ),
            (
                "ready × stale power answer",
                ready(),
                E::PowerSet,
                0,
                vec![],
            ),
            (
                "boot device × a step's answer out of turn",
                provision(start(1)),
                E::Power { on: true },
                0,
                vec![],
            ),
            // ---------------------------------------------- reclaim
            (
                "watching × reclaim",
                watching(),
                E::Reclaim(reclaim(true, keys)),
                0,
                vec![A::Begin, A::ReadPower],
            ),
            (
                "idle × reclaim, no BMC",
                vec![],
                E::Reclaim(reclaim(false, keys)),
                0,
                vec![A::Begin, A::Reclaimed { lease: lease(1) }, A::End],
            ),
            (
                "reclaim read power × on, debug keys",
                vec![E::Reclaim(reclaim(true, keys))],
                E::Power { on: true },
                0,
                vec![A::SendDebugKeys(b"q".to_vec())],
            ),
            (
                "reclaim read power × on, no debug keys",
                vec![E::Reclaim(reclaim(true, b""))],
                E::Power { on: true },
                0,
                vec![A::SetPower(PowerAction::Off)],
            ),
            (
                "reclaim read power × on, console not captured",
                vec![E::Reclaim(Reclaim {
                    console: false,
                    ..reclaim(true, keys)
                })],
                E::Power { on: true },
                0,
                vec![A::SetPower(PowerAction::Off)],
            ),
            (
                "reclaim read power × off",
                vec![E::Reclaim(reclaim(true, keys))],
                E::Power { on: false },
                0,
                vec![A::SetBootDevice {
                    device: BootDevice::None,
                    efi: false,
                }],
            ),
            (
                "debug keys × sent",
                reclaiming(true, keys),
                E::KeysSent,
                0,
                vec![A::SetPower(PowerAction::Off)],
            ),
            (
                "power off × done",
                [reclaiming(true, keys), vec![E::KeysSent]].concat(),
                E::PowerSet,
                0,
                vec![A::ReadPower],
            ),
            (
                "confirm off × still on",
                [reclaiming(true, keys), vec![E::KeysSent, E::PowerSet]].concat(),
                E::Power { on: true },
                0,
                vec![A::ReclaimFailed(ReclaimFailure::StillOn), A::End],
            ),
            (
                "confirm off × off",
                [reclaiming(true, keys), vec![E::KeysSent, E::PowerSet]].concat(),
                E::Power { on: false },
                0,
                vec![A::SetBootDevice {
                    device: BootDevice::None,
                    efi: false,
                }],
            ),
            (
                "clear boot device × done",
                reclaiming(false, keys),
                E::BootDeviceSet,
                0,
                vec![A::Reclaimed { lease: lease(1) }, A::End],
            ),
            (
                "reclaim × BMC fails",
                reclaiming(false, keys),
                fail(failure(true)),
                0,
                vec![A::ReclaimFailed(ReclaimFailure::Bmc(failure(true))), A::End],
            ),
            (
                "reclaiming × a second reclaim joins it",
                reclaiming(true, keys),
                E::Reclaim(reclaim(true, keys)),
                0,
                vec![],
            ),
            (
                "reclaiming × console replaced",
                reclaiming(true, keys),
                E::ConsoleReplaced,
                0,
                vec![],
            ),
            (
                "reclaiming × new lease waits",
                reclaiming(false, keys),
                E::Provision(start(2)),
                0,
                vec![],
            ),
            (
                "reclaim done × the waiting lease starts",
                [reclaiming(false, keys), vec![E::Provision(start(2))]].concat(),
                E::BootDeviceSet,
                0,
                vec![
                    A::Reclaimed { lease: lease(1) },
                    A::End,
                    A::Begin,
                    A::Subscribe,
                    report_of(2, Phase::Pending, "starting", ""),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: false,
                    },
                ],
            ),
            (
                "reclaim done × a waiting lease the desired state dropped",
                [
                    reclaiming(false, keys),
                    vec![E::Provision(start(2)), E::NoLease],
                ]
                .concat(),
                E::BootDeviceSet,
                0,
                vec![A::Reclaimed { lease: lease(1) }, A::End],
            ),
            ("watching × no lease", watching(), E::NoLease, 0, vec![]),
            (
                "reclaim done × never the reclaimed lease again",
                [reclaiming(false, keys), vec![E::Provision(start(1))]].concat(),
                E::BootDeviceSet,
                0,
                vec![A::Reclaimed { lease: lease(1) }, A::End],
            ),
        ];
        for (what, history, event, dt, expected) in table {
            let mut m = Machine::default();
            for ev in history {
                m.on(ev, t0);
            }
            let got = m.on(event, t0 + Duration::from_secs(dt));
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn what_counts_as_a_provisioning_for_a_restarted_agent() {
        let t0 = Instant::now();
        let mut m = Machine::default();
        assert!(!m.has_provisioning());
        for ev in ready() {
            m.on(ev, t0);
        }
        assert!(m.has_provisioning(), "a finished one still counts");
        m.on(E::ConsoleReplaced, t0);
        assert!(!m.has_provisioning(), "a console change stops it");
        for ev in reclaiming(false, b"") {
            m.on(ev, t0);
        }
        assert!(m.is_reclaiming() && !m.has_provisioning());
        m.on(E::BootDeviceSet, t0);
        assert!(!m.is_reclaiming() && !m.has_provisioning());
    }

    #[test]
    fn the_window_keeps_a_tail_and_finds_markers_across_reads() {
        let s = settings();
        let mut w = Window::default();
        for i in 0..10_000 {
            assert_eq!(w.feed(format!("line {i}\r\n").as_bytes(), &s), None);
        }
        assert!(w.recent.len() <= 2 * (8192 + 5 + 4), "bounded");
        let tail = w.tail();
        assert_eq!(tail.lines().count(), 20);
        assert!(tail.ends_with("line 9999"), "{tail}");
        assert_eq!(w.feed(b"RE", &s), None);
        assert_eq!(w.feed(b"ADY", &s), Some(Seen::Ready));
        let mut w = Window::default();
        assert_eq!(w.feed(b"READY FAIL", &s), Some(Seen::Fail("FAIL".into())));
        let mut w = Window::default();
        assert_eq!(w.feed(b"x F", &s), None);
        assert_eq!(w.feed(b"A", &s), None);
        assert_eq!(w.feed(b"IL", &s), Some(Seen::Fail("FAIL".into())));
        assert_eq!(device_name(BootDevice::Pxe), "PXE");
    }
}
