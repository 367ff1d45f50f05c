//! lab-server against one hostile API caller (issue 12): each attack as
//! the issue measured it, and the fixed behaviour asserted.
//!
//! - 20,000 refused `no_wait` requests with 1 KiB comments: no event, the
//!   store file grows by less than 1 MB;
//! - 5,000 ended leases (1 KiB comments) list page by page, and through
//!   `lab lease list --all` and `lab events`;
//! - a `ci` (or `developer`) token asking for priority 2^31−1:
//!   PERMISSION_DENIED naming the limit;
//! - one principal's 65th waiting request: RESOURCE_EXHAUSTED;
//! - a filtered `ListEvents` reads the same number of store rows whatever
//!   the size of the log (the store's counter);
//! - control characters in a comment or a maintenance reason:
//!   INVALID_ARGUMENT naming the field;
//! - one connection gets at most 128 streams at once;
//! - `--dev-insecure-no-auth` with a non-loopback address: the server
//!   refuses to start.

use lab_proto::v1 as pb;
use lab_server::auth::Authenticator;
use lab_tests::{Clients, InProcessServer, ServerOptions, bin_path, inventory_toml, tokens_toml};
use prost::Message as _;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tonic::Code;

fn on(host: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        hosts: vec![host.into()],
        ..Default::default()
    }
}

async fn last_seq(c: &mut Clients) -> u64 {
    c.events
        .list_events(pb::ListEventsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .last_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_no_wait_requests_leave_the_store_as_it_was() {
    let server = InProcessServer::start(ServerOptions {
        hosts: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut holder = server.clients("holder").await.unwrap();
    holder.grant_now(on("h00")).await.unwrap();
    let file = server.dir.path().join("lab.redb");
    let size = || std::fs::metadata(&file).unwrap().len();
    let (seq, before) = (last_seq(&mut holder).await, size());

    const N: usize = 20_000;
    const TASKS: usize = 16;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let mut c = server.clients("mallory").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..N / TASKS {
                let r = c
                    .grant_now(pb::LeaseRequest {
                        comment: "x".repeat(1024),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
                    r => panic!("{r:?}"),
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await.unwrap();
    }
    assert_eq!(refused, N);
    assert_eq!(last_seq(&mut holder).await, seq, "refusals write no event");
    let growth = size().saturating_sub(before);
    eprintln!(
        "{N} refused no_wait requests: store {before} → {} bytes",
        size()
    );
    assert!(growth < 1_000_000, "the store grew by {growth} bytes");
    server.stop().await;
}

/// `lab` with `--json`, against `addr`; stdout.
fn lab_json(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let out = Command::new(bin_path("lab"))
        .arg("--json")
        .args(args)
        .env("LAB_SERVER", format!("http://{addr}"))
        .env("LAB_TOKEN", "reader")
        .output()
        .expect("run lab");
    assert!(out.status.success(), "lab {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_ended_leases_list_page_by_page_and_through_the_cli() {
    const HOSTS: usize = 50;
    const ROUNDS: usize = 100;
    let server = InProcessServer::start(ServerOptions {
        hosts: HOSTS,
        ..Default::default()
    })
    .await
    .unwrap();
    // 5,000 ended leases with 1 KiB comments: unpaged, ~6 MB in one
    // response, more than a client decodes (4 MiB).
    let mut tasks = Vec::new();
    for i in 0..HOSTS {
        let mut c = server.clients(&format!("ci{i}")).await.unwrap();
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let l = c
                    .grant_now(pb::LeaseRequest {
                        comment: format!("{round:04} {}", "c".repeat(1019)),
                        ..on(&format!("h{i:02}"))
                    })
                    .await
                    .unwrap();
                c.leases
                    .release(pb::ReleaseRequest { lease_id: l.id })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = HOSTS * ROUNDS;

    // Page by page: every lease once, in grant order, no response near
    // the 4 MiB a client decodes.
    let mut c = server.clients("reader").await.unwrap();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .leases
            .list_leases(pb::ListLeasesRequest {
                include_ended: true,
                page_size: 100_000, // capped by the server
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(r.leases.len() <= 1000);
        assert!(
            r.encoded_len() < 1_200_000,
            "a page of {} bytes",
            r.encoded_len()
        );
        seen.extend(r.leases);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!(seen.len(), total);
    let ids: HashSet<&str> = seen.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids.len(), total, "no lease twice");
    assert!(
        seen.windows(2)
            .all(|w| w[0].granted_at.as_ref().unwrap().seconds
                <= w[1].granted_at.as_ref().unwrap().seconds),
        "in grant order"
    );
    eprintln!("{total} ended leases in {pages} pages");
    // The default page: 100.
    let first = c
        .leases
        .list_leases(pb::ListLeasesRequest {
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.leases.len(), 100);
    let bad = c
        .leases
        .list_leases(pb::ListLeasesRequest {
            include_ended: true,
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("page_token: "),
        "{}",
        bad.message()
    );

    // The CLI follows the pages by itself.
    let addr = server.addr;
    let out = tokio::task::spawn_blocking(move || lab_json(addr, &["lease", "list", "--all"]))
        .await
        .unwrap();
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), total);
    let last = last_seq(&mut c).await;
    let out = tokio::task::spawn_blocking(move || lab_json(addr, &["events"]))
        .await
        .unwrap();
    assert_eq!(
        out.lines().count() as u64,
        last,
        "every event, page after page"
    );
    let out = tokio::task::spawn_blocking(move || lab_json(addr, &["events", "--limit", "2500"]))
        .await
        .unwrap();
    assert_eq!(out.lines().count(), 2500);
    server.stop().await;
}

fn with_tokens() -> Authenticator {
    let text = tokens_toml(&[
        ("tok-ci", "ci-one", "ci"),
        ("tok-dev", "dana", "developer"),
        ("tok-op", "olga", "operator"),
    ]);
    Authenticator::parse(&text, Path::new("tokens.toml")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_token_may_not_jump_the_queue_with_a_huge_priority() {
    let server = InProcessServer::start(ServerOptions {
        hosts: 2,
        auth: with_tokens(),
        ..Default::default()
    })
    .await
    .unwrap();
    for (token, who) in [("tok-ci", "ci-one (ci)"), ("tok-dev", "dana (developer)")] {
        let mut c = server.clients(token).await.unwrap();
        let err = c
            .grant_now(pb::LeaseRequest {
                priority: i32::MAX,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            format!(
                "{who} may not ask for priority 2147483647: at most 10 for roles ci and developer"
            )
        );
        c.grant_now(pb::LeaseRequest {
            priority: 10,
            hosts: vec![if token == "tok-ci" { "h00" } else { "h01" }.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // An operator may (here: a request that waits, at the head).
    let mut op = server.clients("tok-op").await.unwrap();
    let mut s = op
        .leases
        .acquire(pb::AcquireRequest {
            request: Some(pb::LeaseRequest {
                priority: i32::MAX,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match s.message().await.unwrap().unwrap().update.unwrap() {
        pb::acquire_update::Update::Queued(q) => assert_eq!(q.position, 1),
        u => panic!("{u:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_gets_at_most_64_waiting_requests() {
    let server = InProcessServer::start(ServerOptions {
        hosts: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut holder = server.clients("holder").await.unwrap();
    holder
        .grant_now(pb::LeaseRequest {
            count: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let wait = |mut c: Clients| async move {
        let mut s = c
            .leases
            .acquire(pb::AcquireRequest {
                request: Some(pb::LeaseRequest::default()),
                ..Default::default()
            })
            .await?
            .into_inner();
        match s.message().await? {
            Some(pb::AcquireUpdate {
                update: Some(pb::acquire_update::Update::Queued(q)),
            }) => Ok::<_, tonic::Status>((s, q.position)),
            m => panic!("{m:?}"),
        }
    };
    let mallory = server.clients("mallory").await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..64 {
        let (s, _) = wait(mallory.clone()).await.unwrap();
        streams.push(s);
    }
    let err = wait(mallory.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "mallory already has 64 waiting requests (the most one principal may have); wait for one to be granted or withdraw one"
    );
    // Others still queue, behind mallory's 64.
    let (_other, position) = wait(server.clients("alice").await.unwrap()).await.unwrap();
    assert_eq!(position, 65);
    // A withdrawn request makes room.
    drop(streams.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match wait(mallory.clone()).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no room after a withdrawal"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_event_query_reads_what_it_returns_whatever_the_log_size() {
    let server = InProcessServer::start(ServerOptions {
        hosts: 8,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut c = server.clients("ci").await.unwrap();
    let cycle = |mut c: Clients, host: String, n: usize| async move {
        let mut last = String::new();
        for _ in 0..n {
            let l = c.grant_now(on(&host)).await.unwrap();
            c.leases
                .release(pb::ReleaseRequest {
                    lease_id: l.id.clone(),
                })
                .await
                .unwrap();
            last = l.id;
        }
        last
    };
    // The busy hosts h00..h06, in parallel (their commits share fsyncs).
    let busy_client = c.clone();
    let busy = |n: usize| {
        let c = busy_client.clone();
        async move {
            let tasks: Vec<_> = (0..7)
                .map(|i| tokio::spawn(cycle(c.clone(), format!("h{i:02}"), n)))
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    let rare = cycle(c.clone(), "h07".into(), 3).await;
    busy(5).await;
    // Rows read by a host query and a lease query of the rare host.
    let cost = async |c: &mut Clients| {
        let before = server.store.rows_read();
        let by_host = c
            .events
            .list_events(pb::ListEventsRequest {
                host: "h07".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .len();
        let by_lease = c
            .events
            .list_events(pb::ListEventsRequest {
                lease_id: rare.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .len();
        (by_host, by_lease, server.store.rows_read() - before)
    };
    let small = cost(&mut c).await;
    let events_small = last_seq(&mut c).await;
    busy(90).await;
    let big = cost(&mut c).await;
    let events_big = last_seq(&mut c).await;
    eprintln!(
        "rows read for the rare host's and lease's events: {} with {events_small} events in the log, {} with {events_big}",
        small.2, big.2
    );
    assert!(events_big > 10 * events_small);
    assert_eq!(small, big, "same answers, same rows read");
    // An index entry and an event per event returned (+1 to see there are
    // no more).
    assert_eq!(small.2, 2 * (small.0 + small.1) as u64);
    server.stop().await;
}

#[tokio::test]
async fn control_characters_are_refused_in_comments_and_reasons() {
    let server = InProcessServer::start(ServerOptions::default())
        .await
        .unwrap();
    let mut c = server.clients("root").await.unwrap();
    let err = c
        .grant_now(pb::LeaseRequest {
            comment: "job\x1b]0;owned\x07".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "request.comment: must not contain control characters (found '\\u{1b}')"
    );
    let err = c
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h00".into(),
            maintenance: true,
            reason: "fan\nHOST_AVAILABLE h00".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "reason: must not contain control characters (found '\\n')"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_gets_at_most_128_streams_at_once() {
    let server = InProcessServer::start(ServerOptions::default())
        .await
        .unwrap();
    let c = server.clients("watcher").await.unwrap();
    let mut watches = Vec::new();
    for _ in 0..lab_server::grpc::MAX_STREAMS_PER_CONNECTION {
        let mut events = c.events.clone();
        let s = events
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        watches.push(s);
    }
    // The connection is full: one more call waits for a stream to end.
    let mut admin = c.admin.clone();
    let call = tokio::spawn(async move { admin.who_am_i(pb::WhoAmIRequest {}).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "a 129th stream was opened");
    drop(watches.pop());
    let who = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call went through once a stream ended")
        .unwrap()
        .unwrap();
    assert_eq!(who.into_inner().principal, "watcher");
    // Another connection is not affected.
    let mut other = server.clients("other").await.unwrap();
    other.admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
    drop(watches);
    server.stop().await;
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, inventory_toml(1)).unwrap();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let out = Command::new(bin_path("lab-server"))
            .args(["--dev-insecure-no-auth", "--listen", listen, "--inventory"])
            .arg(&inv)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{listen}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "--dev-insecure-no-auth refuses to listen on {listen}: in development mode every caller is an operator"
            )),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "it must not have listened");
    }
    // Loopback is fine.
    let server = lab_tests::ServerProcess::spawn_dev(dir.path(), &inventory_toml(1)).unwrap();
    assert!(server.addr.ip().is_loopback());
}
