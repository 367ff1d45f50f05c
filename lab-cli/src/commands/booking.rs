//! `lab booking create|list|cancel`: reserve hosts for a window ahead. At
//! the booking's start its holder is granted a lease of the hosts until its
//! end; no other lease is ever granted across it (docs/leases.md,
//! "Bookings and maintenance windows"). `lab host maintenance on --at --for`
//! plans a maintenance window through the same call.

use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use lab_proto::convert;
use lab_proto::v1::{
    Booking, BookingKind, CancelBookingRequest, CreateBookingRequest, ListBookingsRequest,
};

use super::{ArchArg, Ctx};
use crate::clock::{self, Start};
use crate::output::{self, Table};
use crate::view::BookingView;

#[derive(Debug, Clone, Subcommand)]
pub enum BookingCommand {
    /// Book hosts for a window ahead
    ///
    /// Either name the hosts (--host, repeat for several) or ask for
    /// --count hosts with --flag/--arch: the server picks ones that are free
    /// of bookings and leases over the whole window. Refused (exit 1) when a
    /// booking or a lease running past the start is in the way; leases that
    /// end before the start can no longer be renewed past it. At the start
    /// you are granted a lease of the hosts until the end (`lab lease list`).
    ///
    /// --start: now, +2h, "in 30m", 2026-12-05T02:00:00Z or "2026-12-05 02:00"
    /// (local time).
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// List bookings and maintenance windows not yet ended, by start
    List {
        /// Only those of this host
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
    },
    /// Cancel a booking (yours, or any as an operator)
    ///
    /// A started booking's lease runs on until its expiry (release it with
    /// `lab lease release`); a started maintenance window ends now.
    #[command(verbatim_doc_comment)]
    Cancel {
        /// Booking id (from `lab booking list`)
        id: u64,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// Book this host (repeat for several)
    #[arg(long = "host", value_name = "HOST", conflicts_with_all = ["flags", "count", "arch"])]
    hosts: Vec<String>,
    /// Hosts having this flag (repeat: all must match)
    #[arg(long = "flag", value_name = "FLAG")]
    flags: Vec<String>,
    /// How many hosts with --flag/--arch
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    count: Option<u32>,
    /// Only hosts of this architecture
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    /// When the window starts
    #[arg(long, value_parser = clock::parse_start)]
    start: Start,
    /// How long it lasts, e.g. 2h
    #[arg(long, value_parser = clock::parse_ttl)]
    duration: Duration,
    /// Boot profile of the lease it grants (e.g. xen)
    #[arg(long)]
    profile: Option<String>,
    /// Free-form note (shown in lists and with the lease)
    #[arg(long)]
    comment: Option<String>,
}

pub async fn run(ctx: &Ctx, cmd: BookingCommand) -> anyhow::Result<()> {
    match cmd {
        BookingCommand::Create(a) => {
            let req = CreateBookingRequest {
                kind: BookingKind::Lease as i32,
                count: if a.hosts.is_empty() {
                    a.count.unwrap_or(1)
                } else {
                    0
                },
                hosts: a.hosts,
                flags: a.flags,
                arch: super::arch(a.arch),
                start: Some(convert::system_time_to_proto(
                    a.start.resolve(SystemTime::now()),
                )),
                duration: Some(convert::duration_to_proto(a.duration)),
                comment: a.comment.unwrap_or_default(),
                profile: a.profile.unwrap_or_default(),
            };
            create(ctx, req).await
        }
        BookingCommand::List { host } => {
            let resp = ctx
                .lab
                .leases()
                .list_bookings(ListBookingsRequest {
                    host: host.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let views: Vec<BookingView> = resp.bookings.iter().map(BookingView::from).collect();
            if ctx.json {
                return Ok(output::emit(&output::json(&views))?);
            }
            Ok(output::emit(&table(&views, SystemTime::now()))?)
        }
        BookingCommand::Cancel { id } => {
            let b = ctx
                .lab
                .leases()
                .cancel_booking(CancelBookingRequest { id })
                .await?
                .into_inner();
            let view = BookingView::from(&b);
            if ctx.json {
                return Ok(output::emit(&output::json(&view))?);
            }
            Ok(output::emit(&output::line(&format!(
                "booking {} cancelled ({} {})",
                view.id,
                view.kind,
                output::list(&view.hosts)
            )))?)
        }
    }
}

/// Makes a booking (or maintenance window) and says what was booked.
pub async fn create(ctx: &Ctx, req: CreateBookingRequest) -> anyhow::Result<()> {
    let b: Booking = ctx.lab.leases().create_booking(req).await?.into_inner();
    let view = BookingView::from(&b);
    if ctx.json {
        return Ok(output::emit(&output::json(&view))?);
    }
    Ok(output::emit(&output::line(&summary(
        &view,
        SystemTime::now(),
    )))?)
}

/// `booking 17 (lease): x1,x2 from 14:00:00 (in 2h) to 16:00:00`.
fn summary(b: &BookingView, now: SystemTime) -> String {
    let when = |t: Option<crate::view::Time>| t.map(|t| clock::when(t.0, now)).unwrap_or_default();
    format!(
        "booking {} ({}): {} from {} to {}",
        b.id,
        b.kind,
        output::list(&b.hosts),
        when(b.start),
        b.end.map(|t| clock::local(t.0, now)).unwrap_or_default(),
    )
}

fn table(bookings: &[BookingView], now: SystemTime) -> String {
    let mut t = Table::new(&[
        "ID", "KIND", "HOLDER", "HOSTS", "START", "END", "STATE", "LEASE", "COMMENT",
    ]);
    for b in bookings {
        t.row(vec![
            b.id.to_string(),
            b.kind.to_owned(),
            b.holder.clone(),
            output::list(&b.hosts),
            b.start.map(|t| clock::when(t.0, now)).unwrap_or_default(),
            b.end.map(|t| clock::local(t.0, now)).unwrap_or_default(),
            b.state.to_owned(),
            b.lease_id.clone().unwrap_or_default(),
            b.comment.clone().unwrap_or_default(),
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
        #[command(subcommand)]
        cmd: BookingCommand,
    }

    fn parse(args: &[&str]) -> Result<BookingCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("booking").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn hosts_or_flags_not_both() {
        let ok = parse(&[
            "create",
            "--host",
            "x1",
            "--start",
            "+1h",
            "--duration",
            "2h",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        let ok = parse(&[
            "create",
            "--flag",
            "iommu",
            "--count",
            "2",
            "--start",
            "now",
            "--duration",
            "1h",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        let both = parse(&[
            "create",
            "--host",
            "x1",
            "--count",
            "2",
            "--start",
            "+1h",
            "--duration",
            "2h",
        ]);
        assert!(both.is_err());
        let no_start = parse(&["create", "--host", "x1", "--duration", "2h"]);
        assert!(no_start.is_err());
    }
}
