//! `lab run [acquire options] [--artifacts DIR] [--hold-on-failure D] --
//! CMD…`: a CI job's whole use of the lab in one command. Acquire (queue
//! progress on stderr), wait until the hosts are ready, run CMD with the
//! lease in its environment while renewing the lease every TTL/3, then
//! always give the hosts back: release, wait for the reclaim (so the
//! end-of-lease debug output is in the log), save each host's console to
//! `DIR/HOST.console`. SIGINT and SIGTERM are passed on to CMD, which gets
//! [`GRACE`] to exit before it is killed; the hosts are given back either
//! way. A failed CMD with `--hold-on-failure` keeps the lease instead.
//!
//! Everything `lab run` says goes to stderr as `lab: …` lines; stdout is
//! CMD's. The exit status is CMD's (128 + the signal if one killed it);
//! `lab`'s own failures before CMD ran keep their codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use clap::Args;
use lab_proto::convert;
use lab_proto::v1::console_response::Msg as Out;
use lab_proto::v1::{
    ConsoleLogRequest, GetHostRequest, HostState, Lease, ReleaseRequest, RenewRequest,
};
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

use super::Ctx;
use super::lease::{self, AcquireArgs, READY_TIMEOUT};
use super::ssh::exit_code;
use crate::client::Lab;
use crate::clock;
use crate::exit::{ChildExit, Interrupted, ProvisionFailed, TimedOut};
use crate::sanitize;

/// How long CMD has to exit after a passed-on SIGINT or SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the hosts' reclaim before saving their consoles.
pub const RECLAIM_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    acquire: AcquireArgs,
    /// Do not wait for the hosts to boot (hosts that no agent provisions)
    #[arg(long, conflicts_with = "wait_ready")]
    no_wait_ready: bool,
    /// Save each host's console captured during the lease to DIR/HOST.console
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// When CMD fails, keep the lease for this long (e.g. 30m) instead of
    /// releasing it
    #[arg(long, value_name = "DURATION", value_parser = clock::parse_ttl)]
    hold_on_failure: Option<Duration>,
    /// The command and its arguments (after --)
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// `lab: …` on stderr.
pub(super) fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "lab: {}", sanitize::line(text));
}

/// SIGINT and SIGTERM, from the moment `lab run` starts.
pub(super) struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    pub(super) fn new() -> std::io::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    pub(super) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
        }
    }
}

pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let wait =
        (!args.no_wait_ready).then(|| args.acquire.wait_ready.flatten().unwrap_or(READY_TIMEOUT));
    let lease = tokio::select! {
        r = lease::acquire(ctx, args.acquire) => r?,
        _ = signals.recv() => {
            return Err(Interrupted(Some("interrupted: the lease request was withdrawn".into())).into());
        }
    };
    let id = lease.id.clone();
    say(&format!("lease {id} granted: {}", lease.hosts.join(" ")));
    let done = Done {
        ctx,
        lease: &lease,
        artifacts: args.artifacts.as_deref(),
    };
    // Renewing from the grant on: booting may take longer than a short TTL.
    let renewer = Renewer::start(&ctx.lab, &lease);
    if let Some(timeout) = wait {
        let ready = tokio::select! {
            (_, r) = lease::wait_ready(ctx, lease.clone(), timeout) => r,
            sig = signals.recv() => Err(Interrupted(Some(format!("{sig}: lease {id} released"))).into()),
        };
        if let Err(e) = ready {
            drop(renewer);
            done.give_back().await;
            return Err(released(e));
        }
    }

    let status = run_command(ctx, &lease, &args.command, &mut signals).await;
    drop(renewer);
    let code = match status {
        Ok(s) => exit_code(s),
        Err(e) => {
            say(&format!("{e:#}"));
            127
        }
    };
    match args.hold_on_failure {
        Some(hold) if code != 0 => done.hold(hold, code).await,
        _ => done.give_back().await,
    }
    if code == 0 {
        Ok(())
    } else {
        Err(ChildExit(code).into())
    }
}

/// `wait_ready`'s error, whose message says the lease is still held, for a
/// lease `lab run` released: same kind (same exit code), true words.
pub(super) fn released(e: anyhow::Error) -> anyhow::Error {
    let fix = |m: &str| m.replace("is still held", "was released");
    if let Some(ProvisionFailed(m)) = e.downcast_ref() {
        return ProvisionFailed(fix(m)).into();
    }
    if let Some(TimedOut(m)) = e.downcast_ref() {
        return TimedOut(fix(m)).into();
    }
    if let Some(Interrupted(m)) = e.downcast_ref() {
        return Interrupted(m.as_deref().map(fix)).into();
    }
    e
}

/// The renewal task; stopped when dropped.
pub(super) struct Renewer(tokio::task::JoinHandle<()>);

impl Renewer {
    /// Renews `lease` every TTL/3 (at least every 500 ms) from now on.
    pub(super) fn start(lab: &Lab, lease: &Lease) -> Renewer {
        let ttl = lease
            .ttl
            .as_ref()
            .and_then(convert::duration_from_proto)
            .unwrap_or(Duration::from_secs(3600));
        Renewer(tokio::spawn(renew_every(
            lab.clone(),
            lease.id.clone(),
            (ttl / 3).max(Duration::from_millis(500)),
        )))
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews lease `id` every `every` until aborted; stops when the lease can
/// no longer be renewed (ended, released by someone else).
async fn renew_every(lab: Lab, id: String, every: Duration) {
    let mut next = every;
    loop {
        tokio::time::sleep(next).await;
        let req = RenewRequest {
            lease_id: id.clone(),
            ttl: None,
        };
        match lab.leases().renew(req).await {
            Ok(_) => next = every,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::PermissionDenied
                ) =>
            {
                say(&format!(
                    "lease {id} can no longer be renewed: {}",
                    s.message()
                ));
                return;
            }
            Err(s) => {
                say(&format!(
                    "renewing lease {id} failed, retrying: {}",
                    s.message()
                ));
                next = every.min(Duration::from_secs(1));
            }
        }
    }
}

/// Runs CMD with the lease in its environment; a SIGINT or SIGTERM is
/// passed on, and CMD killed after [`GRACE`].
async fn run_command(
    ctx: &Ctx,
    lease: &Lease,
    command: &[String],
    signals: &mut Signals,
) -> anyhow::Result<ExitStatus> {
    let (program, rest) = command.split_first().expect("clap requires CMD");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .env("LAB_SERVER", &ctx.reach.server)
        .env("LAB_LEASE", &lease.id)
        .env("LAB_HOSTS", lease.hosts.join(" "));
    if let Some(ca) = &ctx.reach.ca {
        cmd.env("LAB_CA", ca);
    }
    if let Some(t) = ctx.reach.token.as_ref().and_then(|t| t.expose()) {
        cmd.env("LAB_TOKEN", t);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    tokio::select! {
        s = child.wait() => Ok(s?),
        sig = signals.recv() => {
            say(&format!("{sig}: passing it on to {program}, which has {}s to exit", GRACE.as_secs()));
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
            match tokio::time::timeout(GRACE, child.wait()).await {
                Ok(s) => Ok(s?),
                Err(_) => {
                    say(&format!("{program} did not exit within {}s: killing it", GRACE.as_secs()));
                    child.kill().await?;
                    Ok(child.wait().await?)
                }
            }
        }
    }
}

/// What is left to do with the lease once CMD ran (or could not).
struct Done<'a> {
    ctx: &'a Ctx,
    lease: &'a Lease,
    artifacts: Option<&'a Path>,
}

impl Done<'_> {
    /// Release, wait for the reclaim, save the consoles.
    async fn give_back(&self) {
        let id = &self.lease.id;
        let req = ReleaseRequest {
            lease_id: id.clone(),
        };
        match self.ctx.lab.leases().release(req).await {
            Ok(_) => say(&format!("lease {id} released")),
            Err(s) => say(&format!("cannot release lease {id}: {}", s.message())),
        }
        if self.artifacts.is_some() {
            self.wait_reclaimed().await;
            self.save_consoles().await;
        }
    }

    /// Keep the lease for `hold` after a failed CMD, and say how to reach
    /// the hosts.
    async fn hold(&self, hold: Duration, code: u8) {
        let id = &self.lease.id;
        let req = RenewRequest {
            lease_id: id.clone(),
            ttl: Some(convert::duration_to_proto(hold)),
        };
        let until = match self.ctx.lab.leases().renew(req).await {
            Ok(l) => l
                .into_inner()
                .expires_at
                .map(|t| clock::when(convert::system_time(&t), SystemTime::now()))
                .unwrap_or_default(),
            Err(s) => {
                say(&format!("cannot extend lease {id}: {}", s.message()));
                "its current expiry".to_owned()
            }
        };
        say(&format!(
            "the command failed (exit {code}); lease {id} is held until {until}:"
        ));
        for h in &self.lease.hosts {
            say(&format!("  lab ssh {h}        lab console {h}"));
        }
        say(&format!("  lab lease release {id}"));
        self.save_consoles().await;
    }

    /// Until no host is being reclaimed from the lease any more (bounded).
    async fn wait_reclaimed(&self) {
        let deadline = tokio::time::Instant::now() + RECLAIM_WAIT;
        for h in &self.lease.hosts {
            loop {
                let req = GetHostRequest { name: h.clone() };
                let reclaiming = match self.ctx.lab.hosts().get_host(req).await {
                    Ok(host) => {
                        let host = host.into_inner();
                        host.state == HostState::Reclaiming as i32 && host.lease_id == self.lease.id
                    }
                    Err(_) => false,
                };
                if !reclaiming || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }

    /// Each host's console during the lease to `DIR/HOST.console`.
    async fn save_consoles(&self) {
        let Some(dir) = self.artifacts else { return };
        if let Err(e) = self.try_save_consoles(dir).await {
            say(&format!(
                "cannot save the consoles to {}: {e:#}",
                dir.display()
            ));
        }
    }

    async fn try_save_consoles(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let req = ConsoleLogRequest {
            lease_id: self.lease.id.clone(),
        };
        let mut stream = self.ctx.lab.hosts().console_log(req).await?.into_inner();
        let mut file: Option<std::fs::File> = None;
        while let Some(resp) = stream.message().await? {
            match resp.msg {
                Some(Out::Host(host)) => {
                    // Host names are validated names, but never trust a
                    // path from the network.
                    if !self.lease.hosts.contains(&host) {
                        anyhow::bail!("the server sent the log of {host:?}, not of this lease");
                    }
                    let path = dir.join(format!("{host}.console"));
                    file = Some(std::fs::File::create(&path)?);
                    say(&format!("console of {host} saved to {}", path.display()));
                }
                Some(Out::Output(bytes)) => {
                    if let Some(f) = file.as_mut() {
                        f.write_all(&bytes)?;
                    }
                }
                Some(Out::Notice(text)) => say(&text),
                None => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RunArgs,
    }

    fn parse(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = std::iter::once("run").chain(argv.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn a_released_lease_is_not_said_to_be_held() {
        let e = released(ProvisionFailed("x1 failed; lease L is still held".into()).into());
        let (code, msg) = crate::exit::classify(
            &e,
            &crate::exit::Context {
                server: "s",
                have_token: true,
            },
        );
        assert_eq!(code, crate::exit::Exit::ProvisionFailed);
        assert_eq!(msg.as_deref(), Some("x1 failed; lease L was released"));
        let e = released(TimedOut("slow; lease L is still held".into()).into());
        assert_eq!(e.to_string(), "slow; lease L was released");
    }

    #[test]
    fn arguments() {
        let a = parse(&[
            "--ttl",
            "3m",
            "--artifacts",
            "out",
            "--hold-on-failure",
            "30m",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        assert_eq!(a.command, ["sh", "-c", "exit 3"]);
        assert_eq!(a.hold_on_failure, Some(Duration::from_secs(1800)));
        assert_eq!(a.artifacts.as_deref(), Some(Path::new("out")));
        assert!(!a.no_wait_ready);
        for bad in [
            &[][..],
            &["--"],
            &["--no-wait-ready", "--wait-ready=1m", "--", "true"],
            &["--hold-on-failure", "soon", "--", "true"],
        ] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad:?}"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
