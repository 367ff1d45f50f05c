//! The distributed store on etcd v3 (`--store etcd`): the same records,
//! rules and atomicity as [`super::redb::RedbStore`], for lab-server
//! replicas on several sites (docs/multi-site.md).
//!
//! Keys, all under the prefix (`--etcd-prefix`, `/lab/`); values JSON as in
//! redb; numbers zero-padded to 20 digits so that key order is numeric
//! order:
//!
//! | key | value |
//! |-----|-------|
//! | `host/<name>` | host record |
//! | `lease/<id>` | lease |
//! | `waiter/<id>` | waiting request |
//! | `booking/<id>` | booking |
//! | `event/<seq>` | event |
//! | `ebh/<host>/<seq>` | — (events by host) |
//! | `ebl/<lease>/<seq>` | — (events by lease) |
//! | `outbox/<seq>/<hook>` | outbox row |
//! | `outbox_due/<next attempt>/<seq>/<hook>` | — (the outbox by next attempt; the time with its sign bit flipped) |
//! | `meta/last_event` | the last event's seq (decimal) |
//! | `meta/commit` | the token of the last commit (see below) |
//!
//! **A batch is one etcd transaction.** `commit` reads the records the
//! batch touches (one read transaction), applies the compare-and-set rules
//! of [`super`] to them in order (so a stale generation is
//! [`StoreError::Conflict`], as in redb), and sends one transaction whose
//! compares are the mod revisions it read of every record it changes and
//! of `meta/last_event` (the event sequence), plus the leader's fence when
//! one is set ([`EtcdStore::set_fence`]). If any of them moved, nothing is
//! written and the batch is planned again from a fresh read (which then
//! finds the conflict, if it is one). etcd refuses a transaction that
//! writes one key twice: a batch's writes are folded per key first.
//!
//! **A timeout is not a failure.** Each transaction also writes a token
//! unique to the commit to `meta/commit`, and its failure branch reads that
//! key back. The client resends a transaction whose answer was lost; if the
//! first one had landed, the resend's compares fail, the token read back is
//! this commit's, and the commit succeeded.
//!
//! **Sync over async.** The [`Store`] trait is synchronous and the core
//! calls it on tokio's blocking pool (`spawn_blocking`). The store owns a
//! small runtime (one worker thread) that drives the gRPC connections, and
//! each trait method waits for its calls with that runtime's `block_on`:
//! no async worker of the server is ever blocked. (Called from an async
//! worker, it panics rather than stall the server.)
//!
//! **Limits.** etcd's `--max-txn-ops` (128 by default) and
//! `--max-request-bytes` (1.5 MiB) bound one transaction; a batch must
//! stay atomic, so operators raise both (docs/multi-site.md) and
//! lab-server refuses, before sending, a transaction over its
//! `--etcd-max-txn-ops`.

pub mod client;
pub mod election;

use super::{
    Batch, EventQuery, OutboxRow, Pruned, Settle, Snapshot, Store, StoreError, Write, check_delete,
    check_event_seqs, check_generation, check_waiter,
};
use crate::events::EventRecord;
use crate::lease::booking::Booking;
use crate::lease::{HostRecord, Lease};
use crate::types::{Generation, Timestamp};
pub use client::{EtcdClient, EtcdConfig, EtcdError};
use lab_proto::etcd::etcdserverpb as pb;
use lab_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use lab_proto::etcd::etcdserverpb::request_op::Request as Op;
use lab_proto::etcd::etcdserverpb::response_op::Response as OpResponse;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The leader's fence: the election key and its create revision. A commit
/// carrying it lands only while that key still exists with that revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub create_revision: i64,
}

/// The etcd-backed store.
pub struct EtcdStore {
    rt: Option<tokio::runtime::Runtime>,
    client: Arc<EtcdClient>,
    keys: Keys,
    fence: Mutex<Option<Fence>>,
    /// Makes commit tokens unique across processes and commits.
    instance: u128,
    commits: AtomicU64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("client", &self.client)
            .field("prefix", &self.keys.prefix)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another
        // runtime (where the last handle of the store may go).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The key layout under the prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A timestamp as 20 digits that sort as the numbers do.
fn sortable(t: Timestamp) -> String {
    format!("{:020}", (t.0 as u64) ^ (1 << 63))
}

fn unsortable(s: &str) -> Option<Timestamp> {
    s.parse::<u64>()
        .ok()
        .map(|v| Timestamp((v ^ (1 << 63)) as i64))
}

impl Keys {
    fn k(&self, rest: impl std::fmt::Display) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }
    fn dir(&self, name: &str) -> Vec<u8> {
        self.k(format_args!("{name}/"))
    }
    fn host(&self, name: &str) -> Vec<u8> {
        self.k(format_args!("host/{name}"))
    }
    fn lease(&self, id: impl std::fmt::Display) -> Vec<u8> {
        self.k(format_args!("lease/{id}"))
    }
    fn waiter(&self, id: u64) -> Vec<u8> {
        self.k(format_args!("waiter/{id:020}"))
    }
    fn booking(&self, id: u64) -> Vec<u8> {
        self.k(format_args!("booking/{id:020}"))
    }
    fn event(&self, seq: u64) -> Vec<u8> {
        self.k(format_args!("event/{seq:020}"))
    }
    fn host_index(&self, host: &str) -> Vec<u8> {
        self.k(format_args!("ebh/{host}/"))
    }
    fn lease_index(&self, lease: impl std::fmt::Display) -> Vec<u8> {
        self.k(format_args!("ebl/{lease}/"))
    }
    fn outbox(&self, seq: u64, hook: &str) -> Vec<u8> {
        self.k(format_args!("outbox/{seq:020}/{hook}"))
    }
    fn outbox_due(&self, row: &OutboxRow) -> Vec<u8> {
        self.k(format_args!(
            "outbox_due/{}/{:020}/{}",
            sortable(row.next_attempt),
            row.seq,
            row.hook
        ))
    }
    fn last_event(&self) -> Vec<u8> {
        self.k("meta/last_event")
    }
    fn commit_token(&self) -> Vec<u8> {
        self.k("meta/commit")
    }
    /// The event keys (and index entries) of an event.
    fn event_keys(&self, e: &EventRecord) -> Vec<Vec<u8>> {
        let mut keys = vec![self.event(e.seq)];
        for h in &e.hosts {
            let mut k = self.host_index(h.as_str());
            k.extend_from_slice(format!("{:020}", e.seq).as_bytes());
            keys.push(k);
        }
        if let Some(l) = e.lease {
            let mut k = self.lease_index(l);
            k.extend_from_slice(format!("{:020}", e.seq).as_bytes());
            keys.push(k);
        }
        keys
    }
    /// (seq, hook) of an `outbox/` key.
    fn parse_outbox(&self, key: &[u8]) -> Option<(u64, String)> {
        let rest = key.strip_prefix(self.dir("outbox").as_slice())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (seq, hook) = rest.split_once('/')?;
        Some((seq.parse().ok()?, hook.to_owned()))
    }
    /// (next attempt, seq, hook) of an `outbox_due/` key.
    fn parse_due(&self, key: &[u8]) -> Option<(Timestamp, u64, String)> {
        let rest = key.strip_prefix(self.dir("outbox_due").as_slice())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (t, rest) = rest.split_once('/')?;
        let (seq, hook) = rest.split_once('/')?;
        Some((unsortable(t)?, seq.parse().ok()?, hook.to_owned()))
    }
}

/// The seq at the end of an index or event key.
fn tail_seq(key: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(key.get(key.len().checked_sub(20)?..)?).ok()?;
    s.parse().ok()
}

fn backend(op: &'static str) -> impl FnOnce(EtcdError) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: Box::new(e),
    }
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

fn get(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestRange(pb::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestPut(pb::PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// The key's mod revision is `rev` (0: the key does not exist).
fn same_revision(key: Vec<u8>, rev: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(TargetUnion::ModRevision(rev)),
    }
}

fn fence_compare(f: &Fence) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: f.key.clone(),
        range_end: Vec::new(),
        target_union: Some(TargetUnion::CreateRevision(f.create_revision)),
    }
}

/// The key-values of the `i`th (range) response of a transaction.
fn kvs(resp: &pb::TxnResponse, i: usize) -> &[lab_proto::etcd::mvccpb::KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(OpResponse::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

/// A record as the commit sees it: its mod revision when read, its value
/// as the batch has left it so far, and whether the batch changed it.
#[derive(Debug)]
struct Slot {
    rev: i64,
    value: Option<Vec<u8>>,
    dirty: bool,
}

/// What one planned commit sends.
struct Plan {
    txn: pb::TxnRequest,
}

/// How a transaction came out.
enum Outcome {
    Done,
    /// A compare failed: the fence, or something else moved.
    Fenced,
    Moved,
}

impl EtcdStore {
    /// Connect to the members and check that one answers (within the
    /// config's `retry_for`).
    pub fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend {
                op: "start the etcd client",
                source: Box::new(e),
            })?;
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let client = {
            let _guard = rt.enter();
            EtcdClient::new(config).map_err(backend("connect to etcd"))?
        };
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the OS random source works");
        let store = Self {
            rt: Some(rt),
            client: Arc::new(client),
            keys,
            fence: Mutex::new(None),
            instance: u128::from_le_bytes(b),
            commits: AtomicU64::new(0),
        };
        store.last_event_seq()?;
        Ok(store)
    }

    /// The client (the election uses it from the server's runtime).
    pub fn client(&self) -> Arc<EtcdClient> {
        self.client.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// From now on every write carries this fence (`None`: none).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
            .block_on(f)
    }

    /// Range reads in one transaction (one consistent snapshot).
    async fn read(
        &self,
        op: &'static str,
        ranges: Vec<pb::RangeRequest>,
    ) -> Result<pb::TxnResponse, StoreError> {
        let txn = pb::TxnRequest {
            compare: Vec::new(),
            success: ranges
                .into_iter()
                .map(|r| pb::RequestOp {
                    request: Some(Op::RequestRange(r)),
                })
                .collect(),
            failure: Vec::new(),
        };
        self.client.txn(op, txn).await.map_err(backend(op))
    }

    /// The record at each of `keys` (`None`: absent), `chunk` keys per
    /// read transaction.
    async fn get_kvs(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<lab_proto::etcd::mvccpb::KeyValue>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.client.config().max_txn_ops.clamp(1, 128)) {
            let resp = self
                .read(
                    op,
                    chunk
                        .iter()
                        .map(|k| pb::RangeRequest {
                            key: k.clone(),
                            ..Default::default()
                        })
                        .collect(),
                )
                .await?;
            for i in 0..chunk.len() {
                out.push(kvs(&resp, i).first().cloned());
            }
        }
        Ok(out)
    }

    /// Values of single keys (`None`: absent).
    async fn get_many(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        Ok(self
            .get_kvs(op, keys)
            .await?
            .into_iter()
            .map(|kv| kv.map(|kv| kv.value))
            .collect())
    }

    /// Send a guarded write: `ops` if every compare holds (and the fence,
    /// if set), with the commit token; else read the token back.
    async fn write(
        &self,
        op: &'static str,
        compare: Vec<pb::Compare>,
        ops: Vec<pb::RequestOp>,
    ) -> Result<Outcome, StoreError> {
        let (txn, token) = self.guarded(compare, ops);
        self.send(op, txn, &token).await
    }

    /// The transaction of a guarded write, with its commit token.
    fn guarded(
        &self,
        mut compare: Vec<pb::Compare>,
        mut ops: Vec<pb::RequestOp>,
    ) -> (pb::TxnRequest, Vec<u8>) {
        let token = format!(
            "{:032x}-{}",
            self.instance,
            self.commits.fetch_add(1, Ordering::Relaxed)
        )
        .into_bytes();
        let mut failure = vec![get(self.keys.commit_token())];
        if let Some(f) = &self.fence() {
            compare.push(fence_compare(f));
            failure.push(get(f.key.clone()));
        }
        ops.push(put(self.keys.commit_token(), token.clone()));
        (
            pb::TxnRequest {
                compare,
                success: ops,
                failure,
            },
            token,
        )
    }

    /// Send a guarded write (again, after a lost answer: its compares make
    /// a second application fail, and its token tells it landed).
    async fn send(
        &self,
        op: &'static str,
        txn: pb::TxnRequest,
        token: &[u8],
    ) -> Result<Outcome, StoreError> {
        let fence = self.fence();
        let resp = self.client.txn(op, txn).await.map_err(backend(op))?;
        if resp.succeeded {
            return Ok(Outcome::Done);
        }
        if kvs(&resp, 0).first().is_some_and(|kv| kv.value == token) {
            // An earlier send of this very transaction landed; its answer
            // was lost.
            return Ok(Outcome::Done);
        }
        if let Some(f) = &fence
            && kvs(&resp, 1).first().map(|kv| kv.create_revision) != Some(f.create_revision)
        {
            return Ok(Outcome::Fenced);
        }
        Ok(Outcome::Moved)
    }

    /// For tests: commit `batch` by sending its transaction twice, as the
    /// client does when the first answer is lost. `Ok` means the second
    /// send was recognized as the first one having landed.
    #[doc(hidden)]
    pub fn commit_sent_twice(&self, batch: &Batch) -> Result<(), StoreError> {
        self.block_on(async {
            let plan = self.plan(batch).await?;
            let (txn, token) = self.guarded(plan.txn.compare, plan.txn.success);
            let first = self.send("commit", txn.clone(), &token).await?;
            if !matches!(first, Outcome::Done) {
                return Err(StoreError::Backend {
                    op: "commit",
                    source: "the first send did not land".into(),
                });
            }
            match self.send("commit", txn, &token).await? {
                Outcome::Done => Ok(()),
                Outcome::Fenced => Err(self.fenced()),
                Outcome::Moved => Err(StoreError::Backend {
                    op: "commit",
                    source: "the resend was taken for a conflict".into(),
                }),
            }
        })
    }

    fn fenced(&self) -> StoreError {
        let key = self
            .fence()
            .map(|f| String::from_utf8_lossy(&f.key).into_owned())
            .unwrap_or_default();
        StoreError::Fenced { key }
    }

    /// Read what the batch touches and apply the compare-and-set rules in
    /// order; the transaction that writes the result if nothing moved.
    async fn plan(&self, batch: &Batch) -> Result<Plan, StoreError> {
        let k = &self.keys;
        let mut wanted: Vec<Vec<u8>> = vec![k.last_event()];
        let mut drop_hooks = false;
        for w in &batch.writes {
            match w {
                Write::Host(h) => wanted.push(k.host(h.name.as_str())),
                Write::DeleteHost { name, .. } => wanted.push(k.host(name.as_str())),
                Write::Lease(l) => wanted.push(k.lease(l.id)),
                Write::DeleteLease { id, .. } => wanted.push(k.lease(id)),
                Write::Waiter(w) => wanted.push(k.waiter(w.id)),
                Write::DeleteWaiter(id) => wanted.push(k.waiter(*id)),
                Write::Booking(b) => wanted.push(k.booking(b.id)),
                Write::DeleteBooking { id, .. } => wanted.push(k.booking(*id)),
                Write::Outbox(r) => wanted.push(k.outbox(r.seq, &r.hook)),
                Write::DropOutbox { .. } => drop_hooks = true,
            }
        }
        wanted.sort();
        wanted.dedup();
        let mut ranges: Vec<pb::RangeRequest> = wanted
            .iter()
            .map(|key| pb::RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .collect();
        if drop_hooks {
            let dir = k.dir("outbox");
            ranges.push(pb::RangeRequest {
                range_end: prefix_end(&dir),
                key: dir,
                ..Default::default()
            });
        }
        let n = ranges.len();
        let resp = self.read("read before commit", ranges).await?;
        let mut slots: BTreeMap<Vec<u8>, Slot> = BTreeMap::new();
        for i in 0..n {
            for kv in kvs(&resp, i) {
                slots.insert(
                    kv.key.clone(),
                    Slot {
                        rev: kv.mod_revision,
                        value: Some(kv.value.clone()),
                        dirty: false,
                    },
                );
            }
        }
        for key in wanted {
            slots.entry(key).or_insert(Slot {
                rev: 0,
                value: None,
                dirty: false,
            });
        }
        // Keys written without a compare (event log, indexes, outbox_due):
        // Some = put, None = delete; the last word per key wins.
        let mut derived: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        fn slot(slots: &mut BTreeMap<Vec<u8>, Slot>, key: Vec<u8>) -> &mut Slot {
            slots.entry(key).or_insert(Slot {
                rev: 0,
                value: None,
                dirty: false,
            })
        }
        fn set(s: &mut Slot, value: Option<Vec<u8>>) {
            s.value = value;
            s.dirty = true;
        }
        let host_gen = |key: &[u8], s: &Slot| -> Result<Option<Generation>, StoreError> {
            s.value
                .as_deref()
                .map(|v| decode::<HostRecord>(key, v).map(|h| h.generation))
                .transpose()
        };
        let lease_gen = |key: &[u8], s: &Slot| -> Result<Option<Generation>, StoreError> {
            s.value
                .as_deref()
                .map(|v| decode::<Lease>(key, v).map(|l| l.generation))
                .transpose()
        };
        let booking_gen = |key: &[u8], s: &Slot| -> Result<Option<Generation>, StoreError> {
            s.value
                .as_deref()
                .map(|v| decode::<Booking>(key, v).map(|b| b.generation))
                .transpose()
        };
        for w in &batch.writes {
            match w {
                Write::Host(h) => {
                    let key = k.host(h.name.as_str());
                    let s = slot(&mut slots, key.clone());
                    check_generation(w.key(), host_gen(&key, s)?, h.generation)?;
                    set(s, Some(encode(h)));
                }
                Write::DeleteHost { name, generation } => {
                    let key = k.host(name.as_str());
                    let s = slot(&mut slots, key.clone());
                    check_delete(w.key(), host_gen(&key, s)?, *generation)?;
                    set(s, None);
                }
                Write::Lease(l) => {
                    let key = k.lease(l.id);
                    let s = slot(&mut slots, key.clone());
                    check_generation(w.key(), lease_gen(&key, s)?, l.generation)?;
                    set(s, Some(encode(l)));
                }
                Write::DeleteLease { id, generation } => {
                    let key = k.lease(id);
                    let s = slot(&mut slots, key.clone());
                    check_delete(w.key(), lease_gen(&key, s)?, *generation)?;
                    set(s, None);
                }
                Write::Waiter(waiter) => {
                    let s = slot(&mut slots, k.waiter(waiter.id));
                    check_waiter(waiter.id, true, s.value.is_some())?;
                    set(s, Some(encode(waiter)));
                }
                Write::DeleteWaiter(id) => {
                    let s = slot(&mut slots, k.waiter(*id));
                    check_waiter(*id, false, s.value.is_some())?;
                    set(s, None);
                }
                Write::Booking(b) => {
                    let key = k.booking(b.id);
                    let s = slot(&mut slots, key.clone());
                    check_generation(w.key(), booking_gen(&key, s)?, b.generation)?;
                    set(s, Some(encode(b)));
                }
                Write::DeleteBooking { id, generation } => {
                    let key = k.booking(*id);
                    let s = slot(&mut slots, key.clone());
                    check_delete(w.key(), booking_gen(&key, s)?, *generation)?;
                    set(s, None);
                }
                Write::Outbox(row) => {
                    let key = k.outbox(row.seq, &row.hook);
                    let s = slot(&mut slots, key.clone());
                    if let Some(old) = &s.value {
                        let old: OutboxRow = decode(&key, old)?;
                        derived.insert(k.outbox_due(&old), None);
                    }
                    set(s, Some(encode(row)));
                    derived.insert(k.outbox_due(row), Some(Vec::new()));
                }
                Write::DropOutbox { hook } => {
                    let dir = k.dir("outbox");
                    let end = prefix_end(&dir);
                    for (key, s) in slots.range_mut(dir..end) {
                        let Some(v) = &s.value else { continue };
                        if k.parse_outbox(key).is_some_and(|(_, h)| h == *hook) {
                            let old: OutboxRow = decode(key, v)?;
                            derived.insert(k.outbox_due(&old), None);
                            set(s, None);
                        }
                    }
                }
            }
        }
        let last_key = k.last_event();
        let last_slot = slot(&mut slots, last_key.clone());
        let last = match &last_slot.value {
            Some(v) => std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&last_key).into_owned(),
                    source: serde::de::Error::custom("not a number"),
                })?,
            None => 0,
        };
        check_event_seqs(last, &batch.events)?;
        for e in &batch.events {
            let mut keys = k.event_keys(e).into_iter();
            derived.insert(keys.next().expect("the event's key"), Some(encode(e)));
            for index in keys {
                derived.insert(index, Some(Vec::new()));
            }
        }
        if let Some(e) = batch.events.last() {
            set(last_slot, Some(e.seq.to_string().into_bytes()));
        }
        let mut compare = Vec::new();
        let mut success = Vec::new();
        for (key, s) in slots {
            if !s.dirty {
                continue;
            }
            compare.push(same_revision(key.clone(), s.rev));
            derived.remove(&key);
            success.push(match s.value {
                Some(v) => put(key, v),
                None => delete(key),
            });
        }
        for (key, v) in derived {
            success.push(match v {
                Some(v) => put(key, v),
                None => delete(key),
            });
        }
        Ok(Plan {
            txn: pb::TxnRequest {
                compare,
                success,
                failure: Vec::new(),
            },
        })
    }

    async fn commit_async(&self, batch: &Batch) -> Result<(), StoreError> {
        for _ in 0..5 {
            let plan = self.plan(batch).await?;
            match self
                .write("commit", plan.txn.compare, plan.txn.success)
                .await?
            {
                Outcome::Done => return Ok(()),
                Outcome::Fenced => return Err(self.fenced()),
                // Planned again from a fresh read: a real conflict is
                // found there.
                Outcome::Moved => continue,
            }
        }
        Err(StoreError::Backend {
            op: "commit",
            source: "the records kept changing under the commit (another writer?)".into(),
        })
    }

    async fn last_event_async(&self) -> Result<u64, StoreError> {
        let key = self.keys.last_event();
        let v = self
            .get_many("read last event", std::slice::from_ref(&key))
            .await?;
        match v.into_iter().next().flatten() {
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source: serde::de::Error::custom("not a number"),
                }),
            None => Ok(0),
        }
    }

    async fn load_async(&self) -> Result<Snapshot, StoreError> {
        let k = &self.keys;
        let dir = |name: &str| {
            let d = k.dir(name);
            pb::RangeRequest {
                range_end: prefix_end(&d),
                key: d,
                ..Default::default()
            }
        };
        let resp = self
            .read(
                "load",
                vec![
                    dir("host"),
                    dir("lease"),
                    dir("waiter"),
                    pb::RangeRequest {
                        key: k.last_event(),
                        ..Default::default()
                    },
                    dir("booking"),
                ],
            )
            .await?;
        let mut snap = Snapshot::default();
        for kv in kvs(&resp, 0) {
            snap.hosts.push(decode(&kv.key, &kv.value)?);
        }
        for kv in kvs(&resp, 1) {
            snap.leases.push(decode(&kv.key, &kv.value)?);
        }
        for kv in kvs(&resp, 2) {
            snap.waiters.push(decode(&kv.key, &kv.value)?);
        }
        for kv in kvs(&resp, 4) {
            snap.bookings.push(decode(&kv.key, &kv.value)?);
        }
        if let Some(kv) = kvs(&resp, 3).first() {
            snap.last_event_seq = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    source: serde::de::Error::custom("not a number"),
                })?;
        }
        Ok(snap)
    }

    async fn events_async(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        let op = "list events";
        let mut out = Vec::new();
        if query.limit == 0 {
            return Ok(out);
        }
        let from = format!("{:020}", query.after_seq.saturating_add(1));
        let index = match (&query.lease, &query.host) {
            (Some(l), _) => Some(self.keys.lease_index(l)),
            (None, Some(h)) => Some(self.keys.host_index(h.as_str())),
            (None, None) => None,
        };
        let Some(index) = index else {
            let dir = self.keys.dir("event");
            let resp = self
                .client
                .range(
                    op,
                    pb::RangeRequest {
                        key: [dir.as_slice(), from.as_bytes()].concat(),
                        range_end: prefix_end(&dir),
                        limit: i64::try_from(query.limit).unwrap_or(i64::MAX),
                        ..Default::default()
                    },
                )
                .await
                .map_err(backend(op))?;
            for kv in resp.kvs {
                out.push(decode(&kv.key, &kv.value)?);
            }
            return Ok(out);
        };
        // Walk the index a page at a time; read only the events it names.
        let end = prefix_end(&index);
        let mut start = [index.as_slice(), from.as_bytes()].concat();
        let page = query.limit.clamp(16, 1000);
        loop {
            let resp = self
                .client
                .range(
                    op,
                    pb::RangeRequest {
                        key: start.clone(),
                        range_end: end.clone(),
                        limit: page as i64,
                        keys_only: true,
                        ..Default::default()
                    },
                )
                .await
                .map_err(backend(op))?;
            let seqs: Vec<u64> = resp.kvs.iter().filter_map(|kv| tail_seq(&kv.key)).collect();
            let keys: Vec<Vec<u8>> = seqs.iter().map(|s| self.keys.event(*s)).collect();
            for (key, v) in keys.iter().zip(self.get_many(op, &keys).await?) {
                // Pruned with its index entries; tolerate a missing one.
                let Some(v) = v else { continue };
                let e: EventRecord = decode(key, &v)?;
                if query.matches(&e) {
                    out.push(e);
                    if out.len() >= query.limit {
                        return Ok(out);
                    }
                }
            }
            match resp.kvs.last() {
                Some(kv) if resp.more => {
                    start = kv.key.clone();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    async fn prune_async(&self, before: Timestamp, max: usize) -> Result<Pruned, StoreError> {
        let op = "prune events";
        let last = self.last_event_async().await?;
        let dir = self.keys.dir("event");
        let resp = self
            .client
            .range(
                op,
                pb::RangeRequest {
                    key: dir.clone(),
                    range_end: self.keys.event(last),
                    limit: i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await
            .map_err(backend(op))?;
        let mut old = Vec::new();
        for kv in &resp.kvs {
            let e: EventRecord = decode(&kv.key, &kv.value)?;
            if e.time >= before || old.len() > max {
                break;
            }
            old.push(e);
        }
        let more = old.len() > max;
        old.truncate(max);
        if old.is_empty() {
            return Ok(Pruned { events: 0, more });
        }
        let mut keys: Vec<Vec<u8>> = old.iter().flat_map(|e| self.keys.event_keys(e)).collect();
        keys.sort();
        keys.dedup();
        match self
            .write(op, Vec::new(), keys.into_iter().map(delete).collect())
            .await?
        {
            Outcome::Done => Ok(Pruned {
                events: old.len(),
                more,
            }),
            _ => Err(self.fenced()),
        }
    }

    /// Rows by key (absent ones skipped), with their mod revisions.
    async fn outbox_rows(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, i64, OutboxRow)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.get_kvs(op, keys).await?.into_iter().flatten() {
            let row = decode(&kv.key, &kv.value)?;
            out.push((kv.key, kv.mod_revision, row));
        }
        Ok(out)
    }

    /// Apply `f` (rows read → the rows to delete and to put) under compares
    /// on the rows it read, again from a fresh read if one moved.
    async fn outbox_change<T>(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        f: impl Fn(Vec<(Vec<u8>, i64, OutboxRow)>) -> (Vec<OutboxRow>, Vec<OutboxRow>, T),
    ) -> Result<T, StoreError> {
        for _ in 0..5 {
            let rows = self.outbox_rows(op, keys).await?;
            let compare: Vec<pb::Compare> = rows
                .iter()
                .map(|(key, rev, _)| same_revision(key.clone(), *rev))
                .collect();
            let old: BTreeMap<Vec<u8>, OutboxRow> = rows
                .iter()
                .map(|(key, _, row)| (key.clone(), row.clone()))
                .collect();
            let (deletes, puts, result) = f(rows);
            let mut ops: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for row in &deletes {
                ops.insert(self.keys.outbox(row.seq, &row.hook), None);
                ops.insert(self.keys.outbox_due(row), None);
            }
            for row in &puts {
                let key = self.keys.outbox(row.seq, &row.hook);
                if let Some(o) = old.get(&key) {
                    ops.insert(self.keys.outbox_due(o), None);
                }
                ops.insert(key, Some(encode(row)));
                ops.insert(self.keys.outbox_due(row), Some(Vec::new()));
            }
            if ops.is_empty() {
                return Ok(result);
            }
            let ops = ops
                .into_iter()
                .map(|(k, v)| match v {
                    Some(v) => put(k, v),
                    None => delete(k),
                })
                .collect();
            match self.write(op, compare, ops).await? {
                Outcome::Done => return Ok(result),
                Outcome::Fenced => return Err(self.fenced()),
                Outcome::Moved => continue,
            }
        }
        Err(StoreError::Backend {
            op,
            source: "the outbox kept changing under the change".into(),
        })
    }

    async fn outbox_due_async(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let op = "read outbox";
        if limit == 0 {
            return Ok(Vec::new());
        }
        let dir = self.keys.dir("outbox_due");
        let resp = self
            .client
            .range(
                op,
                pb::RangeRequest {
                    key: dir.clone(),
                    range_end: [
                        dir.as_slice(),
                        sortable(Timestamp(now.0.saturating_add(1))).as_bytes(),
                    ]
                    .concat(),
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    keys_only: true,
                    ..Default::default()
                },
            )
            .await
            .map_err(backend(op))?;
        let keys: Vec<Vec<u8>> = resp
            .kvs
            .iter()
            .filter_map(|kv| self.keys.parse_due(&kv.key))
            .map(|(_, seq, hook)| self.keys.outbox(seq, &hook))
            .collect();
        Ok(self
            .outbox_rows(op, &keys)
            .await?
            .into_iter()
            .map(|(_, _, r)| r)
            .collect())
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.block_on(self.load_async())
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.block_on(self.commit_async(batch))
    }

    fn events(&self, query: &EventQuery) -> Result<Vec<EventRecord>, StoreError> {
        self.block_on(self.events_async(query))
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        self.block_on(self.last_event_async())
    }

    fn prune_events(&self, before: Timestamp, max: usize) -> Result<Pruned, StoreError> {
        self.block_on(self.prune_async(before, max))
    }

    fn outbox_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        self.block_on(self.outbox_due_async(now, limit))
    }

    fn outbox_next_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let op = "read outbox";
        let dir = self.keys.dir("outbox_due");
        let resp = self
            .block_on(self.client.range(
                op,
                pb::RangeRequest {
                    range_end: prefix_end(&dir),
                    key: dir,
                    limit: 1,
                    keys_only: true,
                    ..Default::default()
                },
            ))
            .map_err(backend(op))?;
        Ok(resp
            .kvs
            .first()
            .and_then(|kv| self.keys.parse_due(&kv.key))
            .map(|(t, _, _)| t))
    }

    fn outbox_settle(&self, outcomes: &[Settle]) -> Result<(), StoreError> {
        let keys: Vec<Vec<u8>> = outcomes
            .iter()
            .map(|o| match o {
                Settle::Delete((seq, hook)) => self.keys.outbox(*seq, hook),
                Settle::Retry(row) => self.keys.outbox(row.seq, &row.hook),
            })
            .collect();
        self.block_on(self.outbox_change("settle outbox", &keys, |rows| {
            let stored: BTreeMap<(u64, String), OutboxRow> =
                rows.into_iter().map(|(_, _, r)| (r.key(), r)).collect();
            let mut deletes = Vec::new();
            let mut puts = Vec::new();
            for o in outcomes {
                match o {
                    Settle::Delete(key) => deletes.extend(stored.get(key).cloned()),
                    // A row that is gone (its hook removed) stays gone.
                    Settle::Retry(row) if stored.contains_key(&row.key()) => puts.push(row.clone()),
                    Settle::Retry(_) => {}
                }
            }
            (deletes, puts, ())
        }))
    }

    fn outbox_len(&self) -> Result<u64, StoreError> {
        let op = "read outbox";
        let dir = self.keys.dir("outbox");
        let resp = self
            .block_on(self.client.range(
                op,
                pb::RangeRequest {
                    range_end: prefix_end(&dir),
                    key: dir,
                    count_only: true,
                    ..Default::default()
                },
            ))
            .map_err(backend(op))?;
        Ok(u64::try_from(resp.count).unwrap_or(0))
    }

    fn outbox_trim(&self, max: u64, step: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let op = "trim outbox";
        let len = self.outbox_len()?;
        let excess = usize::try_from(len.saturating_sub(max)).unwrap_or(usize::MAX);
        if excess == 0 || step == 0 {
            return Ok(Vec::new());
        }
        let dir = self.keys.dir("outbox");
        let resp = self
            .block_on(self.client.range(
                op,
                pb::RangeRequest {
                    range_end: prefix_end(&dir),
                    key: dir,
                    limit: i64::try_from(excess.min(step)).unwrap_or(i64::MAX),
                    keys_only: true,
                    ..Default::default()
                },
            ))
            .map_err(backend(op))?;
        let keys: Vec<Vec<u8>> = resp.kvs.into_iter().map(|kv| kv.key).collect();
        self.block_on(self.outbox_change(op, &keys, |rows| {
            let rows: Vec<OutboxRow> = rows.into_iter().map(|(_, _, r)| r).collect();
            (rows.clone(), Vec::new(), rows)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_as_numbers() {
        let k = Keys {
            prefix: "/lab/".into(),
        };
        assert!(k.event(9) < k.event(10));
        assert!(k.waiter(99) < k.waiter(100));
        assert!(sortable(Timestamp(-5)) < sortable(Timestamp(0)));
        assert!(sortable(Timestamp(0)) < sortable(Timestamp(7)));
        assert_eq!(unsortable(&sortable(Timestamp(-5))), Some(Timestamp(-5)));
        let row = super::super::contract::row(12, "a/b", 3);
        let due = k.outbox_due(&row);
        assert_eq!(k.parse_due(&due), Some((Timestamp(3), 12, "a/b".into())));
        assert_eq!(
            k.parse_outbox(&k.outbox(12, "a/b")),
            Some((12, "a/b".into()))
        );
        assert_eq!(prefix_end(b"/lab/event/"), b"/lab/event0".to_vec());
        assert_eq!(tail_seq(&k.event(42)), Some(42));
    }
}
