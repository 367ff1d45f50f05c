//! The real `lab` binary against a stub lab-server running in this process:
//! exit codes, error messages, the bearer token, the acquire stream (queue
//! lines, grant, Ctrl-C withdrawing the request), JSON output, power,
//! consoles (live, follow, the lease log), `--wait-ready`, and terminal
//! escapes in what the server sends shown escaped.
//!
//! The stub answers from fixed data; it checks the token the way the real
//! server will (`authorization: Bearer good` is alice, a developer). Alice
//! holds x1; a1 is free and unreachable. The console of x1 echoes its input.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lab_proto::convert::timestamp_from_millis;
use lab_proto::v1::FailureClass;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use lab_proto::v1::event_service_server::{EventService, EventServiceServer};
use lab_proto::v1::host_service_server::{HostService, HostServiceServer};
use lab_proto::v1::lease_service_server::{LeaseService, LeaseServiceServer};
use lab_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct State {
    /// Set when a waiting Acquire stream was dropped by the client.
    withdrawn: AtomicBool,
    /// x1's power.
    power_on: AtomicBool,
    /// GetLease calls on the leases whose boot progresses per call.
    polls_ok: AtomicU32,
    polls_bad: AtomicU32,
    /// The request ids of Acquire calls, in order.
    request_ids: std::sync::Mutex<Vec<String>>,
    /// Stand by (a deposed leader) once a WhoAmI was answered: host and
    /// lease calls are then refused UNAVAILABLE naming `leader`.
    depose_after_whoami: AtomicBool,
    deposed: AtomicBool,
    leader: std::sync::Mutex<String>,
    /// Host and lease calls answered (not refused).
    answered: AtomicU32,
}

/// What a deposed stub answers host and lease calls with: a standby's
/// refusal, as lab-server's standby layer words it.
fn standby_check(state: &State) -> Result<(), Status> {
    standby_refusal(state)?;
    state.answered.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn standby_refusal(state: &State) -> Result<(), Status> {
    if state.deposed.load(Ordering::SeqCst) {
        let leader = state.leader.lock().unwrap().clone();
        let mut s = Status::unavailable(format!(
            "this lab-server is a standby; the leader is {leader}"
        ));
        s.metadata_mut()
            .insert("lab-leader", leader.parse().unwrap());
        return Err(s);
    }
    Ok(())
}

#[derive(Clone)]
struct Stub(Arc<State>);

fn principal<T>(req: &Request<T>) -> Result<&'static str, Status> {
    match req.metadata().get("authorization").map(|v| v.to_str()) {
        Some(Ok("Bearer good")) => Ok("alice"),
        Some(_) => Err(Status::unauthenticated("unknown token")),
        None => Err(Status::unauthenticated("missing token")),
    }
}

fn now_ms() -> i64 {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    i64::try_from(d.as_millis()).unwrap()
}

fn hosts() -> Vec<Host> {
    vec![
        Host {
            name: "x1".into(),
            arch: Arch::X8664 as i32,
            firmware: Firmware::Uefi as i32,
            rack: "r1".into(),
            flags: vec!["gpu".into()],
            state: HostState::Leased as i32,
            lease_id: "L-1".into(),
            holder: "alice".into(),
            lease_expires_at: Some(timestamp_from_millis(now_ms() + 29 * 60_000 + 30_000)),
            reachable: true,
            ..Default::default()
        },
        Host {
            name: "a1".into(),
            arch: Arch::Aarch64 as i32,
            firmware: Firmware::Uefi as i32,
            rack: "r2".into(),
            state: HostState::Available as i32,
            reachable: false,
            unreachable_reason: "BMC does not answer".into(),
            ..Default::default()
        },
    ]
}

fn prov(host: &str, phase: ProvisionPhase, stage: &str) -> HostProvisioning {
    HostProvisioning {
        host: host.into(),
        phase: phase as i32,
        stage: stage.into(),
        updated_at: Some(timestamp_from_millis(now_ms())),
        console_tail: if phase == ProvisionPhase::Failed {
            "Loading xen...\r\n(XEN) Panic on CPU 0\r\n".into()
        } else {
            String::new()
        },
        percent: 0,
        ..failure(phase, "Xen panic", "(XEN) Panic on CPU 0")
    }
}

/// The server's attribution of a failed phase (none otherwise).
fn failure(phase: ProvisionPhase, rule: &str, line: &str) -> HostProvisioning {
    if phase != ProvisionPhase::Failed {
        return HostProvisioning::default();
    }
    HostProvisioning {
        failure_class: FailureClass::Job as i32,
        failure_rule: rule.into(),
        failure_line: line.into(),
        ..Default::default()
    }
}

/// The leases with boot progress: `L-ok` installs to disk and boots it to
/// ready over six polls,
/// `L-bad` fails on the second, `L-slow` never gets past booting, `L-gone`
/// expired, `L-3` has two hosts, one ready and one failed.
fn booting_lease(state: &State, id: &str, polled: bool) -> Option<Lease> {
    use ProvisionPhase::{Booting, Failed, Installing, Pending, Ready};
    let mut l = lease();
    l.id = id.into();
    l.profile = "xen".into();
    let step = |n: &AtomicU32| {
        if polled {
            n.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            0
        }
    };
    l.provisioning = match id {
        "L-ok" => match step(&state.polls_ok) {
            0 => vec![prov("x1", Pending, "")],
            1 => vec![prov("x1", Booting, "boot device pxe")],
            2 => vec![prov("x1", Booting, "powered on")],
            3 => vec![HostProvisioning {
                percent: 42,
                ..prov("x1", Installing, "writing the image")
            }],
            4 => vec![prov("x1", Booting, "rebooting")],
            5 => vec![prov("x1", Booting, "booting from disk")],
            _ => vec![prov("x1", Ready, "ready marker seen")],
        },
        "L-bad" => match step(&state.polls_bad) {
            0 => vec![prov("x1", Pending, "")],
            1 => vec![prov("x1", Booting, "powered on")],
            _ => vec![prov("x1", Failed, "no ready marker within 180s")],
        },
        "L-slow" => vec![prov("x1", Booting, "powered on")],
        "L-gone" => {
            l.state = LeaseState::Expired as i32;
            vec![prov("x1", Booting, "powered on")]
        }
        "L-3" => {
            l.hosts = vec!["x1".into(), "a1".into()];
            vec![
                prov("x1", Ready, "ready marker seen"),
                prov("a1", Failed, "no ready marker within 180s"),
            ]
        }
        _ => return None,
    };
    Some(l)
}

/// What a hostile user (or host) can put in a lease: a comment that would
/// retitle and clear the terminal, a stage with an 8-bit CSI and a
/// right-to-left override, a console tail with colours and a lone `\r`.
const EVIL_COMMENT: &str = "ci \x1b]0;pwned\x07\x1b[2J";

fn evil_lease() -> Lease {
    let mut l = lease();
    l.id = "L-evil".into();
    l.comment = EVIL_COMMENT.into();
    l.provisioning = vec![HostProvisioning {
        host: "x1".into(),
        phase: ProvisionPhase::Failed as i32,
        stage: "stage \u{9b}31m\u{202e}txt.exe".into(),
        updated_at: None,
        console_tail: "\x1b[1;31mpanic\x1b[0m\r\nfake\rline\r\n".into(),
        percent: 0,
        ..failure(
            ProvisionPhase::Failed,
            "rule \u{202e}evil",
            "\x1b]0;owned\x07line",
        )
    }];
    l
}

fn lease() -> Lease {
    Lease {
        id: "L-1".into(),
        holder: "alice".into(),
        hosts: vec!["x1".into()],
        state: LeaseState::Active as i32,
        expires_at: Some(timestamp_from_millis(now_ms() + 30 * 60_000)),
        ..Default::default()
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl HostService for Stub {
    async fn list_hosts(
        &self,
        req: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        principal(&req)?;
        let arch = req.get_ref().arch;
        let hosts = hosts()
            .into_iter()
            .filter(|h| arch == 0 || h.arch == arch)
            .collect();
        Ok(Response::new(ListHostsResponse { hosts }))
    }

    async fn get_host(&self, req: Request<GetHostRequest>) -> Result<Response<Host>, Status> {
        principal(&req)?;
        let name = &req.get_ref().name;
        hosts()
            .into_iter()
            .find(|h| &h.name == name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no host named {name}")))
    }

    async fn power(&self, req: Request<PowerRequest>) -> Result<Response<PowerResponse>, Status> {
        principal(&req)?;
        let PowerRequest { host, action } = req.into_inner();
        let action = PowerAction::try_from(action)
            .ok()
            .filter(|a| *a != PowerAction::Unspecified)
            .ok_or_else(|| Status::invalid_argument("action: unspecified"))?;
        match host.as_str() {
            "x1" => {}
            "a1" if action == PowerAction::Status => {
                return Ok(Response::new(PowerResponse { host, on: false }));
            }
            "a1" => return Err(Status::permission_denied("a1 is not leased by alice")),
            "gone" => return Err(Status::unavailable("the agent of rack r9 is away")),
            _ => return Err(Status::not_found(format!("no host named {host}"))),
        }
        let power = &self.0.power_on;
        match action {
            PowerAction::On | PowerAction::Cycle | PowerAction::Reset => {
                power.store(true, Ordering::SeqCst);
            }
            PowerAction::Off => power.store(false, Ordering::SeqCst),
            PowerAction::Status | PowerAction::Unspecified => {}
        }
        let on = power.load(Ordering::SeqCst);
        Ok(Response::new(PowerResponse { host, on }))
    }

    type ConsoleStream = Stream<ConsoleResponse>;

    /// Replays `boot: ok\r\n` (its last `replay_bytes`), then: for a
    /// reader, `login: ` and the end of the session; for a writer, an echo
    /// of every input and a notice for every break, until the client is
    /// gone.
    async fn console(
        &self,
        req: Request<Streaming<ConsoleRequest>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        principal(&req)?;
        let mut input = req.into_inner();
        let open = match input.message().await? {
            Some(ConsoleRequest {
                msg: Some(console_request::Msg::Open(open)),
            }) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "msg: the first message must be open",
                ));
            }
        };
        if open.host != "x1" {
            return Err(Status::permission_denied(format!(
                "{} is not leased by alice",
                open.host
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let send = |m| {
                let tx = tx.clone();
                async move { tx.send(Ok(ConsoleResponse { msg: Some(m) })).await.is_ok() }
            };
            let replay = b"boot: ok\r\n";
            let n = match open.replay_bytes as usize {
                0 => replay.len(),
                n => n.min(replay.len()),
            };
            send(console_response::Msg::Notice(format!(
                "replaying {n} bytes"
            )))
            .await;
            send(console_response::Msg::Output(
                replay[replay.len() - n..].to_vec(),
            ))
            .await;
            if !open.write {
                send(console_response::Msg::Output(b"login: ".to_vec())).await;
                send(console_response::Msg::Notice(
                    "session closed by the stub".into(),
                ))
                .await;
                return;
            }
            while let Ok(Some(req)) = input.message().await {
                let reply = match req.msg {
                    Some(console_request::Msg::Input(bytes)) => {
                        console_response::Msg::Output(bytes)
                    }
                    Some(console_request::Msg::SendBreak(_)) => {
                        console_response::Msg::Notice("break sent".into())
                    }
                    _ => console_response::Msg::Notice("unexpected message".into()),
                };
                if !send(reply).await {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ForwardStream = Stream<ForwardResponse>;

    /// Forwards are tested against the real server (tests/tests/forward.rs).
    async fn forward(
        &self,
        _req: Request<Streaming<ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        Err(Status::unimplemented("the stub has no forwards"))
    }

    type ConsoleLogStream = Stream<ConsoleResponse>;

    async fn console_log(
        &self,
        req: Request<ConsoleLogRequest>,
    ) -> Result<Response<Self::ConsoleLogStream>, Status> {
        use console_response::Msg::{Host, Notice, Output};
        principal(&req)?;
        let msgs = match req.get_ref().lease_id.as_str() {
            "L-1" => vec![
                Host("x1".into()),
                Output(b"one\n".to_vec()),
                Notice("gap: 3 s of output lost".into()),
                Output(b"two\n".to_vec()),
            ],
            "L-3" => vec![
                Host("x1".into()),
                Output(b"x1 first\n".to_vec()),
                Host("a1".into()),
                Output(b"a1 first\n".to_vec()),
                Host("x1".into()),
                Output(b"x1 second\n".to_vec()),
            ],
            _ => return Err(Status::not_found("no such lease")),
        };
        let (tx, rx) = mpsc::channel(msgs.len());
        for m in msgs {
            tx.try_send(Ok(ConsoleResponse { msg: Some(m) })).unwrap();
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl LeaseService for Stub {
    type AcquireStream = Stream<AcquireUpdate>;

    async fn create_booking(
        &self,
        _: Request<lab_proto::v1::CreateBookingRequest>,
    ) -> Result<Response<lab_proto::v1::Booking>, Status> {
        Err(Status::unimplemented("the stub has no bookings"))
    }

    async fn list_bookings(
        &self,
        _: Request<lab_proto::v1::ListBookingsRequest>,
    ) -> Result<Response<lab_proto::v1::ListBookingsResponse>, Status> {
        Err(Status::unimplemented("the stub has no bookings"))
    }

    async fn cancel_booking(
        &self,
        _: Request<lab_proto::v1::CancelBookingRequest>,
    ) -> Result<Response<lab_proto::v1::Booking>, Status> {
        Err(Status::unimplemented("the stub has no bookings"))
    }

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        principal(&req)?;
        let AcquireRequest {
            request,
            no_wait,
            request_id,
        } = req.into_inner();
        let flags = request.unwrap_or_default().flags;
        let tries = {
            let mut ids = self.0.request_ids.lock().unwrap();
            ids.push(request_id.clone());
            ids.iter().filter(|id| **id == request_id).count()
        };
        // "flaky": the first stream of a request breaks after one update,
        // as when the server restarts; the request asked again is granted.
        let flaky = flags.iter().any(|f| f == "flaky") && tries == 1;
        let granted_id = if flags.iter().any(|f| f == "boots") {
            "L-ok"
        } else if flags.iter().any(|f| f == "fails") {
            "L-bad"
        } else {
            "L-1"
        };
        let granted_lease = booting_lease(&self.0, granted_id, false).unwrap_or_else(lease);
        if no_wait {
            return Err(Status::resource_exhausted("no matching host is free"));
        }
        if flags.iter().any(|f| f == "never") {
            return Err(Status::failed_precondition("no host has flag never"));
        }
        let hang = flags.iter().any(|f| f == "hang");
        let (tx, rx) = mpsc::channel(8);
        let state = self.0.clone();
        tokio::spawn(async move {
            let queued = |position, queue_length| {
                Ok(AcquireUpdate {
                    update: Some(Update::Queued(QueueStatus {
                        waiter_id: 9,
                        position,
                        queue_length,
                        eta: Some(timestamp_from_millis(now_ms() + 4 * 60_000 + 5_000)),
                        ..Default::default()
                    })),
                })
            };
            if hang {
                let _ = tx.send(queued(1, 1)).await;
                tx.closed().await;
                state.withdrawn.store(true, Ordering::SeqCst);
                return;
            }
            if flaky {
                let _ = tx.send(queued(2, 3)).await;
                let _ = tx
                    .send(Err(Status::unavailable("the server is shutting down")))
                    .await;
                return;
            }
            for (pos, len) in [(2, 3), (2, 2), (1, 2)] {
                let _ = tx.send(queued(pos, len)).await;
            }
            let granted = AcquireUpdate {
                update: Some(Update::Granted(granted_lease)),
            };
            let _ = tx.send(Ok(granted)).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<Lease>, Status> {
        principal(&req)?;
        Err(Status::failed_precondition("lease L-1 has expired"))
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Result<Response<Lease>, Status> {
        principal(&req)?;
        let mut l = lease();
        l.state = LeaseState::Released as i32;
        Ok(Response::new(l))
    }

    async fn get_lease(&self, req: Request<GetLeaseRequest>) -> Result<Response<Lease>, Status> {
        principal(&req)?;
        let id = &req.get_ref().lease_id;
        if id == "L-1" {
            return Ok(Response::new(lease()));
        }
        if id == "L-evil" {
            return Ok(Response::new(evil_lease()));
        }
        booting_lease(&self.0, id, true)
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such lease"))
    }

    async fn list_leases(
        &self,
        req: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        principal(&req)?;
        // Two pages: L-1, then L-2.
        let (leases, next_page_token) = match req.get_ref().page_token.as_str() {
            "" => (vec![lease()], "p2".to_owned()),
            "p2" => {
                let mut l = lease();
                l.id = "L-2".into();
                l.hosts = vec!["x2".into()];
                (vec![l], String::new())
            }
            _ => return Err(Status::invalid_argument("page_token: not a token")),
        };
        Ok(Response::new(ListLeasesResponse {
            leases,
            next_page_token,
        }))
    }
}

fn events() -> Vec<Event> {
    vec![
        Event {
            seq: 1,
            time: Some(timestamp_from_millis(1_700_000_000_123)),
            actor: "alice".into(),
            kind: EventKind::LeaseRequested as i32,
            waiter_id: 9,
            request: Some(LeaseRequest {
                count: 1,
                flags: vec!["gpu".into()],
                ..Default::default()
            }),
            ..Default::default()
        },
        Event {
            seq: 2,
            time: Some(timestamp_from_millis(1_700_000_001_000)),
            actor: "alice".into(),
            kind: EventKind::LeaseGranted as i32,
            hosts: vec!["x1".into()],
            lease_id: "L-1".into(),
            ..Default::default()
        },
    ]
}

#[tonic::async_trait]
impl EventService for Stub {
    type WatchEventsStream = Stream<Event>;

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        principal(&req)?;
        // One event per page, whatever the limit.
        let r = req.get_ref();
        let after = match r.page_token.as_str() {
            "" => r.after_seq,
            t => t
                .parse()
                .map_err(|_| Status::invalid_argument("page_token"))?,
        };
        let page: Vec<Event> = events()
            .into_iter()
            .filter(|e| e.seq > after)
            .take(1)
            .collect();
        let next_page_token = match page.last() {
            Some(e) if e.seq < 2 => e.seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListEventsResponse {
            events: page,
            last_seq: 2,
            next_page_token,
        }))
    }

    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        principal(&req)?;
        let after = req.get_ref().after_seq;
        let (tx, rx) = mpsc::channel(8);
        for e in events().into_iter().filter(|e| e.seq > after) {
            tx.try_send(Ok(e)).unwrap();
        }
        // Ends the stream here, as a server shutting down would.
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl AdminService for Stub {
    async fn set_maintenance(
        &self,
        req: Request<SetMaintenanceRequest>,
    ) -> Result<Response<Host>, Status> {
        principal(&req)?;
        Err(Status::permission_denied("alice is not an operator"))
    }

    async fn set_quarantine(
        &self,
        req: Request<lab_proto::v1::SetQuarantineRequest>,
    ) -> Result<Response<Host>, Status> {
        principal(&req)?;
        Err(Status::permission_denied("alice is not an operator"))
    }

    async fn check_host(
        &self,
        req: Request<lab_proto::v1::CheckHostRequest>,
    ) -> Result<Response<Host>, Status> {
        principal(&req)?;
        Err(Status::permission_denied(
            "alice may not check hosts (operators only)",
        ))
    }

    async fn reload_inventory(
        &self,
        req: Request<ReloadInventoryRequest>,
    ) -> Result<Response<ReloadInventoryResponse>, Status> {
        principal(&req)?;
        Err(Status::permission_denied("alice is not an operator"))
    }

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let principal = principal(&req)?;
        standby_refusal(&self.0)?;
        if self.0.depose_after_whoami.load(Ordering::SeqCst) {
            self.0.deposed.store(true, Ordering::SeqCst);
        }
        Ok(Response::new(WhoAmIResponse {
            principal: principal.into(),
            role: Role::Developer as i32,
            project: "xen-ci".into(),
        }))
    }
}

/// Starts a stub server on its own thread; it lives as long as the test
/// process.
fn start() -> (SocketAddr, Arc<State>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(State::default());
    let stub = Stub(state.clone());
    let (hs, ls) = (state.clone(), state.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(HostServiceServer::with_interceptor(
                    stub.clone(),
                    move |req: Request<()>| standby_check(&hs).map(|()| req),
                ))
                .add_service(LeaseServiceServer::with_interceptor(
                    stub.clone(),
                    move |req: Request<()>| standby_check(&ls).map(|()| req),
                ))
                .add_service(EventServiceServer::new(stub.clone()))
                .add_service(AdminServiceServer::new(stub))
                // Nagle on the server side costs a delayed-ACK round (40 ms)
                // on some calls: set TCP_NODELAY as a real server must.
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await
                .unwrap();
        });
    });
    (addr, state)
}

fn lab(addr: SocketAddr, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lab"));
    cmd.arg("--server").arg(format!("http://{addr}")).args(args);
    cmd.env_remove("LAB_SERVER").env_remove("LAB_TOKEN");
    if let Some(t) = token {
        cmd.env("LAB_TOKEN", t);
    }
    cmd
}

fn run(addr: SocketAddr, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = lab(addr, token, args).output().unwrap();
    (
        status.code().expect("exited, not signalled"),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

const GOOD: Option<&str> = Some("good");

#[test]
fn whoami_sends_the_token() {
    let (addr, _) = start();
    assert_eq!(
        run(addr, GOOD, &["whoami"]),
        (
            0,
            "alice (developer, project xen-ci)\n".into(),
            String::new()
        )
    );
    let (code, out, _) = run(addr, GOOD, &["whoami", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"principal": "alice", "role": "developer", "project": "xen-ci"})
    );
    let (code, out, _) = run(addr, None, &["--token", "good", "whoami"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "alice (developer, project xen-ci)\n")
    );
}

#[test]
fn auth_errors_exit_3() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, None, &["whoami"]);
    assert_eq!((code, out.as_str()), (3, ""));
    assert_eq!(
        err,
        "lab: missing token (no token given: use --token or LAB_TOKEN)\n"
    );
    let (code, _, err) = run(addr, Some("bad"), &["whoami"]);
    assert_eq!((code, err.as_str()), (3, "lab: unknown token\n"));
    let (code, _, err) = run(addr, GOOD, &["host", "maintenance", "on", "x1"]);
    assert_eq!((code, err.as_str()), (3, "lab: alice is not an operator\n"));
}

#[test]
fn host_check_is_for_operators_and_host_show_has_history() {
    let (addr, _) = start();
    let (code, _, err) = run(addr, GOOD, &["host", "check", "x1"]);
    assert_eq!(
        (code, err.as_str()),
        (3, "lab: alice may not check hosts (operators only)\n")
    );
    // The stub's log: L-1 granted to alice on x1.
    let (code, out, _) = run(addr, GOOD, &["host", "show", "x1"]);
    assert_eq!(code, 0);
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("L-1 alice active"), "{out}");
    assert!(flat.contains("health checks: none"), "{out}");
    let (code, out, _) = run(addr, GOOD, &["host", "show", "x1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["name"], "x1");
    assert_eq!(v["history"]["leases"][0]["lease_id"], "L-1");
    assert_eq!(v["history"]["leases"][0]["outcome"], "active");
}

#[test]
fn hosts_table_json_and_not_found() {
    let (addr, _) = start();
    let (code, out, _) = run(addr, GOOD, &["hosts"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "NAME  ARCH     FW    RACK  STATE                                         HEALTH   HOLDER  LEASE  EXPIRES  FLAGS\n\
         x1    x86_64   uefi  r1    leased                                        healthy  alice   L-1    in 29m   gpu\n\
         a1    aarch64  uefi  r2    available (unreachable: BMC does not answer)  healthy  -       -      -        -\n"
    );
    let (code, out, _) = run(addr, GOOD, &["hosts", "--arch", "aarch64", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "a1");
    assert_eq!(v[0]["arch"], "aarch64");
    assert_eq!(v[0]["state"], "available");
    assert_eq!(v[0]["lease_expires_at"], serde_json::Value::Null);

    let (code, out, _) = run(addr, GOOD, &["host", "show", "x1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let expires = v["lease_expires_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(expires).is_ok(), "{expires}");

    let (code, _, err) = run(addr, GOOD, &["host", "show", "nope"]);
    assert_eq!((code, err.as_str()), (4, "lab: no host named nope\n"));
}

#[test]
fn acquire_reports_the_queue_then_prints_the_lease() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "acquire", "--flag", "gpu"]);
    assert_eq!(code, 0, "{err}");
    // stderr is not a terminal: one plain line per position change.
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("waiting: position 2 of 3, ETA "),
        "{err}"
    );
    assert!(lines[0].ends_with(" (in 4m)"), "{err}");
    assert!(
        lines[1].starts_with("waiting: position 1 of 2, ETA "),
        "{err}"
    );
    assert!(!err.contains('\r') && !err.contains('\x1b'), "{err:?}");
    assert!(
        out.starts_with("lease    L-1\nhosts    x1\nexpires  in 29m ("),
        "{out}"
    );

    let (code, out, _) = run(addr, GOOD, &["lease", "acquire", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["id"], "L-1");
    assert_eq!(v["hosts"], serde_json::json!(["x1"]));
    assert_eq!(v["state"], "active");
}

#[test]
fn acquire_failures_have_their_own_exit_codes() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "acquire", "--no-wait"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (5, "", "lab: no matching host is free\n")
    );
    let (code, _, err) = run(addr, GOOD, &["lease", "acquire", "--flag", "never"]);
    assert_eq!((code, err.as_str()), (6, "lab: no host has flag never\n"));
    let (code, _, err) = run(addr, GOOD, &["lease", "renew", "L-1", "--ttl", "1h"]);
    assert_eq!((code, err.as_str()), (6, "lab: lease L-1 has expired\n"));
    let (code, _, err) = run(addr, GOOD, &["lease", "show", "L-2"]);
    assert_eq!((code, err.as_str()), (4, "lab: no such lease\n"));
}

#[test]
fn a_broken_acquire_stream_is_resumed_with_the_same_request_id() {
    let (addr, state) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "acquire", "--flag", "flaky"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("lease    L-1\n"), "{out}");
    let ids = state.request_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ids[1], "asked again with the same request id");
    assert!(
        err.contains(&format!(
            "lab: lost the request's stream (the server is shutting down); sending it again as request {}\n",
            ids[0]
        )),
        "{err}"
    );
    assert!(
        err.contains("lab: the request is back with the server\n"),
        "{err}"
    );

    // --request-id is sent as given.
    let (code, _, err) = run(addr, GOOD, &["lease", "acquire", "--request-id", "job-42"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(state.request_ids.lock().unwrap().last().unwrap(), "job-42");
}

#[test]
fn lease_list_follows_pages() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["--json", "lease", "list", "--all"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["L-1", "L-2"]);
}

#[test]
fn ctrl_c_while_waiting_withdraws_the_request() {
    let (addr, state) = start();
    let mut child = lab(addr, GOOD, &["lease", "acquire", "--flag", "hang"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.starts_with("waiting: position 1 of 1"), "{first}");

    let pid = child.id().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert_eq!(rest, "lab: interrupted: the lease request was withdrawn\n");

    let deadline = Instant::now() + Duration::from_secs(5);
    while !state.withdrawn.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the server never saw the stream close"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn events_lines_json_and_follow() {
    let (addr, _) = start();
    let (code, out, _) = run(addr, GOOD, &["events"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("1 "), "{out}");
    assert!(
        lines[0].ends_with(" alice lease-requested waiter=9 request: count=1 arch=any flags=gpu"),
        "{out}"
    );
    assert!(
        lines[1].ends_with(" alice lease-granted hosts=x1 lease=L-1"),
        "{out}"
    );

    // --limit bounds the events printed, over pages.
    let (code, out, _) = run(addr, GOOD, &["events", "--limit", "1"]);
    assert_eq!((code, out.lines().count()), (0, 1), "{out}");

    let (code, out, _) = run(addr, GOOD, &["events", "--json"]);
    assert_eq!(code, 0);
    let objects: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(objects[1]["kind"], "lease-granted");

    // The stub ends the watch after the backlog, as a server going away would.
    let (code, out, err) = run(
        addr,
        GOOD,
        &["events", "--follow", "--after", "1", "--json"],
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(
        (code, err.as_str()),
        (
            7,
            "lab: the server closed the event stream (resume with --after 2)\n"
        )
    );
}

#[test]
fn cannot_connect_exits_7_naming_the_server() {
    // A port that was just free: the connection is refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, out, err) = run(addr, GOOD, &["hosts"]);
    assert_eq!((code, out.as_str()), (7, ""));
    let prefix = format!("lab: cannot connect to http://{addr}: ");
    assert!(err.starts_with(&prefix), "{err}");
}

/// Runs `lab` with `input` on its stdin (a pipe, closed after the input).
fn run_with_stdin(addr: SocketAddr, args: &[&str], input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = lab(addr, GOOD, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    (
        status.code().expect("exited, not signalled"),
        stdout,
        String::from_utf8(stderr).unwrap(),
    )
}

#[test]
fn power_prints_the_state_read_back() {
    let (addr, _) = start();
    assert_eq!(
        run(addr, GOOD, &["power", "status", "x1"]),
        (0, "x1: off\n".into(), String::new())
    );
    assert_eq!(
        run(addr, GOOD, &["power", "on", "x1"]),
        (0, "x1: on\n".into(), String::new())
    );
    let (code, out, _) = run(addr, GOOD, &["power", "status", "x1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"host": "x1", "on": true, "power": "on"})
    );
    let (code, out, _) = run(addr, GOOD, &["power", "cycle", "x1"]);
    assert_eq!((code, out.as_str()), (0, "x1: on\n"));
}

#[test]
fn power_errors_map_to_exit_codes() {
    let (addr, _) = start();
    // Anyone may read the power of a host that is not theirs.
    let (code, out, _) = run(addr, GOOD, &["power", "status", "a1"]);
    assert_eq!((code, out.as_str()), (0, "a1: off\n"));
    let (code, out, err) = run(addr, GOOD, &["power", "off", "a1"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "", "lab: a1 is not leased by alice\n")
    );
    let (code, _, err) = run(addr, GOOD, &["power", "on", "nope"]);
    assert_eq!((code, err.as_str()), (4, "lab: no host named nope\n"));
    let (code, _, err) = run(addr, GOOD, &["power", "reset", "gone"]);
    assert_eq!(
        (code, err.as_str()),
        (7, "lab: the agent of rack r9 is away\n")
    );
    let (code, _, _) = run(addr, GOOD, &["power", "toggle", "x1"]);
    assert_eq!(code, 2);
}

#[test]
fn hosts_show_unreachable_hosts_and_why() {
    let (addr, _) = start();
    let (code, out, _) = run(addr, GOOD, &["host", "show", "a1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\nreachable    no: BMC does not answer\n"),
        "{out}"
    );
    let (code, out, _) = run(addr, GOOD, &["host", "show", "a1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reachable"], false);
    assert_eq!(v["unreachable_reason"], "BMC does not answer");
}

#[test]
fn console_follow_prints_output_and_notices() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["console", "x1", "--follow"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "boot: ok\r\nlogin: ");
    assert_eq!(
        err,
        "[connected to x1 console, read-only; Ctrl-C to quit]\n\
         [lab: replaying 10 bytes]\n\
         [lab: session closed by the stub]\n\
         [console closed by the server]\n"
    );
    let (code, out, err) = run(addr, GOOD, &["console", "x1", "-f", "--replay", "4"]);
    assert_eq!((code, out.as_str()), (0, "ok\r\nlogin: "), "{err}");
    assert!(err.contains("[lab: replaying 4 bytes]\n"), "{err}");

    let (code, out, err) = run(addr, GOOD, &["console", "a1", "--follow"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (3, "", "lab: a1 is not leased by alice\n")
    );
}

#[test]
fn console_without_a_terminal_sends_stdin_and_prints_the_echo() {
    let (addr, _) = start();
    let started = Instant::now();
    // No escape processing without --escape: Ctrl-E c . is just bytes.
    let (code, out, err) = run_with_stdin(addr, &["console", "x1"], b"hello\n\x05c.");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, b"boot: ok\r\nhello\n\x05c.");
    assert_eq!(
        err,
        "[connected to x1 console, write access]\n[lab: replaying 10 bytes]\n"
    );
    // It lingers a second after stdin ends, and not much more.
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn console_escapes_with_escape_flag() {
    let (addr, _) = start();
    let (code, out, err) =
        run_with_stdin(addr, &["console", "x1", "--escape"], b"ab\x05cbcd\x05c?");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, b"boot: ok\r\nabcd");
    assert!(
        err.starts_with("[connected to x1 console, write access; Ctrl-E c . to detach]\n"),
        "{err}"
    );
    assert!(err.contains("[lab: sending a break]\n"), "{err}");
    assert!(err.contains("[lab: break sent]\n"), "{err}");
    assert!(
        err.contains("[lab: Ctrl-E c .  detach from the console]\n"),
        "{err}"
    );

    // Detach: what follows the escape is never sent.
    let (code, out, err) = run_with_stdin(addr, &["console", "x1", "--escape"], b"x\x05c.y");
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(&b'y'), "{out:?}");
    assert!(err.ends_with("[detached from x1]\n"), "{err}");
}

#[test]
fn console_log_of_a_lease_in_order() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["console", "--lease", "L-1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "one\ntwo\n");
    assert_eq!(err, "==> x1 <==\n[lab: gap: 3 s of output lost]\n");

    let (code, out, err) = run(addr, GOOD, &["console", "--lease", "L-3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "x1 first\na1 first\nx1 second\n");
    assert_eq!(err, "==> x1 <==\n==> a1 <==\n==> x1 <==\n");

    let (code, _, err) = run(addr, GOOD, &["console", "--lease", "L-9"]);
    assert_eq!((code, err.as_str()), (4, "lab: no such lease\n"));
}

#[test]
fn acquire_wait_ready_prints_stages_until_ready() {
    let (addr, _) = start();
    let (code, out, err) = run(
        addr,
        GOOD,
        &["lease", "acquire", "--flag", "boots", "--wait-ready"],
    );
    assert_eq!(code, 0, "{err}");
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("waiting: "))
        .collect();
    assert_eq!(
        progress,
        [
            "x1: pending",
            "x1: booting \u{2014} boot device pxe",
            "x1: booting \u{2014} powered on",
            "x1: installing 42 % \u{2014} writing the image",
            "x1: booting \u{2014} rebooting",
            "x1: booting \u{2014} booting from disk",
            "x1: ready \u{2014} ready marker seen",
        ]
    );
    assert!(out.starts_with("lease    L-ok\nhosts    x1\n"), "{out}");

    let (code, out, _) = run(
        addr,
        GOOD,
        &[
            "lease",
            "acquire",
            "--flag",
            "boots",
            "--wait-ready=1m",
            "--json",
        ],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["provisioning"][0]["phase"], "ready");
    assert_eq!(v["provisioning"][0]["stage"], "ready marker seen");
}

#[test]
fn acquire_wait_ready_fails_with_the_console_tail() {
    let (addr, _) = start();
    let (code, out, err) = run(
        addr,
        GOOD,
        &["lease", "acquire", "--flag", "fails", "--wait-ready=1m"],
    );
    assert_eq!(code, 8, "{err}");
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("waiting: "))
        .collect();
    assert_eq!(
        progress,
        [
            "x1: pending",
            "x1: booting \u{2014} powered on",
            "x1: failed \u{2014} no ready marker within 180s",
            "==> console of x1 (last lines) <==",
            "Loading xen...",
            "(XEN) Panic on CPU 0",
            "x1 failed: the job's fault (rule \"Xen panic\"): (XEN) Panic on CPU 0",
            "lab: provisioning failed on x1: no ready marker within 180s; \
             lease L-bad is still held",
        ]
    );
    assert!(
        err.contains("\nLoading xen...\r\n(XEN) Panic on CPU 0\r\n"),
        "the tail as the server sent it: {err:?}"
    );
    // The lease is printed all the same, so a script can release it.
    assert!(out.starts_with("lease    L-bad\n"), "{out}");
}

#[test]
fn wait_ready_on_an_existing_lease() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "wait-ready", "L-ok"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.ends_with("x1: ready \u{2014} ready marker seen\n"),
        "{err}"
    );
    assert!(out.starts_with("lease    L-ok\n"), "{out}");

    let (code, out, err) = run(
        addr,
        GOOD,
        &["lease", "wait-ready", "L-slow", "--timeout", "1s"],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (
            9,
            "",
            "x1: booting \u{2014} powered on\n\
             lab: not ready after 1s (x1: booting \u{2014} powered on); \
             lease L-slow is still held\n"
        )
    );

    let (code, _, err) = run(addr, GOOD, &["lease", "wait-ready", "L-gone"]);
    assert_eq!(code, 6, "{err}");
    assert!(
        err.ends_with("lab: lease L-gone is expired while its hosts were booting\n"),
        "{err}"
    );

    let (code, _, err) = run(addr, GOOD, &["lease", "wait-ready", "L-9"]);
    assert_eq!((code, err.as_str()), (4, "lab: no such lease\n"));
}

#[test]
fn lease_show_has_boot_progress() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "show", "L-3"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "\nHOST  PHASE   STAGE                        UPDATED\n\
             x1    ready   ready marker seen            now\n\
             a1    failed  no ready marker within 180s  now\n\
             \n==> console of a1 (last lines) <==\n\
             Loading xen...\r\n(XEN) Panic on CPU 0\r\n"
        ),
        "{out}"
    );
    let (code, out, _) = run(addr, GOOD, &["lease", "show", "L-3", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["provisioning"][1]["host"], "a1");
    assert_eq!(v["provisioning"][1]["phase"], "failed");
    assert_eq!(
        v["provisioning"][1]["console_tail"],
        "Loading xen...\r\n(XEN) Panic on CPU 0\r\n"
    );
    assert_eq!(
        v["provisioning"][0]["console_tail"],
        serde_json::Value::Null
    );
}

/// Chunks read from a pty master on a thread of their own, so a test can
/// wait with a deadline.
struct PtyOutput {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl PtyOutput {
    fn new(mut master: std::fs::File) -> Self {
        let (tx, chunks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        PtyOutput {
            chunks,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 10 s) until `want` has been seen.
    fn until(&mut self, want: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.seen.windows(want.len()).any(|w| w == want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => panic!(
                    "never saw {:?} in {:?}",
                    want.escape_ascii().to_string(),
                    self.seen.escape_ascii().to_string()
                ),
            }
        }
    }
}

/// The terminal path: `lab console` on a pseudo-terminal: raw mode (keys
/// reach the host one by one, Ctrl-C included, with no local echo; our own
/// messages end in `\r\n`), the escapes, and the terminal settings restored
/// after detaching.
#[test]
fn console_on_a_terminal_is_raw_and_restored() {
    use nix::sys::termios::{LocalFlags, OutputFlags, tcgetattr};
    let (addr, _) = start();
    let pty = nix::pty::openpty(None, None).unwrap();
    let before = tcgetattr(&pty.slave).unwrap();
    assert!(
        before
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    );
    let mut child = lab(addr, GOOD, &["console", "x1"])
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut out = PtyOutput::new(master.try_clone().unwrap());
    out.until(b"[connected to x1 console, write access; Ctrl-E c . to detach]\r\n");
    out.until(b"boot: ok\r\n");
    // No newline: in canonical mode these would never reach lab.
    master.write_all(b"hi\x03").unwrap();
    out.until(b"hi\x03");
    master.write_all(b"\x05c.").unwrap();
    out.until(b"[detached from x1]\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "lab did not exit after detaching"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    let text = out.seen.escape_ascii().to_string();
    assert_eq!(text.matches("hi").count(), 1, "no local echo: {text}");
    let after = tcgetattr(&pty.slave).unwrap();
    assert_eq!(after.local_flags, before.local_flags, "lflag restored");
    assert_eq!(after.input_flags, before.input_flags, "iflag restored");
    assert_eq!(after.output_flags, before.output_flags, "oflag restored");
    assert!(after.output_flags.contains(OutputFlags::OPOST));
}

#[test]
fn terminal_escapes_from_the_server_are_shown_escaped() {
    let (addr, _) = start();
    let (code, out, err) = run(addr, GOOD, &["lease", "show", "L-evil"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains('\x1b') && !out.contains('\u{9b}') && !out.contains('\u{202e}'));
    assert!(
        out.contains("\ncomment      ci \\x1b]0;pwned\\x07\\x1b[2J\n"),
        "{out}"
    );
    assert!(
        out.contains("x1    failed  stage \\u{9b}31m\\u{202e}txt.exe  -\n"),
        "{out}"
    );
    // The tail keeps its line ends; a lone \r would overwrite a line. The
    // attribution's rule and line are escaped too.
    assert!(
        out.ends_with(
            "==> console of x1 (last lines) <==\n\
             \\x1b[1;31mpanic\\x1b[0m\r\nfake\\rline\r\n\
             x1 failed: the job's fault (rule \"rule \\u{202e}evil\"): \\x1b]0;owned\\x07line\n"
        ),
        "{out:?}"
    );

    // JSON: the same strings, nothing raw for a terminal either.
    let (code, out, _) = run(addr, GOOD, &["lease", "show", "L-evil", "--json"]);
    assert_eq!(code, 0);
    assert!(!out.contains('\x1b') && !out.contains('\u{9b}') && !out.contains('\u{202e}'));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["comment"], EVIL_COMMENT);
    assert_eq!(
        v["provisioning"][0]["stage"],
        "stage \u{9b}31m\u{202e}txt.exe"
    );
    assert_eq!(v["provisioning"][0]["failure"]["class"], "job");
    assert_eq!(
        v["provisioning"][0]["failure"]["line"],
        "\x1b]0;owned\x07line"
    );

    // --wait-ready: the stage and the tail on stderr, then the error.
    let (code, _, err) = run(addr, GOOD, &["lease", "wait-ready", "L-evil"]);
    assert_eq!(code, 8, "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\u{9b}'), "{err:?}");
    assert!(
        err.starts_with("x1: failed \u{2014} stage \\u{9b}31m\\u{202e}txt.exe\n"),
        "{err}"
    );
    assert!(
        err.ends_with(
            "lab: provisioning failed on x1: stage \\u{9b}31m\\u{202e}txt.exe; \
             lease L-evil is still held\n"
        ),
        "{err}"
    );

    // A status message that echoes what it was given.
    let (code, _, err) = run(addr, GOOD, &["host", "show", "\x1b[2Jx9"]);
    assert_eq!((code, err.as_str()), (4, "lab: no host named \\x1b[2Jx9\n"));
}

/// `lab --server SERVERS ARGS` (several replicas).
fn run_on(servers: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .arg("--server")
        .arg(servers)
        .args(args)
        .env_remove("LAB_SERVER")
        .env("LAB_TOKEN", "good")
        .output()
        .unwrap();
    (
        out.status.code().expect("exited, not signalled"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_leader_deposed_after_it_was_found_sends_the_command_to_the_next() {
    // a answers the CLI's WhoAmI as the leader, then stands by naming b.
    let (b, b_state) = start();
    let (a, a_state) = start();
    *a_state.leader.lock().unwrap() = format!("http://{b}");
    a_state.depose_after_whoami.store(true, Ordering::SeqCst);
    let servers = format!("http://{a},http://{b}");
    let moved = format!("lab: http://{a} did not answer as the leader; asking http://{b}");

    // A read: asked again of b.
    let (code, out, err) = run_on(&servers, &["--json", "hosts"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"x1\""), "{out}");
    assert!(err.contains(&moved), "{err}");
    assert_eq!(b_state.answered.load(Ordering::SeqCst), 1);

    // A change a standby refused (so nothing was done): sent again to b.
    a_state.deposed.store(false, Ordering::SeqCst);
    let (code, _, err) = run_on(&servers, &["lease", "release", "L-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&moved), "{err}");
    assert_eq!(b_state.answered.load(Ordering::SeqCst), 2);

    // A command that streams is not run again: exit 7, as before.
    a_state.deposed.store(false, Ordering::SeqCst);
    let (code, _, err) = run_on(&servers, &["console", "--lease", "L-1"]);
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains("this lab-server is a standby") && !err.contains("asking"),
        "{err}"
    );
    assert_eq!(b_state.answered.load(Ordering::SeqCst), 2);

    // One replica (no WhoAmI is asked), standing by: nothing to move to.
    a_state.deposed.store(true, Ordering::SeqCst);
    let (code, _, err) = run_on(&format!("http://{a}"), &["hosts"]);
    assert_eq!(code, 7, "{err}");
}
