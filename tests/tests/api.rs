//! The real `lab-server` with a tokens file: authentication and
//! authorization, INVALID_ARGUMENT naming the field, maintenance, inventory
//! errors with file:line:column, reloads by RPC and by SIGHUP.

use lab_proto::v1 as pb;
use lab_tests::{Clients, ServerProcess, inventory_toml, tokens_toml};
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

const CI1: &str = "tok-ci-one";
const CI2: &str = "tok-ci-two";
const DEV: &str = "tok-developer";
const OP: &str = "tok-operator";

fn start(dir: &Path, inventory: &str) -> anyhow::Result<ServerProcess> {
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory)?;
    let tokens = dir.join("tokens.toml");
    std::fs::write(
        &tokens,
        tokens_toml(&[
            (CI1, "ci-one", "ci"),
            (CI2, "ci-two", "ci"),
            (DEV, "dana", "developer"),
            (OP, "olga", "operator"),
        ]),
    )?;
    ServerProcess::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--inventory",
            inv.to_str().unwrap(),
            "--data-dir",
            dir.join("data").to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--max-ttl",
            "2h",
        ],
        &dir.join("server.log"),
    )
}

fn one(host: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        hosts: vec![host.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn tokens_roles_and_holders_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &inventory_toml(4)).unwrap();

    // No token, unknown token, malformed header → UNAUTHENTICATED.
    let mut anon = Clients::connect(server.addr, None).await.unwrap();
    let s = anon
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut bad = Clients::connect(server.addr, Some("not-a-token"))
        .await
        .unwrap();
    let s = bad
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::Unauthenticated, "unknown token")
    );

    let mut ci1 = Clients::connect(server.addr, Some(CI1)).await.unwrap();
    let mut ci2 = Clients::connect(server.addr, Some(CI2)).await.unwrap();
    let mut dev = Clients::connect(server.addr, Some(DEV)).await.unwrap();
    let mut op = Clients::connect(server.addr, Some(OP)).await.unwrap();
    let who = ci1
        .admin
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (who.principal.as_str(), who.role),
        ("ci-one", pb::Role::Ci as i32)
    );

    let lease = ci1.grant_now(one("h01")).await.unwrap();
    assert_eq!(lease.holder, "ci-one");

    // Another CI principal may not renew or release it.
    let s = ci2
        .leases
        .renew(pb::RenewRequest {
            lease_id: lease.id.clone(),
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let s = ci2
        .leases
        .release(pb::ReleaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("held by ci-one"), "{s:?}");

    // Only operators manage maintenance and the inventory.
    let s = dev
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h02".into(),
            maintenance: true,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = ci1
        .admin
        .reload_inventory(pb::ReloadInventoryRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Maintenance: no new leases on the host; a current lease runs on.
    let h = op
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h02".into(),
            maintenance: true,
            reason: "fan".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.state, pb::HostState::Maintenance as i32);
    let s = dev.grant_now(one("h02")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let h = op
        .admin
        .set_maintenance(pb::SetMaintenanceRequest {
            host: "h01".into(),
            maintenance: true,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (h.state, h.holder.as_str()),
        (pb::HostState::Leased as i32, "ci-one")
    );

    // An operator may release anyone's lease; the event names the operator.
    let l = op
        .leases
        .release(pb::ReleaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.state, pb::LeaseState::Released as i32);
    let ev = op
        .events
        .list_events(pb::ListEventsRequest {
            lease_id: lease.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let released = ev
        .iter()
        .find(|e| e.kind == pb::EventKind::LeaseReleased as i32)
        .unwrap();
    assert_eq!(released.actor, "olga");
    // Released into maintenance: the host stays out of service after reclaim.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = op
            .hosts
            .get_host(pb::GetHostRequest { name: "h01".into() })
            .await
            .unwrap()
            .into_inner();
        if h.state == pb::HostState::Maintenance as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "{h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The BMC password never leaves the server: the host shows only the endpoint.
    let hosts = op
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hosts.hosts.len(), 4);
    // No token in the server's log.
    let log = server.log_text();
    for t in [CI1, CI2, DEV, OP] {
        assert!(!log.contains(t), "token {t} leaked into the log");
    }
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &inventory_toml(4)).unwrap();
    let mut c = Clients::connect(server.addr, Some(CI1)).await.unwrap();
    let acquire = |r: pb::LeaseRequest| pb::AcquireRequest {
        request: Some(r),
        no_wait: true,
        ..Default::default()
    };
    let cases: Vec<(pb::AcquireRequest, &str)> = vec![
        (
            pb::AcquireRequest {
                request: None,
                no_wait: false,
                ..Default::default()
            },
            "request: is required",
        ),
        (
            acquire(pb::LeaseRequest {
                count: 5000,
                ..Default::default()
            }),
            "request.count",
        ),
        (
            acquire(pb::LeaseRequest {
                arch: 42,
                ..Default::default()
            }),
            "request.arch",
        ),
        (
            acquire(pb::LeaseRequest {
                hosts: vec!["nope".into()],
                ..Default::default()
            }),
            "request.hosts: no host named nope",
        ),
        (
            acquire(pb::LeaseRequest {
                flags: vec!["has space".into()],
                ..Default::default()
            }),
            "request.flags",
        ),
        (
            acquire(pb::LeaseRequest {
                ttl: Some(prost_types::Duration {
                    seconds: 3 * 3600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            "request.ttl: must be more than 0 and at most 2h",
        ),
    ];
    for (req, want) in cases {
        let s = match c.leases.acquire(req.clone()).await {
            Err(s) => s,
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(s.code(), Code::InvalidArgument, "{req:?}: {s:?}");
        assert!(s.message().starts_with(want), "{req:?}: {}", s.message());
    }
    let s = c
        .leases
        .get_lease(pb::GetLeaseRequest {
            lease_id: "xyz".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::InvalidArgument,
            "lease_id: \"xyz\" is not a lease id (a UUID)"
        )
    );
    let s = c
        .leases
        .get_lease(pb::GetLeaseRequest {
            lease_id: "00000000-0000-0000-0000-000000000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c
        .hosts
        .get_host(pb::GetHostRequest { name: "h99".into() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    // Never satisfiable by this inventory.
    let s = c
        .grant_now(pb::LeaseRequest {
            count: 5,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
}

#[test]
fn a_broken_inventory_is_refused_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = inventory_toml(3);
    inv.push_str("\n[[host]]\nname = \"h09\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:01\"\n");
    let Err(e) = start(dir.path(), &inv) else {
        panic!("server started on a broken inventory")
    };
    let msg = e.to_string();
    let line = inv
        .lines()
        .position(|l| l.starts_with("mac = \"52:54:00:00:00:01\""))
        .unwrap();
    let last = inv
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("mac = \"52:54:00:00:00:01\""))
        .last()
        .unwrap()
        .0;
    let want = format!(
        "inventory.toml:{}:7: duplicate MAC 52:54:00:00:00:01 (first used by host h01 at line {})",
        last + 1,
        line + 1
    );
    assert!(msg.contains(&want), "expected {want:?} in {msg}");
}

#[tokio::test]
async fn reloads_keep_the_last_good_inventory_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &inventory_toml(2)).unwrap();
    let mut op = Clients::connect(server.addr, Some(OP)).await.unwrap();
    let inv = dir.path().join("inventory.toml");

    // A broken file: FAILED_PRECONDITION with file:line:column; nothing changes.
    std::fs::write(
        &inv,
        inventory_toml(2).replace("arch = \"x86_64\"", "arch = \"sparc\""),
    )
    .unwrap();
    let s = op
        .admin
        .reload_inventory(pb::ReloadInventoryRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("inventory.toml:6:8: unknown arch"),
        "{}",
        s.message()
    );
    let n = op
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts
        .len();
    assert_eq!(n, 2);

    // A good one with a host more, by RPC.
    std::fs::write(&inv, inventory_toml(3)).unwrap();
    let r = op
        .admin
        .reload_inventory(pb::ReloadInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.hosts, r.added, r.removed), (3, 1, 0));

    // Remove a leased host: it is retired, then removed when its lease ends.
    let lease = op.grant_now(one("h02")).await.unwrap();
    std::fs::write(&inv, inventory_toml(2)).unwrap();
    // And by SIGHUP this time.
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = op
            .hosts
            .get_host(pb::GetHostRequest { name: "h02".into() })
            .await
            .unwrap()
            .into_inner();
        if h.state == pb::HostState::Retired as i32 && h.holder == "olga" {
            break; // retired, its lease still held
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload did not retire h02: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    op.leases
        .release(pb::ReleaseRequest { lease_id: lease.id })
        .await
        .unwrap();
    loop {
        match op
            .hosts
            .get_host(pb::GetHostRequest { name: "h02".into() })
            .await
        {
            Err(s) if s.code() == Code::NotFound => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "retired host never removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &inventory_toml(1)).unwrap();
    let mut old = Clients::connect(server.addr, Some(CI1)).await.unwrap();
    old.admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
    std::fs::write(
        dir.path().join("tokens.toml"),
        tokens_toml(&[("tok-new", "newbie", "developer")]),
    )
    .unwrap();
    let pid = server.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut new = Clients::connect(server.addr, Some("tok-new"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let who = loop {
        match new.admin.who_am_i(pb::WhoAmIRequest {}).await {
            Ok(w) => break w.into_inner(),
            Err(s) => {
                assert_eq!(s.code(), Code::Unauthenticated);
                assert!(Instant::now() < deadline, "the new token never worked");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(
        (who.principal.as_str(), who.role),
        ("newbie", pb::Role::Developer as i32)
    );
    let s = old.admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unauthenticated,
        "a removed token must stop working"
    );
    // A broken tokens file keeps the last good one.
    std::fs::write(
        dir.path().join("tokens.toml"),
        "[[token]]\nprincipal = \"x\"\n",
    )
    .unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("tokens reload failed") {
        assert!(Instant::now() < deadline, "no reload failure logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    new.admin.who_am_i(pb::WhoAmIRequest {}).await.unwrap();
}
