//! One agent's link: the hello (within [`HELLO_TIMEOUT`], for a rack whose
//! `agent` is the caller), the full desired state, then two flows until
//! the link ends — the desired state of hosts as committed events change
//! them, down; reports, replies and session data, up.

use super::link::{FromAgent, Inbound, LinkError, Outbound, ToAgent};
use super::registry::ConnId;
use super::{DesiredHost, RackError, RackState, Racks};
use crate::core::policy;
use crate::events::{EventKind, EventRecord};
use crate::types::{Caller, RackName};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tracing::{Instrument, debug, info, info_span, warn};

/// How long the agent has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

impl Racks {
    /// Serves one agent's link. The first message must be its hello naming
    /// a rack whose `agent` is the caller (operators may attach for any
    /// rack: the development mode). A newer attach for the same rack
    /// replaces the older one. Returns what goes down the agent's stream.
    pub async fn attach(
        &self,
        caller: Caller,
        mut inbound: Inbound,
    ) -> Result<mpsc::Receiver<Outbound>, RackError> {
        policy::may_link(&caller)?;
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
        policy::may_attach(&caller, &rack, &agent)?;
        let conn = self.registry.connect(&rack, &agent);
        info!(rack = %rack, agent = %agent, version = %hello.version, "agent attached");
        // Subscribe before the full state, so that no change falls between.
        let events = self.core.subscribe();
        let state = match self.rack_state(&rack).await {
            Ok(s) => s,
            Err(e) => {
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
                let push = me.push_changes(&rack, events, tx.clone());
                tokio::select! {
                    () = me.read_agent(&rack, conn.id, inbound) => {}
                    () = push => {}
                    () = tx.closed() => {}
                }
                me.detach(&rack, conn.id).await;
            }
            .instrument(span),
        );
        Ok(conn.rx)
    }

    async fn detach(&self, rack: &RackName, conn: ConnId) {
        if self.registry.disconnect(rack, conn) {
            self.refresh_reachability().await;
        }
    }

    async fn rack_state(&self, rack: &RackName) -> Result<RackState, RackError> {
        Ok(RackState::of(rack, &self.core.list_hosts().await?))
    }

    /// Sends the desired state of hosts as events change them.
    async fn push_changes(
        &self,
        rack: &RackName,
        mut events: broadcast::Receiver<EventRecord>,
        tx: mpsc::Sender<Outbound>,
    ) {
        loop {
            match events.recv().await {
                Ok(e)
                    if matches!(
                        e.kind,
                        EventKind::InventoryLoaded
                            | EventKind::HostAdded
                            | EventKind::HostRetired
                            | EventKind::HostRemoved
                    ) => {}
                // A forward changes nothing the agent is told.
                Ok(e) if matches!(e.kind, EventKind::ForwardOpened | EventKind::ForwardClosed) => {
                    continue;
                }
                Ok(e) => {
                    if e.kind == EventKind::HostReclaiming {
                        self.registry.end_holder_sessions(rack, &e.hosts).await;
                    }
                    for h in &e.hosts {
                        let Ok(view) = self.core.get_host(h.clone()).await else {
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
                    continue;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
            // The whole rack again (inventory change, or events missed).
            let Ok(state) = self.rack_state(rack).await else {
                return;
            };
            if tx.send(Ok(ToAgent::Rack(state))).await.is_err() {
                return;
            }
        }
    }

    /// Reads the agent's reports, replies and session data until its stream
    /// ends or breaks.
    async fn read_agent(&self, rack: &RackName, conn: ConnId, mut inbound: Inbound) {
        while let Some(msg) = inbound.next().await {
            match msg {
                Ok(FromAgent::Report(r)) => {
                    if self.registry.report(rack, r) {
                        self.refresh_reachability().await;
                    }
                }
                Ok(FromAgent::Reply(r)) => self.registry.reply(rack, conn, r),
                Ok(FromAgent::Data(d)) => self.registry.data(rack, conn, d),
                Ok(FromAgent::Hello(_)) | Err(LinkError::Empty) => {
                    debug!("ignoring a second hello or an empty message");
                }
                Err(LinkError::Broken(e)) => {
                    info!(error = %e, "agent stream broke");
                    return;
                }
                Err(e @ (LinkError::BadHello { .. } | LinkError::BadReport { .. })) => {
                    warn!(error = %lab_types::error_chain(&e), "ignoring a malformed message");
                }
            }
        }
    }
}
