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
use std::collections::{BTreeSet, HashMap, HashSet};
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
        // Rows in flight, by the task that sends each.
        let mut busy: HashMap<tokio::task::Id, OutboxKey> = HashMap::new();
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
                    let limit = free + inflight.len();
                    move |s| s.outbox_due(now, limit)
                })
                .await
                {
                    Ok(rows) => {
                        let hooks = self.webhooks.borrow().clone();
                        let mut orphans = Vec::new();
                        let in_flight: HashSet<&OutboxKey> = busy.values().collect();
                        let rows: Vec<OutboxRow> = rows
                            .into_iter()
                            .filter(|r| !in_flight.contains(&r.key()))
                            .collect();
                        for row in rows {
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
                            let key = row.key();
                            let task = inflight.spawn(async move {
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
                            busy.insert(task.id(), key);
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
                Some(done) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                    match done {
                        Ok((id, a)) => {
                            busy.remove(&id);
                            self.settle(a).await;
                            dirty = true;
                        }
                        Err(e) => {
                            // Tried again when it comes due (its row is
                            // unchanged).
                            busy.remove(&e.id());
                            error!(error = %e, "a webhook delivery task failed");
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

#[cfg(test)]
mod tests {
    //! The delivery task against a receiver on loopback that always
    //! answers 503, with a back-off of milliseconds: it gives up, and a
    //! full outbox is trimmed, each with its event and counter. Real time,
    //! polled (no timed assertion).
    use super::*;
    use crate::core::clock::TokioClock;
    use crate::core::reclaim::Immediate;
    use crate::core::{AcquireRequest, CoreConfig, WaitState};
    use crate::inventory::Inventory;
    use crate::lease::LeaseSpec;
    use crate::store::memory::MemStore;
    use crate::types::{Caller, Role};
    use crate::webhooks::Webhooks;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const INVENTORY: &str = "[[rack]]\nname = \"r1\"\n\n[[host]]\nname = \"h1\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:01\"\n";

    /// Answers every request 503 and counts them.
    async fn refuser() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = n.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        (port, n)
    }

    async fn start(port: u16, config: DeliveryConfig) -> (Core, Arc<MemStore>) {
        let hooks = Webhooks::parse(
            &format!(
                "[[webhook]]\nname = \"down\"\nurl = \"http://127.0.0.1:{port}/\"\nevents = [\"*\"]\nsecret = \"k\"\n"
            ),
            Path::new("w.toml"),
        )
        .unwrap();
        let hooks: SharedWebhooks = Arc::new(hooks);
        let mut c = CoreConfig::new("inv.toml".into());
        c.webhooks = hooks.clone();
        let store = Arc::new(MemStore::new());
        let inv = Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap();
        let (core, _) = Core::start(
            c,
            store.clone(),
            inv,
            Arc::new(Immediate),
            Arc::new(TokioClock::new()),
        )
        .await
        .unwrap();
        let (_tx, rx) = watch::channel(hooks);
        // The sender is dropped: the task stops watching for reloads.
        spawn(core.clone(), rx, config);
        (core, store)
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..3000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    fn undelivered(store: &MemStore) -> Vec<String> {
        store
            .all_events()
            .into_iter()
            .filter(|e| e.kind == EventKind::WebhookUndelivered)
            .map(|e| e.detail)
            .collect()
    }

    #[tokio::test]
    async fn a_delivery_refused_until_its_deadline_is_given_up_once() {
        let (port, posts) = refuser().await;
        let config = DeliveryConfig {
            backoff: Backoff {
                first: Duration::from_millis(20),
                max: Duration::from_millis(50),
                give_up_after: Duration::from_millis(300),
            },
            ..Default::default()
        };
        let (core, store) = start(port, config).await;
        // Start-up committed INVENTORY_LOADED and HOST_ADDED: two rows.
        until("both deliveries given up", || {
            undelivered(&store).len() == 2
        })
        .await;
        let details = undelivered(&store);
        assert!(
            details
                .iter()
                .all(|d| d.starts_with("webhook down: gave up delivering event ")
                    && d.ends_with("last error: HTTP status 503")),
            "{details:?}"
        );
        assert!(
            posts.load(std::sync::atomic::Ordering::SeqCst) >= 4,
            "retried"
        );
        until("the outbox empty", || store.outbox_len().unwrap() == 0).await;
        let counts = core.stats().webhooks.deliveries();
        assert!(
            counts.contains(&("down".into(), "given_up", 2)),
            "{counts:?}"
        );
        assert!(
            counts
                .iter()
                .any(|(h, r, n)| h == "down" && *r == "http_error" && *n >= 4),
            "{counts:?}"
        );
        // WEBHOOK_UNDELIVERED is not delivered: nothing new in the outbox.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.outbox_len().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_drops_the_oldest_deliveries_with_an_event() {
        let (port, _) = refuser().await;
        let config = DeliveryConfig {
            outbox_max: 3,
            // Retried rarely: the rows stay.
            backoff: Backoff {
                first: Duration::from_secs(3600),
                max: Duration::from_secs(3600),
                give_up_after: Duration::from_secs(86_400),
            },
            ..Default::default()
        };
        let (core, store) = start(port, config).await;
        let ci = Caller {
            principal: Principal::new("ci").unwrap(),
            role: Role::Ci,
        };
        let spec = LeaseSpec {
            arch: None,
            flags: Default::default(),
            hosts: Default::default(),
            count: 1,
            profile: None,
            ttl: Duration::from_secs(600),
            priority: 0,
            ssh_public_key: None,
            comment: String::new(),
            min_ttl: None,
        };
        let mut acq = core
            .acquire(
                ci.clone(),
                AcquireRequest {
                    spec,
                    no_wait: false,
                    request_id: None,
                    preemptible: false,
                },
            )
            .await
            .unwrap();
        let lease = loop {
            match acq.next().await.unwrap() {
                WaitState::Granted(l) => break l,
                WaitState::Queued { .. } => {}
                WaitState::Failed(e) => panic!("{e}"),
            }
        };
        core.release(ci, lease.id).await.unwrap();
        // 2 at start + requested, granted, released, reclaiming, available:
        // 7 rows, trimmed once a second, maybe before the last came.
        let dropped = || -> u64 {
            core.stats()
                .webhooks
                .deliveries()
                .iter()
                .filter(|(_, r, _)| *r == "dropped")
                .map(|(_, _, n)| n)
                .sum()
        };
        until("the outbox trimmed to 3 after all 7 rows", || {
            store.outbox_len().unwrap() == 3 && !undelivered(&store).is_empty() && dropped() >= 4
        })
        .await;
        let details = undelivered(&store);
        assert!(
            details
                .iter()
                .all(|d| d.starts_with("webhook outbox over 3 rows: dropped ")
                    && d.ends_with("for down")),
            "{details:?}"
        );
        let kept: Vec<u64> = store
            .outbox_due(crate::types::Timestamp(i64::MAX), 10)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        let newest: Vec<u64> = {
            let mut all: Vec<u64> = store
                .all_events()
                .iter()
                .filter(|e| e.kind != EventKind::WebhookUndelivered)
                .map(|e| e.seq)
                .collect();
            all.sort();
            all.split_off(all.len() - 3)
        };
        let mut kept_sorted = kept.clone();
        kept_sorted.sort();
        assert_eq!(kept_sorted, newest, "the newest events' rows are kept");
        assert_eq!(dropped(), 4, "7 rows, 3 kept");
    }
}
