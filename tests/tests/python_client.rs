//! A gRPC client nobody here wrote can discover and drive lab-server: a real
//! `lab-server` process with a tokens file, and `tests/python/reflection_client.py`
//! (grpcio + grpcio-reflection + protobuf, no generated lab code) finding every
//! service and message through server reflection and calling them.
//!
//! Needs `python3` with `pip install -r tests/python/requirements.txt`, and the
//! workspace binaries (`cargo build --workspace`). Set `LAB_TEST_PYTHON` to use
//! another interpreter.

use lab_tests::{ServerProcess, inventory_toml, tokens_toml};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "py-reflection-token-0123456789";
const PRINCIPAL: &str = "py-client";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

fn python() -> String {
    std::env::var("LAB_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join("reflection_client.py")
}

/// Fails (never skips) when the interpreter or its packages are missing.
fn require_python_packages() {
    let py = python();
    let out = Command::new(&py)
        .args([
            "-c",
            "import grpc, google.protobuf.message_factory, grpc_reflection.v1alpha.reflection_pb2; \
             import google.protobuf as pb; print(grpc.__version__, pb.__version__)",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `{py}` ({e}): install Python 3, then `pip install -r tests/python/requirements.txt`")
        });
    assert!(
        out.status.success(),
        "the Python gRPC packages are not importable by `{py}`: run `pip install -r tests/python/requirements.txt`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "python: {py}, grpcio and protobuf {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// Runs the script with `args`, returns (success, stdout + stderr); killed
/// after `SCRIPT_TIMEOUT`.
fn run_script(dir: &Path, name: &str, args: &[&str]) -> (bool, String) {
    let out_path = dir.join(format!("{name}.out"));
    let out_file = std::fs::File::create(&out_path).expect("create script output file");
    let err_file = out_file.try_clone().expect("clone script output file");
    let mut child = Command::new(python())
        .arg(script())
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_file))
        .stderr(Stdio::from(err_file))
        .spawn()
        .expect("spawn the Python client");
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the Python client") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = std::fs::read_to_string(&out_path).unwrap_or_default();
    if status.is_none() {
        text.push_str(&format!("\n(killed after {SCRIPT_TIMEOUT:?})\n"));
    }
    (status.is_some_and(|s| s.success()), text)
}

#[test]
fn python_client_discovers_and_drives_the_server_through_reflection() {
    require_python_packages();

    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = dir.path().join("inventory.toml");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&inventory, inventory_toml(4)).expect("write inventory");
    std::fs::write(&tokens, tokens_toml(&[(TOKEN, PRINCIPAL, "developer")])).expect("write tokens");
    let data = dir.path().join("data");
    let server = ServerProcess::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--web-listen",
            "127.0.0.1:0",
            "--inventory",
            inventory.to_str().expect("utf-8 path"),
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--tokens",
            tokens.to_str().expect("utf-8 path"),
        ],
        &dir.path().join("lab-server.log"),
    )
    .expect("start lab-server");
    let addr = server.addr.to_string();
    let common = [
        "--server",
        addr.as_str(),
        "--token",
        TOKEN,
        "--expect-auth",
        "--expect-principal",
        PRINCIPAL,
    ];

    // v1 first, v1alpha cross-checked, then the stock grpcio-reflection client.
    let (ok, out) = run_script(dir.path(), "auto", &common);
    println!("--- reflection_client.py (auto) ---\n{out}");
    assert!(
        ok,
        "reflection_client.py failed:\n{out}\n--- lab-server log ---\n{}",
        server.log_text()
    );
    for expected in [
        "ok    reflection: using v1 (working: v1, v1alpha)",
        "ok    descriptors via v1alpha",
        "ok    stock ProtoReflectionDescriptorDatabase (v1alpha)",
        "ok    health '': SERVING",
        "ok    health 'lab.v1.LeaseService': SERVING",
        "LEASE_STATE_RELEASED",
        "INVALID_ARGUMENT 'request.count",
        "ok    ListHosts without token: UNAUTHENTICATED",
        "all checks passed",
    ] {
        assert!(out.contains(expected), "output lacks {expected:?}:\n{out}");
    }

    // The whole walk again on the older protocol only.
    let mut v1alpha = common.to_vec();
    v1alpha.extend(["--reflection", "v1alpha"]);
    let (ok, out) = run_script(dir.path(), "v1alpha", &v1alpha);
    println!("--- reflection_client.py --reflection v1alpha ---\n{out}");
    assert!(
        ok,
        "reflection_client.py --reflection v1alpha failed:\n{out}\n--- lab-server log ---\n{}",
        server.log_text()
    );
    assert!(
        out.contains("ok    reflection: using v1alpha") && out.contains("all checks passed"),
        "{out}"
    );
}
