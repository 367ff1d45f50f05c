//! Webhooks: events POSTed, signed, to the URLs of the webhooks file
//! (`--webhooks`, reloaded on SIGHUP), at least once.
//!
//! The core actor writes an outbox row for every committed event that a
//! hook wants ([`outbox_rows`]), in the same transaction as the event
//! (`crate::store`'s outbox). The delivery task ([`deliver`]) sends the rows
//! that are due, a few at a time, deletes them on a 2xx answer and
//! otherwise tries again with exponential back-off ([`backoff`]) until 24 h
//! after the event, when it gives up with a `WEBHOOK_UNDELIVERED` event.
//!
//! Each POST carries the event as JSON ([`payload`]) and the headers
//! `X-Lab-Event` (the kind), `X-Lab-Delivery` (unique, the same on every
//! attempt), `X-Lab-Timestamp` (Unix seconds of the attempt) and
//! `X-Lab-Signature: sha256=<hex HMAC-SHA256(secret, timestamp "." body)>`
//! ([`signature`]). Secrets never print (`Debug` shows `Secret(***)`).

pub mod client;
pub mod config;
pub mod deliver;

use crate::events::{EventKind, EventRecord};
use crate::store::OutboxRow;
use crate::types::{LeaseId, Principal, Timestamp};
use hmac::{Hmac, Mac};
use lab_client::web::AtomicHistogram;
use lab_types::Secret;
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use client::Target;
pub use config::WebhooksError;

/// What the delivery task measures, for `/metrics`: attempts by hook and
/// result, the outbox's depth, and how long attempts took.
#[derive(Debug)]
pub struct WebhookStats {
    /// (hook, result) → count; results: `delivered`, `http_error`,
    /// `unreachable`, `given_up`, `dropped`.
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Rows in the outbox (set once a second by the delivery task).
    pub depth: AtomicI64,
    /// Seconds one attempt took (connection included).
    pub latency: AtomicHistogram,
}

impl Default for WebhookStats {
    fn default() -> Self {
        Self {
            deliveries: Mutex::default(),
            depth: AtomicI64::new(0),
            // 5 ms .. ~20 s.
            latency: AtomicHistogram::exponential(0.005, 2.0, 13),
        }
    }
}

impl WebhookStats {
    fn count(&self, hook: &str, result: &'static str) {
        let mut m = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((hook.to_owned(), result)).or_default() += 1;
    }

    /// An attempt ended with `result` after `took`.
    pub fn delivered(&self, hook: &str, result: &'static str, took: Duration) {
        self.count(hook, result);
        self.latency.observe(took.as_secs_f64());
    }

    pub fn gave_up(&self, hook: &str) {
        self.count(hook, "given_up");
    }

    pub fn dropped(&self, hook: &str) {
        self.count(hook, "dropped");
    }

    pub fn set_depth(&self, rows: u64) {
        self.depth
            .store(i64::try_from(rows).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// The counts so far: (hook, result, count).
    pub fn deliveries(&self) -> Vec<(String, &'static str, u64)> {
        let m = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|((h, r), n)| (h.clone(), *r, *n)).collect()
    }
}

/// One `[[webhook]]` of the file.
#[derive(Debug)]
pub struct Hook {
    pub name: String,
    pub url: Target,
    /// The kinds it gets (`"*"`: every kind but `WEBHOOK_UNDELIVERED`).
    pub events: BTreeSet<EventKind>,
    pub secret: Secret,
    /// Only events about leases held by these principals (`None`: every
    /// event of its kinds).
    pub holders: Option<BTreeSet<Principal>>,
}

impl Hook {
    /// Does this hook get `e`, whose lease (if any) is held by `holder`?
    pub fn wants(&self, e: &EventRecord, holder: Option<&Principal>) -> bool {
        self.events.contains(&e.kind)
            && self
                .holders
                .as_ref()
                .is_none_or(|hs| holder.is_some_and(|h| hs.contains(h)))
    }
}

/// The webhooks in force.
#[derive(Debug, Default)]
pub struct Webhooks {
    pub hooks: Vec<Hook>,
}

impl Webhooks {
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    pub fn hook(&self, name: &str) -> Option<&Hook> {
        self.hooks.iter().find(|h| h.name == name)
    }

    pub fn names(&self) -> BTreeSet<&str> {
        self.hooks.iter().map(|h| h.name.as_str()).collect()
    }
}

/// The webhooks shared between the actor (which writes the outbox) and
/// the delivery task (which sends it).
pub type SharedWebhooks = Arc<Webhooks>;

/// The JSON body of an event's delivery: `id` (the event's sequence
/// number), `kind`, `time` (RFC 3339), `host` (the first, or null) and
/// `hosts`, `lease` (or null), `principal` (the lease's holder; without a
/// lease, who acted), `actor` and `detail`.
pub fn payload(e: &EventRecord, holder: Option<&Principal>) -> String {
    let body = serde_json::json!({
        "id": e.seq,
        "kind": e.kind.name(),
        "time": e.time.to_string(),
        "host": e.hosts.first().map(|h| h.as_str()),
        "hosts": e.hosts.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "lease": e.lease.map(|l| l.to_string()),
        "principal": holder.unwrap_or(&e.actor).as_str(),
        "actor": e.actor.as_str(),
        "detail": e.detail,
    });
    body.to_string()
}

/// The outbox rows for a batch's events: one per event and hook that wants
/// it. `holder` names the holder of a lease the core knows.
pub fn outbox_rows(
    hooks: &Webhooks,
    events: &[EventRecord],
    holder: impl Fn(LeaseId) -> Option<Principal>,
) -> Vec<OutboxRow> {
    let mut rows = Vec::new();
    if hooks.is_empty() {
        return rows;
    }
    for e in events {
        let holder = e.lease.and_then(&holder);
        let mut body = None;
        for h in hooks.hooks.iter().filter(|h| h.wants(e, holder.as_ref())) {
            let body = body.get_or_insert_with(|| payload(e, holder.as_ref()));
            rows.push(OutboxRow {
                seq: e.seq,
                hook: h.name.clone(),
                delivery: uuid::Uuid::new_v4().to_string(),
                kind: e.kind.name().to_owned(),
                body: body.clone(),
                created: e.time,
                attempts: 0,
                next_attempt: e.time,
                last_error: None,
            });
        }
    }
    rows
}

/// `X-Lab-Signature`'s value: `sha256=` and the hex HMAC-SHA256 of
/// `timestamp + "." + body` under `secret`.
pub fn signature(secret: &Secret, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The retry policy: the first retry after 1 s, doubling up to 5 min, with
/// up to 25 % jitter added; given up 24 h after the event.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub give_up_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// When to try a delivery again after its `attempts`-th attempt failed at
/// `now` (`jitter` in `[0, 1)`), or `None` to give up: an attempt that
/// fails at or after `created + give_up_after` is the last. The last retry
/// is never later than that point.
pub fn backoff(
    policy: &Backoff,
    attempts: u32,
    created: Timestamp,
    now: Timestamp,
    jitter: f64,
) -> Option<Timestamp> {
    let deadline = created.saturating_add(policy.give_up_after);
    if now >= deadline {
        return None;
    }
    let doublings = attempts.saturating_sub(1).min(30);
    let delay = policy
        .first
        .saturating_mul(1u32 << doublings)
        .min(policy.max);
    let delay = delay.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0));
    Some(now.saturating_add(delay).min(deadline))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::HostName;

    fn event(kind: EventKind, lease: Option<u128>) -> EventRecord {
        EventRecord {
            seq: 42,
            time: Timestamp(1_700_000_000_000),
            actor: Principal::server(),
            kind,
            hosts: vec![HostName::new("h1").unwrap()],
            lease: lease.map(|l| LeaseId(uuid::Uuid::from_u128(l))),
            waiter: None,
            request: None,
            detail: "why".into(),
            booking: None,
        }
    }

    fn hooks() -> Webhooks {
        Webhooks::parse(
            r#"
[[webhook]]
name = "all"
url = "http://127.0.0.1:1/"
events = ["*"]
secret = "k1"

[[webhook]]
name = "ci"
url = "http://127.0.0.1:1/ci"
events = ["LEASE_EXPIRING", "LEASE_EXPIRED"]
secret = "k2"
holders = ["ci-xen"]
"#,
            std::path::Path::new("w.toml"),
        )
        .unwrap()
    }

    #[test]
    fn rows_follow_kinds_and_holders() {
        let hooks = hooks();
        let ci = Principal::new("ci-xen").unwrap();
        let bob = Principal::new("bob").unwrap();
        let holder_of = |h: &Principal| {
            let h = h.clone();
            move |_: LeaseId| Some(h.clone())
        };
        let names = |rows: Vec<OutboxRow>| rows.into_iter().map(|r| r.hook).collect::<Vec<_>>();
        let expiring = [event(EventKind::LeaseExpiring, Some(1))];
        assert_eq!(
            names(outbox_rows(&hooks, &expiring, holder_of(&ci))),
            ["all", "ci"]
        );
        assert_eq!(
            names(outbox_rows(&hooks, &expiring, holder_of(&bob))),
            ["all"]
        );
        // No lease: not for a hook limited to holders.
        let health = [event(EventKind::HostHealth, None)];
        assert_eq!(names(outbox_rows(&hooks, &health, holder_of(&ci))), ["all"]);
        assert!(
            outbox_rows(
                &hooks,
                &[event(EventKind::WebhookUndelivered, None)],
                holder_of(&ci)
            )
            .is_empty()
        );
        assert!(outbox_rows(&Webhooks::default(), &expiring, holder_of(&ci)).is_empty());

        let rows = outbox_rows(&hooks, &expiring, holder_of(&ci));
        assert_ne!(
            rows[0].delivery, rows[1].delivery,
            "one delivery id per row"
        );
        assert_eq!(rows[0].body, rows[1].body);
        assert_eq!(rows[0].next_attempt, expiring[0].time, "due at once");
        let body: serde_json::Value = serde_json::from_str(&rows[0].body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": 42,
                "kind": "LEASE_EXPIRING",
                "time": "2023-11-14T22:13:20.000Z",
                "host": "h1",
                "hosts": ["h1"],
                "lease": "00000000-0000-0000-0000-000000000001",
                "principal": "ci-xen",
                "actor": "server",
                "detail": "why",
            })
        );
    }

    /// RFC 4231 test case 7, whose message has a dot to split it at:
    /// timestamp "." body is exactly what is signed.
    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        let key = Secret::new(vec![0xaa; 131]);
        assert_eq!(
            signature(
                &key,
                "This is a test using a larger than block-size key and a larger than block-size data",
                b" The key needs to be hashed before being used by the HMAC algorithm."
            ),
            "sha256=9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn backoff_doubles_to_five_minutes_and_gives_up_after_a_day() {
        let p = Backoff::default();
        let created = Timestamp(0);
        let at = |attempts, now_s: i64, jitter| {
            backoff(&p, attempts, created, Timestamp(now_s * 1000), jitter)
                .map(|t| (t.0 - now_s * 1000) as f64 / 1000.0)
        };
        assert_eq!(at(1, 0, 0.0), Some(1.0));
        assert_eq!(at(2, 1, 0.0), Some(2.0));
        assert_eq!(at(3, 3, 0.0), Some(4.0));
        assert_eq!(at(9, 100, 0.0), Some(256.0));
        assert_eq!(at(10, 400, 0.0), Some(300.0));
        assert_eq!(at(500, 4000, 0.0), Some(300.0));
        assert_eq!(at(1, 0, 0.999), Some(1.249));
        assert_eq!(at(10, 400, 1.0), Some(375.0));
        // The last retry is at the deadline; a failure there gives up.
        let day = 24 * 3600;
        assert_eq!(at(300, day - 10, 0.0), Some(10.0));
        assert_eq!(at(301, day, 0.0), None);
        assert_eq!(at(301, day + 5, 0.0), None);
    }
}
