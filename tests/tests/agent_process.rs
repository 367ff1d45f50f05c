//! The real `lab-agent` beside the real `lab-server`: a lease with profile
//! `xen` makes the agent serve that host a Xen boot script over HTTP and
//! TFTP (fetched with curl as the client), and the release brings back the
//! default profile. Loopback only; DHCP is not started here (it runs only
//! in network namespaces, see lab-agent/tests/dhcp_netns.rs).

use lab_proto::v1 as pb;
use lab_tests::{Clients, ServerProcess, bin_path, eventually, inventory_toml_with_agent};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-assets");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "rack = \"r1\"\nserver = \"http://{}\"\n[tftp]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\nurl = \"http://127.0.0.1:0\"\n[assets]\nroot = \"{assets}\"\n",
            server.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(bin_path("lab-agent"))
        .args(["--config", config.to_str().unwrap(), "--token", "agent-r1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .expect("lab-agent is built (cargo build --workspace)");
    let stdout = child.stdout.take().unwrap();
    let _agent = Agent(child);
    let (mut tftp, mut http) = (String::new(), String::new());
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("lab-agent tftp listening on ") {
            tftp = a.to_owned();
        } else if let Some(a) = line.strip_prefix("lab-agent http listening on ") {
            http = a.to_owned();
        } else if line.starts_with("lab-agent running") {
            break;
        }
    }
    assert!(
        !tftp.is_empty() && !http.is_empty(),
        "agent did not start: {}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );

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
