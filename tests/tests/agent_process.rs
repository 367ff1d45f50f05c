//! The real `lab-agent` beside the real `lab-server`: a lease with profile
//! `xen` makes the agent serve that host a Xen boot script over HTTP and
//! TFTP (fetched with curl as the client), and the release brings back the
//! default profile. Loopback only; DHCP is not started here (it runs only
//! in network namespaces, see lab-agent/tests/dhcp_netns.rs).

use lab_proto::v1 as pb;
use lab_tests::agent::AgentProcess;
use lab_tests::{Clients, ServerProcess, eventually, inventory_toml_with_agent};
use std::process::Command;
use std::time::Duration;

fn curl(url: &str) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", url])
        .output()
        .expect("curl is needed: apt-get install curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_xen_lease_changes_what_the_agent_serves() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_dev(dir.path(), &inventory_toml_with_agent(2)).unwrap();
    let agent = AgentProcess::spawn(dir.path(), server.addr, "").unwrap();
    let (tftp, http) = (&agent.tftp, &agent.http);

    let script = format!("http://{http}/hosts/52-54-00-00-00-00.ipxe");
    eventually("the agent knows h00", Duration::from_secs(15), || {
        curl(&script).0
    })
    .await;
    let (_, body) = curl(&script);
    assert!(
        body.contains("exit"),
        "default profile local-disk exits to the next boot device:\n{body}"
    );

    let mut c = Clients::connect(server.addr, Some("ci")).await.unwrap();
    let req = pb::LeaseRequest {
        hosts: vec!["h00".into()],
        profile: "xen".into(),
        ..Default::default()
    };
    let lease = c.grant_now(req).await.unwrap();
    eventually("h00's script boots Xen", Duration::from_secs(15), || {
        curl(&script).1.contains("xen")
    })
    .await;
    let (_, body) = curl(&script);
    assert!(
        body.contains(&lease.id),
        "the script names the lease:\n{body}"
    );
    assert!(body.contains("dom0_mem="), "{body}");
    // The same file over TFTP.
    let (ok, tftp_body) = curl(&format!("tftp://{tftp}/hosts/52-54-00-00-00-00.ipxe"));
    assert!(ok);
    assert_eq!(tftp_body, body);
    // Unknown MACs get nothing.
    assert!(!curl(&format!("http://{http}/hosts/52-54-00-00-00-99.ipxe")).0);

    c.leases
        .release(pb::ReleaseRequest { lease_id: lease.id })
        .await
        .unwrap();
    eventually("h00 back to local-disk", Duration::from_secs(15), || {
        let b = curl(&script).1;
        !b.contains("dom0_mem=") && b.contains("exit")
    })
    .await;
}
