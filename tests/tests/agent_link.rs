//! The agent ↔ server link, in process, over real gRPC: the agent's rack
//! model with simulated BMCs (`SimPower`, for faults on cue) and a TCP
//! console played by the test.
//!
//! - a lease is provisioned (boot device PXE, power on), watched until the
//!   profile's ready text, driven through the server (power with holder
//!   checks, a live console both ways) and reclaimed (Xen debug keys, power
//!   off, boot device reset); its console log is read back;
//! - an agent restart neither repeats nor forgets a provisioning;
//! - an absent agent or a silent BMC makes hosts unreachable: they are not
//!   granted, the queue moves on to another host, and they come back;
//! - neighbours see and speak only for their own: the next holder's console
//!   replays nothing of the previous lease, another rack's agent cannot
//!   report for this rack's hosts, an operator's token cannot attach.

use lab_agent::config::ProfileSettings;
use lab_agent::ipmi::BootDevice;
use lab_agent::link::{self, LinkConfig};
use lab_agent::power::{PowerControl, Responsiveness, SimPower};
use lab_agent::rack::{PowerFactory, Rack, RackConfig};
use lab_proto::v1 as pb;
use lab_tests::{Clients, InProcessServer, ServerOptions};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);

fn inventory(dir: &Path, console_port: u16) -> String {
    let pw = dir.join("bmc.pw");
    std::fs::write(&pw, "secret-pw").unwrap();
    let mut s = String::from("[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n");
    for i in 0..3 {
        s.push_str(&format!(
            "\n[[host]]\nname = \"h{i}\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:0{i}\"\n\
             [host.bmc]\naddress = \"127.0.0.1\"\nport = {}\nuser = \"admin\"\npassword_file = \"{}\"\n",
            10_000 + i,
            pw.display()
        ));
        if i == 0 {
            s.push_str(&format!(
                "[host.console]\nkind = \"tcp\"\naddress = \"127.0.0.1:{console_port}\"\n"
            ));
        } else {
            s.push_str("[host.console]\nkind = \"none\"\n");
        }
    }
    s
}

type Bmcs = Arc<Mutex<HashMap<String, Arc<SimPower>>>>;

/// Simulated BMCs shared with the test, one per host name, surviving agent
/// restarts (like real hardware).
fn sim_factory(bmcs: Bmcs) -> PowerFactory {
    Arc::new(move |host, bmc| {
        assert_eq!(
            bmc.password.expose(),
            b"secret-pw",
            "the agent gets the BMC password"
        );
        let sim = bmcs
            .lock()
            .unwrap()
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(SimPower::new(host)))
            .clone();
        Ok(sim as Arc<dyn PowerControl>)
    })
}

fn rack(data: &Path, bmcs: Bmcs) -> Rack {
    let mut profiles = std::collections::BTreeMap::new();
    profiles.insert(
        "xen".to_owned(),
        ProfileSettings {
            ready: Some("LAB-DOM0-OK".into()),
            fail: vec!["LAB-DOM0-FAIL".into()],
            timeout: Duration::from_secs(30),
            xen_debug_keys: b"q".to_vec(),
            install: None,
        },
    );
    profiles.insert(
        "slow".to_owned(),
        ProfileSettings {
            ready: Some("NEVER-PRINTED".into()),
            timeout: Duration::from_millis(1500),
            ..Default::default()
        },
    );
    Rack::new(
        RackConfig {
            default_profile: "local-disk".into(),
            profiles,
            data_dir: data.to_owned(),
            console_limits: Default::default(),
            bmc_probe_interval: Duration::from_millis(200),
            ipmi: Default::default(),
            capture: Default::default(),
        },
        lab_agent::hosts::HostTable::default(),
        sim_factory(bmcs),
    )
}

fn start_agent(server: &InProcessServer, rack: Rack) -> tokio::task::JoinHandle<()> {
    tokio::spawn(link::run(
        LinkConfig {
            server: format!("http://{}", server.addr),
            token: Some("agent-r1".into()),
            rack: "r1".into(),
            ca: None,
            log_reads: Default::default(),
        },
        rack,
    ))
}

async fn host(c: &mut Clients, name: &str) -> pb::Host {
    c.hosts
        .get_host(pb::GetHostRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn lease(c: &mut Clients, id: &str) -> pb::Lease {
    tokio::time::timeout(
        WAIT,
        c.leases.get_lease(pb::GetLeaseRequest {
            lease_id: id.into(),
        }),
    )
    .await
    .expect("GetLease answers")
    .unwrap()
    .into_inner()
}

/// Waits until `host`'s provisioning in lease `id` satisfies `f`.
async fn until_phase(
    c: &Clients,
    id: &str,
    host: &'static str,
    what: &str,
    f: impl Fn(&(pb::ProvisionPhase, String)) -> bool,
) -> (pb::ProvisionPhase, String) {
    let f = &f;
    until(what, || {
        let mut c = c.clone();
        let id = id.to_owned();
        async move { phase(&lease(&mut c, &id).await, host).filter(f) }
    })
    .await
}

/// The console captured during a lease (all its output, as text).
async fn lease_log(c: &mut Clients, id: &str) -> String {
    let mut log = c
        .hosts
        .console_log(pb::ConsoleLogRequest {
            lease_id: id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = Vec::new();
    while let Some(m) = log.message().await.unwrap() {
        if let Some(pb::console_response::Msg::Output(b)) = m.msg {
            text.extend_from_slice(&b);
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn phase(l: &pb::Lease, host: &str) -> Option<(pb::ProvisionPhase, String)> {
    l.provisioning
        .iter()
        .find(|p| p.host == host)
        .map(|p| (p.phase(), p.stage.clone()))
}

/// Polls an async condition.
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type AgentClient = lab_proto::v1::agent_service_client::AgentServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        lab_client::auth::BearerAuth,
    >,
>;

/// An `AgentService` client with `token`, to play an agent (or an impostor).
async fn agent_client(server: &InProcessServer, token: &str) -> AgentClient {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = lab_client::auth::BearerToken::new(token).unwrap();
    lab_proto::v1::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        lab_client::auth::BearerAuth::new(Some(token)),
    )
}

/// The in-process server with real tokens (`t-alice` ci, `t-bob` developer,
/// `t-op` operator, `agent-r1`, plus `tokens`), r1's agent attached, h0's
/// console accepted and h0 reachable.
struct TokenLab {
    _tmp: tempfile::TempDir,
    server: InProcessServer,
    agent: tokio::task::JoinHandle<()>,
    serial: TcpStream,
    alice: Clients,
    bob: Clients,
    op: Clients,
}

async fn token_lab(
    more_inventory: impl FnOnce(&Path) -> String,
    tokens: &[(&str, &str, &str)],
) -> TokenLab {
    use lab_server::auth::Authenticator;
    let tmp = tempfile::tempdir().unwrap();
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = console.local_addr().unwrap().port();
    let mut inv = inventory(tmp.path(), port);
    inv.push_str(&more_inventory(tmp.path()));
    let mut all = vec![
        ("t-alice", "alice", "ci"),
        ("t-bob", "bob", "developer"),
        ("t-op", "root", "operator"),
        ("agent-r1", "agent-r1", "agent"),
    ];
    all.extend_from_slice(tokens);
    let auth =
        Authenticator::parse(&lab_tests::tokens_toml(&all), Path::new("tokens.toml")).unwrap();
    let server = InProcessServer::start(ServerOptions {
        inventory: Some(inv),
        agents: true,
        auth,
        ..Default::default()
    })
    .await
    .unwrap();
    let agent = start_agent(&server, rack(&tmp.path().join("agent"), Bmcs::default()));
    let (serial, _) = tokio::time::timeout(WAIT, console.accept())
        .await
        .expect("capture of h0")
        .unwrap();
    let alice = server.clients("t-alice").await.unwrap();
    let bob = server.clients("t-bob").await.unwrap();
    let op = server.clients("t-op").await.unwrap();
    until("h0 reachable", || {
        let mut c = alice.clone();
        async move { host(&mut c, "h0").await.reachable.then_some(()) }
    })
    .await;
    TokenLab {
        _tmp: tmp,
        server,
        agent,
        serial,
        alice,
        bob,
        op,
    }
}

async fn read_until(sock: &mut TcpStream, want: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        while !got.windows(want.len()).any(|w| w == want) {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "console connection closed; got {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{want:?} never arrived on the console; got {got:?}"));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_provisioned_watched_driven_and_reclaimed_through_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = console.local_addr().unwrap().port();
    let server = InProcessServer::start(ServerOptions {
        inventory: Some(inventory(tmp.path(), port)),
        agents: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let bmcs: Bmcs = Arc::default();
    let data = tmp.path().join("agent");
    let first = rack(&data, bmcs.clone());
    let agent = start_agent(&server, first.clone());
    // The agent's console capture connects to the "host's serial port".
    let (mut serial, _) = tokio::time::timeout(WAIT, console.accept())
        .await
        .expect("the agent connects to h0's console")
        .unwrap();
    let mut c = server.clients("ci").await.unwrap();
    until("h0 reachable", || {
        let mut c = c.clone();
        async move { host(&mut c, "h0").await.reachable.then_some(()) }
    })
    .await;

    // ------------------------------------------------ provisioning
    let l = c
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h0".into()],
            profile: "xen".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sim = until("h0's BMC in use", || {
        let b = bmcs.lock().unwrap().get("h0").cloned();
        async move { b.filter(|s| s.powered_on()) }
    })
    .await;
    assert_eq!(sim.boot(), Some((BootDevice::Pxe, false, false)));
    let booting = until_phase(&c, &l.id, "h0", "h0 booting", |(p, _)| {
        *p == pb::ProvisionPhase::Booting
    })
    .await;
    assert!(booting.1.contains("powered on"), "{booting:?}");
    serial
        .write_all(b"Xen 4.17 booting\r\nLAB-DOM0-OK hypervisor=xen caps=control_d\r\n")
        .await
        .unwrap();
    let ready = until_phase(&c, &l.id, "h0", "h0 ready", |(p, _)| {
        *p == pb::ProvisionPhase::Ready
    })
    .await;
    assert!(ready.1.contains("LAB-DOM0-OK"), "{ready:?}");

    // ------------------------------------------------ power via the server
    let on = c
        .hosts
        .power(pb::PowerRequest {
            host: "h0".into(),
            action: pb::PowerAction::Status as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(on.on);
    let mut other = server.clients("someone-else").await.unwrap();
    // Dev mode makes every token an operator: the holder checks with real
    // tokens are in `only_the_holder_drives_a_host_and_only_agents_attach`.
    let st = other
        .hosts
        .power(pb::PowerRequest {
            host: "h0".into(),
            action: pb::PowerAction::Unspecified as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    let st = c
        .hosts
        .power(pb::PowerRequest {
            host: "h2".into(),
            action: pb::PowerAction::On as i32,
        })
        .await;
    // "ci" is an operator in dev mode: allowed, and the simulator obeys.
    assert!(st.unwrap().into_inner().on);
    assert!(bmcs.lock().unwrap()["h2"].powered_on());

    // ------------------------------------------------ live console, both ways
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<pb::ConsoleRequest>(8);
    in_tx
        .send(pb::ConsoleRequest {
            msg: Some(pb::console_request::Msg::Open(pb::ConsoleOpen {
                host: "h0".into(),
                write: true,
                replay_bytes: 0,
                not_before: None,
            })),
        })
        .await
        .unwrap();
    let mut out = c
        .hosts
        .console(tokio_stream::wrappers::ReceiverStream::new(in_rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&seen).contains("LAB-DOM0-OK") {
            if let Some(pb::console_response::Msg::Output(b)) =
                out.message().await.unwrap().unwrap().msg
            {
                seen.extend_from_slice(&b);
            }
        }
    })
    .await
    .expect("the console replays recent output");
    in_tx
        .send(pb::ConsoleRequest {
            msg: Some(pb::console_request::Msg::Input(b"uname -a\r".to_vec())),
        })
        .await
        .unwrap();
    read_until(&mut serial, b"uname -a\r").await;
    serial.write_all(b"Linux dom0\r\n").await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&seen).contains("Linux dom0") {
            if let Some(pb::console_response::Msg::Output(b)) =
                out.message().await.unwrap().unwrap().msg
            {
                seen.extend_from_slice(&b);
            }
        }
    })
    .await
    .expect("live output reaches the viewer");
    drop(in_tx);
    drop(out);

    // ------------------------------------------------ a replay of many small chunks
    // A serial console delivers a few bytes at a time; a new viewer's
    // replay goes out as a few messages, not one per chunk (hundreds of
    // them once overflowed the server's buffer for a browser viewer under
    // load, which then lost its session on every reconnect).
    for i in 0..300 {
        serial
            .write_all(format!("line {i:03}\r\n").as_bytes())
            .await
            .unwrap();
        serial.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    serial.write_all(b"BURST-END\r\n").await.unwrap();
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<pb::ConsoleRequest>(8);
    let mut out = {
        // Captured before the replay is asked for.
        until("the burst captured", || {
            let mut c = c.clone();
            let id = l.id.clone();
            async move {
                lease_log(&mut c, &id)
                    .await
                    .contains("BURST-END")
                    .then_some(())
            }
        })
        .await;
        in_tx
            .send(pb::ConsoleRequest {
                msg: Some(pb::console_request::Msg::Open(pb::ConsoleOpen {
                    host: "h0".into(),
                    write: false,
                    replay_bytes: 16 * 1024,
                    not_before: None,
                })),
            })
            .await
            .unwrap();
        c.hosts
            .console(tokio_stream::wrappers::ReceiverStream::new(in_rx))
            .await
            .unwrap()
            .into_inner()
    };
    let (mut replay, mut messages) = (Vec::new(), 0);
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&replay).contains("BURST-END") {
            if let Some(pb::console_response::Msg::Output(b)) =
                out.message().await.unwrap().unwrap().msg
            {
                replay.extend_from_slice(&b);
                messages += 1;
            }
        }
    })
    .await
    .expect("the replay holds the burst");
    let text = String::from_utf8_lossy(&replay);
    assert!(
        text.contains("line 000") && text.contains("line 299"),
        "{text}"
    );
    assert!(
        messages <= 8,
        "a {}-byte replay came as {messages} messages",
        replay.len()
    );
    drop(in_tx);
    drop(out);

    // ------------------------------------------------ release → reclaim
    c.leases
        .release(pb::ReleaseRequest {
            lease_id: l.id.clone(),
        })
        .await
        .unwrap();
    // The Xen console switch (Ctrl-A ×3) and the debug key reach the host.
    let keys = read_until(&mut serial, b"q").await;
    assert!(
        keys.windows(3).any(|w| w == b"\x01\x01\x01"),
        "no Xen console switch before the debug key: {keys:?}"
    );
    serial
        .write_all(b"(XEN) 'q' pressed -> dumping domain info\r\n")
        .await
        .unwrap();
    until("h0 available again", || {
        let mut c = c.clone();
        async move {
            (host(&mut c, "h0").await.state == pb::HostState::Available as i32).then_some(())
        }
    })
    .await;
    assert!(!sim.powered_on(), "reclaimed host is off");
    assert_eq!(sim.boot(), Some((BootDevice::None, false, false)));

    // ------------------------------------------------ the lease's console log
    let text = lease_log(&mut c, &l.id).await;
    assert!(text.contains("LAB-DOM0-OK"), "{text}");
    assert!(text.contains("Linux dom0"), "{text}");
    assert!(
        text.contains("dumping domain info"),
        "the end-of-lease debug output belongs to the lease: {text}"
    );

    // ------------------------------------------------ agent restart
    let l2 = c
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h0".into()],
            profile: "xen".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    until("h0 powered for the second lease", || {
        let on = sim.powered_on();
        async move { on.then_some(()) }
    })
    .await;
    until("provisioning recorded", || {
        let p = data.join("provisioning.toml");
        let id = l2.id.clone();
        async move {
            std::fs::read_to_string(&p)
                .ok()
                .filter(|t| t.contains(&id))
                .map(|_| ())
        }
    })
    .await;
    let ops_before = sim.log().len();
    // The agent process dies: its link and everything it runs stop.
    agent.abort();
    let _ = agent.await;
    first.shutdown().await;
    until("h0 unreachable while the agent is away", || {
        let mut c = c.clone();
        async move {
            let h = host(&mut c, "h0").await;
            (!h.reachable && h.unreachable_reason.contains("not attached")).then_some(())
        }
    })
    .await;
    let agent = start_agent(&server, rack(&data, bmcs.clone()));
    let (mut serial2, _) = tokio::time::timeout(WAIT, console.accept())
        .await
        .expect("capture resumes after the restart")
        .unwrap();
    until("h0 reachable again", || {
        let mut c = c.clone();
        async move { host(&mut c, "h0").await.reachable.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new_ops: Vec<String> = sim.log()[ops_before..]
        .iter()
        .filter(|o| !o.contains("status"))
        .cloned()
        .collect();
    assert!(
        new_ops.is_empty(),
        "a restarted agent must not provision the lease again: {new_ops:?}"
    );
    assert_eq!(
        host(&mut c, "h0").await.lease_id,
        l2.id,
        "the lease is untouched"
    );
    // The capture resumed, and the lease's log marks the gap.
    let text = lease_log(&mut c, &l2.id).await;
    assert!(
        text.contains("console capture started") && text.contains("is missing"),
        "no gap marker after the agent restart: {text}"
    );
    // The host was still booting: the restarted agent watches again (no
    // power action) and sees the ready text.
    let stage = until_phase(&c, &l2.id, "h0", "watching again", |(_, s)| {
        s.contains("agent restarted")
    })
    .await;
    assert_eq!(stage.0, pb::ProvisionPhase::Booting, "{stage:?}");
    serial2
        .write_all(b"LAB-DOM0-OK hypervisor=xen caps=control_d\r\n")
        .await
        .unwrap();
    until_phase(&c, &l2.id, "h0", "h0 ready after the restart", |(p, _)| {
        *p == pb::ProvisionPhase::Ready
    })
    .await;
    agent.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_hosts_are_not_granted_and_the_queue_moves_on() {
    let tmp = tempfile::tempdir().unwrap();
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = console.local_addr().unwrap().port();
    let server = InProcessServer::start(ServerOptions {
        inventory: Some(inventory(tmp.path(), port)),
        agents: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = server.clients("ci").await.unwrap();

    // No agent yet: nothing of its rack is granted.
    let h = until("h1 marked unreachable", || {
        let mut c = c.clone();
        async move { Some(host(&mut c, "h1").await).filter(|h| !h.reachable) }
    })
    .await;
    assert!(
        h.unreachable_reason
            .contains("agent agent-r1 of rack r1 is not attached"),
        "{h:?}"
    );
    let st = match c
        .leases
        .acquire(pb::AcquireRequest {
            request: Some(pb::LeaseRequest::default()),
            no_wait: true,
            ..Default::default()
        })
        .await
    {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");

    // h1's BMC never answers.
    let bmcs: Bmcs = Arc::default();
    let sim1 = Arc::new(SimPower::new("h1"));
    sim1.set_responsiveness(Responsiveness::Unresponsive {
        timeout: Duration::from_millis(100),
    });
    bmcs.lock().unwrap().insert("h1".into(), sim1.clone());
    let agent = start_agent(&server, rack(&tmp.path().join("agent"), bmcs.clone()));
    let h1 = until("h1 unreachable for its BMC", || {
        let mut c = c.clone();
        async move {
            Some(host(&mut c, "h1").await)
                .filter(|h| !h.reachable && !h.unreachable_reason.contains("not attached"))
        }
    })
    .await;
    assert!(h1.unreachable_reason.contains("h1"), "{h1:?}");
    until("h2 reachable", || {
        let mut c = c.clone();
        async move { host(&mut c, "h2").await.reachable.then_some(()) }
    })
    .await;
    // A request for one of h1/h2 gets h2: the silent BMC's host is skipped.
    let l = c
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h1".into(), "h2".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(l.hosts, vec!["h2".to_owned()]);
    // The events say why.
    let ev = c
        .events
        .list_events(pb::ListEventsRequest {
            host: "h1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        ev.events
            .iter()
            .any(|e| e.kind() == pb::EventKind::HostUnreachable && e.detail.contains("h1")),
        "{:?}",
        ev.events
    );
    // A power command on it fails as UNAVAILABLE, and affects no other host.
    let st = c
        .hosts
        .power(pb::PowerRequest {
            host: "h1".into(),
            action: pb::PowerAction::Status as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    assert!(host(&mut c, "h2").await.reachable);
    // The BMC comes back: so does the host.
    sim1.set_responsiveness(Responsiveness::Responsive);
    until("h1 reachable again", || {
        let mut c = c.clone();
        async move { host(&mut c, "h1").await.reachable.then_some(()) }
    })
    .await;

    // A profile whose ready text never comes: FAILED with the console tail.
    let _serial = tokio::time::timeout(WAIT, console.accept())
        .await
        .expect("capture of h0")
        .unwrap();
    let l = c
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h0".into()],
            profile: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut serial = _serial.0;
    // Output counts from the power-on: write once the host is booting.
    until_phase(&c, &l.id, "h0", "h0 booting", |(p, _)| {
        *p == pb::ProvisionPhase::Booting
    })
    .await;
    serial
        .write_all(b"[    2.1] Kernel panic - not syncing: No working init found.\r\n")
        .await
        .unwrap();
    let failed = until("h0 provisioning fails", || {
        let mut c = c.clone();
        let id = l.id.clone();
        async move {
            let l = lease(&mut c, &id).await;
            l.provisioning
                .into_iter()
                .find(|p| p.phase() == pb::ProvisionPhase::Failed)
        }
    })
    .await;
    assert!(failed.stage.contains("NEVER-PRINTED"), "{failed:?}");
    assert!(failed.console_tail.contains("Kernel panic"), "{failed:?}");
    // The server attributes it: the kernel the lease booted panicked.
    assert_eq!(
        (
            failed.failure_class(),
            failed.failure_rule.as_str(),
            failed.failure_line.as_str()
        ),
        (
            pb::FailureClass::Job,
            "kernel panic",
            "[    2.1] Kernel panic - not syncing: No working init found."
        ),
        "{failed:?}"
    );
    // The job's fault says nothing about the host.
    assert_eq!(
        host(&mut c, "h0").await.health(),
        pb::HostHealth::Healthy,
        "a job failure changed h0's health"
    );
    c.leases
        .release(pb::ReleaseRequest {
            lease_id: l.id.clone(),
        })
        .await
        .unwrap();
    // A failure through the host's fault (no bootable device): suspect.
    let l = until("h0 granted again after the reclaim", || {
        let mut c = c.clone();
        async move {
            c.grant_now(pb::LeaseRequest {
                hosts: vec!["h0".into()],
                profile: "slow".into(),
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    until_phase(&c, &l.id, "h0", "h0 booting", |(p, _)| {
        *p == pb::ProvisionPhase::Booting
    })
    .await;
    serial
        .write_all(b"Booting from Hard Disk...\r\nNo bootable device.\r\n")
        .await
        .unwrap();
    let h0 = until("h0 suspect", || {
        let mut c = c.clone();
        async move {
            let h = host(&mut c, "h0").await;
            (h.health() == pb::HostHealth::Suspect).then_some(h)
        }
    })
    .await;
    assert!(
        h0.health_reason.starts_with(&format!(
            "no bootable device in lease {}: No bootable device.",
            l.id
        )),
        "{h0:?}"
    );
    agent.abort();
    server.stop().await;
}

/// With real tokens (not development mode): only the holder drives a
/// host, agents make no user calls, users cannot attach as agents, and a
/// holder's console ends with the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_drives_a_host_and_only_agents_attach() {
    let TokenLab {
        _tmp,
        server,
        agent,
        mut serial,
        mut alice,
        mut bob,
        mut op,
    } = token_lab(|_| String::new(), &[("t-fake", "agent-r2", "agent")]).await;
    let l = alice
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h0".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let power = |action: pb::PowerAction| pb::PowerRequest {
        host: "h0".into(),
        action: action as i32,
    };
    // Bob may read the power state, not switch it; Alice and operators may.
    assert!(
        bob.hosts
            .power(power(pb::PowerAction::Status))
            .await
            .is_ok()
    );
    let st = bob
        .hosts
        .power(power(pb::PowerAction::Off))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(alice.hosts.power(power(pb::PowerAction::On)).await.is_ok());
    assert!(op.hosts.power(power(pb::PowerAction::Status)).await.is_ok());

    // Consoles and logs: the holder (and operators), nobody else.
    let open = |write| pb::ConsoleRequest {
        msg: Some(pb::console_request::Msg::Open(pb::ConsoleOpen {
            host: "h0".into(),
            write,
            replay_bytes: 0,
            not_before: None,
        })),
    };
    let st = bob
        .hosts
        .console(tokio_stream::iter(vec![open(false)]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    let st = bob
        .hosts
        .console_log(pb::ConsoleLogRequest {
            lease_id: l.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");

    // Agents make no user calls; users and other agents cannot attach.
    let mut as_agent = server.clients("agent-r1").await.unwrap();
    let st = as_agent
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    for (token, code) in [
        ("t-alice", tonic::Code::PermissionDenied),
        ("t-fake", tonic::Code::PermissionDenied),
        ("t-op", tonic::Code::PermissionDenied),
    ] {
        let mut c = agent_client(&server, token).await;
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::AgentHello {
                rack: "r1".into(),
                version: "test".into(),
            })),
        };
        let st = c.attach(tokio_stream::iter(vec![hello])).await.unwrap_err();
        assert_eq!(st.code(), code, "{token}: {st:?}");
    }

    // Alice's live console ends when her lease does.
    let (in_tx, in_rx) = tokio::sync::mpsc::channel::<pb::ConsoleRequest>(8);
    in_tx.send(open(true)).await.unwrap();
    let mut out = alice
        .hosts
        .console(tokio_stream::wrappers::ReceiverStream::new(in_rx))
        .await
        .unwrap()
        .into_inner();
    serial.write_all(b"alice was here\r\n").await.unwrap();
    alice
        .leases
        .release(pb::ReleaseRequest {
            lease_id: l.id.clone(),
        })
        .await
        .unwrap();
    let ended = tokio::time::timeout(WAIT, async {
        let mut notices = Vec::new();
        loop {
            match out.message().await {
                Ok(Some(m)) => {
                    if let Some(pb::console_response::Msg::Notice(n)) = m.msg {
                        notices.push(n);
                    }
                }
                Ok(None) | Err(_) => return notices,
            }
        }
    })
    .await
    .expect("the holder's console session ends with the lease");
    assert!(
        ended.iter().any(|n| n.contains("lease on h0 ended")),
        "{ended:?}"
    );
    drop(in_tx);
    agent.abort();
    server.stop().await;
}

/// Reads a console stream until its output contains `want`; returns the
/// output so far.
async fn console_until(out: &mut tonic::Streaming<pb::ConsoleResponse>, want: &str) -> String {
    let mut text = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&text).contains(want) {
            match out.message().await {
                Ok(Some(m)) => {
                    if let Some(pb::console_response::Msg::Output(b)) = m.msg {
                        text.extend_from_slice(&b);
                    }
                }
                other => panic!("console stream ended before {want:?}: {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{want:?} never reached the viewer; got {:?}",
            String::from_utf8_lossy(&text)
        )
    });
    String::from_utf8_lossy(&text).into_owned()
}

/// A hostile neighbour's view (hardening items 3, 5, 6): the next holder's
/// console replays nothing captured before its lease (while an operator
/// who is not the holder still sees that history), an agent cannot speak
/// for another rack's hosts (its reports about them are ignored: no
/// unreachable host, no forged READY), and an operator's token cannot
/// attach as an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbours_see_and_speak_only_for_their_own() {
    let TokenLab {
        _tmp,
        server,
        agent,
        mut serial,
        mut alice,
        mut bob,
        mut op,
    } = token_lab(
        |dir| {
            format!(
                "\n[[rack]]\nname = \"r2\"\nagent = \"agent-r2\"\n\n[[host]]\nname = \"h9\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r2\"\nmac = \"52:54:00:00:00:19\"\n\
                 [host.bmc]\naddress = \"127.0.0.1\"\nport = 10009\nuser = \"admin\"\npassword_file = \"{}\"\n[host.console]\nkind = \"none\"\n",
                dir.join("bmc.pw").display()
            )
        },
        &[("agent-r2", "agent-r2", "agent")],
    )
    .await;

    let open = |replay_bytes| {
        tokio_stream::iter(vec![pb::ConsoleRequest {
            msg: Some(pb::console_request::Msg::Open(pb::ConsoleOpen {
                host: "h0".into(),
                write: false,
                replay_bytes,
                not_before: None,
            })),
        }])
    };

    // Alice's lease: what h0 prints reaches her console.
    let a = alice
        .grant_now(pb::LeaseRequest {
            hosts: vec!["h0".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut a_out = alice.hosts.console(open(0)).await.unwrap().into_inner();
    serial
        .write_all(b"alice-secret-7f3a typed in dom0\r\n")
        .await
        .unwrap();
    console_until(&mut a_out, "alice-secret-7f3a").await;
    drop(a_out);
    alice
        .leases
        .release(pb::ReleaseRequest {
            lease_id: a.id.clone(),
        })
        .await
        .unwrap();

    // Bob's lease on the same host: the largest replay shows nothing of
    // Alice's lease, only what h0 printed after Bob's grant.
    let b = until("bob's grant of h0 after the reclaim", || {
        let mut c = bob.clone();
        async move {
            c.grant_now(pb::LeaseRequest {
                hosts: vec!["h0".into()],
                profile: "xen".into(),
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    let mut b_out = bob.hosts.console(open(65_536)).await.unwrap().into_inner();
    serial.write_all(b"bob-marker-51c0\r\n").await.unwrap();
    let seen = console_until(&mut b_out, "bob-marker-51c0").await;
    assert!(
        !seen.contains("alice-secret"),
        "the next holder's replay shows the previous lease's console: {seen:?}"
    );
    // The history is there: an operator who does not hold the lease sees it
    // in the replay (so the check above is not vacuous).
    let mut op_out = op.hosts.console(open(65_536)).await.unwrap().into_inner();
    let op_seen = console_until(&mut op_out, "bob-marker-51c0").await;
    assert!(
        op_seen.contains("alice-secret-7f3a"),
        "the operator's replay lacks the history: {op_seen:?}"
    );
    drop(op_out);
    drop(b_out);

    // Rack r2's agent reports about h0 (rack r1): forged unreachability and
    // a forged READY for Bob's lease. Then a true report about its own h9;
    // once that one shows, the forged ones were handled (one ordered stream).
    let mut r2 = agent_client(&server, "agent-r2").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    let msg = |m| pb::AgentMessage { msg: Some(m) };
    tx.send(msg(pb::agent_message::Msg::Hello(pb::AgentHello {
        rack: "r2".into(),
        version: "test".into(),
    })))
    .await
    .unwrap();
    let mut from_server = r2
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("agent-r2 attaches for its own rack")
        .into_inner();
    let first = tokio::time::timeout(WAIT, from_server.message())
        .await
        .expect("the rack state")
        .unwrap()
        .unwrap();
    match first.msg {
        Some(pb::server_message::Msg::Rack(r)) => {
            let names: Vec<_> = r.hosts.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(names, ["h9"], "agent-r2 is told only its own hosts");
        }
        other => panic!("first message to agent-r2: {other:?}"),
    }
    for report in [
        pb::HostReport {
            host: "h0".into(),
            reachable: false,
            unreachable_reason: "forged by r2".into(),
            ..Default::default()
        },
        pb::HostReport {
            host: "h0".into(),
            reachable: true,
            lease_id: b.id.clone(),
            phase: pb::ProvisionPhase::Ready as i32,
            stage: "forged ready".into(),
            ..Default::default()
        },
        pb::HostReport {
            host: "h9".into(),
            reachable: true,
            ..Default::default()
        },
    ] {
        tx.send(msg(pb::agent_message::Msg::Report(report)))
            .await
            .unwrap();
    }
    until("h9 reachable by its own agent's report", || {
        let mut c = op.clone();
        async move { host(&mut c, "h9").await.reachable.then_some(()) }
    })
    .await;
    let h0 = host(&mut op, "h0").await;
    assert!(h0.reachable, "r2's report made h0 unreachable: {h0:?}");
    let (ph, stage) = phase(&lease(&mut bob, &b.id).await, "h0").expect("h0 provisioning");
    assert!(
        ph != pb::ProvisionPhase::Ready && !stage.contains("forged"),
        "r2 forged the provisioning of Bob's lease: {ph:?} {stage:?}"
    );
    drop(tx);

    // An operator's token cannot attach as r1's agent (outside the
    // development mode).
    let mut c = agent_client(&server, "t-op").await;
    let hello = msg(pb::agent_message::Msg::Hello(pb::AgentHello {
        rack: "r1".into(),
        version: "test".into(),
    }));
    let st = c.attach(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    // The real agent is still the one attached: Bob's provisioning goes on.
    serial.write_all(b"LAB-DOM0-OK\r\n").await.unwrap();
    until_phase(
        &bob,
        &b.id,
        "h0",
        "bob's lease READY from the real agent",
        |p| p.0 == pb::ProvisionPhase::Ready,
    )
    .await;
    agent.abort();
    server.stop().await;
}
