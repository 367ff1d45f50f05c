//! `lab grab [acquire options] [--ssh] [--keep | --release]`: a developer's
//! interactive lease in one command. Acquire (profile `xen` unless
//! `--profile` names another; queue position and ETA on stderr while
//! waiting), wait until the hosts are ready (their boot stages on stderr;
//! `--no-wait-ready` attaches at once, to watch the boot or for a host
//! powered by hand),
//! attach to the first host's console — or log in with `lab ssh` with
//! `--ssh` — and renew the lease every TTL/3 while attached. On detach
//! (`Ctrl-E c .` on the console, the end of the SSH session) ask whether to
//! keep the lease, which then runs to its expiry unrenewed, or release it.
//!
//! `--keep` and `--release` answer for scripts. With neither and no
//! terminal to ask on, the lease is released: a lease nobody can come back
//! to should not hold a host. A signal that ends the session (SIGTERM, or
//! SIGHUP when the terminal closes) releases it too, unless `--keep`.

use std::io::IsTerminal;
use std::time::SystemTime;

use clap::Args;
use lab_proto::convert;
use lab_proto::v1::{Lease, ReleaseRequest};

use super::Ctx;
use super::console;
use super::lease::{self, AcquireArgs, READY_TIMEOUT};
use super::run::{Renewer, Signals, released, say};
use super::ssh::{self, SshArgs};
use crate::clock;
use crate::exit::Interrupted;

/// The profile of a grab that names none: the one this lab exists for.
pub const DEFAULT_PROFILE: &str = "xen";

#[derive(Debug, Clone, Args)]
pub struct GrabArgs {
    #[command(flatten)]
    acquire: AcquireArgs,
    /// Log in over SSH (lab ssh, with the lease's key) instead of attaching
    /// to the console
    #[arg(long)]
    ssh: bool,
    /// Attach at once, without waiting for the hosts to boot (a host you
    /// power by hand, or to watch its boot from the start)
    #[arg(long, conflicts_with = "wait_ready")]
    no_wait_ready: bool,
    /// On detach, keep the lease until it expires, without asking
    #[arg(long, conflicts_with = "release")]
    keep: bool,
    /// On detach, release the lease, without asking
    #[arg(long)]
    release: bool,
}

/// What to do with the lease after the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Keep,
    Release,
    /// Ask on the terminal.
    Ask,
}

/// The decision before asking: the flags first, then whether the session
/// ended by a signal, then whether there is a terminal to ask on.
pub fn decide(keep: bool, release: bool, signalled: bool, terminal: bool) -> Decision {
    match (keep, release) {
        (true, _) => Decision::Keep,
        (_, true) => Decision::Release,
        _ if signalled || !terminal => Decision::Release,
        _ => Decision::Ask,
    }
}

/// The answer to "keep or release?": `k`/`keep` keeps; anything else
/// (Enter included) releases, the answer that frees the host.
pub fn keeps(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "k" | "keep")
}

pub async fn run(ctx: &Ctx, args: GrabArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let wait = args.acquire.wait_ready.flatten().unwrap_or(READY_TIMEOUT);
    let ssh_key = args.acquire.ssh_key.clone();
    let lease = lease::acquire(ctx, args.acquire.or_profile(DEFAULT_PROFILE)).await?;
    let id = lease.id.clone();
    say(&format!(
        "lease {id} granted: {} (profile {})",
        lease.hosts.join(" "),
        if lease.profile.is_empty() {
            "the agent's default"
        } else {
            &lease.profile
        }
    ));
    let renewer = Renewer::start(&ctx.lab, &lease);
    let ready = if args.no_wait_ready {
        Ok(())
    } else {
        tokio::select! {
            (_, r) = lease::wait_ready(ctx, lease.clone(), wait) => r,
            sig = signals.recv() => Err(Interrupted(Some(format!("{sig}: lease {id} released"))).into()),
        }
    };
    if let Err(e) = ready {
        drop(renewer);
        release(ctx, &id).await;
        return Err(released(e));
    }

    let host = lease.hosts.first().cloned().unwrap_or_default();
    for other in lease.hosts.iter().skip(1) {
        say(&format!(
            "also in this lease: {other} (lab console {other}, lab ssh {other})"
        ));
    }
    say(&format!(
        "{} {host}; the lease is renewed while you are there",
        if args.ssh {
            "logging in to"
        } else {
            "attaching to the console of"
        }
    ));
    let session = if args.ssh {
        ssh::run(ctx, SshArgs::to(&host, ssh_key)).await
    } else {
        console::attach(ctx, &host).await
    };
    drop(renewer);
    let signalled = match &session {
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => true,
        // The SSH session's own exit status is the user's business.
        Err(e) if e.downcast_ref::<crate::exit::ChildExit>().is_some() => false,
        Err(e) => {
            say(&format!("the session ended: {e:#}"));
            false
        }
        Ok(()) => false,
    };
    let keep = match decide(
        args.keep,
        args.release,
        signalled,
        std::io::stdin().is_terminal(),
    ) {
        Decision::Keep => true,
        Decision::Release => false,
        Decision::Ask => {
            eprint!(
                "lab: keep lease {id} on {} until it expires (it is no longer renewed), or release it? [k/R] ",
                lease.hosts.join(" ")
            );
            console::read_line().await.is_some_and(|a| keeps(&a))
        }
    };
    if keep {
        kept(ctx, &lease).await;
    } else {
        release(ctx, &id).await;
    }
    Ok(())
}

async fn release(ctx: &Ctx, id: &str) {
    let req = ReleaseRequest {
        lease_id: id.to_owned(),
    };
    match ctx.lab.leases().release(req).await {
        Ok(_) => say(&format!("lease {id} released")),
        Err(s) => say(&format!("cannot release lease {id}: {}", s.message())),
    }
}

/// Says until when the kept lease runs and how to come back to it.
async fn kept(ctx: &Ctx, lease: &Lease) {
    let id = &lease.id;
    let req = lab_proto::v1::GetLeaseRequest {
        lease_id: id.clone(),
    };
    let until = match ctx.lab.leases().get_lease(req).await {
        Ok(l) => l
            .into_inner()
            .expires_at
            .map(|t| clock::when(convert::system_time(&t), SystemTime::now()))
            .unwrap_or_else(|| "its expiry".to_owned()),
        Err(s) => format!("its expiry ({})", s.message()),
    };
    say(&format!("lease {id} kept until {until}:"));
    for h in &lease.hosts {
        say(&format!("  lab console {h}        lab ssh {h}"));
    }
    say(&format!("  lab lease renew {id}   lab lease release {id}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GrabArgs,
    }

    fn parse(argv: &[&str]) -> Result<GrabArgs, clap::Error> {
        let argv = std::iter::once("grab").chain(argv.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn the_decision_table() {
        use Decision::*;
        // (keep, release, signalled, terminal) → decision
        let table = [
            ((true, false, false, true), Keep),
            ((true, false, true, false), Keep),
            ((false, true, false, true), Release),
            ((false, false, true, true), Release),
            ((false, false, false, false), Release),
            ((false, false, false, true), Ask),
        ];
        for ((k, r, s, t), want) in table {
            assert_eq!(
                decide(k, r, s, t),
                want,
                "keep={k} release={r} signalled={s} terminal={t}"
            );
        }
    }

    #[test]
    fn only_keep_keeps() {
        for a in ["k", "K", "keep", " Keep\n"] {
            assert!(keeps(a), "{a:?}");
        }
        for a in ["", "r", "release", "yes", "n", "kk"] {
            assert!(!keeps(a), "{a:?}");
        }
    }

    #[test]
    fn arguments() {
        let a = parse(&["--host", "h1", "--ssh", "--keep"]).unwrap();
        assert!(a.ssh && a.keep && !a.release && !a.no_wait_ready);
        let err = parse(&["--no-wait-ready", "--wait-ready=5m"]).expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["--keep", "--release"]).expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
    }
}
