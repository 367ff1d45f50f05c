//! The private-CA commands of docs/deploy.md, run as written (with the
//! example name and address replaced by localhost and 127.0.0.1): their
//! certificate serves lab-server's TLS, and `lab --ca ca.pem` reaches it by
//! name and by address. Needs openssl and bash; loopback only.

use lab_tests::{ServerProcess, bin_path, inventory_toml};
use std::path::Path;
use std::process::Command;

const MARKER: &str = "<!-- tests/tests/deploy_tls.rs runs this block";

/// The first ```sh block after the marker in docs/deploy.md.
fn documented_block() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/deploy.md")).unwrap();
    let after = &doc[doc.find(MARKER).expect("the marker is in docs/deploy.md")..];
    let start = after.find("```sh\n").expect("a sh block after the marker") + 6;
    let len = after[start..].find("```").expect("the block ends");
    after[start..start + len].to_owned()
}

#[test]
fn the_documented_private_ca_serves_lab_server() {
    let block = documented_block();
    assert!(block.contains("lab.example.org") && block.contains("192.0.2.10"));
    let script = block
        .replace("lab.example.org", "localhost")
        .replace("192.0.2.10", "127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .expect("bash and openssl (package openssl)");
    assert!(
        out.status.success(),
        "the documented commands failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("server.pem: OK"));

    let p = |f: &str| dir.path().join(f).display().to_string();
    std::fs::write(dir.path().join("inventory.toml"), inventory_toml(1)).unwrap();
    let server = ServerProcess::spawn(
        &[
            "--dev-insecure-no-auth",
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            &p("inventory.toml"),
            "--data-dir",
            &p("data"),
            "--tls-cert",
            &p("server.pem"),
            "--tls-key",
            &p("server.key"),
        ],
        &dir.path().join("server.log"),
    )
    .unwrap();
    let lab = |url: String, ca: Option<&Path>| {
        let mut c = Command::new(bin_path("lab"));
        c.args(["--server", &url, "whoami"])
            .env("LAB_TOKEN", "alice")
            .env_remove("LAB_CA");
        if let Some(ca) = ca {
            c.arg("--ca").arg(ca);
        }
        c.output().unwrap()
    };
    let ca = dir.path().join("ca.pem");
    let port = server.addr.port();
    for url in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let out = lab(url.clone(), Some(&ca));
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alice"),
            "lab --server {url} --ca ca.pem whoami: {out:?}\n{}",
            server.log_text()
        );
    }
    // Without the CA: the system's roots do not know it (exit 7).
    let out = lab(format!("https://localhost:{port}"), None);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}
