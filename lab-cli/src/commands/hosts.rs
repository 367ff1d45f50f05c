//! `lab hosts`, `lab host show` (with the host's recent history from the
//! event log), `lab host maintenance`, `lab host quarantine`, `lab host
//! release-quarantine`, `lab host check`.

use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use lab_proto::v1::{
    CheckHostRequest, Event, EventKind, GetHostRequest, Host, ListEventsRequest, ListHostsRequest,
    SetMaintenanceRequest, SetQuarantineRequest,
};
use serde::Serialize;

use super::{ArchArg, Ctx};
use crate::clock;
use crate::output::{self, Table};
use crate::view::{HostView, Time};

#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    /// Only hosts of this architecture
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    /// Only hosts having this flag (repeat for several: all must match)
    #[arg(long = "flag", value_name = "FLAG")]
    flags: Vec<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum HostCommand {
    /// Show one host in full, with its recent history
    ///
    /// After the host: its recent leases with their outcome, its health
    /// checks with result and reason, and its health changes (failures
    /// attributed to it, quarantines, releases), from the event log.
    Show {
        /// Host name
        name: String,
    },
    /// Put a host in maintenance or take it back (operators only)
    ///
    /// A host in maintenance gets no new leases; a lease it holds runs out
    /// first.
    ///
    /// With --at and --for, plan a maintenance window instead: from --at
    /// (now, +2h, 2026-12-05T02:00:00Z, "2026-12-05 02:00") for --for the
    /// host is in maintenance, and no lease is granted across the window
    /// (leases that end before it cannot be renewed past its start). Refused
    /// when a lease runs past --at or a booking overlaps. Windows are listed
    /// and cancelled with `lab booking list|cancel`.
    #[command(verbatim_doc_comment)]
    Maintenance {
        /// on: take the host out of service; off: give it back
        #[arg(value_enum, value_name = "on|off")]
        switch: Switch,
        /// Host name
        name: String,
        /// Why (recorded in the event log)
        #[arg(long)]
        reason: Option<String>,
        /// Plan a window starting then (with --for)
        #[arg(long, value_parser = clock::parse_start, requires = "for_")]
        at: Option<clock::Start>,
        /// How long the planned window lasts, e.g. 4h
        #[arg(long = "for", id = "for_", value_name = "DURATION", value_parser = clock::parse_ttl)]
        for_: Option<std::time::Duration>,
    },
    /// Quarantine a host: never granted until released (operators only)
    ///
    /// A lease it holds runs out first. The server also quarantines a host
    /// by itself after repeated provisioning failures attributed to it.
    Quarantine {
        /// Host name
        name: String,
        /// Why (required; shown with the host and recorded in the event log)
        #[arg(long)]
        reason: String,
    },
    /// Check a host now (operators only)
    ///
    /// The server leases the host to itself (holder lab-health, profile
    /// health-check, ahead of every waiter; a quarantined host too), boots
    /// it and compares the facts it prints with the inventory: a failure
    /// quarantines the host, a pass makes it healthy. Returns at once; a
    /// check already pending is joined. `lab host show` and `lab events
    /// --host` tell how it ended.
    Check {
        /// Host name
        name: String,
    },
    /// Release a host from quarantine (or suspicion): healthy again
    /// (operators only)
    ReleaseQuarantine {
        /// Host name
        name: String,
        /// Why (recorded in the event log)
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

pub async fn list(ctx: &Ctx, args: HostsArgs) -> anyhow::Result<()> {
    let req = ListHostsRequest {
        arch: super::arch(args.arch),
        flags: args.flags,
    };
    let hosts = ctx.lab.hosts().list_hosts(req).await?.into_inner().hosts;
    let views: Vec<HostView> = hosts.iter().map(HostView::from).collect();
    if ctx.json {
        return Ok(output::emit(&output::json(&views))?);
    }
    Ok(output::emit(&table(&views, SystemTime::now()))?)
}

fn table(hosts: &[HostView], now: SystemTime) -> String {
    let mut t = Table::new(&[
        "NAME", "ARCH", "FW", "RACK", "STATE", "HEALTH", "HOLDER", "LEASE", "EXPIRES", "FLAGS",
    ]);
    for h in hosts {
        t.row(vec![
            h.name.clone(),
            h.arch.to_owned(),
            h.firmware.to_owned(),
            h.rack.clone(),
            h.state_label(),
            h.health.to_owned(),
            h.holder.clone().unwrap_or_default(),
            h.lease_id.clone().unwrap_or_default(),
            h.lease_expires_at
                .map(|t| clock::relative(t.0, now))
                .unwrap_or_default(),
            output::list(&h.flags),
        ]);
    }
    t.render()
}

pub async fn run(ctx: &Ctx, cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::Show { name } => {
            let host = ctx
                .lab
                .hosts()
                .get_host(GetHostRequest { name: name.clone() })
                .await?
                .into_inner();
            let events = host_events(ctx, &name).await?;
            print_host(ctx, &host, &History::from_events(&events))
        }
        HostCommand::Check { name } => {
            let host = ctx
                .lab
                .admin()
                .check_host(CheckHostRequest { host: name })
                .await?
                .into_inner();
            let view = HostView::from(&host);
            if ctx.json {
                return Ok(output::emit(&output::json(&view))?);
            }
            let mut msg = format!("{}: health check asked for; {}", view.name, view.health);
            match (view.state, view.holder.as_deref()) {
                ("leased", Some("lab-health")) => msg.push_str(", being checked"),
                ("leased" | "reclaiming", _) => {
                    msg.push_str(", checked when its current lease is over")
                }
                _ => {}
            }
            Ok(output::emit(&output::line(&msg))?)
        }
        HostCommand::Maintenance {
            switch,
            name,
            reason,
            at,
            for_,
        } => {
            if let Some(duration) = for_ {
                if switch == Switch::Off {
                    anyhow::bail!(
                        "--at/--for plan a window: use `on` (cancel a planned window with lab booking cancel)"
                    );
                }
                let start = at.unwrap_or(clock::Start::In(std::time::Duration::ZERO));
                let req = lab_proto::v1::CreateBookingRequest {
                    kind: lab_proto::v1::BookingKind::Maintenance as i32,
                    hosts: vec![name],
                    start: Some(lab_proto::convert::system_time_to_proto(
                        start.resolve(SystemTime::now()),
                    )),
                    duration: Some(lab_proto::convert::duration_to_proto(duration)),
                    comment: reason.unwrap_or_default(),
                    ..Default::default()
                };
                return super::booking::create(ctx, req).await;
            }
            let req = SetMaintenanceRequest {
                host: name,
                maintenance: switch == Switch::On,
                reason: reason.unwrap_or_default(),
            };
            let host = ctx.lab.admin().set_maintenance(req).await?.into_inner();
            if ctx.json {
                return Ok(output::emit(&output::json(&HostView::from(&host)))?);
            }
            let view = HostView::from(&host);
            let mut msg = format!(
                "{}: maintenance {}, state {}",
                view.name,
                if view.maintenance { "on" } else { "off" },
                view.state
            );
            if view.maintenance && view.state == "leased" {
                msg.push_str(" (its lease runs out first)");
            }
            Ok(output::emit(&output::line(&msg))?)
        }
        HostCommand::Quarantine { name, reason } => set_quarantine(ctx, name, true, reason).await,
        HostCommand::ReleaseQuarantine { name, reason } => {
            set_quarantine(ctx, name, false, reason.unwrap_or_default()).await
        }
    }
}

async fn set_quarantine(
    ctx: &Ctx,
    name: String,
    quarantined: bool,
    reason: String,
) -> anyhow::Result<()> {
    let req = SetQuarantineRequest {
        host: name,
        quarantined,
        reason,
    };
    let host = ctx.lab.admin().set_quarantine(req).await?.into_inner();
    let view = HostView::from(&host);
    if ctx.json {
        return Ok(output::emit(&output::json(&view))?);
    }
    let mut msg = format!("{}: {}, state {}", view.name, view.health, view.state);
    if view.health == "quarantined" && view.state == "leased" {
        msg.push_str(" (its lease runs out first)");
    }
    Ok(output::emit(&output::line(&msg))?)
}

fn print_host(ctx: &Ctx, host: &Host, history: &History) -> anyhow::Result<()> {
    let v = HostView::from(host);
    if ctx.json {
        let shown = HostShow { host: v, history };
        return Ok(output::emit(&output::json(&shown))?);
    }
    let now = SystemTime::now();
    let mut text = details(&v, now);
    text.push_str(&history.render(now));
    Ok(output::emit(&text)?)
}

/// `host show --json`: the host's fields, and `history`.
#[derive(Serialize)]
struct HostShow<'a> {
    #[serde(flatten)]
    host: HostView,
    history: &'a History,
}

/// How many of each kind of history entry `host show` lists.
const HISTORY: usize = 10;

/// Events asked for per call while reading a host's history.
const HISTORY_PAGE: u32 = 1000;

/// The host's recent events: the event log is read forwards only, so the
/// tail is read from ever earlier points (the last 10,000 sequence
/// numbers, then 100,000, ...) until it holds enough history or the
/// whole log.
async fn host_events(ctx: &Ctx, host: &str) -> anyhow::Result<Vec<Event>> {
    let list = |after_seq: u64, limit: u32, page_token: String| ListEventsRequest {
        after_seq,
        limit,
        host: host.to_owned(),
        lease_id: String::new(),
        page_token,
    };
    let last = ctx
        .lab
        .events()
        .list_events(list(u64::MAX - 1, 1, String::new()))
        .await?
        .into_inner()
        .last_seq;
    let mut span = 10_000u64;
    loop {
        let after = last.saturating_sub(span);
        let mut events = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = list(after, HISTORY_PAGE, page_token.clone());
            let page = ctx.lab.events().list_events(req).await?.into_inner();
            events.extend(page.events);
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                break;
            }
            page_token = page.next_page_token;
        }
        if after == 0 || History::from_events(&events).is_full() {
            return Ok(events);
        }
        span = span.saturating_mul(10);
    }
}

/// A host's recent history, newest first.
#[derive(Debug, Default, Serialize)]
struct History {
    leases: Vec<LeaseEntry>,
    health_checks: Vec<CheckEntry>,
    /// HOST_HEALTH events: failures attributed to the host, quarantines,
    /// releases.
    health_changes: Vec<HealthEntry>,
}

#[derive(Debug, Serialize)]
struct LeaseEntry {
    lease_id: String,
    holder: String,
    granted_at: Option<Time>,
    /// `active`, `released` or `expired`.
    outcome: &'static str,
    ended_at: Option<Time>,
}

#[derive(Debug, Serialize)]
struct CheckEntry {
    lease_id: String,
    started_at: Option<Time>,
    /// What triggered it.
    trigger: String,
    /// `running`, `passed` or `failed`.
    result: &'static str,
    /// Why it failed, or what it found.
    reason: String,
}

#[derive(Debug, Serialize)]
struct HealthEntry {
    time: Option<Time>,
    actor: String,
    detail: String,
}

fn event_time(e: &Event) -> Option<Time> {
    e.time
        .as_ref()
        .map(|t| Time(lab_proto::convert::system_time(t)))
}

impl History {
    /// From the host's events in log order.
    fn from_events(events: &[Event]) -> History {
        let mut h = History::default();
        for e in events {
            match EventKind::try_from(e.kind) {
                Ok(EventKind::LeaseGranted) => h.leases.push(LeaseEntry {
                    lease_id: e.lease_id.clone(),
                    holder: e.actor.clone(),
                    granted_at: event_time(e),
                    outcome: "active",
                    ended_at: None,
                }),
                Ok(k @ (EventKind::LeaseReleased | EventKind::LeaseExpired)) => {
                    if let Some(l) = h.leases.iter_mut().find(|l| l.lease_id == e.lease_id) {
                        l.outcome = if k == EventKind::LeaseReleased {
                            "released"
                        } else {
                            "expired"
                        };
                        l.ended_at = event_time(e);
                    }
                }
                Ok(EventKind::HealthCheckStarted) => h.health_checks.push(CheckEntry {
                    lease_id: e.lease_id.clone(),
                    started_at: event_time(e),
                    trigger: e.detail.clone(),
                    result: "running",
                    reason: String::new(),
                }),
                Ok(k @ (EventKind::HealthCheckPassed | EventKind::HealthCheckFailed)) => {
                    if let Some(c) = h
                        .health_checks
                        .iter_mut()
                        .find(|c| c.lease_id == e.lease_id)
                    {
                        c.result = if k == EventKind::HealthCheckPassed {
                            "passed"
                        } else {
                            "failed"
                        };
                        c.reason = e.detail.clone();
                    }
                }
                Ok(EventKind::HostHealth) => h.health_changes.push(HealthEntry {
                    time: event_time(e),
                    actor: e.actor.clone(),
                    detail: e.detail.clone(),
                }),
                _ => {}
            }
        }
        h.leases.reverse();
        h.leases.truncate(HISTORY);
        h.health_checks.reverse();
        h.health_checks.truncate(HISTORY);
        h.health_changes.reverse();
        h.health_changes.truncate(HISTORY);
        h
    }

    fn is_full(&self) -> bool {
        self.leases.len() >= HISTORY
            && self.health_checks.len() >= HISTORY
            && self.health_changes.len() >= HISTORY
    }

    fn render(&self, now: SystemTime) -> String {
        let when = |t: &Option<Time>| {
            t.as_ref()
                .map(|t| clock::when(t.0, now))
                .unwrap_or_default()
        };
        let mut out = String::new();
        out.push_str("\nrecent leases:\n");
        if self.leases.is_empty() {
            out.push_str("  none\n");
        } else {
            let mut t = Table::new(&["  GRANTED", "LEASE", "HOLDER", "OUTCOME"]);
            for l in &self.leases {
                t.row(vec![
                    format!("  {}", when(&l.granted_at)),
                    l.lease_id.clone(),
                    l.holder.clone(),
                    l.outcome.to_owned(),
                ]);
            }
            out.push_str(&t.render());
        }
        out.push_str("\nhealth checks:\n");
        if self.health_checks.is_empty() {
            out.push_str("  none\n");
        } else {
            let mut t = Table::new(&["  STARTED", "RESULT", "TRIGGER", "REASON"]);
            for c in &self.health_checks {
                t.row(vec![
                    format!("  {}", when(&c.started_at)),
                    c.result.to_owned(),
                    c.trigger.clone(),
                    c.reason.clone(),
                ]);
            }
            out.push_str(&t.render());
        }
        out.push_str("\nhealth changes:\n");
        if self.health_changes.is_empty() {
            out.push_str("  none\n");
        } else {
            let mut t = Table::new(&["  TIME", "BY", "DETAIL"]);
            for c in &self.health_changes {
                t.row(vec![
                    format!("  {}", when(&c.time)),
                    c.actor.clone(),
                    c.detail.clone(),
                ]);
            }
            out.push_str(&t.render());
        }
        out
    }
}

fn details(v: &HostView, now: SystemTime) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    output::key_values(&[
        ("name", v.name.clone()),
        ("arch", v.arch.to_owned()),
        ("firmware", v.firmware.to_owned()),
        ("rack", v.rack.clone()),
        ("mac", v.mac.clone()),
        ("ipv4", v.ipv4.clone().unwrap_or_default()),
        ("flags", output::list(&v.flags)),
        ("state", v.state.to_owned()),
        ("maintenance", yes_no(v.maintenance)),
        ("lease", v.lease_id.clone().unwrap_or_default()),
        ("holder", v.holder.clone().unwrap_or_default()),
        (
            "expires",
            v.lease_expires_at
                .map(|t| clock::when(t.0, now))
                .unwrap_or_default(),
        ),
        ("bmc", v.bmc.clone().unwrap_or_default()),
        ("console", v.console.to_owned()),
        ("reachable", reachable(v)),
        ("health", health(v, now)),
        ("generation", v.generation.to_string()),
    ])
}

/// `healthy`, or `quarantined since 12:03 (2m ago): <reason>`.
fn health(v: &HostView, now: SystemTime) -> String {
    let mut s = v.health.to_owned();
    if let Some(t) = v.health_since {
        s.push_str(&format!(" since {}", clock::when(t.0, now)));
    }
    if let Some(r) = &v.health_reason {
        s.push_str(": ");
        s.push_str(r);
    }
    s
}

/// `yes`, or `no: <reason>` for `host show`.
fn reachable(v: &HostView) -> String {
    match (v.reachable, &v.unreachable_reason) {
        (true, _) => "yes".to_owned(),
        (false, None) => "no".to_owned(),
        (false, Some(why)) => format!("no: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_proto::convert::timestamp_from_millis;
    use lab_proto::v1::{Arch, Firmware, HostState};

    #[test]
    fn host_table() {
        let now_ms = 1_700_000_000_000;
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now_ms as u64);
        let leased = Host {
            name: "x1".into(),
            arch: Arch::X8664 as i32,
            firmware: Firmware::Uefi as i32,
            rack: "r1".into(),
            flags: vec!["gpu".into(), "nvme".into()],
            state: HostState::Leased as i32,
            lease_id: "L-1".into(),
            holder: "ci".into(),
            lease_expires_at: Some(timestamp_from_millis(now_ms + 29 * 60_000 + 30_000)),
            reachable: true,
            ..Default::default()
        };
        let free = Host {
            name: "a1".into(),
            arch: Arch::Aarch64 as i32,
            firmware: Firmware::Uefi as i32,
            rack: "r2".into(),
            state: HostState::Available as i32,
            reachable: true,
            health: lab_proto::v1::HostHealth::Quarantined as i32,
            health_reason: "2 host failures within 1h".into(),
            ..Default::default()
        };
        let views: Vec<HostView> = [leased, free].iter().map(HostView::from).collect();
        assert_eq!(
            table(&views, now),
            "NAME  ARCH     FW    RACK  STATE      HEALTH       HOLDER  LEASE  EXPIRES  FLAGS\n\
             x1    x86_64   uefi  r1    leased     healthy      ci      L-1    in 29m   gpu,nvme\n\
             a1    aarch64  uefi  r2    available  quarantined  -       -      -        -\n"
        );
    }

    /// Leases with their outcome, checks with result and reason, health
    /// changes; newest first.
    #[test]
    fn history_from_the_host_event_log() {
        let at = |s: i64| Some(timestamp_from_millis(1_700_000_000_000 + s * 1000));
        let ev = |s: i64, kind: EventKind, actor: &str, lease: &str, detail: &str| Event {
            seq: s as u64,
            time: at(s),
            actor: actor.into(),
            kind: kind as i32,
            hosts: vec!["h2".into()],
            lease_id: lease.into(),
            detail: detail.into(),
            ..Default::default()
        };
        let events = vec![
            ev(1, EventKind::LeaseGranted, "ci", "L-1", ""),
            ev(
                2,
                EventKind::HostHealth,
                "server",
                "",
                "suspect: no bootable device in lease L-1: No bootable device.",
            ),
            ev(3, EventKind::LeaseExpired, "server", "L-1", ""),
            ev(4, EventKind::LeaseGranted, "lab-health", "L-2", ""),
            ev(
                5,
                EventKind::HealthCheckStarted,
                "lab-health",
                "L-2",
                "asked for by root",
            ),
            ev(
                6,
                EventKind::HealthCheckFailed,
                "lab-health",
                "L-2",
                "memory 495 MiB, inventory expects 1024 MiB",
            ),
            ev(
                7,
                EventKind::HostHealth,
                "lab-health",
                "",
                "quarantined: health check failed: memory 495 MiB, inventory expects 1024 MiB",
            ),
            ev(8, EventKind::LeaseReleased, "lab-health", "L-2", ""),
            ev(9, EventKind::LeaseGranted, "lab-health", "L-3", ""),
            ev(
                10,
                EventKind::HealthCheckStarted,
                "lab-health",
                "L-3",
                "asked for by root",
            ),
        ];
        let h = History::from_events(&events);
        let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let text = h.render(now);
        let rows: Vec<&str> = text.lines().collect();
        let find = |needle: &str| {
            rows.iter()
                .find(|r| r.contains(needle))
                .unwrap_or_else(|| panic!("no {needle} in:\n{text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            find("L-1")[find("L-1").len() - 3..],
            ["L-1", "ci", "expired"]
        );
        assert_eq!(
            find("L-2")[find("L-2").len() - 3..],
            ["L-2", "lab-health", "released"]
        );
        assert_eq!(
            find("L-3")[find("L-3").len() - 3..],
            ["L-3", "lab-health", "active"]
        );
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "failed asked for by root memory 495 MiB, inventory expects 1024 MiB",
            "running asked for by root -",
            "server suspect: no bootable device in lease L-1",
        ] {
            assert!(flat.contains(want), "{want} in\n{text}");
        }
        let json: serde_json::Value = serde_json::from_str(&output::json(&h)).unwrap();
        assert_eq!(json["leases"][0]["lease_id"], "L-3", "newest first");
        assert_eq!(json["health_checks"][1]["result"], "failed");
        assert_eq!(
            json["health_checks"][1]["reason"],
            "memory 495 MiB, inventory expects 1024 MiB"
        );
        assert_eq!(json["health_changes"][0]["actor"], "lab-health");
        assert_eq!(
            History::from_events(&[])
                .render(now)
                .matches("  none")
                .count(),
            3
        );
    }

    #[test]
    fn host_details_show_why_it_is_unreachable() {
        let host = Host {
            name: "a1".into(),
            state: HostState::Available as i32,
            reachable: false,
            unreachable_reason: "BMC does not answer".into(),
            ..Default::default()
        };
        let text = details(&HostView::from(&host), std::time::UNIX_EPOCH);
        assert!(
            text.contains("\nreachable    no: BMC does not answer\n"),
            "{text}"
        );
    }
}
