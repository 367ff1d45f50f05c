//! The real `lab` CLI against the real `lab-server`: acquire, list, renew,
//! release, events, with `--json`, and the documented exit codes.

use lab_tests::lab_cli as lab;
use lab_tests::{ServerProcess, inventory_toml, json};

#[test]
fn a_lease_cycle_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_dev(dir.path(), &inventory_toml(2)).unwrap();

    let (code, out, err) = lab(
        &server,
        "alice",
        &[
            "--json",
            "lease",
            "acquire",
            "--count",
            "2",
            "--ttl",
            "10m",
            "--profile",
            "xen",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let lease = json(&out);
    let id = lease["id"].as_str().unwrap().to_owned();
    assert_eq!(lease["holder"], "alice");
    assert_eq!(lease["hosts"].as_array().unwrap().len(), 2);
    assert_eq!(lease["profile"], "xen");

    let (code, out, _) = lab(&server, "alice", &["hosts"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("leased") && l.contains("alice"))
            .count(),
        2,
        "{out}"
    );

    // No host is free: --no-wait exits 5; more hosts than exist exits 6.
    let (code, _, err) = lab(&server, "bob", &["lease", "acquire", "--no-wait"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = lab(&server, "bob", &["lease", "acquire", "--count", "3"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.starts_with("lab: "), "{err}");

    let (code, out, err) = lab(
        &server,
        "alice",
        &["--json", "lease", "renew", &id, "--ttl", "20m"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "active");

    let (code, _, err) = lab(&server, "alice", &["lease", "release", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = lab(&server, "alice", &["--json", "lease", "show", &id]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["state"], "released");
    let (code, _, _) = lab(
        &server,
        "alice",
        &["lease", "show", "00000000-0000-0000-0000-000000000000"],
    );
    assert_eq!(code, 4);

    let (code, out, _) = lab(&server, "alice", &["--json", "events", "--lease", &id]);
    assert_eq!(code, 0);
    let kinds: Vec<String> = out
        .lines()
        .map(|l| json(l)["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds[..3],
        ["lease-granted", "lease-renewed", "lease-released"],
        "{kinds:?}"
    );
}
