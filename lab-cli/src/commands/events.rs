//! `lab events`: the event log, once or followed live.

use clap::Args;
use lab_proto::v1::{Event, ListEventsRequest, WatchEventsRequest};

use super::Ctx;
use super::lease::ctrl_c;
use crate::clock;
use crate::exit::{Interrupted, StreamEnded};
use crate::output;
use crate::view::EventView;

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// Only events with a sequence number above SEQ
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    after: u64,
    /// At most N events [default: all, page after page]
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with = "follow"
    )]
    limit: Option<u64>,
    /// Only events about this host
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Only events about this lease
    #[arg(long, value_name = "ID")]
    lease: Option<String>,
    /// Keep printing new events as they happen, until interrupted
    #[arg(long, short)]
    pub follow: bool,
}

pub async fn run(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<()> {
    if args.follow {
        return follow(ctx, args).await;
    }
    // Every page up to the end of the log (or --limit), printed as it comes.
    let mut left = args.limit.unwrap_or(u64::MAX);
    let mut page_token = String::new();
    while left > 0 {
        let req = ListEventsRequest {
            after_seq: args.after,
            limit: u32::try_from(left).unwrap_or(u32::MAX).min(PAGE),
            host: args.host.clone().unwrap_or_default(),
            lease_id: args.lease.clone().unwrap_or_default(),
            page_token: page_token.clone(),
        };
        let page = ctx.lab.events().list_events(req).await?.into_inner();
        let text: String = page.events.iter().map(|e| render(ctx, e)).collect();
        output::emit(&text)?;
        left = left.saturating_sub(page.events.len() as u64);
        if page.next_page_token.is_empty() || page.next_page_token == page_token {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(())
}

/// Events asked for per `ListEvents` call.
const PAGE: u32 = 1000;

async fn follow(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<()> {
    let req = WatchEventsRequest {
        after_seq: args.after,
        host: args.host.unwrap_or_default(),
        lease_id: args.lease.unwrap_or_default(),
    };
    let mut last_seq = args.after;
    let watch = async {
        let mut stream = ctx.lab.events().watch_events(req).await?.into_inner();
        while let Some(event) = stream.message().await? {
            last_seq = event.seq;
            output::emit(&render(ctx, &event))?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = watch => r?,
        () = ctrl_c() => return Err(Interrupted(None).into()),
    }
    Err(StreamEnded(format!(
        "the server closed the event stream (resume with --after {last_seq})"
    ))
    .into())
}

fn render(ctx: &Ctx, e: &Event) -> String {
    let v = EventView::from(e);
    if ctx.json {
        output::json_line(&v)
    } else {
        line(&v)
    }
}

/// `42 2025-11-25 12:08:01 alice lease-granted hosts=x1,x2 lease=L-1 detail`,
/// control characters escaped.
fn line(v: &EventView) -> String {
    let time = v
        .time
        .map(|t| clock::local_full(t.0))
        .unwrap_or_else(|| output::NONE.to_owned());
    let actor = if v.actor.is_empty() {
        output::NONE
    } else {
        &v.actor
    };
    let mut parts = vec![v.seq.to_string(), time, actor.to_owned(), v.kind.to_owned()];
    if !v.hosts.is_empty() {
        parts.push(format!("hosts={}", v.hosts.join(",")));
    }
    if let Some(id) = &v.lease_id {
        parts.push(format!("lease={id}"));
    }
    if let Some(w) = v.waiter_id {
        parts.push(format!("waiter={w}"));
    }
    if let Some(r) = &v.request {
        parts.push(format!("request: {}", r.summary()));
    }
    if let Some(d) = &v.detail {
        parts.push(d.replace('\n', " "));
    }
    output::line(&parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_proto::v1::EventKind;

    #[test]
    fn event_line_skips_empty_fields() {
        let e = Event {
            seq: 42,
            actor: "alice".into(),
            kind: EventKind::LeaseGranted as i32,
            hosts: vec!["x1".into(), "x2".into()],
            lease_id: "L-1".into(),
            detail: "granted after 4m\nin queue".into(),
            ..Default::default()
        };
        assert_eq!(
            line(&EventView::from(&e)),
            "42 - alice lease-granted hosts=x1,x2 lease=L-1 granted after 4m in queue\n"
        );
        let e = Event {
            seq: 43,
            actor: "server".into(),
            kind: EventKind::HostAvailable as i32,
            ..Default::default()
        };
        assert_eq!(line(&EventView::from(&e)), "43 - server host-available\n");
    }

    #[test]
    fn event_line_escapes_what_the_server_sent() {
        let e = Event {
            seq: 44,
            actor: "mallory\u{202e}".into(),
            kind: EventKind::HostMaintenanceOn as i32,
            hosts: vec!["x1\x1b[2J".into()],
            lease_id: "L\x07".into(),
            request: Some(lab_proto::v1::LeaseRequest {
                flags: vec!["\u{9b}0m".into()],
                profile: "p\rq".into(),
                ..Default::default()
            }),
            detail: "\x1b]0;pwned\x07 rack\nmove".into(),
            ..Default::default()
        };
        assert_eq!(
            line(&EventView::from(&e)),
            "44 - mallory\\u{202e} host-maintenance-on hosts=x1\\x1b[2J lease=L\\x07 \
             request: count=1 arch=any flags=\\u{9b}0m profile=p\\rq \
             \\x1b]0;pwned\\x07 rack move\n"
        );
    }
}
