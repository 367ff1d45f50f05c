//! The application core: one actor task owns the lab's state (hosts, leases,
//! the wait queue) and is the only writer of the store. [`Core`] is its
//! cloneable handle; a gRPC handler calls one method of it (or, for power,
//! consoles and agents, one method of the rack registry, `crate::racks`,
//! which reads the core through the same handle). Who may do what is
//! decided in [`policy`], for the core and the rack registry alike.
//!
//! The actor works in batches: it takes every request waiting in its channel,
//! applies them (and any expiries that are due) to its state through the pure
//! state machines, runs one scheduling pass, commits all resulting records and
//! events in **one** durable transaction, and only then replies. Concurrent
//! requests thus share one fsync, and nothing is acknowledged before it is on
//! disk. If a commit fails, every request of the batch gets UNAVAILABLE and
//! the actor reloads its state from the store.
//!
//! Waiting requests are in the store too (written in the commit that queues
//! them, deleted in the one that grants or withdraws them). After a restart
//! (or a failed commit) they wait *detached*: they keep their place until
//! their client resumes them by request id ([`AcquireRequest::request_id`]),
//! or are withdrawn after [`CoreConfig::reattach_grace`]. Retention removes
//! ended leases and old events in bounded steps ([`CoreConfig::retention`]).
//!
//! A `LEASE_EXPIRING` event goes out [`CoreConfig::expiry_warning`] before an
//! active lease expires (once per expiry; a renewal re-arms it). Every
//! committed event that a webhook wants gets an outbox row in the same
//! commit (`crate::webhooks`); the delivery task is woken after such a
//! commit ([`Core::outbox_wake`]).

mod actor;
pub use actor::error_chain;
pub mod clock;
mod free;
pub mod policy;
pub mod reclaim;
mod share;
pub mod stats;

use crate::events::{EventKind, EventRecord};
use crate::health::HostVerdict;
use crate::inventory::{HostSpec, Inventory, InventoryError};
use crate::lease::booking::{Booking, BookingId, BookingKind};
use crate::lease::{HostRecord, Lease, LeaseSpec, TransitionError};
use crate::projects::Policy;
use crate::store::{EventQuery, Store, StoreError};
use crate::types::{Caller, HostName, LeaseId, Principal, RequestId, Timestamp, WaiterId};
use crate::webhooks::SharedWebhooks;
use clock::Clock;
use policy::Denied;
use reclaim::Reclaimer;
use stats::CoreStats;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot, watch};

/// Limits the server enforces on leases. (The TTL of a request that names
/// none is filled in where the request is read: `grpc::Api`'s default TTL.)
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Longest TTL a request or renewal may ask for.
    pub max_ttl: Duration,
    /// Hard cap on a lease's life from its grant, renewals included.
    pub max_lifetime: Duration,
    /// Most requests handled in one batch (one commit).
    pub max_batch: usize,
    /// Where the inventory is re-read from on reload.
    pub inventory_path: PathBuf,
    /// Highest priority roles `ci` and `developer` may ask for (operators:
    /// any).
    pub max_user_priority: i32,
    /// Most requests one principal may have waiting at once.
    pub max_waiting_per_principal: usize,
    /// How long a waiting request whose client is away after a restart (or
    /// a failed commit) keeps its place before it is withdrawn.
    pub reattach_grace: Duration,
    /// Ended leases and events older than this are removed.
    pub retention: Duration,
    /// Most leases, and most events, one retention step removes (one
    /// transaction each).
    pub retention_batch: usize,
    /// This many provisioning failures attributed to a host within
    /// `quarantine_window` quarantine it (fewer make it suspect).
    pub quarantine_after: usize,
    pub quarantine_window: Duration,
    /// A health check's lease lasts this long; no READY by then fails it.
    pub health_check_timeout: Duration,
    /// Check a host after this many leases (0: never).
    pub health_check_every: u32,
    /// Check a host that has been free this long (`None`: never).
    pub health_check_idle: Option<Duration>,
    /// A `LEASE_EXPIRING` event this long before an active lease expires
    /// (zero: none). A lease whose TTL is not longer gets none.
    pub expiry_warning: Duration,
    /// The webhooks in force at start (then [`Core::set_webhooks`]).
    pub webhooks: SharedWebhooks,
    /// Projects, shares and quotas in force at start (then
    /// [`Core::set_policy`]).
    pub policy: Arc<Policy>,
    /// A preemptible lease ends this long after its preemption notice.
    pub preempt_grace: Duration,
}

impl CoreConfig {
    pub fn new(inventory_path: PathBuf) -> Self {
        Self {
            max_ttl: Duration::from_secs(24 * 3600),
            max_lifetime: Duration::from_secs(7 * 24 * 3600),
            max_batch: 512,
            inventory_path,
            max_user_priority: 10,
            max_waiting_per_principal: 64,
            reattach_grace: Duration::from_secs(60),
            retention: Duration::from_secs(90 * 24 * 3600),
            retention_batch: 1000,
            quarantine_after: 2,
            quarantine_window: Duration::from_secs(3600),
            health_check_timeout: Duration::from_secs(600),
            health_check_every: 0,
            health_check_idle: None,
            expiry_warning: Duration::from_secs(600),
            webhooks: SharedWebhooks::default(),
            policy: Arc::default(),
            preempt_grace: Duration::from_secs(300),
        }
    }

    /// How often retention runs: a tenth of the retention period, between
    /// 1 s and 1 min (more often while it has a backlog).
    pub fn retention_interval(&self) -> Duration {
        (self.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// Why the core refused or failed a request. Mapped to gRPC codes in one
/// place (`grpc::status`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("no {what} named {name}")]
    NotFound { what: &'static str, name: String },
    #[error(transparent)]
    PermissionDenied(#[from] Denied),
    #[error("the request can never be met: {reason}")]
    Unsatisfiable { reason: String },
    #[error(
        "no matching host can be granted now (busy, in maintenance, or held for earlier requests)"
    )]
    Busy,
    /// Nothing can be granted now, and bookings ahead are why (or part of
    /// why): `reason` names one.
    #[error("no matching host can be granted now: {reason}")]
    BusyBooked { reason: String },
    /// A booking or a running lease is in the way of a new booking.
    #[error("{reason}")]
    BookingConflict { reason: String },
    #[error(
        "{principal} already has {max} waiting requests (the most one principal may have); wait for one to be granted or withdraw one"
    )]
    TooManyWaiting { principal: Principal, max: usize },
    #[error("another Acquire with request id {request_id} took this request over")]
    Superseded { request_id: RequestId },
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("the store could not commit the change; retry")]
    Store(#[source] Arc<StoreError>),
    #[error("the inventory was not reloaded")]
    Inventory(#[source] Arc<InventoryError>),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// A host as the API shows it: inventory description, lease-cycle record and
/// the lease holding it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub spec: Option<HostSpec>,
    pub record: HostRecord,
    pub lease: Option<Lease>,
    /// Why the host cannot be driven now; `None` when it can.
    pub unreachable: Option<String>,
}

/// What a waiting acquire sees.
#[derive(Debug, Clone)]
pub enum WaitState {
    /// Still in the queue. `waiter` is the sequence number of the request's
    /// LEASE_REQUESTED event (0 until the server has taken the request).
    Queued {
        waiter: WaiterId,
        position: u32,
        queue_length: u32,
        eta: Option<Timestamp>,
        /// The quota that keeps it waiting whatever is free, said for its
        /// queue line (`None`: only free hosts are missing).
        held_back: Option<String>,
        /// A booking of a host it named that is in its way, if one is.
        waiting_for: Option<String>,
    },
    /// Done: the lease.
    Granted(Lease),
    /// Done: refused or failed.
    Failed(CoreError),
}

impl WaitState {
    pub fn is_final(&self) -> bool {
        !matches!(self, WaitState::Queued { .. })
    }
}

/// What an Acquire asks for.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    pub spec: LeaseSpec,
    /// Refuse (RESOURCE_EXHAUSTED) instead of waiting.
    pub no_wait: bool,
    /// The client's id of the request: an Acquire with the id of a request
    /// of the same principal that still waits takes it over (keeping its
    /// place); one whose request was granted gets that lease.
    pub request_id: Option<RequestId>,
    /// Its lease may be preempted for a request that is not (and it is
    /// served after every such request).
    pub preemptible: bool,
}

/// A lease request in progress. Dropping it before the grant withdraws the
/// request from the queue.
#[derive(Debug)]
pub struct Acquisition {
    rx: watch::Receiver<WaitState>,
    cancel: Option<(mpsc::Sender<Command>, u64)>,
    last_queued: Option<tokio::time::Instant>,
    /// A `Queued` state was seen (marked as seen in the channel) but not
    /// returned yet because of the rate limit.
    pending: bool,
}

/// Queue positions change with every grant; a waiter hears of them at most
/// this often (a grant or failure is never delayed).
pub const QUEUE_UPDATE_INTERVAL: Duration = Duration::from_secs(1);

impl Acquisition {
    /// The next state: `Queued` changes (at most one per
    /// [`QUEUE_UPDATE_INTERVAL`], always the latest, and never one lost:
    /// a change seen during the wait is returned when the wait is over),
    /// then the final one, without delay. `None` after the final state was
    /// returned. Cancel-safe: a state seen by a call that was dropped is
    /// returned by the next call.
    pub async fn next(&mut self) -> Option<WaitState> {
        self.cancel.as_ref()?;
        loop {
            if !self.pending && self.rx.changed().await.is_err() {
                return Some(self.finish(WaitState::Failed(CoreError::ShuttingDown)));
            }
            let state = self.rx.borrow_and_update().clone();
            if state.is_final() {
                return Some(self.finish(state));
            }
            self.pending = true;
            if let Some(t) = self.last_queued {
                let due = t + QUEUE_UPDATE_INTERVAL;
                if tokio::time::Instant::now() < due {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        // Look again: a final state goes out at once, a
                        // newer position replaces this one.
                        r = self.rx.changed() => {
                            if r.is_err() {
                                return Some(self.finish(WaitState::Failed(CoreError::ShuttingDown)));
                            }
                            continue;
                        }
                    }
                    // The latest state when the wait is over.
                    continue;
                }
            }
            self.pending = false;
            self.last_queued = Some(tokio::time::Instant::now());
            return Some(state);
        }
    }

    fn finish(&mut self, state: WaitState) -> WaitState {
        self.cancel = None;
        self.pending = false;
        state
    }
}

impl Drop for Acquisition {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.cancel.take() {
            // Best effort: if the channel is full the actor is busy and the
            // request will be withdrawn when it notices the receiver is gone.
            let _ = tx.try_send(Command::Withdraw { handle });
        }
    }
}

/// An event from outside the lease cycle (a forward opened or closed),
/// committed and broadcast like the core's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub actor: Principal,
    pub kind: EventKind,
    pub hosts: Vec<HostName>,
    pub lease: Option<LeaseId>,
    pub detail: String,
}

/// Result of an inventory reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    pub hosts: usize,
    pub added: usize,
    pub removed: usize,
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// A booking to make (`lease::booking`), its names already parsed; the
/// core checks the rest (window, hosts, quotas, conflicts).
#[derive(Debug, Clone)]
pub struct BookingRequest {
    pub kind: BookingKind,
    /// These hosts; or, when empty, `count` hosts with `flags` and `arch`
    /// chosen by the core.
    pub hosts: Vec<HostName>,
    pub flags: std::collections::BTreeSet<crate::types::Flag>,
    pub arch: Option<crate::types::Arch>,
    pub count: u32,
    pub start: Timestamp,
    pub duration: Duration,
    pub comment: String,
    pub profile: Option<crate::types::ProfileName>,
}

#[derive(Debug)]
enum Command {
    Acquire {
        caller: Caller,
        /// Identifies the request to `Withdraw` before it has a waiter id.
        handle: u64,
        request: AcquireRequest,
        state: watch::Sender<WaitState>,
    },
    Withdraw {
        handle: u64,
    },
    Renew {
        caller: Caller,
        lease: LeaseId,
        ttl: Option<Duration>,
        reply: Reply<Lease>,
    },
    Release {
        caller: Caller,
        lease: LeaseId,
        reply: Reply<Lease>,
    },
    GetLease {
        lease: LeaseId,
        reply: Reply<Lease>,
    },
    ListLeases {
        query: LeaseQuery,
        reply: Reply<LeasePage>,
    },
    ListHosts {
        /// Only the hosts of this rack (retired ones included).
        rack: Option<crate::types::RackName>,
        reply: Reply<Vec<HostView>>,
    },
    GetHost {
        host: HostName,
        reply: Reply<HostView>,
    },
    CreateBooking {
        caller: Caller,
        request: BookingRequest,
        reply: Reply<Booking>,
    },
    CancelBooking {
        caller: Caller,
        id: BookingId,
        reply: Reply<Booking>,
    },
    ListBookings {
        host: Option<HostName>,
        reply: Reply<Vec<Booking>>,
    },
    SetMaintenance {
        caller: Caller,
        host: HostName,
        on: bool,
        reason: String,
        reply: Reply<HostView>,
    },
    SetQuarantine {
        caller: Caller,
        host: HostName,
        on: bool,
        reason: String,
        reply: Reply<HostView>,
    },
    HostVerdict {
        host: HostName,
        lease: LeaseId,
        verdict: HostVerdict,
    },
    CheckHost {
        caller: Caller,
        host: HostName,
        reply: Reply<HostView>,
    },
    SetInventory {
        actor: Principal,
        inventory: Arc<Inventory>,
        reply: Reply<ReloadSummary>,
    },
    Reclaimed {
        host: HostName,
        lease: LeaseId,
        /// The first error of a reclaim that had to be retried because the
        /// host failed it (not the lab: an agent away is no reason to check).
        failure: Option<String>,
    },
    SetUnreachable {
        hosts: BTreeMap<HostName, String>,
    },
    GetInventory {
        reply: Reply<Arc<Inventory>>,
    },
    ListQueue {
        reply: Reply<Vec<QueueEntry>>,
    },
    RecentLeases {
        limit: usize,
        reply: Reply<Vec<Lease>>,
    },
    Record {
        note: Note,
        reply: Reply<u64>,
    },
    SetWebhooks {
        webhooks: SharedWebhooks,
        reply: Reply<()>,
    },
    SetPolicy {
        policy: Arc<Policy>,
        reply: Reply<()>,
    },

    /// Finish the batch, then stop (waiting requests stay in the store).
    Stop {
        reply: Reply<()>,
    },
}

/// Where a page of leases ends: leases are listed by grant time, then id.
pub type LeaseKey = (Timestamp, LeaseId);

/// Which leases to list, one page.
#[derive(Debug, Clone, Default)]
pub struct LeaseQuery {
    /// Also released and expired leases.
    pub include_ended: bool,
    pub holder: Option<Principal>,
    /// Only leases after this key (the previous page's `next`).
    pub after: Option<LeaseKey>,
    /// At most this many leases.
    pub limit: usize,
}

/// One page of leases. `next` is set when more may follow (a page may
/// hold fewer than `limit` leases then: one call examines at most
/// [`LEASE_SCAN_LIMIT`] leases, so that a filter matching few of many does
/// not stall the actor).
#[derive(Debug, Clone, Default)]
pub struct LeasePage {
    pub leases: Vec<Lease>,
    pub next: Option<LeaseKey>,
}

/// A waiting request as the dashboard shows it: in service order.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub waiter: WaiterId,
    pub principal: Principal,
    pub spec: LeaseSpec,
    pub queued_at: Timestamp,
    /// 1-based place in the service order.
    pub position: u32,
    /// When its hosts are expected to be free (none: not known).
    pub eta: Option<Timestamp>,
    /// Its client is away (after a restart), within its grace period.
    pub detached: bool,
    /// Its principal's project.
    pub project: String,
    /// The quota that keeps it waiting, if one does.
    pub held_back: Option<String>,
    /// A booking of a host it named that is in its way, if one is.
    pub waiting_for: Option<String>,
}

/// Most leases one `ListLeases` call looks at.
pub const LEASE_SCAN_LIMIT: usize = 10_000;

/// One page of events; `more` when events after the last one match too.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    pub events: Vec<EventRecord>,
    pub more: bool,
}

/// Event queries read the store on the blocking pool; at most this many at
/// once, so a flood of them queues here instead of competing with the
/// actor's commits for the CPU.
pub const CONCURRENT_EVENT_READS: usize = 4;

/// The cloneable handle to the core actor.
#[derive(Clone)]
pub struct Core {
    tx: mpsc::Sender<Command>,
    /// Request handles, so that a dropped [`Acquisition`] can withdraw its
    /// request. (Waiter ids are the sequence numbers of the requests' events.)
    next_handle: Arc<AtomicU64>,
    events: broadcast::Sender<EventRecord>,
    store: Arc<dyn Store>,
    inventory_path: PathBuf,
    clock: Arc<dyn Clock>,
    event_reads: Arc<Semaphore>,
    stats: Arc<CoreStats>,
    outbox_wake: Arc<Notify>,
    /// The policy in force, for answers that need no actor (a principal's
    /// project); the actor has its own copy.
    policy: Arc<std::sync::RwLock<Arc<Policy>>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("inventory_path", &self.inventory_path)
            .finish()
    }
}

impl Core {
    /// Load the store, reconcile it with the inventory (commit), expire what
    /// ran out while the server was down, and start the actor.
    pub async fn start(
        config: CoreConfig,
        store: Arc<dyn Store>,
        inventory: Inventory,
        reclaimer: Arc<dyn Reclaimer>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Core, tokio::task::JoinHandle<()>), CoreError> {
        let (tx, rx) = mpsc::channel(8192);
        let (events, _) = broadcast::channel(8192);
        let inventory_path = config.inventory_path.clone();
        let stats = Arc::new(CoreStats::default());
        let outbox_wake = Arc::new(Notify::new());
        let policy = Arc::new(std::sync::RwLock::new(config.policy.clone()));
        let actor = actor::Actor::start(
            config,
            store.clone(),
            inventory,
            reclaimer,
            clock.clone(),
            actor::Links {
                tx: tx.clone(),
                events: events.clone(),
                stats: stats.clone(),
                outbox_wake: outbox_wake.clone(),
            },
        )
        .await?;
        let handle = tokio::spawn(actor.run(rx));
        let next_handle = Arc::new(AtomicU64::new(1));
        Ok((
            Core {
                tx,
                next_handle,
                events,
                store,
                inventory_path,
                clock,
                event_reads: Arc::new(Semaphore::new(CONCURRENT_EVENT_READS)),
                stats,
                outbox_wake,
                policy,
            },
            handle,
        ))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }

    /// Ask for hosts. Errors that need no queue (unsatisfiable, busy with
    /// `no_wait`) arrive as the final state.
    pub async fn acquire(
        &self,
        caller: Caller,
        request: AcquireRequest,
    ) -> Result<Acquisition, CoreError> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (state, mut rx) = watch::channel(WaitState::Queued {
            waiter: 0,
            position: 0,
            queue_length: 0,
            eta: None,
            held_back: None,
            waiting_for: None,
        });
        rx.mark_unchanged();
        self.tx
            .send(Command::Acquire {
                caller,
                handle,
                request,
                state,
            })
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        Ok(Acquisition {
            rx,
            cancel: Some((self.tx.clone(), handle)),
            last_queued: None,
            pending: false,
        })
    }

    pub async fn renew(
        &self,
        caller: Caller,
        lease: LeaseId,
        ttl: Option<Duration>,
    ) -> Result<Lease, CoreError> {
        self.call(|reply| Command::Renew {
            caller,
            lease,
            ttl,
            reply,
        })
        .await
    }

    pub async fn release(&self, caller: Caller, lease: LeaseId) -> Result<Lease, CoreError> {
        self.call(|reply| Command::Release {
            caller,
            lease,
            reply,
        })
        .await
    }

    pub async fn get_lease(&self, lease: LeaseId) -> Result<Lease, CoreError> {
        self.call(|reply| Command::GetLease { lease, reply }).await
    }

    /// One page of leases, by grant time.
    pub async fn list_leases(&self, query: LeaseQuery) -> Result<LeasePage, CoreError> {
        self.call(|reply| Command::ListLeases { query, reply })
            .await
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, CoreError> {
        self.call(|reply| Command::ListHosts { rack: None, reply })
            .await
    }

    /// The hosts of one rack (what its agent is told), without building a
    /// view of every other host.
    pub async fn rack_hosts(
        &self,
        rack: crate::types::RackName,
    ) -> Result<Vec<HostView>, CoreError> {
        self.call(|reply| Command::ListHosts {
            rack: Some(rack),
            reply,
        })
        .await
    }

    pub async fn get_host(&self, host: HostName) -> Result<HostView, CoreError> {
        self.call(|reply| Command::GetHost { host, reply }).await
    }

    /// Operators only.
    pub async fn set_maintenance(
        &self,
        caller: Caller,
        host: HostName,
        on: bool,
        reason: String,
    ) -> Result<HostView, CoreError> {
        self.call(|reply| Command::SetMaintenance {
            caller,
            host,
            on,
            reason,
            reply,
        })
        .await
    }

    /// Make a booking or (operators) a maintenance window.
    pub async fn create_booking(
        &self,
        caller: Caller,
        request: BookingRequest,
    ) -> Result<Booking, CoreError> {
        self.call(|reply| Command::CreateBooking {
            caller,
            request,
            reply,
        })
        .await
    }

    /// Cancel a booking (its holder or an operator).
    pub async fn cancel_booking(
        &self,
        caller: Caller,
        id: BookingId,
    ) -> Result<Booking, CoreError> {
        self.call(|reply| Command::CancelBooking { caller, id, reply })
            .await
    }

    /// Bookings not yet ended (of `host`, when given), in start order.
    pub async fn list_bookings(&self, host: Option<HostName>) -> Result<Vec<Booking>, CoreError> {
        self.call(|reply| Command::ListBookings { host, reply })
            .await
    }

    /// Quarantine a host (never granted until released) or release it back
    /// to healthy. Operators only; a quarantine needs a reason.
    pub async fn set_quarantine(
        &self,
        caller: Caller,
        host: HostName,
        on: bool,
        reason: String,
    ) -> Result<HostView, CoreError> {
        self.call(|reply| Command::SetQuarantine {
            caller,
            host,
            on,
            reason,
            reply,
        })
        .await
    }

    /// What a provisioning said about its host (from the rack registry):
    /// the core keeps the host's health (see [`crate::health`]).
    pub async fn host_verdict(&self, host: HostName, lease: LeaseId, verdict: HostVerdict) {
        let _ = self
            .tx
            .send(Command::HostVerdict {
                host,
                lease,
                verdict,
            })
            .await;
    }

    /// Check a host now: the server leases it to itself (`lab-health`)
    /// with profile `health-check`, ahead of every waiter, and compares
    /// what it sees with the inventory (see [`crate::health`]). Operators
    /// only; not a host in maintenance; joins a check already pending.
    pub async fn check_host(&self, caller: Caller, host: HostName) -> Result<HostView, CoreError> {
        self.call(|reply| Command::CheckHost {
            caller,
            host,
            reply,
        })
        .await
    }

    /// Re-read the inventory file and apply it. Operators only (the server
    /// itself on SIGHUP). On error the last good inventory stays in force.
    pub async fn reload_inventory(&self, caller: &Caller) -> Result<ReloadSummary, CoreError> {
        policy::operators_only(caller, "reload the inventory")?;
        let path = self.inventory_path.clone();
        let inventory = tokio::task::spawn_blocking(move || Inventory::load(&path))
            .await
            .map_err(|_| CoreError::ShuttingDown)?
            .map_err(|e| CoreError::Inventory(Arc::new(e)))?;
        let actor = caller.principal.clone();
        self.call(|reply| Command::SetInventory {
            actor,
            inventory: Arc::new(inventory),
            reply,
        })
        .await
    }

    /// One page of events from the log (at most `query.limit`).
    pub async fn list_events(&self, mut query: EventQuery) -> Result<EventPage, CoreError> {
        let _permit = self
            .event_reads
            .acquire()
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        let store = self.store.clone();
        let limit = query.limit;
        query.limit = limit.saturating_add(1);
        let mut events = tokio::task::spawn_blocking(move || store.events(&query))
            .await
            .map_err(|_| CoreError::ShuttingDown)?
            .map_err(|e| CoreError::Store(Arc::new(e)))?;
        let more = events.len() > limit;
        events.truncate(limit);
        Ok(EventPage { events, more })
    }

    /// Stop the actor after the batch in progress. Waiting requests stay in
    /// the store (their streams end with UNAVAILABLE, and their clients may
    /// resume them after the restart); later calls get UNAVAILABLE.
    pub async fn stop(&self) {
        let _ = self.call(|reply| Command::Stop { reply }).await;
    }

    /// The last sequence number of the event log.
    pub async fn last_event_seq(&self) -> Result<u64, CoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.last_event_seq())
            .await
            .map_err(|_| CoreError::ShuttingDown)?
            .map_err(|e| CoreError::Store(Arc::new(e)))
    }

    /// The clock the core reads (for what works alongside it, e.g. the rack
    /// registry's records).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// The actor's gauges and histograms (for `/metrics`).
    pub fn stats(&self) -> Arc<CoreStats> {
        self.stats.clone()
    }

    /// Live events as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    /// The waiting requests in service order, with positions and ETAs.
    pub async fn list_queue(&self) -> Result<Vec<QueueEntry>, CoreError> {
        self.call(|reply| Command::ListQueue { reply }).await
    }

    /// The `limit` most recently granted leases (ended ones included),
    /// newest first.
    pub async fn recent_leases(&self, limit: usize) -> Result<Vec<Lease>, CoreError> {
        self.call(|reply| Command::RecentLeases { limit, reply })
            .await
    }

    /// The inventory in force.
    pub async fn inventory(&self) -> Result<Arc<Inventory>, CoreError> {
        self.call(|reply| Command::GetInventory { reply }).await
    }

    /// Replace the webhooks in force: events committed from now on get
    /// outbox rows for these hooks; the rows of hooks no longer there are
    /// dropped (in the same commit).
    pub async fn set_webhooks(&self, webhooks: SharedWebhooks) -> Result<(), CoreError> {
        self.call(|reply| Command::SetWebhooks { webhooks, reply })
            .await
    }

    /// Puts a new policy (projects, shares, quotas) in force: usage is
    /// recounted for its projects and the queue is scheduled again.
    pub async fn set_policy(&self, policy: Arc<Policy>) -> Result<(), CoreError> {
        let p = policy.clone();
        self.call(|reply| Command::SetPolicy { policy, reply })
            .await?;
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = p;
        Ok(())
    }

    /// The project `principal` belongs to under the policy in force.
    pub fn project_of(&self, principal: &Principal) -> String {
        let policy = self.policy.read().unwrap_or_else(|e| e.into_inner());
        policy.project(policy.project_of(principal)).name.clone()
    }

    /// Notified after every commit that wrote outbox rows (the delivery
    /// task waits on it).
    pub fn outbox_wake(&self) -> Arc<Notify> {
        self.outbox_wake.clone()
    }

    /// The store (for the webhook delivery task, which settles outbox rows
    /// directly: they are not core state).
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Commits `note` to the event log; its sequence number once durable.
    pub async fn record(&self, note: Note) -> Result<u64, CoreError> {
        self.call(|reply| Command::Record { note, reply }).await
    }

    /// Replace the set of hosts that cannot be driven now (with why); they
    /// are not granted until they are back. Changes are recorded as events.
    pub async fn set_unreachable(
        &self,
        hosts: BTreeMap<HostName, String>,
    ) -> Result<(), CoreError> {
        self.tx
            .send(Command::SetUnreachable { hosts })
            .await
            .map_err(|_| CoreError::ShuttingDown)
    }
}

#[cfg(test)]
mod booking_tests;
#[cfg(test)]
mod preempt_tests;
#[cfg(test)]
mod share_tests;
#[cfg(test)]
mod tests;
