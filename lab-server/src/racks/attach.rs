//! One agent's link: the hello (within [`HELLO_TIMEOUT`], for a rack whose
//! `agent` is the caller), the full desired state, then two flows until
//! the link ends — the desired state of hosts as committed events change
//! them, down; reports, replies and session data, up.
//!
//! - **Who.** Only a caller with the `agent` role whose principal is the
//!   rack's `agent` attaches (`core::policy::may_attach`); an operator's
//!   token is refused, since the link carries the rack's BMC passwords and
//!   replaces the real agent. In the development mode anyone may.
//! - **Events.** Every attach is logged and recorded as `AGENT_ATTACHED`
//!   (actor: the caller's principal; detail: rack, principal, version), and
//!   its end as `AGENT_DETACHED` (detail: rack, principal, why).
//! - **Reports** count only for hosts of the attached rack; a report about
//!   any other host is ignored, counted, and logged once per
//!   [`FOREIGN_LOG_INTERVAL`] with the count.

use super::feed::{Change, FeedRx};
use super::link::{FromAgent, Inbound, LinkError, Outbound, ToAgent};
use super::registry::ConnId;
use super::{DesiredHost, RackError, RackState, Racks};
use crate::core::Note;
use crate::core::policy::{self, AuthMode};
use crate::events::EventKind;
use crate::types::{Caller, HostName, Principal, RackName};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

/// How long the agent has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports about hosts of other racks are logged at most once per this.
pub const FOREIGN_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Racks {
    /// Serves one agent's link. The first message must be its hello naming
    /// a rack whose `agent` is the caller (anyone, for any rack, in the
    /// development mode). A newer attach for the same rack replaces the
    /// older one. Returns what goes down the agent's stream.
    pub async fn attach(
        &self,
        caller: Caller,
        mode: AuthMode,
        mut inbound: Inbound,
    ) -> Result<mpsc::Receiver<Outbound>, RackError> {
        if let Err(denied) = policy::may_link(&caller, mode) {
            warn!(principal = %caller.principal, role = %caller.role, "agent attach refused: not an agent");
            return Err(denied.into());
        }
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
            .await
            .map_err(|_| RackError::HelloTimeout {
                after: HELLO_TIMEOUT,
            })?;
        let hello = match first {
            Some(Ok(FromAgent::Hello(hello))) => hello,
            Some(Err(e @ (LinkError::Broken(_) | LinkError::BadHello { .. }))) => {
                return Err(e.into());
            }
            _ => return Err(RackError::NoHello),
        };
        let rack = hello.rack;
        let inventory = self.core.inventory().await?;
        let Some(spec) = inventory.rack(&rack) else {
            return Err(RackError::UnknownRack { rack });
        };
        let Some(agent) = spec.agent.clone() else {
            return Err(RackError::RackHasNoAgent { rack });
        };
        if let Err(denied) = policy::may_attach(&caller, &rack, &agent, mode) {
            warn!(rack = %rack, principal = %caller.principal, agent = %agent, "agent attach refused: not the rack's agent");
            return Err(denied.into());
        }
        let conn = self.registry.connect(&rack, &agent);
        let principal = caller.principal.clone();
        info!(rack = %rack, agent = %agent, principal = %principal, version = %hello.version, "agent attached");
        self.note_link(
            &principal,
            EventKind::AgentAttached,
            format!(
                "rack {rack}, principal {principal}, version {}",
                truncated(&hello.version)
            ),
        )
        .await;
        // The feed opens before the full state is read, so that no change
        // falls between.
        let feed = self.feeds.open(&rack);
        let feed_id = feed.id;
        let state = match self.rack_state(&rack).await {
            Ok(s) => s,
            Err(e) => {
                self.feeds.close(&rack, feed_id);
                self.detach(&rack, conn.id).await;
                return Err(e);
            }
        };
        let _ = conn.tx.send(Ok(ToAgent::Rack(state))).await;
        self.refresh_reachability().await;
        let me = self.clone();
        let tx = conn.tx;
        let span = info_span!("agent", rack = %rack, conn = ?conn.id);
        tokio::spawn(
            async move {
                let push = me.push_changes(&rack, feed, tx.clone());
                let why = tokio::select! {
                    why = me.read_agent(&rack, conn.id, inbound) => why,
                    () = push => "the server stopped following the rack".to_owned(),
                    // The agent's call is gone.
                    () = tx.closed() => "the agent closed the link".to_owned(),
                };
                me.feeds.close(&rack, feed_id);
                let why = if me.detach(&rack, conn.id).await {
                    why
                } else {
                    "replaced by a newer attach".to_owned()
                };
                info!(principal = %principal, why = %why, "agent detached");
                me.note_link(
                    &principal,
                    EventKind::AgentDetached,
                    format!("rack {rack}, principal {principal}: {why}"),
                )
                .await;
            }
            .instrument(span),
        );
        Ok(conn.rx)
    }

    /// Records an attach or detach; a store failure is logged, not fatal
    /// to the link.
    async fn note_link(&self, actor: &Principal, kind: EventKind, detail: String) {
        let note = Note {
            actor: actor.clone(),
            kind,
            hosts: Vec::new(),
            lease: None,
            detail,
        };
        if let Err(e) = self.core.record(note).await {
            warn!(error = %lab_types::error_chain(&e), kind = ?kind, "cannot record the agent link event");
        }
    }

    /// Ends connection `conn`; false if a newer attach replaced it.
    async fn detach(&self, rack: &RackName, conn: ConnId) -> bool {
        if self.registry.disconnect(rack, conn) {
            self.refresh_reachability().await;
            true
        } else {
            false
        }
    }

    async fn rack_state(&self, rack: &RackName) -> Result<RackState, RackError> {
        Ok(RackState::of(
            rack,
            &self.core.rack_hosts(rack.clone()).await?,
        ))
    }

    /// Sends the desired state of hosts as the rack's feed says they
    /// changed, or the whole rack.
    async fn push_changes(&self, rack: &RackName, mut feed: FeedRx, tx: mpsc::Sender<Outbound>) {
        while let Some(change) = feed.next().await {
            match change {
                Change::Hosts { hosts, reclaiming } => {
                    if reclaiming {
                        self.registry.end_holder_sessions(rack, &hosts).await;
                    }
                    for h in hosts {
                        let Ok(view) = self.core.get_host(h).await else {
                            continue;
                        };
                        if view.spec.as_ref().is_some_and(|s| &s.rack == rack)
                            && tx
                                .send(Ok(ToAgent::Host(DesiredHost::of(&view))))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                }
                Change::Rack => {
                    let Ok(state) = self.rack_state(rack).await else {
                        return;
                    };
                    if tx.send(Ok(ToAgent::Rack(state))).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the agent's reports, replies and session data until its stream
    /// ends or breaks; says why it ended.
    async fn read_agent(&self, rack: &RackName, conn: ConnId, mut inbound: Inbound) -> String {
        let mut foreign = ForeignReports::default();
        while let Some(msg) = inbound.next().await {
            match msg {
                Ok(FromAgent::Report(r)) => {
                    let host = r.host.clone();
                    match self.registry.report(rack, conn, r) {
                        Ok(rep) => {
                            if rep.reachability_changed {
                                self.refresh_reachability().await;
                            }
                            if let Some((host, lease, verdict)) = rep.verdict {
                                self.core.host_verdict(host, lease, verdict).await;
                            }
                        }
                        Err(total) => foreign.seen(rack, &host, total),
                    }
                }
                Ok(FromAgent::Reply(r)) => self.registry.reply(rack, conn, r),
                Ok(FromAgent::Data(d)) => self.registry.data(rack, conn, d),
                Ok(FromAgent::Hello(_)) | Err(LinkError::Empty) => {
                    debug!("ignoring a second hello or an empty message");
                }
                Err(LinkError::Broken(e)) => {
                    info!(error = %e, "agent stream broke");
                    foreign.flush(rack);
                    return format!("the link broke: {e}");
                }
                Err(e @ (LinkError::BadHello { .. } | LinkError::BadReport { .. })) => {
                    warn!(error = %lab_types::error_chain(&e), "ignoring a malformed message");
                }
            }
        }
        foreign.flush(rack);
        "the agent closed the link".to_owned()
    }
}

/// Reports about hosts outside the rack, logged at most once per
/// [`FOREIGN_LOG_INTERVAL`].
#[derive(Default)]
struct ForeignReports {
    last_line: Option<Instant>,
    /// Ignored since the last line.
    unlogged: u64,
}

impl ForeignReports {
    fn seen(&mut self, rack: &RackName, host: &HostName, total: u64) {
        self.unlogged += 1;
        if self
            .last_line
            .is_none_or(|t| t.elapsed() >= FOREIGN_LOG_INTERVAL)
        {
            warn!(rack = %rack, host = %host, count = self.unlogged, total, "ignoring reports about hosts outside the agent's rack");
            self.unlogged = 0;
            self.last_line = Some(Instant::now());
        }
    }

    fn flush(&mut self, rack: &RackName) {
        if self.unlogged > 0 {
            warn!(rack = %rack, count = self.unlogged, "ignored reports about hosts outside the agent's rack");
            self.unlogged = 0;
        }
    }
}

/// An agent's version as recorded: at most 64 characters, none a control
/// character.
fn truncated(version: &str) -> String {
    version
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect()
}
