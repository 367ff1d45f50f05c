//! `lab lease acquire|renew|release|show|list|wait-ready`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use lab_proto::convert;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::{
    AcquireRequest, GetLeaseRequest, Lease, LeaseRequest, LeaseState, ListLeasesRequest,
    ReleaseRequest, RenewRequest,
};

use super::{ArchArg, Ctx};
use crate::clock;
use crate::exit::{Interrupted, LeaseEnded, ProvisionFailed, StreamEnded, TimedOut};
use crate::output::{self, Table};
use crate::ready::{self, Progress, Verdict};
use crate::sanitize;
use crate::sshkey::{self, SshKeyArg};
use crate::view::LeaseView;
use crate::waiting::{Queued, WaitLine};

/// How long `--wait-ready` (without a value) and `lease wait-ready` wait for
/// the hosts to boot, counted from the grant (or the start of the command).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How often `--wait-ready` asks the server for the lease.
pub const READY_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Subcommand)]
pub enum LeaseCommand {
    /// Ask for hosts; wait in the queue until they are granted
    ///
    /// While the request waits, its queue position and ETA are shown on
    /// stderr: one live line on a terminal, a line per position change
    /// otherwise. On grant the lease is printed on stdout (as JSON with
    /// --json). Ctrl-C while waiting withdraws the request and exits with 130.
    ///
    /// When the connection breaks (the server restarts, the network drops),
    /// the request is sent again with the same request id, with backoff, for
    /// up to 5 minutes: it keeps its place in the queue, or gets its lease
    /// if it was granted meanwhile.
    ///
    /// --flag, --host and --arch all narrow the hosts that may be granted;
    /// --count says how many of them, granted together or not at all.
    ///
    /// With --wait-ready, after the grant each host's boot progress is shown
    /// on stderr ("x1: booting — powered on") until every host is ready
    /// (exit 0), one fails (its console tail on stderr, exit 8) or the
    /// timeout passes (exit 9). The lease is printed on stdout in every
    /// case, so a script can release it; it is not released for you.
    ///
    /// The lease carries your OpenSSH public key for root on its hosts
    /// (profiles that install an OS put it into authorized_keys; see
    /// lab ssh): --ssh-key FILE, else ~/.ssh/id_ed25519.pub, else
    /// ~/.ssh/id_rsa.pub, else none; --ssh-key none sends none.
    #[command(verbatim_doc_comment)]
    Acquire(AcquireArgs),
    /// Extend an active lease by its TTL (or the one given)
    Renew {
        /// Lease id
        id: String,
        /// Extend by this much instead of the lease's own TTL (e.g. 30m, 2h)
        #[arg(long, value_parser = clock::parse_ttl)]
        ttl: Option<Duration>,
    },
    /// End a lease now; its hosts are reclaimed
    Release {
        /// Lease id
        id: String,
    },
    /// Show one lease in full
    Show {
        /// Lease id
        id: String,
    },
    /// Wait until every host of a lease has booted into its profile
    ///
    /// Prints each host's boot progress on stderr ("x1: booting — powered
    /// on") and the lease on stdout once every host is ready (exit 0). A host
    /// that fails prints its console tail on stderr and exits 8; the timeout
    /// exits 9; a lease that ends meanwhile exits 6.
    #[command(verbatim_doc_comment)]
    WaitReady {
        /// Lease id
        id: String,
        /// Give up after this long, e.g. 90s, 10m
        #[arg(long, value_parser = clock::parse_ttl, default_value = "10m")]
        timeout: Duration,
    },
    /// List active leases (every page of them)
    List {
        /// Also list released and expired leases
        #[arg(long)]
        all: bool,
        /// Only this holder's leases
        #[arg(long, value_name = "PRINCIPAL")]
        holder: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AcquireArgs {
    /// Only hosts of this architecture [default: any]
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    /// Every granted host has this flag (repeat for several)
    #[arg(long = "flag", value_name = "FLAG")]
    flags: Vec<String>,
    /// Only this host may be granted (repeat to allow several; see --count)
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// How many hosts, granted together or not at all
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Lease time to live, e.g. 30m, 2h, 1h30m [default: the server's]
    #[arg(long, value_parser = clock::parse_ttl)]
    ttl: Option<Duration>,
    /// Accept a lease as short as this when a booking ahead of the hosts
    /// leaves less than --ttl [default: only --ttl; wait]
    #[arg(long, value_parser = clock::parse_ttl)]
    min_ttl: Option<Duration>,
    /// Boot profile the agents apply to the hosts (e.g. xen)
    #[arg(long)]
    profile: Option<String>,
    /// Higher is served first; equal priorities in arrival order
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Fail at once with exit code 5 when no hosts are free, instead of waiting
    #[arg(long)]
    no_wait: bool,
    /// Use hosts nobody else waits for; the lease may be preempted (ends
    /// after the server's grace period) for a request that is not
    #[arg(long)]
    preemptible: bool,
    /// OpenSSH public key for root on the hosts, or none [default:
    /// ~/.ssh/id_ed25519.pub, else ~/.ssh/id_rsa.pub, if one exists]
    #[arg(long, value_name = "FILE|none", value_parser = sshkey::parse_arg)]
    pub ssh_key: Option<SshKeyArg>,
    /// Free-form note shown with the lease (a CI job URL, say)
    #[arg(long)]
    comment: Option<String>,
    /// Id of this request, to resume it after a broken connection (also
    /// from another process: the same id asks for the same lease) [default:
    /// a random UUID]
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// After the grant, wait until every host has booted (exit 8 if one
    /// fails, 9 after TIMEOUT) [default TIMEOUT: 10m]
    #[arg(
        long,
        value_name = "TIMEOUT",
        num_args = 0..=1,
        require_equals = true,
        value_parser = clock::parse_ttl,
    )]
    pub wait_ready: Option<Option<Duration>>,
}

impl AcquireArgs {
    /// `profile` unless the request names one.
    pub fn or_profile(mut self, profile: &str) -> Self {
        self.profile.get_or_insert_with(|| profile.to_owned());
        self
    }

    /// The request, with the public key read from `--ssh-key` (or a
    /// default file).
    fn request(self, ssh_public_key: Option<String>) -> AcquireRequest {
        let request_id = self
            .request_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        AcquireRequest {
            request_id,
            request: Some(LeaseRequest {
                arch: super::arch(self.arch),
                flags: self.flags,
                hosts: self.hosts,
                count: self.count,
                profile: self.profile.unwrap_or_default(),
                ttl: self.ttl.map(convert::duration_to_proto),
                priority: self.priority,
                comment: self.comment.unwrap_or_default(),
                ssh_public_key: ssh_public_key.unwrap_or_default(),
                preemptible: self.preemptible,
                min_ttl: self.min_ttl.map(convert::duration_to_proto),
            }),
            no_wait: self.no_wait,
        }
    }
}

pub async fn run(ctx: &Ctx, cmd: LeaseCommand) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Acquire(args) => {
            let wait = args.wait_ready.map(|t| t.unwrap_or(READY_TIMEOUT));
            let lease = acquire(ctx, args).await?;
            let (lease, result) = match wait {
                Some(timeout) => wait_ready(ctx, lease, timeout).await,
                None => (lease, Ok(())),
            };
            // Printed even when the wait failed: a script needs the id to
            // release the lease.
            print_granted(ctx, &lease)?;
            result
        }
        LeaseCommand::WaitReady { id, timeout } => {
            let req = GetLeaseRequest { lease_id: id };
            let lease = ctx.lab.leases().get_lease(req).await?.into_inner();
            let (lease, result) = wait_ready(ctx, lease, timeout).await;
            result?;
            print_granted(ctx, &lease)
        }
        LeaseCommand::Renew { id, ttl } => {
            let req = RenewRequest {
                lease_id: id,
                ttl: ttl.map(convert::duration_to_proto),
            };
            let lease = LeaseView::from(&ctx.lab.leases().renew(req).await?.into_inner());
            if ctx.json {
                return Ok(output::emit(&output::json(&lease))?);
            }
            let expires = lease
                .expires_at
                .map(|t| clock::when(t.0, SystemTime::now()))
                .unwrap_or_else(|| output::NONE.to_owned());
            Ok(output::emit(&output::line(&format!(
                "lease {} renewed: expires {expires}",
                lease.id
            )))?)
        }
        LeaseCommand::Release { id } => {
            let req = ReleaseRequest { lease_id: id };
            let lease = LeaseView::from(&ctx.lab.leases().release(req).await?.into_inner());
            if ctx.json {
                return Ok(output::emit(&output::json(&lease))?);
            }
            let hosts = lease.hosts.join(", ");
            Ok(output::emit(&output::line(&format!(
                "lease {} released ({hosts})",
                lease.id
            )))?)
        }
        LeaseCommand::Show { id } => {
            let req = GetLeaseRequest { lease_id: id };
            let lease = LeaseView::from(&ctx.lab.leases().get_lease(req).await?.into_inner());
            if ctx.json {
                return Ok(output::emit(&output::json(&lease))?);
            }
            Ok(output::emit(&details(&lease, SystemTime::now()))?)
        }
        LeaseCommand::List { all, holder } => {
            let leases = list(ctx, all, holder.unwrap_or_default()).await?;
            let views: Vec<LeaseView> = leases.iter().map(LeaseView::from).collect();
            if ctx.json {
                return Ok(output::emit(&output::json(&views))?);
            }
            Ok(output::emit(&table(&views, SystemTime::now()))?)
        }
    }
}

/// The leases, following the server's pages.
async fn list(ctx: &Ctx, include_ended: bool, holder: String) -> anyhow::Result<Vec<Lease>> {
    let mut leases = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = ListLeasesRequest {
            include_ended,
            holder: holder.clone(),
            page_size: LIST_PAGE,
            page_token: page_token.clone(),
        };
        let page = ctx.lab.leases().list_leases(req).await?.into_inner();
        leases.extend(page.leases);
        if page.next_page_token.is_empty() || page.next_page_token == page_token {
            return Ok(leases);
        }
        page_token = page.next_page_token;
    }
}

/// Leases asked for per `ListLeases` call (the server's maximum).
const LIST_PAGE: u32 = 1000;

fn print_granted(ctx: &Ctx, lease: &Lease) -> anyhow::Result<()> {
    let view = LeaseView::from(lease);
    if ctx.json {
        return Ok(output::emit(&output::json(&view))?);
    }
    Ok(output::emit(&granted(&view, SystemTime::now()))?)
}

/// Polls the lease every [`READY_POLL`] and prints each host's new boot
/// stage on stderr until every host is ready, one fails, the lease ends or
/// `timeout` passes. Returns the last lease seen along with the outcome.
pub async fn wait_ready(ctx: &Ctx, lease: Lease, timeout: Duration) -> (Lease, anyhow::Result<()>) {
    let mut last = lease;
    let id = last.id.clone();
    let still_held = format!("lease {id} is still held");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut progress = Progress::default();
    let mut tick = tokio::time::interval(READY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: we have the lease
    let result = loop {
        match judge(&last, &mut progress) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => {
                break Err(TimedOut(format!(
                    "not ready after {} ({}); {still_held}",
                    humantime::format_duration(timeout),
                    ready::summary(&LeaseView::from(&last)),
                ))
                .into());
            }
            () = ctrl_c() => {
                break Err(Interrupted(Some(format!("interrupted: {still_held}"))).into());
            }
        }
        let req = GetLeaseRequest {
            lease_id: id.clone(),
        };
        match ctx.lab.leases().get_lease(req).await {
            Ok(resp) => last = resp.into_inner(),
            Err(status) => break Err(status.into()),
        }
    };
    (last, result)
}

/// Prints what is new about `lease` on stderr; `Ok(true)` when every host is
/// ready, an error when one failed or the lease ended.
fn judge(lease: &Lease, progress: &mut Progress) -> anyhow::Result<bool> {
    let view = LeaseView::from(lease);
    let mut err = std::io::stderr().lock();
    for line in progress.news(&view) {
        writeln!(err, "{}", sanitize::line(&line))?;
    }
    match ready::verdict(&view) {
        Verdict::Ready => Ok(true),
        Verdict::Failed(hosts) => {
            for p in &hosts {
                if let Some(tail) = ready::tail(p) {
                    err.write_all(tail.as_bytes())?;
                }
                if let Some(why) = ready::attribution(p) {
                    err.write_all(why.as_bytes())?;
                }
            }
            let what = hosts
                .iter()
                .map(|p| match &p.stage {
                    Some(stage) => format!("{}: {stage}", p.host),
                    None => p.host.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ");
            Err(ProvisionFailed(format!(
                "provisioning failed on {what}; lease {} is still held",
                view.id
            ))
            .into())
        }
        Verdict::Waiting if lease.state != LeaseState::Active as i32 => Err(LeaseEnded(format!(
            "lease {} is {} while its hosts were booting",
            view.id, view.state
        ))
        .into()),
        Verdict::Waiting => Ok(false),
    }
}

/// Sends the request and waits for the grant, reporting the queue position
/// on stderr. Ctrl-C drops the stream, which withdraws the request.
pub async fn acquire(ctx: &Ctx, args: AcquireArgs) -> anyhow::Result<Lease> {
    let ssh_public_key = sshkey::for_request(args.ssh_key.as_ref())?;
    let stderr = std::io::stderr();
    let live = stderr.is_terminal();
    let mut line = WaitLine::new(stderr, live);
    let result = tokio::select! {
        r = wait_for_grant(ctx, args.request(ssh_public_key), &mut line) => r,
        () = ctrl_c() => Err(Interrupted(Some(
            "interrupted: the lease request was withdrawn".to_owned()
        )).into()),
    };
    // The wait future (and with it the stream) is gone by now.
    line.clear()?;
    result
}

/// How long `lease acquire` keeps sending its request again after the
/// connection broke, before it gives up (exit 7).
pub const RECONNECT_FOR: Duration = Duration::from_secs(5 * 60);
/// The first pause before sending it again; doubled up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The longest pause before trying another replica (`--server A,B`).
const FAILOVER_PAUSE: Duration = Duration::from_millis(500);

/// Waits for the grant; when the connection breaks, sends the request again
/// with the same request id (so it keeps its place, or gets its lease if
/// it was granted meanwhile), with backoff, for up to [`RECONNECT_FOR`].
async fn wait_for_grant<W: std::io::Write>(
    ctx: &Ctx,
    req: AcquireRequest,
    line: &mut WaitLine<W>,
) -> anyhow::Result<Lease> {
    let mut broken_since: Option<tokio::time::Instant> = None;
    let mut delay = RECONNECT_FIRST;
    loop {
        let err = match wait_once(ctx, req.clone(), line, &mut broken_since).await {
            Ok(lease) => return Ok(lease),
            Err(e) if reconnectable(&e) => e,
            Err(e) => return Err(e),
        };
        let since = match broken_since {
            Some(t) => t,
            None => {
                let msg = format!(
                    "lab: lost the request's stream ({}); sending it again as request {}",
                    one_line(&err),
                    req.request_id
                );
                line.notice(&sanitize::line(&msg))?;
                delay = RECONNECT_FIRST;
                *broken_since.insert(tokio::time::Instant::now())
            }
        };
        // Several replicas: the next one (or the leader a standby named),
        // soon: another server may well answer.
        let mut pause = delay;
        if ctx.lab.failover(&err) {
            line.notice(&sanitize::line(&format!(
                "lab: trying {} ({})",
                ctx.lab.current(),
                one_line(&err)
            )))?;
            pause = pause.min(FAILOVER_PAUSE);
        }
        if since.elapsed() >= RECONNECT_FOR {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// Errors after which the request is sent again: the server or the
/// connection went away (UNAVAILABLE, a transport failure, a stream that
/// ended without an answer), not the server's refusal.
fn reconnectable(err: &anyhow::Error) -> bool {
    use std::error::Error as _;
    if err.downcast_ref::<StreamEnded>().is_some() {
        return true;
    }
    let Some(status) = err.downcast_ref::<tonic::Status>() else {
        return false;
    };
    match status.code() {
        tonic::Code::Unavailable => true,
        // A transport failure mid-call (h2: connection reset, GOAWAY).
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => {
            status.source().is_some()
        }
        _ => false,
    }
}

fn one_line(err: &anyhow::Error) -> String {
    match err.downcast_ref::<tonic::Status>() {
        Some(s) if !s.message().is_empty() => s.message().replace('\n', " "),
        Some(s) => s.code().description().to_owned(),
        None => err.to_string(),
    }
}

/// One Acquire stream, until the grant or an error. A message from the
/// server clears `broken_since`.
async fn wait_once<W: std::io::Write>(
    ctx: &Ctx,
    req: AcquireRequest,
    line: &mut WaitLine<W>,
    broken_since: &mut Option<tokio::time::Instant>,
) -> anyhow::Result<Lease> {
    let mut stream = ctx.lab.leases().acquire(req).await?.into_inner();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let msg = tokio::select! {
            msg = stream.message() => msg?,
            _ = tick.tick(), if line.is_live() => {
                line.redraw(SystemTime::now())?;
                continue;
            }
        };
        if msg.is_some() && broken_since.take().is_some() {
            line.notice("lab: the request is back with the server")?;
        }
        match msg.and_then(|m| m.update) {
            Some(Update::Queued(q)) => {
                let q = Queued {
                    position: q.position,
                    queue_length: q.queue_length,
                    eta: q.eta.as_ref().map(convert::system_time),
                    held_back: Some(sanitize::line(&q.held_back).into_owned())
                        .filter(|h| !h.is_empty()),
                    waiting_for: Some(sanitize::line(&q.waiting_for).into_owned())
                        .filter(|h| !h.is_empty()),
                };
                line.update(q, SystemTime::now())?;
            }
            Some(Update::Granted(lease)) => return Ok(lease),
            None => {
                return Err(StreamEnded(
                    "the server ended the request without granting a lease".to_owned(),
                )
                .into());
            }
        }
    }
}

/// Resolves on Ctrl-C; never, if the handler cannot be installed.
pub async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What `lease acquire` prints on grant.
fn granted(l: &LeaseView, now: SystemTime) -> String {
    output::key_values(&[
        ("lease", l.id.clone()),
        ("hosts", l.hosts.join(" ")),
        (
            "expires",
            l.expires_at
                .map(|t| clock::when(t.0, now))
                .unwrap_or_default(),
        ),
    ])
}

fn details(l: &LeaseView, now: SystemTime) -> String {
    let at = |t: Option<crate::view::Time>| t.map(|t| clock::when(t.0, now)).unwrap_or_default();
    let mut rows = vec![
        ("lease", l.id.clone()),
        ("holder", l.holder.clone()),
        ("hosts", l.hosts.join(" ")),
        ("state", l.state.to_owned()),
        ("profile", l.profile.clone().unwrap_or_default()),
        ("priority", l.priority.to_string()),
        ("comment", l.comment.clone().unwrap_or_default()),
        ("ssh key", l.ssh_key.clone().unwrap_or_default()),
        (
            "ttl",
            l.ttl_seconds
                .map(|s| clock::compact(Duration::from_secs(s)))
                .unwrap_or_default(),
        ),
        ("granted", at(l.granted_at)),
        ("expires", at(l.expires_at)),
        ("max expires", at(l.max_expires_at)),
        ("ended", at(l.ended_at)),
        ("generation", l.generation.to_string()),
    ];
    if let Some(b) = l.booking {
        rows.push(("booking", b.to_string()));
    }
    if l.preemptible {
        let said = match l.preempted_at {
            None => "yes".to_owned(),
            Some(t) => format!(
                "yes; preempted {}: it ends when it expires and cannot be renewed",
                clock::when(t.0, now)
            ),
        };
        rows.insert(8, ("preemptible", said));
    }
    output::key_values(&rows) + &provisioning(l, now)
}

/// The boot progress block of `lease show`: a table of the hosts' phases,
/// then the console tail of each failed host. Empty when nothing is
/// reported.
fn provisioning(l: &LeaseView, now: SystemTime) -> String {
    if l.provisioning.is_empty() {
        return String::new();
    }
    let mut t = Table::new(&["HOST", "PHASE", "STAGE", "UPDATED"]);
    for p in &l.provisioning {
        t.row(vec![
            p.host.clone(),
            p.phase_percent(),
            p.stage.clone().unwrap_or_default(),
            p.updated_at
                .map(|t| clock::relative(t.0, now))
                .unwrap_or_default(),
        ]);
    }
    let mut s = format!("\n{}", t.render());
    for p in &l.provisioning {
        if p.phase == "failed"
            && let Some(tail) = ready::tail(p)
        {
            s.push('\n');
            s.push_str(&tail);
        }
        if p.phase == "failed"
            && let Some(why) = ready::attribution(p)
        {
            s.push_str(&why);
        }
    }
    s
}

fn table(leases: &[LeaseView], now: SystemTime) -> String {
    let mut t = Table::new(&[
        "ID", "HOLDER", "HOSTS", "STATE", "PROFILE", "BOOT", "EXPIRES",
    ]);
    for l in leases {
        t.row(vec![
            l.id.clone(),
            l.holder.clone(),
            output::list(&l.hosts),
            l.state.to_owned(),
            l.profile.clone().unwrap_or_default(),
            l.boot_summary(),
            l.expires_at
                .map(|t| clock::relative(t.0, now))
                .unwrap_or_default(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AcquireArgs,
    }

    fn parse(args: &[&str]) -> Result<AcquireRequest, clap::Error> {
        let argv = std::iter::once("acquire").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.args.request(None))
    }

    #[test]
    fn acquire_defaults() {
        let req = parse(&[]).unwrap();
        let r = req.request.unwrap();
        assert_eq!(r.arch, 0, "any arch");
        assert_eq!(r.count, 1);
        assert_eq!(r.ttl, None, "the server's default TTL");
        assert!(!req.no_wait);
        // A fresh request id each time.
        assert!(
            uuid::Uuid::parse_str(&req.request_id).is_ok(),
            "{}",
            req.request_id
        );
        assert_ne!(req.request_id, parse(&[]).unwrap().request_id);
    }

    #[test]
    fn acquire_arguments_map_to_the_request() {
        let req = parse(&[
            "--arch",
            "aarch64",
            "--flag",
            "gpu",
            "--flag",
            "nvme",
            "--host",
            "a1",
            "--host",
            "a2",
            "--count",
            "2",
            "--ttl",
            "1h30m",
            "--profile",
            "xen",
            "--priority",
            "-5",
            "--no-wait",
            "--comment",
            "ci#42",
            "--request-id",
            "job-42",
        ])
        .unwrap();
        assert_eq!(req.request_id, "job-42");
        let r = req.request.unwrap();
        assert_eq!(r.arch, lab_proto::v1::Arch::Aarch64 as i32);
        assert_eq!(r.flags, ["gpu", "nvme"]);
        assert_eq!(r.hosts, ["a1", "a2"]);
        assert_eq!(r.count, 2);
        assert_eq!(r.ttl.unwrap().seconds, 5400);
        assert_eq!(r.profile, "xen");
        assert_eq!(r.priority, -5);
        assert_eq!(r.comment, "ci#42");
        assert!(req.no_wait);
    }

    #[test]
    fn acquire_rejects_bad_values() {
        for bad in [
            &["--arch", "sparc"][..],
            &["--count", "0"],
            &["--ttl", "30"],
            &["--ttl", "0s"],
            &["--priority", "high"],
        ] {
            let err = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn lease_table() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let lease = Lease {
            id: "L-1".into(),
            holder: "ci".into(),
            hosts: vec!["x1".into(), "x2".into()],
            state: lab_proto::v1::LeaseState::Active as i32,
            profile: "xen".into(),
            expires_at: Some(convert::timestamp_from_millis(1_700_003_600_000)),
            ..Default::default()
        };
        assert_eq!(
            table(&[LeaseView::from(&lease)], now),
            "ID   HOLDER  HOSTS  STATE   PROFILE  BOOT  EXPIRES\n\
             L-1  ci      x1,x2  active  xen      -     in 1h\n"
        );
    }

    #[test]
    fn wait_ready_flag() {
        let wait = |args: &[&str]| {
            let argv = std::iter::once("acquire").chain(args.iter().copied());
            Cli::try_parse_from(argv).map(|c| c.args.wait_ready)
        };
        assert_eq!(wait(&[]).unwrap(), None);
        assert_eq!(wait(&["--wait-ready"]).unwrap(), Some(None));
        assert_eq!(
            wait(&["--wait-ready=90s"]).unwrap(),
            Some(Some(Duration::from_secs(90)))
        );
        assert!(wait(&["--wait-ready=soon"]).is_err());
    }

    #[test]
    fn lease_details_show_boot_progress_and_failed_tails() {
        use lab_proto::v1::{HostProvisioning, ProvisionPhase};
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let lease = Lease {
            id: "L-1".into(),
            hosts: vec!["x1".into(), "x2".into(), "x3".into()],
            provisioning: vec![
                HostProvisioning {
                    host: "x1".into(),
                    phase: ProvisionPhase::Ready as i32,
                    stage: "ready marker seen".into(),
                    updated_at: Some(convert::timestamp_from_millis(1_699_999_940_000)),
                    ..Default::default()
                },
                HostProvisioning {
                    host: "x2".into(),
                    phase: ProvisionPhase::Failed as i32,
                    stage: "no ready marker within 180s".into(),
                    console_tail: "Loading xen...\nKernel panic - not syncing\n".into(),
                    failure_class: lab_proto::v1::FailureClass::Job as i32,
                    failure_rule: "kernel panic".into(),
                    failure_line: "Kernel panic - not syncing".into(),
                    ..Default::default()
                },
                HostProvisioning {
                    host: "x3".into(),
                    phase: ProvisionPhase::Installing as i32,
                    stage: "writing the image".into(),
                    percent: 42,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = details(&LeaseView::from(&lease), now);
        let block = text.split_once("\n\n").unwrap().1;
        assert_eq!(
            block,
            "HOST  PHASE            STAGE                        UPDATED\n\
             x1    ready            ready marker seen            1m ago\n\
             x2    failed           no ready marker within 180s  -\n\
             x3    installing 42 %  writing the image            -\n\
             \n\
             ==> console of x2 (last lines) <==\n\
             Loading xen...\nKernel panic - not syncing\n\
             x2 failed: the job's fault (rule \"kernel panic\"): Kernel panic - not syncing\n"
        );
    }
}
