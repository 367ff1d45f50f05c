//! The delivery task: sends the outbox rows that are due, at most
//! [`DeliveryConfig::concurrency`] at once, and settles each in the store
//! (deleted on a 2xx answer, rescheduled with back-off otherwise, given up
//! 24 h after its event). It keeps the outbox within
//! [`DeliveryConfig::outbox_max`] rows (the oldest events' rows dropped).
//!
//! It wakes when a commit wrote outbox rows ([`Core::outbox_wake`]), when
//! the earliest row comes due, when an attempt ends and when the webhooks
//! are reloaded; while attempts are in flight it looks for due rows once a
//! second at most. A failing hook is logged once when it starts failing
//! and once when it recovers; each attempt is logged at debug level.

use super::client::{self, Timeouts};
use super::{Backoff, SharedWebhooks, WebhookStats, backoff, signature};
use crate::core::{Core, Note, error_chain};
use crate::events::EventKind;
use crate::store::{OutboxKey, OutboxRow, Settle, Store, StoreError};
use crate::types::{HostName, LeaseId, Principal};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// Limits of the delivery task.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Most rows the outbox keeps; the oldest events' rows are dropped
    /// beyond it (with a `WEBHOOK_UNDELIVERED` event).
    pub outbox_max: u64,
    pub backoff: Backoff,
    pub timeouts: Timeouts,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            outbox_max: 100_000,
            backoff: Backoff::default(),
            timeouts: Timeouts::default(),
        }
    }
}

/// Rows dropped in one transaction when the outbox is over its bound.
const TRIM_STEP: usize = 10_000;

/// How often the outbox's size is checked (and its gauge set).
const SIZE_CHECK: Duration = Duration::from_secs(1);

/// What one attempt came to.
struct Attempt {
    row: OutboxRow,
    result: Result<u16, client::PostError>,
    took: Duration,
}

/// Starts the delivery task (it runs until the runtime stops).
pub fn spawn(
    core: Core,
    webhooks: watch::Receiver<SharedWebhooks>,
    config: DeliveryConfig,
) -> tokio::task::JoinHandle<()> {
    let task = Deliverer {
        store: core.store(),
        stats: core.stats().webhooks.clone(),
        core,
        webhooks,
        config,
        failing: HashSet::new(),
    };
    tokio::spawn(task.run())
}

struct Deliverer {
    core: Core,
    store: Arc<dyn Store>,
    webhooks: watch::Receiver<SharedWebhooks>,
    config: DeliveryConfig,
    stats: Arc<WebhookStats>,
    /// Hooks whose last attempt failed (logged once until they recover).
    failing: HashSet<String>,
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(r) => r,
        Err(join) => Err(StoreError::Backend {
            op: "outbox",
            source: Box::new(join),
        }),
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source works");
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

impl Deliverer {
    async fn run(mut self) {
        let wake = self.core.outbox_wake();
        let clock = self.core.clock();
        let mut inflight: JoinSet<Attempt> = JoinSet::new();
        let mut busy: HashSet<OutboxKey> = HashSet::new();
        let mut reloads = true;
        let mut last_size_check: Option<Instant> = None;
        // The outbox changed since its size was last checked.
        let mut dirty = true;
        loop {
            if dirty && last_size_check.is_none_or(|t| t.elapsed() >= SIZE_CHECK) {
                last_size_check = Some(Instant::now());
                dirty = false;
                self.keep_bounded().await;
            }
            let now = clock.now();
            let mut pause = Duration::ZERO;
            let free = self.config.concurrency.saturating_sub(inflight.len());
            if free > 0 {
                match blocking(&self.store, {
                    let limit = free + busy.len();
                    move |s| s.outbox_due(now, limit)
                })
                .await
                {
                    Ok(rows) => {
                        let hooks = self.webhooks.borrow().clone();
                        let mut orphans = Vec::new();
                        for row in rows {
                            if busy.contains(&row.key()) {
                                continue;
                            }
                            if inflight.len() >= self.config.concurrency {
                                break;
                            }
                            let Some(hook) = hooks.hook(&row.hook) else {
                                // Its hook was removed (while the server was
                                // down, or the drop failed).
                                orphans.push(Settle::Delete(row.key()));
                                continue;
                            };
                            let ts = (clock.now().0 / 1000).to_string();
                            let headers = vec![
                                ("x-lab-event", row.kind.clone()),
                                ("x-lab-delivery", row.delivery.clone()),
                                (
                                    "x-lab-signature",
                                    signature(&hook.secret, &ts, row.body.as_bytes()),
                                ),
                                ("x-lab-timestamp", ts),
                            ];
                            let target = hook.url.clone();
                            let timeouts = self.config.timeouts;
                            busy.insert(row.key());
                            inflight.spawn(async move {
                                let started = Instant::now();
                                let result =
                                    client::post(&target, &headers, row.body.clone(), timeouts)
                                        .await;
                                Attempt {
                                    row,
                                    result,
                                    took: started.elapsed(),
                                }
                            });
                        }
                        if !orphans.is_empty() {
                            info!(
                                rows = orphans.len(),
                                "dropping webhook deliveries of hooks no longer configured"
                            );
                            if let Err(e) =
                                blocking(&self.store, move |s| s.outbox_settle(&orphans)).await
                            {
                                error!(error = %error_chain(&e), "cannot drop webhook deliveries");
                            }
                        }
                    }
                    Err(e) => {
                        error!(error = %error_chain(&e), "cannot read the webhook outbox; trying again in 1 s");
                        pause = Duration::from_secs(1);
                    }
                }
            }
            // Until the next row is due (none in flight: every due row was
            // started), or a second (some in flight: due rows may wait for
            // a free slot or be the ones in flight).
            let next = if !pause.is_zero() {
                Some(tokio::time::Instant::now() + pause)
            } else if inflight.is_empty() {
                match blocking(&self.store, |s| s.outbox_next_due()).await {
                    Ok(t) => t.map(|t| clock.instant_at(t)),
                    Err(e) => {
                        error!(error = %error_chain(&e), "cannot read the webhook outbox; trying again in 1 s");
                        Some(tokio::time::Instant::now() + Duration::from_secs(1))
                    }
                }
            } else {
                Some(tokio::time::Instant::now() + Duration::from_secs(1))
            };
            // The size check that is owed, too.
            let next = match (dirty, last_size_check) {
                (true, Some(t)) => {
                    let check = tokio::time::Instant::from_std(t + SIZE_CHECK);
                    Some(next.map_or(check, |n| n.min(check)))
                }
                _ => next,
            };
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    match done {
                        Ok(a) => {
                            busy.remove(&a.row.key());
                            self.settle(a).await;
                            dirty = true;
                        }
                        Err(e) => {
                            error!(error = %e, "a webhook delivery task failed");
                            // Its key stays busy until a restart; rare.
                        }
                    }
                }
                () = wake.notified() => dirty = true,
                r = self.webhooks.changed(), if reloads => {
                    if r.is_err() {
                        reloads = false;
                    }
                }
                () = async {
                    match next {
                        Some(t) => tokio::time::sleep_until(t.max(tokio::time::Instant::now() + Duration::from_millis(10))).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
    }

    /// Settle one attempt in the store: delete, reschedule or give up.
    async fn settle(&mut self, a: Attempt) {
        let Attempt {
            mut row,
            result,
            took,
        } = a;
        let hook = row.hook.clone();
        let now = self.core.clock().now();
        let error = match result {
            Ok(status) if (200..300).contains(&status) => {
                self.stats.delivered(&hook, "delivered", took);
                debug!(hook = %hook, event = row.seq, delivery = %row.delivery, status, attempts = row.attempts + 1, "webhook delivered");
                if self.failing.remove(&hook) {
                    info!(hook = %hook, "webhook deliveries succeed again");
                }
                let key = row.key();
                if let Err(e) = blocking(&self.store, move |s| {
                    s.outbox_settle(&[Settle::Delete(key)])
                })
                .await
                {
                    // Delivered again later: at least once.
                    error!(error = %error_chain(&e), "cannot remove a delivered webhook from the outbox");
                }
                return;
            }
            Ok(status) => {
                self.stats.delivered(&hook, "http_error", took);
                format!("HTTP status {status}")
            }
            Err(e) => {
                self.stats.delivered(&hook, "unreachable", took);
                error_chain(&e)
            }
        };
        row.attempts += 1;
        debug!(hook = %hook, event = row.seq, delivery = %row.delivery, attempts = row.attempts, error = %error, "webhook delivery failed");
        if self.failing.insert(hook.clone()) {
            warn!(hook = %hook, error = %error, "webhook delivery failed; retrying with back-off (1 s doubling to 5 min) for 24 h after each event");
        }
        let settle = match backoff(
            &self.config.backoff,
            row.attempts,
            row.created,
            now,
            jitter(),
        ) {
            Some(next) => {
                row.next_attempt = next;
                row.last_error = Some(error);
                Settle::Retry(row.clone())
            }
            None => {
                self.stats.gave_up(&hook);
                warn!(hook = %hook, event = row.seq, kind = %row.kind, delivery = %row.delivery, attempts = row.attempts, error = %error, "webhook delivery given up");
                let note = undelivered_note(
                    &row,
                    format!(
                        "webhook {hook}: gave up delivering event {} ({}, delivery {}) after {} attempts over {}; last error: {error}",
                        row.seq,
                        row.kind,
                        row.delivery,
                        row.attempts,
                        humantime::format_duration(self.config.backoff.give_up_after)
                    ),
                );
                if let Err(e) = self.core.record(note).await {
                    error!(error = %error_chain(&e), "cannot record a given-up webhook delivery");
                }
                Settle::Delete(row.key())
            }
        };
        if let Err(e) = blocking(&self.store, move |s| s.outbox_settle(&[settle])).await {
            error!(error = %error_chain(&e), "cannot reschedule a webhook delivery");
        }
    }

    /// The outbox's gauge, and its bound: the oldest events' rows dropped
    /// beyond `outbox_max`, with one event and log line per step.
    async fn keep_bounded(&mut self) {
        let max = self.config.outbox_max;
        loop {
            let dropped = match blocking(&self.store, move |s| s.outbox_trim(max, TRIM_STEP)).await
            {
                Ok(d) => d,
                Err(e) => {
                    error!(error = %error_chain(&e), "cannot trim the webhook outbox");
                    return;
                }
            };
            if dropped.is_empty() {
                break;
            }
            let hooks: BTreeSet<&str> = dropped.iter().map(|r| r.hook.as_str()).collect();
            for r in &dropped {
                self.stats.dropped(&r.hook);
            }
            let first = dropped.iter().map(|r| r.seq).min().unwrap_or(0);
            let last = dropped.iter().map(|r| r.seq).max().unwrap_or(0);
            let detail = format!(
                "webhook outbox over {max} rows: dropped {} deliveries (events {first}..={last}) for {}",
                dropped.len(),
                hooks.iter().copied().collect::<Vec<_>>().join(", ")
            );
            warn!(
                dropped = dropped.len(),
                max, first, last, "webhook outbox full; oldest deliveries dropped"
            );
            let note = Note {
                actor: Principal::server(),
                kind: EventKind::WebhookUndelivered,
                hosts: Vec::new(),
                lease: None,
                detail,
            };
            if let Err(e) = self.core.record(note).await {
                error!(error = %error_chain(&e), "cannot record dropped webhook deliveries");
            }
        }
        match blocking(&self.store, |s| s.outbox_len()).await {
            Ok(n) => self.stats.set_depth(n),
            Err(e) => error!(error = %error_chain(&e), "cannot read the webhook outbox's size"),
        }
    }
}

/// A `WEBHOOK_UNDELIVERED` note about `row`'s event (its hosts and lease,
/// read back from the body).
fn undelivered_note(row: &OutboxRow, detail: String) -> Note {
    let body: serde_json::Value = serde_json::from_str(&row.body).unwrap_or_default();
    let hosts = body["hosts"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter_map(|h| h.as_str().and_then(|h| HostName::new(h).ok()))
                .collect()
        })
        .unwrap_or_default();
    let lease = body["lease"]
        .as_str()
        .and_then(|l| l.parse::<uuid::Uuid>().ok())
        .map(LeaseId);
    Note {
        actor: Principal::server(),
        kind: EventKind::WebhookUndelivered,
        hosts,
        lease,
        detail,
    }
}
