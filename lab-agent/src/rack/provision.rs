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
//! install (profile with        Announce(PENDING "starting") → BootDevice(PXE)
//!   `install`, BMC, console):  → ReadPower → PowerOn → WaitInstall (INSTALLING n %)
//!                              → WaitOff (BOOTING "rebooting …") → BootDevice(disk,
//!                              persistent) → PowerOn (BOOTING "booting from disk")
//!                              → WaitDisk → READY | FAILED
//! install, resumed:            the same from the start (the install is redone)
//! install (no BMC or console): Announce(PENDING "starting") → Announce(FAILED why)
//! reclaim (lease ended):       ReadPower → DebugKeys → PowerOff → ConfirmOff
//!                              → BootDevice(none)    (the middle three only if on)
//! ```
//!
//! A provisioning reports every stage; a BMC error, a failure text, the
//! timeout or the console capture stopping make it FAILED (with the
//! console tail where there is one). READY carries the console line that
//! held the ready text ([`MatchedLine`]: the health check's facts line): when
//! the text arrives before its line ends, the watch waits up to
//! [`READY_LINE_WAIT`] for the end of the line (a timeout or the console
//! closing then reports READY with the line so far). A finished run ignores
//! whatever the host does next: the `health-check` initramfs powers the host
//! off right after its line. A reclaim reports nothing but answers
//! its command: done (the lease's provisioning is cleared) or why not. A
//! new lease replaces a provisioning in progress; a reclaim stops it; a new
//! lease during a reclaim waits for the reclaim to end.
//!
//! An install follows the installer's console lines ([`super::install`]):
//! each `LAB-INSTALL` stage is reported (INSTALLING, with the percentage
//! written), `stage=failed` or a failure text fails it with the line, and
//! it must finish within the install timeout with no more than the stage
//! timeout between two lines. The installer then powers the host off; the
//! agent polls the power state (past the power-off timeout it switches the
//! host off itself: the disk was synced before `stage=done`). The boot
//! device becomes the disk, **persistently**: on a real BMC a one-shot
//! override is used up by the first boot, and a holder's `reboot` in dom0
//! would then boot the firmware's first device — PXE in a lab — and
//! reinstall the host; the reclaim clears the override again. The disk's
//! ready line must name this lease (if it names one), so an older install
//! that booted instead is not taken for this one.

use super::install::{InstallLine, Lines, Meaning, ReadyLine};
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
    /// Sets the boot device for the next boot (for every boot when
    /// `persistent`).
    BootDevice {
        device: BootDevice,
        efi: bool,
        persistent: bool,
    },
    /// Reads the power state (what `PowerOn` and the reclaim go by).
    ReadPower,
    /// Powers on, or hard resets a host that is on. Console output before
    /// this point never counts. Reports `stage` (default: "powered on" or
    /// "reset (it was on)").
    PowerOn { stage: Option<String> },
    /// Watches the console for the profile's ready text or a failure text
    /// within its timeout.
    WaitReady,
    /// Follows the installer's `LAB-INSTALL` lines until `stage=done`.
    WaitInstall,
    /// Polls the power state until the host is off (switches it off past
    /// the power-off timeout).
    WaitOff,
    /// Watches the console lines for the ready line of the installed disk
    /// (or a failure text) within the profile's timeout.
    WaitDisk,
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
            Step::PowerOn { .. } => "switching the power on".into(),
            Step::PowerOff => "switching the power off".into(),
            Step::WaitOff => "waiting for the host to power off after the install".into(),
            Step::Announce { .. }
            | Step::WaitReady
            | Step::WaitInstall
            | Step::WaitDisk
            | Step::DebugKeys => String::new(),
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
/// The first stage of an install resumed by a restarted agent.
pub const RESUMED_INSTALL: &str = "the agent restarted during the install; installing again";
/// The stage while the installer powers the host off.
pub const REBOOTING: &str = "rebooting: waiting for the host to power off";
/// The stage of the disk boot after an install.
pub const FROM_DISK: &str = "booting from disk";
/// How long READY waits for the end of the line that holds the ready text.
pub const READY_LINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest ready line reported (bytes; a longer one is cut).
pub const MAX_READY_LINE: usize = 4096;
/// How often the power state is read while waiting for the power-off.
pub const POWER_POLL: std::time::Duration = std::time::Duration::from_secs(1);

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
        if self.settings.install.is_some() {
            return self.install_plan();
        }
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
                persistent: false,
            },
            Step::ReadPower,
            Step::PowerOn { stage: None },
            Step::WaitReady,
        ]
    }

    /// The plan of a profile that installs to disk. A resumed install
    /// starts again: whatever the host did while no agent watched, the
    /// install is idempotent.
    fn install_plan(&self) -> Vec<Step> {
        let starting = Step::Announce {
            phase: Phase::Pending,
            stage: if self.resume {
                RESUMED_INSTALL
            } else {
                "starting"
            }
            .into(),
        };
        let refuse = |why: &str| {
            vec![
                starting.clone(),
                Step::Announce {
                    phase: Phase::Failed,
                    stage: why.into(),
                },
            ]
        };
        if !self.bmc {
            return refuse("an install needs the host's BMC (to boot its disk afterwards)");
        }
        if !self.console {
            return refuse(
                "an install needs the host's console captured (to follow the installer)",
            );
        }
        vec![
            starting,
            Step::BootDevice {
                device: BootDevice::Pxe,
                efi: self.efi,
                persistent: false,
            },
            Step::ReadPower,
            Step::PowerOn { stage: None },
            Step::WaitInstall,
            Step::WaitOff,
            Step::BootDevice {
                device: BootDevice::Disk,
                efi: self.efi,
                persistent: true,
            },
            Step::PowerOn {
                stage: Some(FROM_DISK.into()),
            },
            Step::WaitDisk,
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
                persistent: false,
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
        persistent: bool,
    },
    ReadPower,
    /// Read the power state after `after` (as [`Event::Power`]).
    PollPower {
        after: std::time::Duration,
    },
    SetPower(PowerAction),
    /// Play these Xen debug keys into the console.
    SendDebugKeys(Vec<u8>),
    /// Deliver console output as [`Event::Output`] (or
    /// [`Event::ConsoleClosed`]) and [`Event::Timeout`] at `deadline`.
    Watch {
        deadline: Instant,
    },
    /// Stop delivering console output and the deadline (a watch is over
    /// but the run goes on).
    StopWatch,
    /// Report the provisioning of `lease`.
    Report {
        lease: LeaseId,
        phase: Phase,
        stage: String,
        tail: String,
        /// For [`Phase::Installing`]: 0–100.
        percent: u32,
        /// For [`Phase::Ready`]: the console line that held the ready text
        /// (cleaned, at most [`MAX_READY_LINE`] bytes), else empty.
        ready_line: String,
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
    /// Where in `recent` the ready text was seen.
    ready_at: Option<usize>,
}

/// What the console showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first of the profile's failure texts that appeared.
    Fail(String),
    Ready,
}

/// Console output kept for a tail beyond what the markers need.
const TAIL_KEEP: usize = 8192;

impl Window {
    /// Adds output for the tail only (watches that go by lines).
    pub fn push(&mut self, data: &[u8]) {
        self.recent.extend_from_slice(data);
        if self.recent.len() > 2 * TAIL_KEEP {
            self.recent.drain(..self.recent.len() - TAIL_KEEP);
        }
    }

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
            let from = old.saturating_sub(ready.len().saturating_sub(1));
            self.ready_at = self.recent[from..]
                .windows(ready.len())
                .position(|w| w == ready.as_bytes())
                .map(|i| from + i);
            return Some(Seen::Ready);
        }
        let keep = TAIL_KEEP + ready.len() + settings.fail.iter().map(String::len).sum::<usize>();
        if self.recent.len() > 2 * keep {
            self.recent.drain(..self.recent.len() - keep);
        }
        None
    }

    /// The last lines, for failure reports.
    pub fn tail(&self) -> String {
        tail(&self.recent)
    }

    /// The line that holds the ready text [`Self::feed`] saw, as far as it
    /// arrived (from its start, up to its end if that arrived too).
    pub fn ready_line(&self) -> MatchedLine {
        let mut line = MatchedLine::default();
        if let Some(at) = self.ready_at {
            let start = self.recent[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            line.extend(&self.recent[start..]);
        }
        line
    }
}

/// The console line that held the ready text, collected until its end
/// (a newline) or [`MAX_READY_LINE`] bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchedLine {
    bytes: Vec<u8>,
    ended: bool,
}

impl MatchedLine {
    /// Adds output; whether the line is complete now.
    pub fn extend(&mut self, data: &[u8]) -> bool {
        for &b in data {
            if self.ended {
                break;
            }
            if b == b'\n' {
                self.ended = true;
            } else {
                self.bytes.push(b);
                self.ended = self.bytes.len() >= MAX_READY_LINE;
            }
        }
        self.ended
    }

    /// The line as text: control characters and terminal escapes stripped,
    /// trimmed, at most [`MAX_READY_LINE`] bytes.
    pub fn text(&self) -> String {
        cap_line(super::install::clean(&self.bytes))
    }
}

/// `line` cut to at most [`MAX_READY_LINE`] bytes (on a character boundary).
fn cap_line(mut line: String) -> String {
    if line.len() > MAX_READY_LINE {
        let mut end = MAX_READY_LINE;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
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
    /// The phase last reported (what a boot device report keeps).
    phase: Phase,
    window: Window,
    /// Console lines (the install steps go by lines).
    lines: Lines,
    /// When the install watch began.
    install_since: Instant,
    /// The installer's last line, for a timeout's report.
    install_line: Option<String>,
    /// How much of the install is done.
    percent: u32,
    /// The ready text was seen but its line has not ended yet: the line so
    /// far and the READY stage to report.
    ready: Option<(MatchedLine, String)>,
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
            phase: Phase::Pending,
            window: Window::default(),
            lines: Lines::default(),
            install_since: now,
            install_line: None,
            percent: 0,
            ready: None,
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

    fn report(&mut self, phase: Phase, stage: String, tail: String, out: &mut Vec<Action>) {
        self.report_percent(phase, stage, tail, 0, out);
    }

    fn report_percent(
        &mut self,
        phase: Phase,
        stage: String,
        tail: String,
        percent: u32,
        out: &mut Vec<Action>,
    ) {
        self.report_full(phase, stage, tail, percent, String::new(), out);
    }

    /// Reports READY with the line that held the ready text and ends the
    /// run.
    fn ready(&mut self, stage: String, line: String, out: &mut Vec<Action>) {
        self.report_full(Phase::Ready, stage, String::new(), 0, line, out);
        self.finish(out, None);
    }

    fn report_full(
        &mut self,
        phase: Phase,
        stage: String,
        tail: String,
        percent: u32,
        ready_line: String,
        out: &mut Vec<Action>,
    ) {
        if let Some(s) = self.provisioning() {
            out.push(Action::Report {
                lease: s.lease,
                phase,
                stage,
                tail,
                percent,
                ready_line,
            });
            self.phase = phase;
        }
    }

    /// Reports FAILED with the console tail and ends the run.
    fn fail(&mut self, stage: String, out: &mut Vec<Action>) {
        let tail = self.window.tail();
        self.report(Phase::Failed, stage, tail, out);
        self.finish(out, None);
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

    /// The current step is done: on to the next.
    fn next_step(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.at += 1;
        self.advance(now, out);
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
                    if phase == Phase::Failed {
                        return self.finish(out, None);
                    }
                }
                Step::BootDevice {
                    device,
                    efi,
                    persistent,
                } => {
                    out.push(Action::SetBootDevice {
                        device,
                        efi,
                        persistent,
                    });
                    return;
                }
                Step::ReadPower => {
                    out.push(Action::ReadPower);
                    return;
                }
                Step::PowerOn { .. } => {
                    self.lines.clear();
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
                    let (settings, console) = (s.settings.clone(), s.console);
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
                Step::WaitInstall => {
                    self.install_since = now;
                    self.install_line = None;
                    out.push(Action::Watch {
                        deadline: self.install_deadline(now),
                    });
                    return;
                }
                Step::WaitOff => {
                    let wait = self.install().poweroff_timeout;
                    self.report(Phase::Booting, REBOOTING.into(), String::new(), out);
                    out.push(Action::Watch {
                        deadline: now + wait,
                    });
                    out.push(Action::PollPower { after: POWER_POLL });
                    return;
                }
                Step::WaitDisk => {
                    let timeout = self.provisioning().map_or_else(
                        || ProfileSettings::default().timeout,
                        |s| s.settings.timeout,
                    );
                    out.push(Action::Watch {
                        deadline: now + timeout,
                    });
                    return;
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

    /// The install limits (install steps are only in plans of profiles
    /// that have them).
    fn install(&self) -> crate::config::InstallSettings {
        self.provisioning()
            .and_then(|s| s.settings.install)
            .unwrap_or_default()
    }

    /// When the install watch gives up: the stage timeout after the last
    /// installer line, at the latest the install timeout after it began.
    fn install_deadline(&self, now: Instant) -> Instant {
        let i = self.install();
        (now + i.stage_timeout).min(self.install_since + i.timeout)
    }

    /// The first of the profile's failure texts in `line`, with the line
    /// from that text on (for the report).
    fn failure_in(&self, line: &str) -> Option<String> {
        let s = self.provisioning()?;
        s.settings.fail.iter().find_map(|f| {
            line.find(f.as_str())
                .map(|at| format!("on the console: {}", &line[at..]))
        })
    }

    /// The outcome of the current step's operation.
    fn outcome(&mut self, event: Event, now: Instant, out: &mut Vec<Action>) {
        let Some(step) = self.steps.get(self.at).cloned() else {
            return;
        };
        match (&step, event) {
            (
                Step::BootDevice {
                    device, persistent, ..
                },
                Event::BootDeviceSet,
            ) => {
                let mut stage = format!("boot device {}", device_name(*device));
                if *persistent {
                    stage.push_str(" (persistent)");
                }
                self.report(self.phase, stage, String::new(), out);
            }
            (Step::ReadPower, Event::Power { on }) => self.on = on,
            (Step::PowerOn { stage }, Event::PowerSet) => {
                out.push(Action::Reachable(None));
                let stage = match stage {
                    Some(s) => s.clone(),
                    None if self.on => "reset (it was on)".into(),
                    None => "powered on".into(),
                };
                self.on = true;
                self.booted.clone_from(&stage);
                self.report(Phase::Booting, stage, String::new(), out);
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
                | Step::PowerOn { .. }
                | Step::PowerOff
                | Step::ConfirmOff
                | Step::WaitOff,
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
                // The ready text came: the rest of its line.
                if let Some((mut line, stage)) = self.ready.take() {
                    if line.extend(&data) {
                        return self.ready(stage, line.text(), out);
                    }
                    self.ready = Some((line, stage));
                    return;
                }
                let Some(s) = self.provisioning() else { return };
                let settings = s.settings.clone();
                let ready = settings.ready.clone().unwrap_or_default();
                match self.window.feed(&data, &settings) {
                    None => return,
                    Some(Seen::Fail(f)) => {
                        let stage = format!("failure text {f:?} on the console");
                        let tail = self.window.tail();
                        self.report(Phase::Failed, stage, tail, out);
                    }
                    Some(Seen::Ready) => {
                        let stage = format!(
                            "{ready:?} on the console {:.1}s after the lease reached the agent",
                            (now - self.started).as_secs_f64()
                        );
                        let line = self.window.ready_line();
                        if line.ended {
                            return self.ready(stage, line.text(), out);
                        }
                        self.ready = Some((line, stage));
                        out.push(Action::Watch {
                            deadline: now + READY_LINE_WAIT,
                        });
                        return;
                    }
                }
                return self.finish(out, None);
            }
            // The ready text came but its line did not end: READY with the
            // line so far.
            (Step::WaitReady, Event::Timeout | Event::ConsoleClosed) if self.ready.is_some() => {
                if let Some((line, stage)) = self.ready.take() {
                    return self.ready(stage, line.text(), out);
                }
                return;
            }
            (
                Step::WaitReady | Step::WaitInstall | Step::WaitOff | Step::WaitDisk,
                Event::ConsoleClosed,
            ) => {
                return self.fail("the console capture stopped".into(), out);
            }
            (Step::WaitReady, Event::Timeout) => {
                let Some(s) = self.provisioning() else { return };
                let ready = s.settings.ready.clone().unwrap_or_default();
                let stage = format!(
                    "no {ready:?} on the console within {:?}",
                    s.settings.timeout
                );
                return self.fail(stage, out);
            }
            (Step::WaitInstall, Event::Output(data)) => {
                self.window.push(&data);
                for line in self.lines.feed(&data) {
                    if let Some(why) = self.failure_in(&line) {
                        return self.fail(why, out);
                    }
                    let Some(l) = InstallLine::parse(&line) else {
                        continue;
                    };
                    self.install_line = Some(l.text.clone());
                    match l.meaning() {
                        Meaning::Progress { stage, percent } => {
                            if let Some(p) = percent {
                                self.percent = p;
                            }
                            let percent = self.percent;
                            self.report_percent(
                                Phase::Installing,
                                stage,
                                String::new(),
                                percent,
                                out,
                            );
                            out.push(Action::Watch {
                                deadline: self.install_deadline(now),
                            });
                        }
                        Meaning::Done { stage } => {
                            self.percent = 100;
                            self.report_percent(Phase::Installing, stage, String::new(), 100, out);
                            out.push(Action::StopWatch);
                            return self.next_step(now, out);
                        }
                        Meaning::Failed { stage } => return self.fail(stage, out),
                    }
                }
                return;
            }
            (Step::WaitInstall, Event::Timeout) => {
                let i = self.install();
                let stage = if now >= self.install_since + i.timeout {
                    format!("the install did not finish within {:?}", i.timeout)
                } else {
                    match &self.install_line {
                        Some(l) => format!(
                            "no word from the installer for {:?} (last: {l})",
                            i.stage_timeout
                        ),
                        None => format!("the installer did not start within {:?}", i.stage_timeout),
                    }
                };
                return self.fail(stage, out);
            }
            (Step::WaitOff, Event::Output(data)) => {
                self.window.push(&data);
                return;
            }
            (Step::WaitOff, Event::Power { on: true }) => {
                out.push(Action::PollPower { after: POWER_POLL });
                return;
            }
            (Step::WaitOff, Event::Power { on: false }) => {
                self.on = false;
                out.push(Action::StopWatch);
            }
            (Step::WaitOff, Event::Timeout) => {
                let stage = format!(
                    "rebooting: the host did not power off within {:?} after the install; switching it off",
                    self.install().poweroff_timeout
                );
                self.report(Phase::Booting, stage, String::new(), out);
                out.push(Action::SetPower(PowerAction::Off));
                return;
            }
            (Step::WaitOff, Event::PowerSet) => self.on = false,
            (Step::WaitDisk, Event::Output(data)) => {
                self.window.push(&data);
                let Some(s) = self.provisioning() else { return };
                let (lease, ready) = (s.lease, s.settings.ready.clone().unwrap_or_default());
                for line in self.lines.feed(&data) {
                    if let Some(why) = self.failure_in(&line) {
                        return self.fail(why, out);
                    }
                    let Some(r) = ReadyLine::parse(&line, &ready) else {
                        continue;
                    };
                    if let Some(other) = r.lease()
                        && other != lease.to_string()
                    {
                        return self.fail(
                            format!(
                                "the disk booted the install of another lease ({other}): {line}"
                            ),
                            out,
                        );
                    }
                    let mut stage = format!(
                        "{ready:?} on the console {:.1}s after the lease reached the agent",
                        (now - self.started).as_secs_f64()
                    );
                    let about = r.describe();
                    if !about.is_empty() {
                        stage = format!("{stage}: {about}");
                    }
                    return self.ready(stage, cap_line(line), out);
                }
                return;
            }
            (Step::WaitDisk, Event::Timeout) => {
                let Some(s) = self.provisioning() else { return };
                let ready = s.settings.ready.clone().unwrap_or_default();
                let stage = format!(
                    "no {ready:?} on the console within {:?} of booting from disk",
                    s.settings.timeout
                );
                return self.fail(stage, out);
            }
            // Not this step's outcome (a late answer of a replaced
            // operation): nothing happens.
            _ => return,
        }
        self.next_step(now, out);
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
            install: None,
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
            percent: 0,
            ready_line: String::new(),
        }
    }

    /// READY of lease 1 with the line that held the ready text.
    fn ready_with(stage: &str, line: &str) -> Action {
        Action::Report {
            lease: lease(1),
            phase: Phase::Ready,
            stage: stage.into(),
            tail: String::new(),
            percent: 0,
            ready_line: line.into(),
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
        [watching(), vec![E::Output(b"READY\r\n".to_vec())]].concat()
    }
    fn reclaiming(on: bool, keys: &[u8]) -> Vec<Event> {
        vec![E::Reclaim(reclaim(true, keys)), E::Power { on }]
    }

    // ------------------------------------------------ the install plan

    fn install_settings() -> ProfileSettings {
        ProfileSettings {
            ready: Some("LAB-DISK-READY".into()),
            fail: vec!["LAB-DISK-FAILED".into(), "LAB-BOOT-FAILED".into()],
            install: Some(crate::config::InstallSettings::default()),
            ..settings()
        }
    }
    fn install_start(l: u8) -> Start {
        Start {
            settings: install_settings(),
            ..start(l)
        }
    }
    fn out(text: &str) -> Event {
        E::Output(text.as_bytes().to_vec())
    }
    /// Powered on, the installer's output awaited.
    fn installing() -> Vec<Event> {
        [
            provision(install_start(1)),
            vec![E::BootDeviceSet, E::Power { on: false }, E::PowerSet],
        ]
        .concat()
    }
    const DONE: &str =
        "LAB-INSTALL stage=done sha256=ok bytes=9 seconds=24 mbps=29.3 then=poweroff\r\n";
    /// The installer finished: waiting for the power-off.
    fn install_done() -> Vec<Event> {
        [installing(), vec![out(DONE)]].concat()
    }
    /// Booting the installed disk, watching for its ready line.
    fn disk_booting() -> Vec<Event> {
        [
            install_done(),
            vec![E::Power { on: false }, E::BootDeviceSet, E::PowerSet],
        ]
        .concat()
    }
    fn installing_at(stage: &str, percent: u32) -> Action {
        Action::Report {
            lease: lease(1),
            phase: Phase::Installing,
            stage: stage.into(),
            tail: String::new(),
            percent,
            ready_line: String::new(),
        }
    }

    /// The install plan's steps × their outcomes: (what, history at t0,
    /// event after `dt` seconds, the actions).
    #[test]
    fn install_table() {
        use Action as A;
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let e = "BMC b unreachable: no answer";
        let disk = A::SetBootDevice {
            device: BootDevice::Disk,
            efi: false,
            persistent: true,
        };
        let refused = "LAB-BOOT-FAILED profile=xen-install is not supported for aarch64/uefi hosts (the disk image is x86_64 BIOS only)";
        let ready_line = format!(
            "LAB-DISK-READY host=h1 lease={} xen=4.17.7 sshd=active ip=198.18.0.11 hostkey=SHA256:abc",
            lease(1)
        );
        type Row = (&'static str, Vec<Event>, Event, u64, Vec<Action>);
        let table: Vec<Row> = vec![
            // ---------------------------------------------- starts
            (
                "idle × new lease",
                vec![],
                E::Provision(install_start(1)),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: false,
                        persistent: false,
                    },
                ],
            ),
            (
                "idle × resumed: installed again",
                vec![],
                E::Provision(Start {
                    resume: true,
                    ..install_start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, RESUMED_INSTALL),
                    A::SetBootDevice {
                        device: BootDevice::Pxe,
                        efi: false,
                        persistent: false,
                    },
                ],
            ),
            (
                "idle × no BMC",
                vec![],
                E::Provision(Start {
                    bmc: false,
                    ..install_start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    report(
                        Phase::Failed,
                        "an install needs the host's BMC (to boot its disk afterwards)",
                    ),
                    A::End,
                ],
            ),
            (
                "idle × no console",
                vec![],
                E::Provision(Start {
                    console: false,
                    ..install_start(1)
                }),
                0,
                vec![
                    A::Begin,
                    A::Subscribe,
                    report(Phase::Pending, "starting"),
                    report(
                        Phase::Failed,
                        "an install needs the host's console captured (to follow the installer)",
                    ),
                    A::End,
                ],
            ),
            (
                "power on × done: the stage timeout runs",
                [
                    provision(install_start(1)),
                    vec![E::BootDeviceSet, E::Power { on: false }],
                ]
                .concat(),
                E::PowerSet,
                5,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, "powered on"),
                    A::Watch {
                        deadline: secs(5 + 180),
                    },
                ],
            ),
            // ---------------------------------------------- the installer
            (
                "installing × first line",
                installing(),
                out("LAB-INSTALL stage=start version=1 kernel=6.1 image=http://a/i.zst\r\n"),
                10,
                vec![
                    installing_at("installer started", 0),
                    A::Watch {
                        deadline: secs(10 + 180),
                    },
                ],
            ),
            (
                "installing × a percentage",
                installing(),
                out("LAB-INSTALL stage=writing percent=42 bytes=1 total=2\r\n"),
                20,
                vec![
                    installing_at("writing the image", 42),
                    A::Watch {
                        deadline: secs(20 + 180),
                    },
                ],
            ),
            (
                "installing × a stage keeps the percentage",
                [
                    installing(),
                    vec![out("LAB-INSTALL stage=writing percent=42\r\n")],
                ]
                .concat(),
                out("LAB-INSTALL stage=resize\r\n"),
                0,
                vec![
                    installing_at("installer stage resize", 42),
                    A::Watch {
                        deadline: secs(180),
                    },
                ],
            ),
            (
                "installing × a line split over two outputs",
                [installing(), vec![out("\x1b[0mLAB-INSTALL stage=wri")]].concat(),
                out("ting percent=5\r\n"),
                0,
                vec![
                    installing_at("writing the image", 5),
                    A::Watch {
                        deadline: secs(180),
                    },
                ],
            ),
            (
                "installing × two lines at once",
                installing(),
                out("LAB-INSTALL stage=start\r\nLAB-INSTALL stage=network ip=198.18.0.11\r\n"),
                0,
                vec![
                    installing_at("installer started", 0),
                    A::Watch {
                        deadline: secs(180),
                    },
                    installing_at("installer on the network at 198.18.0.11", 0),
                    A::Watch {
                        deadline: secs(180),
                    },
                ],
            ),
            (
                "installing × other output, and the ready text",
                installing(),
                out("Loading Linux 6.1\r\nLAB-DISK-READY host=h1\r\n"),
                0,
                vec![],
            ),
            (
                "installing × the line is only half there",
                installing(),
                out("LAB-INSTALL stage=writing percent=5"),
                0,
                vec![],
            ),
            (
                "installing × done",
                installing(),
                out(DONE),
                40,
                vec![
                    installing_at("image written and checked in 24 s (29.3 MB/s)", 100),
                    A::StopWatch,
                    report(Phase::Booting, REBOOTING),
                    A::Watch {
                        deadline: secs(40 + 60),
                    },
                    A::PollPower { after: POWER_POLL },
                ],
            ),
            (
                "installing × the installer fails",
                installing(),
                out("LAB-INSTALL stage=failed reason=http detail=http://a/i.zst: 404\r\n"),
                0,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "install failed: http: http://a/i.zst: 404",
                        "LAB-INSTALL stage=failed reason=http detail=http://a/i.zst: 404",
                    ),
                    A::End,
                ],
            ),
            (
                "installing × the template refuses the host",
                installing(),
                out(&format!(
                    "LAB-IPXE profile=xen-install host=h1 lease=-\r\n{refused}\r\n"
                )),
                0,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        &format!("on the console: {refused}"),
                        &format!("LAB-IPXE profile=xen-install host=h1 lease=-\n{refused}"),
                    ),
                    A::End,
                ],
            ),
            (
                "installing × the installer never starts",
                installing(),
                E::Timeout,
                180,
                vec![
                    report(Phase::Failed, "the installer did not start within 180s"),
                    A::End,
                ],
            ),
            (
                "installing × the installer goes quiet",
                [
                    installing(),
                    vec![out("LAB-INSTALL stage=writing percent=40\r\n")],
                ]
                .concat(),
                E::Timeout,
                181,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "no word from the installer for 180s (last: LAB-INSTALL stage=writing percent=40)",
                        "LAB-INSTALL stage=writing percent=40",
                    ),
                    A::End,
                ],
            ),
            (
                "installing × the whole install takes too long",
                installing(),
                E::Timeout,
                900,
                vec![
                    report(Phase::Failed, "the install did not finish within 900s"),
                    A::End,
                ],
            ),
            (
                "installing × capture stopped",
                installing(),
                E::ConsoleClosed,
                0,
                vec![report(Phase::Failed, "the console capture stopped"), A::End],
            ),
            // ---------------------------------------------- the power-off
            (
                "waiting for the power-off × still on",
                install_done(),
                E::Power { on: true },
                1,
                vec![A::PollPower { after: POWER_POLL }],
            ),
            (
                "waiting for the power-off × output",
                install_done(),
                out("reboot: Power down\r\n"),
                1,
                vec![],
            ),
            (
                "waiting for the power-off × off",
                install_done(),
                E::Power { on: false },
                3,
                vec![A::StopWatch, disk.clone()],
            ),
            (
                "waiting for the power-off × too long: switched off",
                install_done(),
                E::Timeout,
                60,
                vec![
                    report(
                        Phase::Booting,
                        "rebooting: the host did not power off within 60s after the install; switching it off",
                    ),
                    A::SetPower(PowerAction::Off),
                ],
            ),
            (
                "switched off × done",
                [install_done(), vec![E::Timeout]].concat(),
                E::PowerSet,
                60,
                vec![disk.clone()],
            ),
            (
                "waiting for the power-off × BMC silent",
                install_done(),
                E::BmcFailed(failure(true)),
                1,
                vec![
                    A::Reachable(Some(e.into())),
                    report(
                        Phase::Failed,
                        &format!("waiting for the host to power off after the install: {e}"),
                    ),
                    A::End,
                ],
            ),
            // ---------------------------------------------- the disk
            (
                "boot device disk × set",
                [install_done(), vec![E::Power { on: false }]].concat(),
                E::BootDeviceSet,
                0,
                vec![
                    report(Phase::Booting, "boot device disk (persistent)"),
                    A::MarkHead,
                    A::SetPower(PowerAction::On),
                ],
            ),
            (
                "boot device disk × BMC refuses",
                [install_done(), vec![E::Power { on: false }]].concat(),
                E::BmcFailed(failure(false)),
                0,
                vec![
                    report(
                        Phase::Failed,
                        &format!("setting the boot device to disk: {e}"),
                    ),
                    A::End,
                ],
            ),
            (
                "power on from disk × done",
                [
                    install_done(),
                    vec![E::Power { on: false }, E::BootDeviceSet],
                ]
                .concat(),
                E::PowerSet,
                50,
                vec![
                    A::Reachable(None),
                    report(Phase::Booting, FROM_DISK),
                    A::Watch {
                        deadline: secs(50 + 60),
                    },
                ],
            ),
            (
                "booting from disk × the ready line",
                disk_booting(),
                out(&format!("[  OK  ] Started ssh.service\r\n{ready_line}\r\n")),
                120,
                vec![
                    ready_with(
                        "\"LAB-DISK-READY\" on the console 120.0s after the lease reached the agent: \
                         xen 4.17.7, ssh root@198.18.0.11, host key SHA256:abc",
                        &ready_line,
                    ),
                    A::End,
                ],
            ),
            (
                "booting from disk × the ready line before its end",
                disk_booting(),
                out(&ready_line),
                120,
                vec![],
            ),
            (
                "booting from disk × another lease's install",
                disk_booting(),
                out("LAB-DISK-READY host=h1 lease=L-old xen=4.17.7\r\n"),
                0,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "the disk booted the install of another lease (L-old): \
                         LAB-DISK-READY host=h1 lease=L-old xen=4.17.7",
                        &format!(
                            "{}\nLAB-DISK-READY host=h1 lease=L-old xen=4.17.7",
                            DONE.trim_end()
                        ),
                    ),
                    A::End,
                ],
            ),
            (
                "booting from disk × the failure line",
                disk_booting(),
                out("LAB-DISK-FAILED host=h1 lease=- reason=no-address\r\n"),
                0,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "on the console: LAB-DISK-FAILED host=h1 lease=- reason=no-address",
                        &format!(
                            "{}\nLAB-DISK-FAILED host=h1 lease=- reason=no-address",
                            DONE.trim_end()
                        ),
                    ),
                    A::End,
                ],
            ),
            (
                "booting from disk × timeout",
                disk_booting(),
                E::Timeout,
                60,
                vec![
                    report_of(
                        1,
                        Phase::Failed,
                        "no \"LAB-DISK-READY\" on the console within 60s of booting from disk",
                        DONE.trim_end(),
                    ),
                    A::End,
                ],
            ),
            (
                "ready × late output",
                [disk_booting(), vec![out(&format!("{ready_line}\r\n"))]].concat(),
                out("LAB-DISK-FAILED\r\n"),
                0,
                vec![],
            ),
            (
                "booting from disk × reclaim",
                disk_booting(),
                E::Reclaim(reclaim(true, b"q")),
                0,
                vec![A::Begin, A::ReadPower],
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
                        persistent: false,
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
                        persistent: false,
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
                E::Output(b"boot\r\n\x1b[0mREADY arch=x86_64 cpus=2\r\nmore\r\n".to_vec()),
                12,
                vec![
                    ready_with(
                        "\"READY\" on the console 12.0s after the lease reached the agent",
                        "READY arch=x86_64 cpus=2",
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
                [watching(), vec![E::Output(b"xx\nyy REA".to_vec())]].concat(),
                E::Output(b"DY cpus=1\r\n".to_vec()),
                0,
                vec![
                    ready_with(
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                        "yy READY cpus=1",
                    ),
                    A::End,
                ],
            ),
            (
                "watching × the ready text before its line ends",
                watching(),
                E::Output(b"READY cpus".to_vec()),
                3,
                vec![A::Watch {
                    deadline: t0 + Duration::from_secs(3) + READY_LINE_WAIT,
                }],
            ),
            (
                "ready text × the end of its line",
                [watching(), vec![E::Output(b"READY cpus".to_vec())]].concat(),
                E::Output(b"=2 mem_kb=1\r\nLAB-POWEROFF\r\n".to_vec()),
                1,
                vec![
                    ready_with(
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                        "READY cpus=2 mem_kb=1",
                    ),
                    A::End,
                ],
            ),
            (
                "ready text × more of its line, no end",
                [watching(), vec![E::Output(b"READY cpus".to_vec())]].concat(),
                E::Output(b"=2 FAIL".to_vec()),
                1,
                vec![],
            ),
            (
                "ready text × no end of its line in time",
                [watching(), vec![E::Output(b"READY cpus".to_vec())]].concat(),
                E::Timeout,
                2,
                vec![
                    ready_with(
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                        "READY cpus",
                    ),
                    A::End,
                ],
            ),
            (
                "ready text × capture stopped before its line ended",
                [watching(), vec![E::Output(b"READY cpus".to_vec())]].concat(),
                E::ConsoleClosed,
                1,
                vec![
                    ready_with(
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                        "READY cpus",
                    ),
                    A::End,
                ],
            ),
            (
                "ready text × a line longer than 4 KiB",
                [watching(), vec![E::Output(b"READY ".to_vec())]].concat(),
                E::Output(vec![b'x'; 5000]),
                0,
                vec![
                    ready_with(
                        "\"READY\" on the console 0.0s after the lease reached the agent",
                        &format!("READY {}", "x".repeat(MAX_READY_LINE - 6)),
                    ),
                    A::End,
                ],
            ),
            (
                "ready × the host powers itself off (health check)",
                ready(),
                E::Power { on: false },
                5,
                vec![],
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
                        persistent: false,
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
                    persistent: false,
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
                    persistent: false,
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
                        persistent: false,
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
