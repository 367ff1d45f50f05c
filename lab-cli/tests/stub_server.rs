//! The real `lab` binary against a stub lab-server running in this process:
//! exit codes, error messages, the bearer token, the acquire stream (queue
//! lines, grant, Ctrl-C withdrawing the request) and JSON output.
//!
//! The stub answers from fixed data; it checks the token the way the real
//! server will (`authorization: Bearer good` is alice, a developer).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lab_proto::convert::timestamp_from_millis;
use lab_proto::v1::acquire_update::Update;
use lab_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use lab_proto::v1::event_service_server::{EventService, EventServiceServer};
use lab_proto::v1::host_service_server::{HostService, HostServiceServer};
use lab_proto::v1::lease_service_server::{LeaseService, LeaseServiceServer};
use lab_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct State {
    /// Set when a waiting Acquire stream was dropped by the client.
    withdrawn: AtomicBool,
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
            ..Default::default()
        },
        Host {
            name: "a1".into(),
            arch: Arch::Aarch64 as i32,
            firmware: Firmware::Uefi as i32,
            rack: "r2".into(),
            state: HostState::Available as i32,
            ..Default::default()
        },
    ]
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
}

#[tonic::async_trait]
impl LeaseService for Stub {
    type AcquireStream = Stream<AcquireUpdate>;

    async fn acquire(
        &self,
        req: Request<AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        principal(&req)?;
        let AcquireRequest { request, no_wait } = req.into_inner();
        let flags = request.unwrap_or_default().flags;
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
                    })),
                })
            };
            if hang {
                let _ = tx.send(queued(1, 1)).await;
                tx.closed().await;
                state.withdrawn.store(true, Ordering::SeqCst);
                return;
            }
            for (pos, len) in [(2, 3), (2, 2), (1, 2)] {
                let _ = tx.send(queued(pos, len)).await;
            }
            let granted = AcquireUpdate {
                update: Some(Update::Granted(lease())),
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
        if req.get_ref().lease_id != "L-1" {
            return Err(Status::not_found("no such lease"));
        }
        Ok(Response::new(lease()))
    }

    async fn list_leases(
        &self,
        req: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        principal(&req)?;
        Ok(Response::new(ListLeasesResponse {
            leases: vec![lease()],
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
        Ok(Response::new(ListEventsResponse {
            events: events(),
            last_seq: 0,
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
        Ok(Response::new(WhoAmIResponse {
            principal: principal.into(),
            role: Role::Developer as i32,
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
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(HostServiceServer::new(stub.clone()))
                .add_service(LeaseServiceServer::new(stub.clone()))
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
        (0, "alice (developer)\n".into(), String::new())
    );
    let (code, out, _) = run(addr, GOOD, &["whoami", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"principal": "alice", "role": "developer"})
    );
    let (code, out, _) = run(addr, None, &["--token", "good", "whoami"]);
    assert_eq!((code, out.as_str()), (0, "alice (developer)\n"));
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
fn hosts_table_json_and_not_found() {
    let (addr, _) = start();
    let (code, out, _) = run(addr, GOOD, &["hosts"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "NAME  ARCH     FW    RACK  STATE      HOLDER  LEASE  EXPIRES  FLAGS\n\
         x1    x86_64   uefi  r1    leased     alice   L-1    in 29m   gpu\n\
         a1    aarch64  uefi  r2    available  -       -      -        -\n"
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
