//! `lab grab` against the real lab-server and lab-agent of
//! [`lab_tests::console_lab`] (host `h00`'s console is a terminal server
//! that echoes each line): the lease is granted, its host attached, what is
//! typed reaches the console and its answer comes back, the lease is
//! renewed past its TTL while attached, and on detach it is released (no
//! terminal to ask on) or kept (`--keep`); and in a real terminal (tmux) the
//! question on detach, answered both ways. Loopback only; no VM.

use lab_tests::bin_path;
use lab_tests::console_lab::ConsoleLab;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lab(lab: &ConsoleLab, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("lab"));
    cmd.env("LAB_SERVER", format!("http://{}", lab.server.addr))
        .env("LAB_TOKEN", "tok-dev")
        .env("HOME", lab.dir.path())
        .args(args);
    cmd
}

/// `lab --json lease show ID`.
fn lease(l: &ConsoleLab, id: &str) -> serde_json::Value {
    let out = lab(l, &["--json", "lease", "show", id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The lease id in `lab grab`'s "lease ID granted" line.
fn granted_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("lab: lease ")?
                .split_once(" granted")?
                .0
                .into()
        })
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no grant line in:\n{stderr}"))
}

#[test]
fn grab_attaches_renews_and_gives_the_host_back() {
    let l = ConsoleLab::start(&[("tok-dev", "dev1", "developer")]);

    // Typed input reaches the console; stdin stays open past the 3 s TTL,
    // so the lease lives on only because lab grab renews it.
    // h00 has no BMC (the agent asks for it to be powered by hand): attach
    // without waiting for a boot.
    let mut child = lab(
        &l,
        &["grab", "--host", "h00", "--ttl", "3s", "--no-wait-ready"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stdin.write_all(b"uname -a\r").unwrap();
    // Past the TTL: the lease must still be active then.
    std::thread::sleep(Duration::from_secs(5));
    let listed = lab(&l, &["--json", "lease", "list"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let active_at = started.elapsed();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "lab grab failed:\n{stderr}");
    let id = granted_id(&stderr);
    let rows = listed.as_array().cloned().unwrap_or_default();
    assert!(
        rows.iter()
            .any(|r| r["id"] == id.as_str() && r["state"] == "active"),
        "lease {id} was not active {active_at:?} after the grab with a 3 s TTL: {listed}\n{stderr}"
    );
    assert!(
        stdout.contains("echo: uname -a"),
        "the console's answer:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("(profile xen)"), "{stderr}");
    assert!(stderr.contains(&format!("lease {id} released")), "{stderr}");
    assert_eq!(lease(&l, &id)["state"], "released");

    // --keep: the lease outlives the session (no longer renewed).
    let out = lab(
        &l,
        &[
            "grab",
            "--host",
            "h00",
            "--ttl",
            "10m",
            "--keep",
            "--no-wait-ready",
        ],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lab grab --keep failed:\n{stderr}");
    let id = granted_id(&stderr);
    assert!(
        stderr.contains(&format!("lease {id} kept until")),
        "{stderr}"
    );
    assert_eq!(lease(&l, &id)["state"], "active");
    let out = lab(&l, &["lease", "release", &id]).output().unwrap();
    assert!(out.status.success());
}

/// `lab grab` in a real terminal (tmux): the console attached, a typed line
/// answered, and on detach (`Ctrl-E c .`) the question keep or release,
/// answered `k` once (the lease stays active) and with Enter once (the
/// default: released).
#[test]
fn grab_in_a_terminal_asks_on_detach() {
    let l = ConsoleLab::start(&[("tok-dev", "dev1", "developer")]);
    let sock = l.dir.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(["-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux (apt-get install tmux)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A server that outlives the grabs, and panes that stay after their
    // command exits (to read its last words).
    tmux(&["new-session", "-d", "-s", "keep", "sleep", "600"]);
    tmux(&["set-option", "-g", "remain-on-exit", "on"]);
    let server = format!("LAB_SERVER=http://{}", l.server.addr);
    let home = format!("HOME={}", l.dir.path().display());
    let lab_bin = bin_path("lab");
    let lab_bin = lab_bin.to_str().unwrap();
    let until = |pane: &str, what: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = tmux(&["capture-pane", "-p", "-J", "-t", pane]);
            if text.contains(what) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the terminal:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for (pane, answer, state) in [("g1", "k", "active"), ("g2", "", "released")] {
        tmux(&[
            "new-session",
            "-d",
            "-x",
            "200",
            "-y",
            "50",
            "-s",
            pane,
            "env",
            &server,
            "LAB_TOKEN=tok-dev",
            &home,
            lab_bin,
            "grab",
            "--host",
            "h00",
            "--ttl",
            "10m",
            "--no-wait-ready",
        ]);
        let text = until(pane, " granted");
        let id = granted_id(&text);
        std::thread::sleep(Duration::from_millis(500));
        tmux(&["send-keys", "-t", pane, "uname -a", "Enter"]);
        until(pane, "echo: uname -a");
        tmux(&["send-keys", "-t", pane, "C-e", "c", "."]);
        until(pane, "or release it? [k/R]");
        if answer.is_empty() {
            tmux(&["send-keys", "-t", pane, "Enter"]);
        } else {
            tmux(&["send-keys", "-t", pane, answer, "Enter"]);
        }
        let said = if state == "active" {
            "kept until"
        } else {
            "released"
        };
        until(pane, &format!("lease {id} {said}"));
        assert_eq!(lease(&l, &id)["state"], state, "answer {answer:?}");
        if state == "active" {
            let out = lab(&l, &["lease", "release", &id]).output().unwrap();
            assert!(out.status.success());
        }
    }
    tmux(&["kill-server"]);
}
