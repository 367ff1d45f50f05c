//! The gRPC face of the core: thin handlers that authenticate the caller,
//! convert the request (bad fields → INVALID_ARGUMENT naming the field), call
//! one method of [`Core`] — or of the rack registry ([`Racks`]) for `Power`,
//! `Console`, `ConsoleLog`, `Forward` and `AgentService.Attach`
//! (`agent.rs`) — and
//! convert the result; domain errors become statuses in `status.rs` only.
//! Also serves gRPC health and reflection (v1 and v1alpha) so that clients
//! nobody here wrote can discover the API.
//!
//! What one caller may take is bounded here too: HTTP/2 streams per
//! connection, request and header sizes, keep-alives, and the size of a
//! `ListLeases` / `ListEvents` page (page tokens are made in `convert.rs`).
//! On shutdown the core is stopped before the server drains, so waiting
//! requests stay stored for their clients to resume.

pub mod agent;
pub mod convert;
pub mod standby;
pub mod status;

use crate::auth::{AuthError, Authenticator};
use crate::core::{Core, LeaseQuery, WaitState, policy};
use crate::lease::Lease;
use crate::metrics::ApiStats;
use crate::racks::{FromUser, RackRegistry, Racks, ToUser};
use crate::store::EventQuery;
use crate::types::{Caller, Principal};
use convert as cv;
use futures::{Stream, StreamExt};
use lab_proto::convert::timestamp_from_millis;
use lab_proto::v1 as pb;
use lab_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use lab_proto::v1::agent_service_server::AgentServiceServer;
use lab_proto::v1::event_service_server::{EventService, EventServiceServer};
use lab_proto::v1::host_service_server::{HostService, HostServiceServer};
use lab_proto::v1::lease_service_server::{LeaseService, LeaseServiceServer};
use prost::Message as _;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::debug;

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// HTTP/2 streams one connection may have open at once (calls in
/// progress, waiting Acquires, event followers, consoles): the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`. A client opening more waits for one
/// to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Largest request message the user services decode (the agent service
/// keeps tonic's 4 MiB).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest HTTP/2 header list a client may send.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;
/// TCP keep-alive on accepted connections (HTTP/2 pings every 10 s, with a
/// 5 s timeout, notice a silent peer first).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// `ListLeases` page size when the request names none, and the most.
pub const DEFAULT_LEASE_PAGE: usize = 100;
pub const MAX_LEASE_PAGE: usize = 1000;
/// `ListEvents` page size (`limit`) when the request names none, and the most.
pub const DEFAULT_EVENT_PAGE: usize = 1000;
pub const MAX_EVENT_PAGE: usize = 10_000;
/// A page ends early when its messages pass this many bytes (a quarter of
/// the 4 MiB a gRPC client decodes by default), so long comments or
/// provisioning tails never make a response too large to read.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// Implements every `lab.v1` service over one core handle.
#[derive(Clone)]
pub struct Api {
    core: Core,
    auth: Arc<std::sync::RwLock<Authenticator>>,
    /// TTL of a lease request that names none.
    default_ttl: Duration,
    racks: Racks,
    stats: ApiStats,
}

impl Api {
    pub fn new(core: Core, auth: Authenticator, default_ttl: Duration) -> Self {
        Self::with_shared_auth(core, Arc::new(std::sync::RwLock::new(auth)), default_ttl)
    }

    /// With an authenticator that can be replaced while serving (tokens
    /// file reloads).
    pub fn with_shared_auth(
        core: Core,
        auth: Arc<std::sync::RwLock<Authenticator>>,
        default_ttl: Duration,
    ) -> Self {
        let registry = RackRegistry::new(core.clock());
        Self::with_racks(core, auth, default_ttl, registry)
    }

    /// With the rack registry whose reclaimer the core was started with
    /// (the registry is connected to the core here).
    pub fn with_racks(
        core: Core,
        auth: Arc<std::sync::RwLock<Authenticator>>,
        default_ttl: Duration,
        registry: RackRegistry,
    ) -> Self {
        let racks = Racks::start(core.clone(), registry);
        Self {
            core,
            auth,
            default_ttl,
            racks,
            stats: ApiStats::default(),
        }
    }

    /// The core handle (for the web port, which serves the same core).
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The rack registry.
    pub fn racks(&self) -> &Racks {
        &self.racks
    }

    /// What the gRPC layer measures.
    pub fn stats(&self) -> &ApiStats {
        &self.stats
    }

    /// The caller a bearer token names (the dashboard's login checks the
    /// same tokens, with the same authenticator, as every call).
    pub fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let header = format!("Bearer {token}");
        self.auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authenticate(Some(&header))
    }

    /// The TTL of a request that names none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// The caller of a user call (agents make none).
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let caller = self.any_caller(req)?;
        policy::may_call(&caller)?;
        Ok(caller)
    }

    /// Is the server in the development mode (no authentication)?
    fn auth_is_insecure_dev(&self) -> bool {
        self.auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_insecure_dev()
    }

    fn any_caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let header = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| Status::from(AuthError::Malformed))?),
        };
        let caller = self
            .auth
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authenticate(header)?;
        debug!(principal = %caller.principal, role = %caller.role, "authenticated");
        Ok(caller)
    }
}

#[tonic::async_trait]
impl HostService for Api {
    async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        self.caller(&req)?;
        let r = req.into_inner();
        let arch = cv::arch_from_proto("arch", r.arch)?;
        let flags = cv::flags_from_proto("flags", r.flags)?;
        let hosts = self
            .core
            .list_hosts()
            .await?
            .iter()
            .filter(|v| match &v.spec {
                Some(s) => arch.is_none_or(|a| a == s.arch) && flags.is_subset(&s.flags),
                None => arch.is_none() && flags.is_empty(),
            })
            .map(cv::host_to_proto)
            .collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn get_host(
        &self,
        req: Request<pb::GetHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        self.caller(&req)?;
        let name = cv::host_name("name", req.into_inner().name)?;
        Ok(Response::new(cv::host_to_proto(
            &self.core.get_host(name).await?,
        )))
    }

    async fn power(
        &self,
        req: Request<pb::PowerRequest>,
    ) -> Result<Response<pb::PowerResponse>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let host = cv::host_name("host", r.host)?;
        let action = cv::power_action("action", r.action)?;
        let on = self.racks.power(&caller, &host, action).await?;
        Ok(Response::new(pb::PowerResponse {
            host: host.to_string(),
            on,
        }))
    }

    type ConsoleStream = RpcStream<pb::ConsoleResponse>;

    async fn console(
        &self,
        req: Request<tonic::Streaming<pb::ConsoleRequest>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let open = match inbound.message().await? {
            Some(pb::ConsoleRequest {
                msg: Some(pb::console_request::Msg::Open(o)),
            }) => o,
            _ => {
                return Err(status::invalid(
                    "open",
                    "the first message must open the console",
                ));
            }
        };
        let write = open.write;
        let mut session = self.racks.console(&caller, cv::console_open(open)?).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::ConsoleResponse, Status>>(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    data = session.output.recv() => {
                        let Some(d) = data else {
                            let _ = tx.send(Ok(notice("the agent closed the console"))).await;
                            break;
                        };
                        if !d.notice.is_empty() && tx.send(Ok(notice(&d.notice))).await.is_err() {
                            break;
                        }
                        if !d.output.is_empty() && tx.send(Ok(pb::ConsoleResponse {
                            msg: Some(pb::console_response::Msg::Output(d.output)),
                        })).await.is_err() {
                            break;
                        }
                        if d.end {
                            break;
                        }
                    }
                    m = inbound.message() => match m {
                        Ok(Some(pb::ConsoleRequest { msg: Some(pb::console_request::Msg::Input(b)) })) if write => {
                            if session.input(b, false).await.is_err() { break; }
                        }
                        Ok(Some(pb::ConsoleRequest { msg: Some(pb::console_request::Msg::SendBreak(true)) })) if write => {
                            if session.input(Vec::new(), true).await.is_err() { break; }
                        }
                        Ok(Some(_)) => {
                            let _ = tx.send(Err(status::invalid("input", "this console was opened read-only"))).await;
                            break;
                        }
                        // The client closed its side: keep streaming output
                        // until it goes away.
                        Ok(None) => {
                            while let Some(d) = session.output.recv().await {
                                let end = d.end;
                                if !d.output.is_empty() && tx.send(Ok(pb::ConsoleResponse {
                                    msg: Some(pb::console_response::Msg::Output(d.output)),
                                })).await.is_err() || end {
                                    break;
                                }
                            }
                            break;
                        }
                        Err(_) => break,
                    },
                    () = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ForwardStream = RpcStream<pb::ForwardResponse>;

    async fn forward(
        &self,
        req: Request<tonic::Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        use pb::forward_request::Msg as In;
        use pb::forward_response::Msg as Out;
        let caller = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let open = match inbound.message().await? {
            Some(pb::ForwardRequest {
                msg: Some(In::Open(o)),
            }) => o,
            _ => {
                return Err(status::invalid(
                    "open",
                    "the first message must open the forward",
                ));
            }
        };
        let forward = self.racks.forward(&caller, cv::forward_open(open)?).await?;
        let from_user = inbound
            .map(|m| match m {
                Ok(pb::ForwardRequest {
                    msg: Some(In::Data(b)),
                }) => FromUser::Data(b),
                // A second open, or an empty message: nothing to send.
                Ok(_) => FromUser::Data(Vec::new()),
                Err(_) => FromUser::Broken,
            })
            .boxed();
        let (to_user, mut rx) = mpsc::channel::<ToUser>(4);
        let (tx, out) = mpsc::channel::<Result<pb::ForwardResponse, Status>>(4);
        let racks = self.racks.clone();
        tokio::spawn(async move {
            let run = racks.run_forward(forward, from_user, to_user);
            // Ends when the forward does, or when the user's call is gone
            // (then dropping `rx` tells the forward).
            let relay = async {
                loop {
                    let m = tokio::select! {
                        m = rx.recv() => m,
                        () = tx.closed() => return,
                    };
                    let Some(m) = m else { return };
                    let msg = match m {
                        ToUser::Data(b) => Out::Data(b),
                        ToUser::Notice(n) => Out::Notice(n),
                    };
                    if tx
                        .send(Ok(pb::ForwardResponse { msg: Some(msg) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            };
            let (result, ()) = tokio::join!(run, relay);
            if let Err(e) = result {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    type ConsoleLogStream = RpcStream<pb::ConsoleResponse>;

    async fn console_log(
        &self,
        req: Request<pb::ConsoleLogRequest>,
    ) -> Result<Response<Self::ConsoleLogStream>, Status> {
        let caller = self.caller(&req)?;
        let id = cv::lease_id("lease_id", &req.get_ref().lease_id)?;
        let lease = self.core.get_lease(id).await?;
        let mut parts = self.racks.console_log(&caller, &lease).await?;
        let (tx, rx) = mpsc::channel::<Result<pb::ConsoleResponse, Status>>(64);
        tokio::spawn(async move {
            while let Some((host, part)) = parts.next_part().await {
                let header = pb::ConsoleResponse {
                    msg: Some(pb::console_response::Msg::Host(host.to_string())),
                };
                if tx.send(Ok(header)).await.is_err() {
                    return;
                }
                let mut data = match part {
                    Ok(d) => d,
                    Err(e) => {
                        let msg =
                            format!("no console log of {host}: {}", Status::from(e).message());
                        if tx.send(Ok(notice(&msg))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                while let Some(d) = data.next().await {
                    if !d.notice.is_empty() && tx.send(Ok(notice(&d.notice))).await.is_err() {
                        return;
                    }
                    if !d.output.is_empty()
                        && tx
                            .send(Ok(pb::ConsoleResponse {
                                msg: Some(pb::console_response::Msg::Output(d.output)),
                            }))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    if d.end {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A lease as the API shows it: with its hosts' provisioning progress.
fn lease_pb(racks: &Racks, l: &Lease) -> pb::Lease {
    cv::lease_to_proto(l, &racks.provisioning(l))
}

fn notice(text: &str) -> pb::ConsoleResponse {
    pb::ConsoleResponse {
        msg: Some(pb::console_response::Msg::Notice(text.to_owned())),
    }
}

#[tonic::async_trait]
impl LeaseService for Api {
    type AcquireStream = RpcStream<pb::AcquireUpdate>;

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        let arrived = std::time::Instant::now();
        let caller = self.caller(&req)?;
        let request = cv::acquire_request(req.into_inner(), self.default_ttl)?;
        let project = self.core.project_of(&caller.principal);
        let acq = self.core.acquire(caller, request).await?;
        let racks = self.racks.clone();
        let latency = self.stats.grant_latency.clone();
        let stream = futures::stream::unfold(Some(acq), move |state| {
            let racks = racks.clone();
            let latency = latency.clone();
            let project = project.clone();
            async move {
                let mut acq = state?;
                let update = |u| pb::AcquireUpdate { update: Some(u) };
                match acq.next().await? {
                    WaitState::Queued {
                        waiter,
                        position,
                        queue_length,
                        eta,
                        held_back,
                        waiting_for,
                    } => Some((
                        Ok(update(pb::acquire_update::Update::Queued(
                            pb::QueueStatus {
                                waiter_id: waiter,
                                position,
                                queue_length,
                                eta: eta.map(|t| timestamp_from_millis(t.millis())),
                                held_back: held_back.unwrap_or_default(),
                                project: project.clone(),
                                waiting_for: waiting_for.unwrap_or_default(),
                            },
                        ))),
                        Some(acq),
                    )),
                    WaitState::Granted(lease) => {
                        latency.observe_duration(arrived.elapsed());
                        let l = lease_pb(&racks, &lease);
                        Some((Ok(update(pb::acquire_update::Update::Granted(l))), None))
                    }
                    WaitState::Failed(e) => Some((Err(Status::from(e)), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_booking(
        &self,
        req: Request<pb::CreateBookingRequest>,
    ) -> Result<Response<pb::Booking>, Status> {
        let caller = self.caller(&req)?;
        let request = cv::booking_request(req.into_inner())?;
        let b = self.core.create_booking(caller, request).await?;
        Ok(Response::new(cv::booking_to_proto(&b)))
    }

    async fn list_bookings(
        &self,
        req: Request<pb::ListBookingsRequest>,
    ) -> Result<Response<pb::ListBookingsResponse>, Status> {
        self.caller(&req)?;
        let host = match req.into_inner().host {
            h if h.is_empty() => None,
            h => Some(crate::types::HostName::new(h).map_err(|e| status::invalid("host", e))?),
        };
        let bookings = self.core.list_bookings(host).await?;
        Ok(Response::new(pb::ListBookingsResponse {
            bookings: bookings.iter().map(cv::booking_to_proto).collect(),
        }))
    }

    async fn cancel_booking(
        &self,
        req: Request<pb::CancelBookingRequest>,
    ) -> Result<Response<pb::Booking>, Status> {
        let caller = self.caller(&req)?;
        let b = self.core.cancel_booking(caller, req.get_ref().id).await?;
        Ok(Response::new(cv::booking_to_proto(&b)))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let id = cv::lease_id("lease_id", &r.lease_id)?;
        let ttl = cv::duration("ttl", r.ttl)?;
        Ok(Response::new(lease_pb(
            &self.racks,
            &self.core.renew(caller, id, ttl).await?,
        )))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.caller(&req)?;
        let id = cv::lease_id("lease_id", &req.get_ref().lease_id)?;
        Ok(Response::new(lease_pb(
            &self.racks,
            &self.core.release(caller, id).await?,
        )))
    }

    async fn get_lease(
        &self,
        req: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        self.caller(&req)?;
        let id = cv::lease_id("lease_id", &req.get_ref().lease_id)?;
        Ok(Response::new(lease_pb(
            &self.racks,
            &self.core.get_lease(id).await?,
        )))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.caller(&req)?;
        let r = req.into_inner();
        let holder = if r.holder.is_empty() {
            None
        } else {
            Some(Principal::new(r.holder).map_err(|e| status::invalid("holder", e))?)
        };
        let limit = match r.page_size {
            0 => DEFAULT_LEASE_PAGE,
            n => (n as usize).min(MAX_LEASE_PAGE),
        };
        let query = LeaseQuery {
            include_ended: r.include_ended,
            holder,
            after: cv::lease_page_after("page_token", &r.page_token)?,
            limit,
        };
        let page = self.core.list_leases(query).await?;
        let mut next = page.next;
        let mut leases = Vec::with_capacity(page.leases.len());
        let mut bytes = 0;
        for l in &page.leases {
            let m = lease_pb(&self.racks, l);
            bytes += m.encoded_len();
            if bytes > MAX_PAGE_BYTES && !leases.is_empty() {
                next = page
                    .leases
                    .get(leases.len() - 1)
                    .map(|l| (l.granted_at, l.id));
                break;
            }
            leases.push(m);
        }
        Ok(Response::new(pb::ListLeasesResponse {
            leases,
            next_page_token: next.map(cv::lease_page_token).unwrap_or_default(),
        }))
    }
}

fn event_query(
    after_seq: u64,
    limit: u32,
    host: String,
    lease: String,
) -> Result<EventQuery, Status> {
    Ok(EventQuery {
        after_seq,
        limit: match limit {
            0 => DEFAULT_EVENT_PAGE,
            n => (n as usize).min(MAX_EVENT_PAGE),
        },
        host: if host.is_empty() {
            None
        } else {
            Some(cv::host_name("host", host)?)
        },
        lease: if lease.is_empty() {
            None
        } else {
            Some(cv::lease_id("lease_id", &lease)?)
        },
    })
}

#[tonic::async_trait]
impl EventService for Api {
    type WatchEventsStream = RpcStream<pb::Event>;

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        self.caller(&req)?;
        let r = req.into_inner();
        let after = cv::event_page_after("page_token", &r.page_token)?;
        let mut q = event_query(r.after_seq, r.limit, r.host, r.lease_id)?;
        if let Some(after) = after {
            q.after_seq = after;
        }
        let last_seq = self.core.last_event_seq().await?;
        let page = self.core.list_events(q).await?;
        let mut more = page.more;
        let mut events = Vec::with_capacity(page.events.len());
        let mut bytes = 0;
        for e in &page.events {
            let m = cv::event_to_proto(e);
            bytes += m.encoded_len();
            if bytes > MAX_PAGE_BYTES && !events.is_empty() {
                more = true;
                break;
            }
            events.push(m);
        }
        let next_page_token = match events.last() {
            Some(e) if more => cv::event_page_token(e.seq),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events,
            last_seq,
            next_page_token,
        }))
    }

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.caller(&req)?;
        let r = req.into_inner();
        let query = event_query(r.after_seq, 1000, r.host, r.lease_id)?;
        let (tx, rx) = mpsc::channel(256);
        let core = self.core.clone();
        tokio::spawn(watch_events(core, query, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Backlog from the store, then live events; after falling behind the live
/// feed, catch up from the store again. Ends when the client goes away.
async fn watch_events(
    core: Core,
    mut query: EventQuery,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
) {
    let mut live = core.subscribe();
    loop {
        loop {
            let batch = match core.list_events(query.clone()).await {
                Ok(b) => b.events,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if batch.is_empty() {
                break;
            }
            for e in batch {
                query.after_seq = e.seq;
                if tx.send(Ok(cv::event_to_proto(&e))).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let e = tokio::select! {
                () = tx.closed() => return,
                e = live.recv() => e,
            };
            match e {
                Ok(e) if query.matches(&e) => {
                    query.after_seq = e.seq;
                    if tx.send(Ok(cv::event_to_proto(&e))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

#[tonic::async_trait]
impl AdminService for Api {
    async fn set_maintenance(
        &self,
        req: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let host = cv::host_name("host", r.host)?;
        let reason = cv::text("reason", r.reason)?;
        let view = self
            .core
            .set_maintenance(caller, host, r.maintenance, reason)
            .await?;
        Ok(Response::new(cv::host_to_proto(&view)))
    }

    async fn set_quarantine(
        &self,
        req: Request<pb::SetQuarantineRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let caller = self.caller(&req)?;
        let r = req.into_inner();
        let host = cv::host_name("host", r.host)?;
        let reason = cv::text("reason", r.reason)?;
        let view = self
            .core
            .set_quarantine(caller, host, r.quarantined, reason)
            .await?;
        Ok(Response::new(cv::host_to_proto(&view)))
    }

    async fn check_host(
        &self,
        req: Request<pb::CheckHostRequest>,
    ) -> Result<Response<pb::Host>, Status> {
        let caller = self.caller(&req)?;
        let host = cv::host_name("host", req.into_inner().host)?;
        let view = self.core.check_host(caller, host).await?;
        Ok(Response::new(cv::host_to_proto(&view)))
    }

    async fn reload_inventory(
        &self,
        req: Request<pb::ReloadInventoryRequest>,
    ) -> Result<Response<pb::ReloadInventoryResponse>, Status> {
        let caller = self.caller(&req)?;
        let s = self.core.reload_inventory(&caller).await?;
        Ok(Response::new(pb::ReloadInventoryResponse {
            hosts: s.hosts as u32,
            added: s.added as u32,
            removed: s.removed as u32,
        }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        // Agents may ask too (to check their token).
        let caller = self.any_caller(&req)?;
        Ok(Response::new(pb::WhoAmIResponse {
            principal: caller.principal.to_string(),
            role: cv::role_to_proto(caller.role) as i32,
            project: self.core.project_of(&caller.principal),
        }))
    }
}

/// The transport of every gRPC port of lab-server (the leader's and a
/// standby's): TCP no-delay and keep-alive, HTTP/2 keep-alive (to notice a
/// peer, an agent's machine, that died silently), the per-connection stream
/// cap and header size limit, and TLS when given.
pub(crate) fn transport(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(tonic::transport::Server, TcpIncoming), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let builder = builder
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES));
    Ok((builder, incoming))
}

/// Serve every service, health and reflection on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_tls(listener, api, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (certificate chain and key,
/// PEM). When `shutdown` resolves, the core stops first (waiting requests
/// stay in the store and their streams end with UNAVAILABLE, so their
/// clients resume them after the restart), then the server drains.
pub async fn serve_tls(
    listener: TcpListener,
    api: Api,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let core = api.core.clone();
    let shutdown = async move {
        shutdown.await;
        core.stop().await;
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<HostServiceServer<Api>>().await;
    reporter.set_serving::<LeaseServiceServer<Api>>().await;
    reporter.set_serving::<EventServiceServer<Api>>().await;
    reporter.set_serving::<AdminServiceServer<Api>>().await;
    reporter.set_serving::<AgentServiceServer<Api>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lab_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let (mut builder, incoming) = transport(listener, tls)?;
    builder
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            HostServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            LeaseServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            EventServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(AgentServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
