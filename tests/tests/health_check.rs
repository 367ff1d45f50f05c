//! Health checks over real gRPC, in process, with a fake rack agent played
//! by the test: an operator's `CheckHost` leases the host to `lab-health`
//! with profile `health-check`; the agent answers READY with the facts line
//! (`HostReport.ready_line`); facts that miss the inventory's expectations
//! quarantine the host (never granted, a request for any host gets the
//! other one), facts that match make it healthy and granted again. Only
//! operators check; an unknown host is NOT_FOUND, one in maintenance
//! FAILED_PRECONDITION.

use lab_proto::v1 as pb;
use lab_tests::{Clients, InProcessServer, ServerOptions};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(15);

const INVENTORY: &str = r#"
[[rack]]
name = "r1"
agent = "agent-r1"

[[host]]
name = "h1"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:01"
expect = { memory_mb = 1024, cpus = 2 }

[[host]]
name = "h2"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:02"
"#;

/// h1 with half the memory its inventory expects (a `memory` fault).
const HALF_MEMORY: &str = "LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=506880 model=QEMU_Virtual_CPU macs=52:54:00:00:00:01 disks=vda:8589934592 virt=vmx iommu=no kernel=6.1.0-27-amd64";
/// h1 as its inventory describes it.
const HEALTHY: &str = "LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=1012345 model=QEMU_Virtual_CPU macs=52:54:00:00:00:01 disks=vda:8589934592 virt=vmx iommu=no kernel=6.1.0-27-amd64";

async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn host(c: &Clients, name: &str) -> pb::Host {
    c.clone()
        .hosts
        .get_host(pb::GetHostRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The fake agent of r1: attached, its hosts reachable, every command
/// answered with success (a reclaim powers nothing off here).
struct FakeAgent {
    tx: mpsc::Sender<pb::AgentMessage>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    async fn attach(server: &InProcessServer) -> FakeAgent {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = lab_client::auth::BearerToken::new("agent-r1").unwrap();
        let mut client = pb::agent_service_client::AgentServiceClient::with_interceptor(
            channel,
            lab_client::auth::BearerAuth::new(Some(token)),
        );
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        tx.send(msg(pb::agent_message::Msg::Hello(pb::AgentHello {
            rack: "r1".into(),
            version: "test".into(),
        })))
        .await
        .unwrap();
        let mut from_server = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let replies = tx.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(m)) = from_server.message().await {
                if let Some(pb::server_message::Msg::Command(c)) = m.msg {
                    let reply = pb::CommandReply {
                        id: c.id,
                        ..Default::default()
                    };
                    if replies
                        .send(msg(pb::agent_message::Msg::Reply(reply)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let agent = FakeAgent { tx, _task: task };
        for h in ["h1", "h2"] {
            agent
                .report(pb::HostReport {
                    host: h.into(),
                    reachable: true,
                    ..Default::default()
                })
                .await;
        }
        agent
    }

    async fn report(&self, r: pb::HostReport) {
        self.tx
            .send(msg(pb::agent_message::Msg::Report(r)))
            .await
            .unwrap();
    }

    /// READY for the check running on `name`, with `facts` as the line that
    /// matched the profile's ready text.
    async fn ready(&self, c: &Clients, name: &str, facts: &str) -> String {
        let lease = until("the check's lease", || async {
            let h = host(c, name).await;
            (h.holder == "lab-health" && h.state == pb::HostState::Leased as i32)
                .then_some(h.lease_id)
        })
        .await;
        let l = c
            .clone()
            .leases
            .get_lease(pb::GetLeaseRequest {
                lease_id: lease.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.profile, "health-check");
        self.report(pb::HostReport {
            host: name.into(),
            reachable: true,
            lease_id: lease.clone(),
            phase: pb::ProvisionPhase::Ready as i32,
            stage: "ready".into(),
            ready_line: facts.into(),
            ..Default::default()
        })
        .await;
        lease
    }
}

fn msg(m: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_check_quarantines_a_passing_one_returns_the_host() {
    use lab_server::auth::Authenticator;
    let auth = Authenticator::parse(
        &lab_tests::tokens_toml(&[
            ("t-alice", "alice", "ci"),
            ("t-op", "root", "operator"),
            ("agent-r1", "agent-r1", "agent"),
        ]),
        Path::new("tokens.toml"),
    )
    .unwrap();
    let server = InProcessServer::start(ServerOptions {
        inventory: Some(INVENTORY.into()),
        agents: true,
        auth,
        ..Default::default()
    })
    .await
    .unwrap();
    let alice = server.clients("t-alice").await.unwrap();
    let op = server.clients("t-op").await.unwrap();
    let agent = FakeAgent::attach(&server).await;
    until("h1 and h2 reachable", || async {
        (host(&alice, "h1").await.reachable && host(&alice, "h2").await.reachable).then_some(())
    })
    .await;

    // Who may check what.
    let check = |c: &Clients, name: &str| {
        let mut c = c.clone();
        let name = name.to_string();
        async move {
            c.admin
                .check_host(pb::CheckHostRequest { host: name })
                .await
        }
    };
    let e = check(&alice, "h1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = check(&op, "h7").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    op.clone()
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h1".into(),
            maintenance: true,
            reason: "fans".into(),
        })
        .await
        .unwrap();
    let e = check(&op, "h1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    op.clone()
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h1".into(),
            maintenance: false,
            reason: String::new(),
        })
        .await
        .unwrap();

    // Half the memory: quarantined, with a reason naming it.
    check(&op, "h1").await.unwrap();
    let first = agent.ready(&op, "h1", HALF_MEMORY).await;
    let h1 = until("h1 quarantined", || async {
        let h = host(&alice, "h1").await;
        (h.health == pb::HostHealth::Quarantined as i32).then_some(h)
    })
    .await;
    assert_eq!(
        h1.health_reason,
        "health check failed: memory 495 MiB, inventory expects 1024 MiB (by lab-health)"
    );
    // The check's lease ends as any lease does (reclaimed through the agent).
    until("h1 free again", || async {
        (host(&alice, "h1").await.state == pb::HostState::Available as i32).then_some(())
    })
    .await;

    // Never granted: a request for any host gets h2; one for h1 alone waits.
    let l = alice
        .clone()
        .grant_now(pb::LeaseRequest::default())
        .await
        .unwrap();
    assert_eq!(l.hosts, ["h2"]);
    let e = alice
        .clone()
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h1".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    alice
        .clone()
        .leases
        .release(pb::ReleaseRequest {
            lease_id: l.id.clone(),
        })
        .await
        .unwrap();

    // The fault is fixed: the next check (on the quarantined host) passes.
    check(&op, "h1").await.unwrap();
    let second = agent.ready(&op, "h1", HEALTHY).await;
    until("h1 healthy", || async {
        (host(&alice, "h1").await.health == pb::HostHealth::Healthy as i32).then_some(())
    })
    .await;
    let l = until("h1 granted again", || async {
        alice
            .clone()
            .grant_now(pb::LeaseRequest {
                hosts: vec!["h1".into()],
                ..Default::default()
            })
            .await
            .ok()
    })
    .await;
    assert_eq!(l.hosts, ["h1"]);

    // The event log tells the story, by lab-health.
    let events = op
        .clone()
        .events
        .list_events(pb::ListEventsRequest {
            host: "h1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let checks: Vec<(i32, String, String)> = events
        .iter()
        .filter(|e| {
            [
                pb::EventKind::HealthCheckStarted,
                pb::EventKind::HealthCheckPassed,
                pb::EventKind::HealthCheckFailed,
            ]
            .iter()
            .any(|k| *k as i32 == e.kind)
        })
        .map(|e| (e.kind, e.lease_id.clone(), e.detail.clone()))
        .collect();
    assert_eq!(
        checks,
        [
            (
                pb::EventKind::HealthCheckStarted as i32,
                first.clone(),
                "asked for by root".to_string()
            ),
            (
                pb::EventKind::HealthCheckFailed as i32,
                first,
                "memory 495 MiB, inventory expects 1024 MiB".to_string()
            ),
            (
                pb::EventKind::HealthCheckStarted as i32,
                second.clone(),
                "asked for by root".to_string()
            ),
            (
                pb::EventKind::HealthCheckPassed as i32,
                second,
                "the facts match the inventory".to_string()
            ),
        ]
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind == pb::EventKind::HealthCheckStarted as i32)
            .all(|e| e.actor == "lab-health")
    );
}
