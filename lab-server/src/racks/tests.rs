//! Registry tests on paused time, with a fake agent in place of the Attach
//! stream (two channels, no gRPC) and a real core on the in-memory store:
//! the hello and the full state, detach and replacement, commands that time
//! out or fail, reports, the reclaim step, and every refusal.

use super::*;
use crate::core::clock::TokioClock;
use crate::core::policy::AuthMode;
use crate::core::reclaim::ReclaimJob;
use crate::core::{Core, CoreConfig, CoreError, WaitState};
use crate::inventory::Inventory;
use crate::lease::{HostState, Lease, LeaseSpec};
use crate::store::memory::MemStore;
use crate::types::{Caller, HostName, Principal, ProfileName, RackName, Role, Timestamp};
use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

const INVENTORY: &str = r#"
[[rack]]
name = "r1"
agent = "a1"

[[rack]]
name = "r2"

[[host]]
name = "h1"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:01"
ipv4 = "10.0.0.1"
[host.bmc]
address = "127.0.0.1"
port = 10001
user = "admin"
password_file = "PW"
[host.console]
kind = "tcp"
address = "127.0.0.1:9"

[[host]]
name = "h2"
arch = "x86_64"
firmware = "uefi"
rack = "r1"
mac = "52:54:00:00:00:02"
[host.console]
kind = "none"

[[host]]
name = "h3"
arch = "x86_64"
firmware = "bios"
rack = "r2"
mac = "52:54:00:00:00:03"
[host.bmc]
address = "127.0.0.1"
port = 10003
user = "admin"
password_file = "PW"
"#;

/// A core on the in-memory store with the registry's reclaimer, and the
/// registry wired to it.
struct Lab {
    core: Core,
    racks: Racks,
    dir: tempfile::TempDir,
}

fn inventory_text(dir: &Path, with_agent: bool) -> String {
    let text = INVENTORY.replace("PW", &dir.join("bmc.pw").display().to_string());
    if with_agent {
        text
    } else {
        text.replace("agent = \"a1\"\n", "")
    }
}

async fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bmc.pw"), "secret-pw\n").unwrap();
    let path = dir.path().join("inventory.toml");
    std::fs::write(&path, inventory_text(dir.path(), true)).unwrap();
    let inventory = Inventory::load(&path).unwrap();
    let clock = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
    let registry = RackRegistry::new(clock.clone());
    let (core, _actor) = Core::start(
        CoreConfig::new(path),
        Arc::new(MemStore::new()),
        inventory,
        registry.reclaimer(),
        clock,
    )
    .await
    .unwrap();
    let racks = Racks::start(core.clone(), registry);
    settle().await;
    Lab { core, racks, dir }
}

fn h(name: &str) -> HostName {
    HostName::new(name).unwrap()
}

fn caller(name: &str, role: Role) -> Caller {
    Caller {
        principal: Principal::new(name).unwrap(),
        role,
    }
}

fn hello(rack: &str) -> FromAgent {
    FromAgent::Hello(Hello {
        rack: RackName::new(rack).unwrap(),
        version: "test".into(),
    })
}

/// Let the core, the registry and their tasks run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Polls `f` (every 10 ms of paused time, up to a minute) until it gives a
/// value.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..6000 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no {what} within a minute");
}

/// Fails the test rather than hanging it.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(600), f)
        .await
        .unwrap_or_else(|_| panic!("no {what} within 600 s"))
}

/// The registry's side of a link, played by the test.
struct FakeAgent {
    up: mpsc::Sender<Result<FromAgent, LinkError>>,
    down: mpsc::Receiver<Outbound>,
}

/// Opens a link as `who` (tokens, not the development mode), sending
/// `first` before the registry looks.
async fn link(
    racks: &Racks,
    who: Caller,
    first: Vec<Result<FromAgent, LinkError>>,
    close: bool,
) -> Result<FakeAgent, RackError> {
    link_in(racks, who, AuthMode::Tokens, first, close).await
}

async fn link_in(
    racks: &Racks,
    who: Caller,
    mode: AuthMode,
    first: Vec<Result<FromAgent, LinkError>>,
    close: bool,
) -> Result<FakeAgent, RackError> {
    let (up, rx) = mpsc::channel(64);
    for m in first {
        up.send(m).await.unwrap();
    }
    let keep = (!close).then_some(up);
    let down = racks
        .attach(who, mode, Box::pin(ReceiverStream::new(rx)))
        .await?;
    let up = keep.unwrap_or_else(|| mpsc::channel(1).0);
    Ok(FakeAgent { up, down })
}

/// Agent `a1` attached for rack r1.
async fn attach(racks: &Racks) -> FakeAgent {
    link(
        racks,
        caller("a1", Role::Agent),
        vec![Ok(hello("r1"))],
        false,
    )
    .await
    .unwrap()
}

impl FakeAgent {
    async fn recv(&mut self) -> ToAgent {
        within("message for the agent", self.down.recv())
            .await
            .expect("the link is open")
            .expect("no error down the link")
    }

    /// The next command, skipping desired-state updates.
    async fn command(&mut self) -> Command {
        loop {
            if let ToAgent::Command(c) = self.recv().await {
                return c;
            }
        }
    }

    async fn send(&self, m: FromAgent) {
        self.up.send(Ok(m)).await.unwrap();
    }

    async fn reply(&self, id: CommandId, outcome: Result<Done, AgentFailure>) {
        self.send(FromAgent::Reply(CommandReply { id, outcome }))
            .await;
    }

    /// Commands received so far, without waiting.
    fn commands_so_far(&mut self) -> Vec<Command> {
        let mut v = Vec::new();
        while let Ok(m) = self.down.try_recv() {
            if let Ok(ToAgent::Command(c)) = m {
                v.push(c);
            }
        }
        v
    }
}

async fn grant(core: &Core, who: &str, host: &str, profile: Option<&str>) -> Lease {
    let spec = LeaseSpec {
        arch: None,
        flags: BTreeSet::new(),
        hosts: BTreeSet::from([h(host)]),
        count: 1,
        profile: profile.map(|p| ProfileName::new(p).unwrap()),
        ttl: Duration::from_secs(3600),
        priority: 0,
        comment: String::new(),
        ssh_public_key: None,
        min_ttl: None,
    };
    let mut acq = core
        .acquire(
            caller(who, Role::Ci),
            crate::core::AcquireRequest {
                spec,
                no_wait: true,
                request_id: None,
                preemptible: false,
            },
        )
        .await
        .unwrap();
    loop {
        match acq.next().await.expect("a final state") {
            WaitState::Granted(l) => return l,
            WaitState::Queued { .. } => continue,
            WaitState::Failed(e) => panic!("{host} not granted: {e}"),
        }
    }
}

async fn unreachable(core: &Core, host: &str) -> Option<String> {
    core.get_host(h(host)).await.unwrap().unreachable
}

async fn state(core: &Core, host: &str) -> HostState {
    core.get_host(h(host)).await.unwrap().record.state
}

const AWAY: &str = "agent a1 of rack r1 is not attached";

#[tokio::test(start_paused = true)]
async fn hello_gets_the_full_rack_state_and_its_hosts_become_reachable() {
    let lab = lab().await;
    assert_eq!(unreachable(&lab.core, "h1").await.as_deref(), Some(AWAY));
    assert_eq!(unreachable(&lab.core, "h2").await.as_deref(), Some(AWAY));
    // A rack without an agent is never unreachable.
    assert_eq!(unreachable(&lab.core, "h3").await, None);

    let mut agent = attach(&lab.racks).await;
    let ToAgent::Rack(rack) = agent.recv().await else {
        panic!("the full state first")
    };
    assert_eq!(rack.rack.as_str(), "r1");
    let names: Vec<&str> = rack.hosts.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["h1", "h2"]);
    let h1 = rack.hosts[0].hardware.as_ref().unwrap();
    let bmc = h1.bmc.as_ref().unwrap();
    assert_eq!((bmc.endpoint.port, bmc.user.as_str()), (10001, "admin"));
    assert_eq!(
        bmc.password.expose(),
        b"secret-pw",
        "resolved, newline trimmed"
    );
    assert!(rack.hosts[1].hardware.as_ref().unwrap().bmc.is_none());
    assert!(rack.hosts.iter().all(|d| d.lease.is_none() && !d.retired));
    assert!(
        lab.racks
            .registry()
            .is_attached(&RackName::new("r1").unwrap())
    );
    assert_eq!(unreachable(&lab.core, "h1").await, None);

    // A grant sends that host's desired state again, with the lease.
    let lease = grant(&lab.core, "alice", "h1", Some("xen")).await;
    let update = loop {
        if let ToAgent::Host(d) = agent.recv().await
            && d.lease.is_some()
        {
            break d;
        }
    };
    assert_eq!(update.name.as_str(), "h1");
    assert_eq!(
        update.lease,
        Some(ActiveLease {
            id: lease.id,
            profile: Some(ProfileName::new("xen").unwrap()),
            holder: Principal::new("alice").unwrap(),
            ssh_public_key: None,
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_detach_marks_the_racks_hosts_unreachable() {
    let lab = lab().await;
    let agent = attach(&lab.racks).await;
    assert_eq!(unreachable(&lab.core, "h1").await, None);
    drop(agent);
    for host in ["h1", "h2"] {
        let why = until("unreachable after the detach", || async {
            unreachable(&lab.core, host).await
        })
        .await;
        assert_eq!(why, AWAY);
    }
    assert!(
        !lab.racks
            .registry()
            .is_attached(&RackName::new("r1").unwrap())
    );
    assert_eq!(unreachable(&lab.core, "h3").await, None);
}

#[tokio::test(start_paused = true)]
async fn a_second_attach_replaces_the_first() {
    let lab = lab().await;
    let mut first = attach(&lab.racks).await;
    let mut second = attach(&lab.racks).await;
    let ended = loop {
        match within("the replacement", first.down.recv()).await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(ended, Some(Err(RackError::Replaced { .. }))),
        "{ended:?}"
    );
    // The older link's end is no detach: the rack stays reachable.
    drop(first);
    settle().await;
    assert_eq!(unreachable(&lab.core, "h1").await, None);
    // Commands go to the newer link.
    let (root, h1) = (caller("root", Role::Operator), h("h1"));
    let (on, ()) = tokio::join!(lab.racks.power(&root, &h1, PowerAction::Status), async {
        let c = second.command().await;
        assert_eq!(
            (c.host.as_str(), &c.kind),
            ("h1", &CommandKind::Power(PowerAction::Status))
        );
        second.reply(c.id, Ok(Done { on: true })).await;
    });
    assert!(on.unwrap());
}

/// An operation that sends one command to the agent of rack r1.
#[derive(Debug, Clone, Copy)]
enum Op {
    Power,
    Console,
    Log,
    Reclaim,
}

/// What the fake agent does with the command.
#[derive(Debug, Clone, Copy)]
enum AgentDoes {
    Nothing,
    Fails,
    Leaves,
}

async fn run(lab: &Lab, op: Op, lease: &Lease) -> Result<(), RackError> {
    let root = caller("root", Role::Operator);
    match op {
        Op::Power => lab
            .racks
            .power(&root, &h("h1"), PowerAction::Cycle)
            .await
            .map(drop),
        Op::Console => {
            let open = ConsoleOpen {
                host: h("h1"),
                write: true,
                replay_bytes: 0,
                not_before: None,
            };
            lab.racks.console(&root, open).await.map(drop)
        }
        Op::Log => {
            let mut parts = lab.racks.console_log(&root, lease).await?;
            let part = parts.next_part().await.expect("one host");
            assert!(parts.next_part().await.is_none());
            part.1.map(drop)
        }
        Op::Reclaim => {
            let inventory = lab.core.inventory().await.unwrap();
            let job = ReclaimJob {
                host: inventory.host(&h("h1")).unwrap().clone(),
                lease: lease.id,
                profile: None,
            };
            let reclaimer = lab.racks.registry().reclaimer();
            reclaimer
                .reclaim(&job)
                .await
                .map_err(|e| *e.source.downcast::<RackError>().expect("a rack error"))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn commands_that_time_out_or_fail_are_forgotten() {
    let r1 = RackName::new("r1").unwrap();
    let cases = [
        (Op::Power, POWER_TIMEOUT),
        (Op::Console, CONSOLE_OPEN_TIMEOUT),
        (Op::Log, LOG_READ_TIMEOUT),
        (Op::Reclaim, RECLAIM_TIMEOUT),
    ];
    for (op, timeout) in cases {
        for does in [AgentDoes::Nothing, AgentDoes::Fails, AgentDoes::Leaves] {
            let lab = lab().await;
            let mut agent = attach(&lab.racks).await;
            let lease = grant(&lab.core, "alice", "h1", None).await;
            let start = Instant::now();
            let (result, ()) = tokio::join!(run(&lab, op, &lease), async {
                let c = agent.command().await;
                assert_eq!(c.host.as_str(), "h1");
                match does {
                    AgentDoes::Nothing => {}
                    AgentDoes::Fails => {
                        let failure = AgentFailure {
                            kind: FailureKind::Unavailable,
                            message: "the BMC did not answer".into(),
                        };
                        agent.reply(c.id, Err(failure)).await;
                    }
                    AgentDoes::Leaves => {
                        let (up, _) = mpsc::channel(1);
                        drop(std::mem::replace(&mut agent.up, up));
                        agent.down.close();
                    }
                }
            });
            let err = result.expect_err("the command cannot succeed");
            let what = format!("{op:?} when the agent does {does:?}: {err}");
            match does {
                AgentDoes::Nothing => {
                    assert!(
                        matches!(err, RackError::Timeout { after, .. } if after == timeout),
                        "{what}"
                    );
                    assert_eq!(start.elapsed(), timeout, "{what}");
                    assert_eq!(
                        err.to_string(),
                        format!("the agent of rack r1 did not answer within {timeout:?}")
                    );
                }
                AgentDoes::Fails => assert!(
                    matches!(
                        &err,
                        RackError::AgentFailed { kind: FailureKind::Unavailable, message, .. }
                            if message == "the BMC did not answer"
                    ),
                    "{what}"
                ),
                AgentDoes::Leaves => {
                    assert!(matches!(err, RackError::AgentGone { .. }), "{what}");
                }
            }
            // Nothing is left waiting for a reply or session data.
            assert_eq!(lab.racks.registry().under_way(&r1), (0, 0), "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn reports_update_provisioning_and_reachability() {
    let lab = lab().await;
    let agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", Some("xen")).await;
    let before = lab.racks.provisioning(&lease);
    assert_eq!(before.len(), 1);
    assert_eq!(
        (
            before[0].phase,
            before[0].stage.as_str(),
            before[0].updated_at
        ),
        (
            ProvisionPhase::Pending,
            "waiting for the rack's agent",
            None
        )
    );
    // A host of a rack without an agent gets no provisioning at all.
    let other = grant(&lab.core, "alice", "h3", None).await;
    assert!(lab.racks.provisioning(&other).is_empty());

    let report = |reachability, phase, stage: &str, percent| {
        FromAgent::Report(HostReport {
            host: h("h1"),
            reachability,
            provisioning: Some(ProvisionReport {
                lease: lease.id,
                phase,
                stage: stage.into(),
                console_tail: String::new(),
                percent,
                ready_line: String::new(),
            }),
        })
    };
    let silent = HostReachability::Unreachable {
        reason: "BMC of h1 silent".into(),
    };
    // (reachability, phase, stage, percent sent, percent kept, unreachable)
    let steps = [
        (
            silent,
            ProvisionPhase::Booting,
            "powered on",
            0,
            0,
            Some("BMC of h1 silent"),
        ),
        (
            HostReachability::Reachable,
            ProvisionPhase::Installing,
            "writing the image",
            42,
            42,
            None,
        ),
        (
            HostReachability::Reachable,
            ProvisionPhase::Installing,
            "image written",
            250,
            100,
            None,
        ),
        (
            HostReachability::Reachable,
            ProvisionPhase::Ready,
            "ready",
            7,
            0,
            None,
        ),
    ];
    for (reachability, phase, stage, sent, kept, want_unreachable) in steps {
        let now = lab.racks.registry().now();
        agent.send(report(reachability, phase, stage, sent)).await;
        let p = until("the report's provisioning", || async {
            let p = lab.racks.provisioning(&lease).remove(0);
            (p.phase == phase && p.stage == stage).then_some(p)
        })
        .await;
        assert_eq!(p.percent, kept, "{stage}");
        assert!(p.updated_at.is_some_and(|t| t >= now), "{p:?}");
        let why = until("the report's reachability", || async {
            let why = unreachable(&lab.core, "h1").await;
            (why.as_deref() == want_unreachable).then_some(why)
        })
        .await;
        assert_eq!(why.as_deref(), want_unreachable);
    }
}

#[tokio::test(start_paused = true)]
async fn a_reclaim_waits_for_the_agent() {
    let lab = lab().await;
    let agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", Some("xen")).await;
    drop(agent);
    until("h1 unreachable", || async {
        unreachable(&lab.core, "h1").await
    })
    .await;
    lab.core
        .release(caller("alice", Role::Ci), lease.id)
        .await
        .unwrap();
    // The agent is away: the reclaim fails and is retried; the host is
    // never handed out meanwhile.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        state(&lab.core, "h1").await,
        HostState::Reclaiming(lease.id)
    );

    let mut agent = attach(&lab.racks).await;
    let c = agent.command().await;
    assert_eq!(c.host.as_str(), "h1");
    assert_eq!(
        c.kind,
        CommandKind::Reclaim {
            lease: lease.id,
            profile: Some(ProfileName::new("xen").unwrap())
        }
    );
    agent.reply(c.id, Ok(Done::default())).await;
    until("h1 available", || async {
        (state(&lab.core, "h1").await == HostState::Available).then_some(())
    })
    .await;
    assert!(
        lab.racks
            .registry()
            .reclaimed_at(lease.id, &h("h1"))
            .is_some_and(|t| t.0 > 1_000_000 + 30_000)
    );
}

#[tokio::test(start_paused = true)]
async fn a_reclaim_ends_when_the_rack_loses_its_agent() {
    let lab = lab().await;
    let agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    drop(agent);
    lab.core
        .release(caller("alice", Role::Ci), lease.id)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        state(&lab.core, "h1").await,
        HostState::Reclaiming(lease.id)
    );
    // The rack is driven by hand from now on: nothing left to do.
    std::fs::write(
        lab.dir.path().join("inventory.toml"),
        inventory_text(lab.dir.path(), false),
    )
    .unwrap();
    lab.core
        .reload_inventory(&caller("root", Role::Operator))
        .await
        .unwrap();
    until("h1 available", || async {
        (state(&lab.core, "h1").await == HostState::Available).then_some(())
    })
    .await;
    assert_eq!(unreachable(&lab.core, "h1").await, None);
}

#[tokio::test(start_paused = true)]
async fn attach_refusals() {
    let lab = lab().await;
    let a1 = || caller("a1", Role::Agent);
    let bad_rack = RackName::new("r 1").unwrap_err();
    // (who, first messages, close the stream, refusal)
    type Case = (
        Caller,
        Vec<Result<FromAgent, LinkError>>,
        bool,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            caller("alice", Role::Ci),
            vec![Ok(hello("r1"))],
            false,
            "alice (ci) is not an agent",
        ),
        (
            caller("a2", Role::Agent),
            vec![Ok(hello("r1"))],
            false,
            "a2 may not attach for rack r1 (its agent is a1)",
        ),
        (
            caller("root", Role::Operator),
            vec![Ok(hello("r1"))],
            false,
            "root (operator) is not an agent",
        ),
        // An operator's token named like the rack's agent is no agent.
        (
            caller("a1", Role::Operator),
            vec![Ok(hello("r1"))],
            false,
            "a1 (operator) is not an agent",
        ),
        (
            a1(),
            vec![Ok(hello("r9"))],
            false,
            "hello.rack: no rack r9 in the inventory",
        ),
        (
            a1(),
            vec![Ok(hello("r2"))],
            false,
            "rack r2 has no agent in the inventory",
        ),
        (
            a1(),
            vec![Err(LinkError::BadHello { source: bad_rack })],
            false,
            "hello.rack",
        ),
        (
            a1(),
            vec![Ok(FromAgent::Data(SessionData::default())), Ok(hello("r1"))],
            false,
            "hello: the first message must be a hello",
        ),
        (
            a1(),
            vec![Err(LinkError::Empty)],
            false,
            "hello: the first message must be a hello",
        ),
        (
            a1(),
            vec![],
            true,
            "hello: the first message must be a hello",
        ),
        (a1(), vec![], false, "no hello within 10s"),
    ];
    for (who, first, close, want) in cases {
        let what = format!("{who:?} {first:?}");
        let start = Instant::now();
        let err = link(&lab.racks, who, first, close)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} attached"));
        assert_eq!(err.to_string(), want, "{what}");
        let waited = start.elapsed();
        if want.starts_with("no hello") {
            assert_eq!(waited, Duration::from_secs(10));
        } else {
            assert!(waited < Duration::from_secs(1), "{what}: {waited:?}");
        }
        assert!(
            !lab.racks
                .registry()
                .is_attached(&RackName::new("r1").unwrap())
        );
    }
    // In the development mode anyone may attach for any rack that has an
    // agent.
    link_in(
        &lab.racks,
        caller("root", Role::Operator),
        AuthMode::InsecureDev,
        vec![Ok(hello("r1"))],
        false,
    )
    .await
    .unwrap();
    assert!(
        lab.racks
            .registry()
            .is_attached(&RackName::new("r1").unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn drive_refusals() {
    let lab = lab().await;
    let mut agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    let alice = caller("alice", Role::Ci);
    let bob = caller("bob", Role::Developer);
    let root = caller("root", Role::Operator);
    let console = |host: &str| ConsoleOpen {
        host: h(host),
        write: false,
        replay_bytes: 0,
        not_before: None,
    };
    let power = |who: &Caller, host: &str, action| {
        let (racks, who, host) = (lab.racks.clone(), who.clone(), h(host));
        async move { racks.power(&who, &host, action).await.map(drop) }
    };
    let results: Vec<(Result<(), RackError>, String)> = vec![
        (
            power(&bob, "h1", PowerAction::Off).await,
            "bob may not switch the power of host h1: it does not hold the host's active lease"
                .into(),
        ),
        (
            power(&alice, "h2", PowerAction::On).await,
            "alice may not switch the power of host h2: it does not hold the host's active lease"
                .into(),
        ),
        (
            lab.racks.console(&bob, console("h1")).await.map(drop),
            "bob may not open the console of host h1: it does not hold the host's active lease"
                .into(),
        ),
        (
            lab.racks.console_log(&bob, &lease).await.map(drop),
            format!(
                "bob may not read the console log of lease {} (held by alice)",
                lease.id
            ),
        ),
        (
            power(&root, "h2", PowerAction::Status).await,
            "host h2 has no BMC in the inventory".into(),
        ),
        (
            power(&root, "h3", PowerAction::Status).await,
            "rack r2 has no agent".into(),
        ),
        (
            lab.racks.console(&root, console("h2")).await.map(drop),
            "host h2 has no console in the inventory".into(),
        ),
        (
            power(&root, "h9", PowerAction::Status).await,
            "no host named h9".into(),
        ),
    ];
    for (result, want) in results {
        let err = result.expect_err(&want);
        assert_eq!(err.to_string(), want);
        let is_denial = matches!(err, RackError::Denied(_));
        assert_eq!(is_denial, want.contains("may not"), "{err:?}");
        if want.starts_with("no host") {
            assert!(matches!(err, RackError::Core(CoreError::NotFound { .. })));
        }
    }
    settle().await;
    assert!(
        agent.commands_so_far().is_empty(),
        "a refused operation sends no command"
    );
    // Reading the power state needs no lease.
    let (on, ()) = tokio::join!(power(&bob, "h1", PowerAction::Status), async {
        let c = agent.command().await;
        agent.reply(c.id, Ok(Done { on: false })).await;
    });
    on.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_holders_console_ends_with_the_lease() {
    let lab = lab().await;
    let mut agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    let alice = caller("alice", Role::Ci);
    let open = ConsoleOpen {
        host: h("h1"),
        write: true,
        replay_bytes: 0,
        not_before: None,
    };
    let (session, id) = tokio::join!(lab.racks.console(&alice, open.clone()), async {
        let c = agent.command().await;
        // The holder's replay starts at the lease's grant.
        let want = ConsoleOpen {
            not_before: Some(lease.granted_at),
            ..open.clone()
        };
        assert_eq!(c.kind, CommandKind::Console(want));
        agent.reply(c.id, Ok(Done::default())).await;
        c.id
    });
    let mut session = session.unwrap();
    assert_eq!(session.id, id);
    // Output and input flow.
    agent
        .send(FromAgent::Data(SessionData {
            id,
            output: b"login: ".to_vec(),
            ..Default::default()
        }))
        .await;
    let d = within("console output", session.output.recv())
        .await
        .unwrap();
    assert_eq!(d.output, b"login: ");
    session.input(b"root\n".to_vec(), false).await.unwrap();
    let input = loop {
        if let ToAgent::Input(i) = agent.recv().await {
            break i;
        }
    };
    assert_eq!((input.id, input.input.as_slice()), (id, &b"root\n"[..]));

    lab.core.release(alice, lease.id).await.unwrap();
    let last = within("the session's end", session.output.recv())
        .await
        .unwrap();
    assert!(last.end, "{last:?}");
    assert_eq!(last.notice, "the lease on h1 ended; console closed");
    let close = loop {
        let c = agent.command().await;
        if c.kind == CommandKind::CloseSession {
            break c;
        }
    };
    assert_eq!((close.id, close.host.as_str()), (id, "h1"));
}

/// The agent's next session input, skipping everything else.
async fn next_input(agent: &mut FakeAgent) -> SessionInput {
    loop {
        if let ToAgent::Input(i) = agent.recv().await {
            return i;
        }
    }
}

/// Session inputs the agent has now, without waiting.
fn inputs_so_far(agent: &mut FakeAgent) -> Vec<SessionInput> {
    let mut v = Vec::new();
    while let Ok(m) = agent.down.try_recv() {
        if let Ok(ToAgent::Input(i)) = m {
            v.push(i);
        }
    }
    v
}

#[tokio::test(start_paused = true)]
async fn forwards_keep_to_their_windows_and_limits_and_end_with_the_lease() {
    let lab = lab().await;
    lab.racks.registry().set_forward_limits(ForwardLimits {
        per_lease: 1,
        idle_timeout: Duration::from_secs(3600),
    });
    let mut agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    let alice = caller("alice", Role::Ci);
    let open = ForwardOpen {
        host: h("h1"),
        port: 22,
    };
    let (forward, id) = tokio::join!(lab.racks.forward(&alice, open.clone()), async {
        let c = agent.command().await;
        assert_eq!(c.kind, CommandKind::Forward(open.clone()));
        agent.reply(c.id, Ok(Done::default())).await;
        c.id
    });
    let forward = forward.unwrap();
    assert_eq!((forward.id, forward.lease), (id, Some(lease.id)));
    let scope = ForwardScope::Lease(lease.id);
    assert_eq!(lab.racks.registry().open_forwards(&scope), 1);

    // Refusals: the lease's limit, someone else, a host without ipv4.
    let e = lab.racks.forward(&alice, open.clone()).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("lease {} already has 1 forwards open (the limit)", lease.id)
    );
    let bob = caller("bob", Role::Ci);
    let e = lab.racks.forward(&bob, open.clone()).await.unwrap_err();
    assert!(matches!(e, RackError::Denied(_)), "{e}");
    let root = caller("root", Role::Operator);
    let no_ip = ForwardOpen {
        host: h("h2"),
        port: 22,
    };
    let e = lab.racks.forward(&root, no_ip).await.unwrap_err();
    assert_eq!(e.to_string(), "host h2 has no ipv4 in the inventory");
    assert!(
        agent.commands_so_far().is_empty(),
        "no refusal reached the agent"
    );

    // A user who sends a lot and reads nothing.
    let (user_tx, user_rx) = mpsc::channel::<FromUser>(64);
    let (to_user, mut user_out) = mpsc::channel::<ToUser>(1);
    let racks = lab.racks.clone();
    let run = tokio::spawn(async move {
        racks
            .run_forward(forward, ReceiverStream::new(user_rx), to_user)
            .await
    });
    for _ in 0..20 {
        user_tx.send(FromUser::Data(vec![7; 10])).await.unwrap();
    }
    // One message of 100 KiB goes to the agent in 32 KiB pieces.
    user_tx
        .send(FromUser::Data(vec![8; 100 * 1024]))
        .await
        .unwrap();
    settle().await;
    let first = inputs_so_far(&mut agent);
    assert_eq!(first.len(), FORWARD_WINDOW as usize, "a window's worth");
    assert!(first.iter().all(|i| i.id == id && i.input == [7; 10]));
    // The agent wrote 4 of them: 4 more may come.
    agent
        .send(FromAgent::Data(SessionData {
            id,
            credit: 4,
            ..Default::default()
        }))
        .await;
    settle().await;
    assert_eq!(inputs_so_far(&mut agent).len(), 4);
    agent
        .send(FromAgent::Data(SessionData {
            id,
            credit: 16,
            ..Default::default()
        }))
        .await;
    settle().await;
    let rest = inputs_so_far(&mut agent);
    let sizes: Vec<usize> = rest.iter().map(|i| i.input.len()).collect();
    assert_eq!(sizes, [32 * 1024, 32 * 1024, 32 * 1024, 4 * 1024]);

    // The host's bytes: credited back only as the user takes them.
    for n in 0..FORWARD_WINDOW {
        agent
            .send(FromAgent::Data(SessionData {
                id,
                output: vec![n as u8; 100],
                ..Default::default()
            }))
            .await;
    }
    settle().await;
    assert!(
        inputs_so_far(&mut agent).iter().all(|i| i.credit == 0),
        "no credit while the user reads nothing"
    );
    for n in 0..FORWARD_WINDOW / 2 {
        let got = within("output for the user", user_out.recv())
            .await
            .unwrap();
        assert_eq!(got, ToUser::Data(vec![n as u8; 100]));
    }
    let credit = next_input(&mut agent).await;
    assert_eq!((credit.id, credit.credit), (id, FORWARD_WINDOW / 2));

    // The user's end of input half-closes (once the user reads again: a
    // user who does not read holds the whole forward back); the lease's
    // end cuts the forward.
    let drain = tokio::spawn(async move { while user_out.recv().await.is_some() {} });
    drop(user_tx);
    let eof = loop {
        let i = next_input(&mut agent).await;
        if i.credit == 0 {
            break i;
        }
    };
    assert!(eof.eof && eof.input.is_empty(), "{eof:?}");
    lab.core.release(alice.clone(), lease.id).await.unwrap();
    let end = within("the forward's end", run).await.unwrap();
    assert!(
        matches!(end, Err(RackError::ForwardLeaseEnded { .. })),
        "{end:?}"
    );
    drain.await.unwrap();
    let close = loop {
        let c = agent.command().await;
        if c.kind == CommandKind::CloseSession {
            break c;
        }
    };
    assert_eq!(close.id, id);
    assert_eq!(
        lab.racks.registry().open_forwards(&scope),
        0,
        "slot given back"
    );
    let events = lab
        .core
        .list_events(crate::store::EventQuery {
            after_seq: 0,
            limit: 1000,
            host: Some(h("h1")),
            lease: None,
        })
        .await
        .unwrap();
    let details: Vec<(EventKind, &str)> = events
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ForwardOpened | EventKind::ForwardClosed))
        .map(|e| (e.kind, e.detail.as_str()))
        .collect();
    assert_eq!(
        details,
        [
            (EventKind::ForwardOpened, "port 22"),
            (
                EventKind::ForwardClosed,
                "port 22: 102600 bytes to the host, 1600 bytes from it; the lease ended"
            ),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_forward_is_closed() {
    let lab = lab().await;
    let idle = Duration::from_secs(60);
    lab.racks.registry().set_forward_limits(ForwardLimits {
        per_lease: 16,
        idle_timeout: idle,
    });
    let mut agent = attach(&lab.racks).await;
    grant(&lab.core, "alice", "h1", None).await;
    let alice = caller("alice", Role::Ci);
    let open = ForwardOpen {
        host: h("h1"),
        port: 22,
    };
    let (forward, _) = tokio::join!(lab.racks.forward(&alice, open), async {
        let c = agent.command().await;
        agent.reply(c.id, Ok(Done::default())).await;
    });
    let (_user_tx, user_rx) = mpsc::channel::<FromUser>(1);
    let (to_user, _user_out) = mpsc::channel::<ToUser>(1);
    let t0 = Instant::now();
    let end = lab
        .racks
        .run_forward(forward.unwrap(), ReceiverStream::new(user_rx), to_user)
        .await;
    assert_eq!(t0.elapsed(), idle);
    assert_eq!(
        end.unwrap_err().to_string(),
        "forward to h1 closed after 1m without traffic"
    );
}

/// Who sees what was captured before the lease: the holder (an operator
/// too, when it holds the lease) replays nothing from before the grant; an
/// operator without the lease replays everything.
#[tokio::test(start_paused = true)]
async fn only_an_operator_without_the_lease_sees_before_it() {
    let lab = lab().await;
    let mut agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    let open = ConsoleOpen {
        host: h("h1"),
        write: false,
        replay_bytes: 0,
        not_before: Some(Timestamp(1)),
    };
    // (who, the bound the agent is told)
    let cases = [
        (caller("alice", Role::Ci), Some(lease.granted_at)),
        (caller("alice", Role::Operator), Some(lease.granted_at)),
        (caller("root", Role::Operator), None),
    ];
    for (who, want) in cases {
        let (session, ()) = tokio::join!(lab.racks.console(&who, open.clone()), async {
            // (The previous session's close comes first.)
            let c = loop {
                let c = agent.command().await;
                if c.kind != CommandKind::CloseSession {
                    break c;
                }
            };
            let CommandKind::Console(o) = &c.kind else {
                panic!("{c:?}")
            };
            // Never what the user asked for.
            assert_eq!(o.not_before, want, "{who:?}");
            agent.reply(c.id, Ok(Done::default())).await;
        });
        drop(session.unwrap());
    }
}

/// An agent speaks for its own rack only: reports about any other host
/// change nothing and are counted.
#[tokio::test(start_paused = true)]
async fn reports_about_other_racks_hosts_are_ignored() {
    let lab = lab().await;
    let agent = attach(&lab.racks).await;
    let other = grant(&lab.core, "bob", "h3", Some("xen")).await;
    let r1 = RackName::new("r1").unwrap();
    for host in ["h3", "h9"] {
        agent
            .send(FromAgent::Report(HostReport {
                host: h(host),
                reachability: HostReachability::Unreachable {
                    reason: "forged".into(),
                },
                provisioning: Some(ProvisionReport {
                    lease: other.id,
                    phase: ProvisionPhase::Ready,
                    stage: "forged".into(),
                    console_tail: String::new(),
                    percent: 0,
                    ready_line: String::new(),
                }),
            }))
            .await;
    }
    until("both reports counted", || async {
        (lab.racks.registry().foreign_reports(&r1) == 2).then_some(())
    })
    .await;
    assert_eq!(unreachable(&lab.core, "h3").await, None);
    assert!(lab.racks.provisioning(&other).is_empty());
    // A report about its own host still counts.
    agent
        .send(FromAgent::Report(HostReport {
            host: h("h1"),
            reachability: HostReachability::Unreachable {
                reason: "BMC of h1 silent".into(),
            },
            provisioning: None,
        }))
        .await;
    let why = until("h1 unreachable", || async {
        unreachable(&lab.core, "h1").await
    })
    .await;
    assert_eq!(why, "BMC of h1 silent");
    assert_eq!(lab.racks.registry().foreign_reports(&r1), 2);
}

/// Every attach and its end are events with the caller's principal.
#[tokio::test(start_paused = true)]
async fn agent_links_are_recorded() {
    let lab = lab().await;
    let links = || async {
        let events = lab
            .core
            .list_events(crate::store::EventQuery {
                after_seq: 0,
                limit: 1000,
                host: None,
                lease: None,
            })
            .await
            .unwrap();
        events
            .events
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::AgentAttached | EventKind::AgentDetached))
            .map(|e| (e.kind, e.actor.to_string(), e.detail))
            .collect::<Vec<_>>()
    };
    let first = attach(&lab.racks).await;
    let second = attach(&lab.racks).await;
    drop(first);
    drop(second);
    let got = until("four link events", || async {
        let l = links().await;
        (l.len() == 4).then_some(l)
    })
    .await;
    let attached = (
        EventKind::AgentAttached,
        "a1".to_owned(),
        "rack r1, principal a1, version test".to_owned(),
    );
    assert_eq!(got[..2], [attached.clone(), attached]);
    let mut ends: Vec<_> = got[2..].iter().map(|e| e.2.as_str()).collect();
    ends.sort_unstable();
    assert_eq!(
        ends,
        [
            "rack r1, principal a1: replaced by a newer attach",
            "rack r1, principal a1: the agent closed the link",
        ]
    );
    assert!(
        got[2..]
            .iter()
            .all(|e| e.0 == EventKind::AgentDetached && e.1 == "a1")
    );
}

/// Whenever the lease ends while its holder's console is being opened, the
/// console is either refused or ended: it never outlives the lease.
#[tokio::test(start_paused = true)]
async fn a_console_opened_as_the_lease_ends_does_not_outlive_it() {
    let mut outcomes = BTreeSet::new();
    for delay in 0..16 {
        let lab = lab().await;
        let mut agent = attach(&lab.racks).await;
        let lease = grant(&lab.core, "alice", "h1", None).await;
        let alice = caller("alice", Role::Ci);
        // The agent opens every console it is asked for.
        let answer = tokio::spawn(async move {
            loop {
                let c = agent.command().await;
                if matches!(c.kind, CommandKind::Console(_)) {
                    agent.reply(c.id, Ok(Done::default())).await;
                }
            }
        });
        let release = {
            let (core, alice) = (lab.core.clone(), alice.clone());
            tokio::spawn(async move {
                for _ in 0..delay {
                    tokio::task::yield_now().await;
                }
                core.release(alice, lease.id).await.unwrap();
            })
        };
        let open = ConsoleOpen {
            host: h("h1"),
            write: true,
            replay_bytes: 0,
            not_before: None,
        };
        match lab.racks.console(&alice, open).await {
            Err(e) => {
                assert!(matches!(e, RackError::Denied(_)), "delay {delay}: {e}");
                outcomes.insert("refused");
            }
            Ok(mut session) => {
                let end = loop {
                    let d = within("the end of the session", session.output.recv())
                        .await
                        .expect("ended by the server, not dropped");
                    if d.end {
                        break d;
                    }
                };
                assert!(end.lease_ended, "delay {delay}: {end:?}");
                outcomes.insert("ended");
            }
        }
        release.await.unwrap();
        answer.abort();
        let r1 = RackName::new("r1").unwrap();
        assert_eq!(lab.racks.registry().under_way(&r1).1, 0, "delay {delay}");
    }
    // Both ways were taken (the lease ended before the session was
    // registered, and after).
    assert_eq!(outcomes, BTreeSet::from(["ended", "refused"]));
}

/// A log read's output is credited back to the agent as it is read, never
/// before; an agent refusing the first read for being busy is the answer.
#[tokio::test(start_paused = true)]
async fn log_reads_are_credited_as_they_are_read() {
    let lab = lab().await;
    let mut agent = attach(&lab.racks).await;
    let lease = grant(&lab.core, "alice", "h1", None).await;
    let alice = caller("alice", Role::Ci);
    let (reader, id) = tokio::join!(lab.racks.console_log(&alice, &lease), async {
        let c = agent.command().await;
        assert_eq!(
            c.kind,
            CommandKind::Log(LogRead {
                from: lease.granted_at,
                to: None,
                window: LOG_WINDOW,
            })
        );
        agent.reply(c.id, Ok(Done::default())).await;
        c.id
    });
    let mut reader = reader.unwrap();
    let (host, part) = reader.next_part().await.unwrap();
    assert_eq!(host.as_str(), "h1");
    let mut part = part.unwrap();
    for n in 0..LOG_WINDOW {
        agent
            .send(FromAgent::Data(SessionData {
                id,
                output: vec![n as u8; 10],
                ..Default::default()
            }))
            .await;
    }
    settle().await;
    assert!(inputs_so_far(&mut agent).is_empty(), "nothing read yet");
    for n in 0..LOG_WINDOW {
        let d = within("log output", part.next()).await.unwrap();
        assert_eq!(d.output, vec![n as u8; 10]);
    }
    let credits: Vec<(CommandId, u32)> = inputs_so_far(&mut agent)
        .iter()
        .map(|i| (i.id, i.credit))
        .collect();
    assert_eq!(credits, [(id, LOG_WINDOW / 2), (id, LOG_WINDOW / 2)]);
    agent
        .send(FromAgent::Data(SessionData {
            id,
            end: true,
            ..Default::default()
        }))
        .await;
    assert!(within("the end", part.next()).await.unwrap().end);
    assert!(reader.next_part().await.is_none());

    // Busy: the call fails with the agent's words.
    let (refused, ()) = tokio::join!(lab.racks.console_log(&alice, &lease), async {
        let c = agent.command().await;
        let failure = AgentFailure {
            kind: FailureKind::ResourceExhausted,
            message: "2 console log reads of h1 are already streaming".into(),
        };
        agent.reply(c.id, Err(failure)).await;
    });
    assert!(
        matches!(
            refused,
            Err(RackError::AgentFailed {
                kind: FailureKind::ResourceExhausted,
                ..
            })
        ),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_is_told_only_of_its_racks_hosts_and_the_whole_rack_after_a_reload() {
    let lab = lab().await;
    let mut agent = attach(&lab.racks).await;
    assert!(matches!(agent.recv().await, ToAgent::Rack(_)));
    // (Its hosts' reachability, changed by the attach, comes down too.)
    settle().await;
    while agent.down.try_recv().is_ok() {}
    // h3 (rack r2, no agent) then h2 (r1): only h2 comes down r1's link.
    grant(&lab.core, "alice", "h3", None).await;
    grant(&lab.core, "bob", "h2", None).await;
    settle().await;
    let mut told = Vec::new();
    while let Ok(m) = agent.down.try_recv() {
        match m.unwrap() {
            ToAgent::Host(d) => told.push(d.name.to_string()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        !told.is_empty() && told.iter().all(|n| n == "h2"),
        "{told:?}"
    );
    // A reload: the whole rack again, with the host the new file adds.
    let path = lab.dir.path().join("inventory.toml");
    let mut text = inventory_text(lab.dir.path(), true);
    text.push_str(
        "\n[[host]]\nname = \"h4\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:04\"\n",
    );
    std::fs::write(&path, text).unwrap();
    lab.core
        .reload_inventory(&caller("root", Role::Operator))
        .await
        .unwrap();
    let rack = loop {
        if let ToAgent::Rack(r) = agent.recv().await {
            break r;
        }
    };
    let names: Vec<&str> = rack.hosts.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["h1", "h2", "h4"]);
    // The link ended, its feed is closed; the rack can attach again.
    drop(agent);
    let r1 = RackName::new("r1").unwrap();
    until("the feed closed", || async {
        (!lab.racks.feeds.has(&r1)).then_some(())
    })
    .await;
    let mut again = attach(&lab.racks).await;
    assert!(matches!(again.recv().await, ToAgent::Rack(_)));
}
