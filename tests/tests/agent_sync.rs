//! The agent follows lab-server: a lease with a profile changes what its host
//! boots, and the end of the lease brings the default profile back; a
//! restarted server is followed again after a resync.

use lab_agent::hosts::{HostTable, Mac};
use lab_agent::sync::{SyncConfig, run};
use lab_proto::v1 as pb;
use lab_tests::{InProcessServer, ServerOptions, eventually};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_boots_each_host_with_its_lease_profile() {
    let server = InProcessServer::start(ServerOptions {
        hosts: 4,
        ..Default::default()
    })
    .await
    .unwrap();
    let table = HostTable::default();
    let cfg = SyncConfig {
        server: format!("http://{}", server.addr),
        token: Some("agent-r1".into()),
        rack: "r1".into(),
        default_profile: "local-disk".into(),
    };
    let agent = tokio::spawn(run(cfg, table.clone()));
    eventually("4 hosts synced", Duration::from_secs(10), || {
        table.all().len() == 4
    })
    .await;
    assert!(
        table
            .all()
            .iter()
            .all(|h| h.profile == "local-disk" && h.lease.is_none())
    );

    let mut c = server.clients("ci").await.unwrap();
    let req = pb::LeaseRequest {
        hosts: vec!["h02".into()],
        profile: "xen".into(),
        ..Default::default()
    };
    let lease = c.grant_now(req).await.unwrap();
    let mac: Mac = "52:54:00:00:00:02".parse().unwrap();
    eventually("h02 boots xen", Duration::from_secs(10), || {
        table
            .by_mac(&mac)
            .is_some_and(|h| h.profile == "xen" && h.lease.as_deref() == Some(lease.id.as_str()))
    })
    .await;
    assert_eq!(table.all().iter().filter(|h| h.profile == "xen").count(), 1);

    c.leases
        .release(pb::ReleaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap();
    eventually("h02 back to local-disk", Duration::from_secs(10), || {
        table
            .by_mac(&mac)
            .is_some_and(|h| h.profile == "local-disk" && h.lease.is_none())
    })
    .await;
    agent.abort();
    server.stop().await;
}
