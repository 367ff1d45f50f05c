//! TLS on the API and the agent link: lab-server serves TLS with a
//! certificate from a test CA; the `lab` CLI and `lab-agent` trust that CA
//! (`--ca` / `LAB_CA`) and work; a client that does not trust it, or that
//! speaks plaintext, gets nothing. Real processes, loopback only.

use lab_tests::{ServerProcess, bin_path, inventory_toml_with_agent};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files
/// in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lab test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "lab-server");
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

fn lab(server: &str, ca: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin_path("lab"));
    cmd.args(["--server", server])
        .args(args)
        .env("LAB_TOKEN", "ci")
        .env_remove("LAB_CA");
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    cmd.output().expect("run lab")
}

#[test]
fn the_api_and_the_agent_link_work_over_tls_and_only_with_a_trusted_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    std::fs::write(
        dir.path().join("inventory.toml"),
        inventory_toml_with_agent(2),
    )
    .unwrap();
    let mut server = ServerProcess::spawn(
        &[
            "--dev-insecure-no-auth",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            dir.path().join("inventory.toml").to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &dir.path().join("server.log"),
    )
    .unwrap();
    let https = format!("https://127.0.0.1:{}", server.addr.port());
    let http = format!("http://127.0.0.1:{}", server.addr.port());

    // The CLI with the CA: works.
    let out = lab(&https, Some(&ca), &["whoami"]);
    assert!(
        out.status.success(),
        "lab over TLS failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ci"));
    // Without it (system roots do not know the test CA): refused, exit 7.
    let out = lab(&https, None, &["whoami"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "an untrusted certificate must not be accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plaintext to a TLS server: nothing.
    let out = lab(&http, None, &["whoami"]);
    assert!(!out.status.success());
    // The web port (/metrics, the dashboard) serves HTTPS with the same
    // certificate: curl with the CA gets the metrics, plaintext gets nothing.
    let web = server.web.expect("the web port's line");
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .output()
            .expect("curl")
    };
    let out = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        &format!("https://127.0.0.1:{}/metrics", web.port()),
    ]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("lab_leases_active"),
        "/metrics over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(&["-f", &format!("http://127.0.0.1:{}/metrics", web.port())]);
    assert!(!out.status.success(), "plaintext to the TLS web port");
    // A CA with a plaintext URL is a usage error, not silently ignored.
    let out = lab(&http, Some(&ca), &["whoami"]);
    assert_eq!(out.status.code(), Some(2));

    // The agent attaches over TLS with the CA.
    let assets = concat!(env!("CARGO_MANIFEST_DIR"), "/../pxe-assets");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "rack = \"r1\"\nserver = \"{https}\"\nca_file = \"{}\"\ndata_dir = \"{}\"\n[assets]\nroot = \"{assets}\"\n",
            ca.display(),
            dir.path().join("agent-data").display()
        ),
    )
    .unwrap();
    let mut agent = Command::new(bin_path("lab-agent"))
        .args(["--config", config.to_str().unwrap(), "--token", "agent-r1"])
        .env_remove("LAB_CA")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .expect("lab-agent is built");
    let stdout = agent.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let attached = loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("lab-agent attached to https://") => break true,
            Ok(_) => {}
            Err(_) if Instant::now() > deadline => break false,
            Err(_) => {}
        }
    };
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        attached,
        "the agent did not attach over TLS:\n{}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
    server.kill();
}
