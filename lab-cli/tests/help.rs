//! Golden files for `lab --help` and friends: the command line is an
//! interface, and a change to it should show up in review.
//!
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p lab-cli --test help`.

use std::path::PathBuf;
use std::process::Command;

fn check(args: &[&str], golden: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_lab"))
        .args(args)
        // Help shows env var names, never their values; keep the run
        // independent of the caller's environment all the same.
        .env_remove("LAB_SERVER")
        .env_remove("LAB_TOKEN")
        .env_remove("LAB_TOKEN_FILE")
        .env("NO_COLOR", "1")
        .output()
        .expect("run lab");
    assert!(out.status.success(), "lab {args:?}: {out:?}");
    let got = String::from_utf8(out.stdout).expect("utf-8 help");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    if got != want {
        let line = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
        panic!(
            "lab {args:?} differs from {} at line {}:\n--- got ---\n{got}\n\
             (run with UPDATE_GOLDEN=1 to accept)",
            path.display(),
            line + 1
        );
    }
}

#[test]
fn lab_help() {
    check(&["--help"], "lab-help.txt");
}

#[test]
fn lab_short_help() {
    check(&["-h"], "lab-h.txt");
}

#[test]
fn lease_acquire_help() {
    check(&["lease", "acquire", "--help"], "lease-acquire-help.txt");
}

#[test]
fn console_help() {
    check(&["console", "--help"], "console-help.txt");
}

#[test]
fn power_help() {
    check(&["power", "--help"], "power-help.txt");
}

#[test]
fn forward_help() {
    check(&["forward", "--help"], "forward-help.txt");
}

#[test]
fn ssh_help() {
    check(&["ssh", "--help"], "ssh-help.txt");
}

#[test]
fn run_help() {
    check(&["run", "--help"], "run-help.txt");
}
