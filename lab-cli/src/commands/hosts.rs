//! `lab hosts`, `lab host show`, `lab host maintenance`, `lab host
//! quarantine`, `lab host release-quarantine`.

use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use lab_proto::v1::{
    GetHostRequest, Host, ListHostsRequest, SetMaintenanceRequest, SetQuarantineRequest,
};

use super::{ArchArg, Ctx};
use crate::clock;
use crate::output::{self, Table};
use crate::view::HostView;

#[derive(Debug, Args)]
pub struct HostsArgs {
    /// Only hosts of this architecture
    #[arg(long, value_enum)]
    arch: Option<ArchArg>,
    /// Only hosts having this flag (repeat for several: all must match)
    #[arg(long = "flag", value_name = "FLAG")]
    flags: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Show one host in full
    Show {
        /// Host name
        name: String,
    },
    /// Put a host in maintenance or take it back (operators only)
    ///
    /// A host in maintenance gets no new leases; a lease it holds runs out
    /// first.
    Maintenance {
        /// on: take the host out of service; off: give it back
        #[arg(value_enum, value_name = "on|off")]
        switch: Switch,
        /// Host name
        name: String,
        /// Why (recorded in the event log)
        #[arg(long)]
        reason: Option<String>,
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
            let host = ctx.lab.hosts().get_host(GetHostRequest { name }).await?;
            print_host(ctx, &host.into_inner())
        }
        HostCommand::Maintenance {
            switch,
            name,
            reason,
        } => {
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

fn print_host(ctx: &Ctx, host: &Host) -> anyhow::Result<()> {
    let v = HostView::from(host);
    if ctx.json {
        return Ok(output::emit(&output::json(&v))?);
    }
    Ok(output::emit(&details(&v, SystemTime::now()))?)
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
