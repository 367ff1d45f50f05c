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

/// Bookings through the CLI: a booking made, a lease refused across
/// another one and granted shortened to fit before it, a maintenance
/// window planned, and the booking's holder granted its host at its start.
#[test]
fn bookings_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn_dev(dir.path(), &inventory_toml(2)).unwrap();
    let book = |who: &str, host: &str, start: &str, dur: &str| {
        let (code, out, err) = lab(
            &server,
            who,
            &[
                "--json",
                "booking",
                "create",
                "--host",
                host,
                "--start",
                start,
                "--duration",
                dur,
                "--comment",
                "nightly",
            ],
        );
        assert_eq!(code, 0, "{err}");
        json(&out)
    };
    // Alice's booking of h00 starts in a few seconds; carol's of h01 in an
    // hour.
    let soon = book("alice", "h00", "+4s", "1h");
    let later = book("carol", "h01", "+1h", "30m");
    assert_eq!(soon["state"], "scheduled");
    assert_eq!(later["hosts"][0], "h01");
    let later_id = later["id"].as_u64().unwrap().to_string();

    // Two hours on h01 would run into carol's booking: refused (exit 5)
    // naming it; with --min-ttl the lease is granted until its start.
    let (code, _, err) = lab(
        &server,
        "bob",
        &[
            "lease",
            "acquire",
            "--host",
            "h01",
            "--ttl",
            "2h",
            "--no-wait",
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains(&format!("booking {later_id}")), "{err}");
    let (code, out, err) = lab(
        &server,
        "bob",
        &[
            "--json",
            "lease",
            "acquire",
            "--host",
            "h01",
            "--ttl",
            "2h",
            "--min-ttl",
            "10m",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let bobs = json(&out);
    assert_eq!(bobs["expires_at"], later["start"], "shortened to fit");
    assert_eq!(bobs["max_expires_at"], later["start"]);

    // Overlapping bookings are refused; a maintenance window after it is
    // planned (development mode: everyone is an operator).
    let (code, _, err) = lab(
        &server,
        "dave",
        &[
            "booking",
            "create",
            "--host",
            "h01",
            "--start",
            "+70m",
            "--duration",
            "1h",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains(&format!("booking {later_id}")), "{err}");
    let (code, out, err) = lab(
        &server,
        "root",
        &[
            "host",
            "maintenance",
            "on",
            "h01",
            "--at",
            "+3h",
            "--for",
            "1h",
            "--reason",
            "bios",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("booking ") && out.contains("(maintenance): h01"),
        "{out}"
    );
    let (code, out, _) = lab(&server, "alice", &["--json", "booking", "list"]);
    assert_eq!(code, 0);
    let kinds: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {}",
                b["kind"].as_str().unwrap(),
                b["hosts"][0].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(kinds, ["lease h00", "lease h01", "maintenance h01"]);

    // At its start alice holds h00, by the booking.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let lease = loop {
        let (code, out, err) = lab(
            &server,
            "alice",
            &["--json", "lease", "list", "--holder", "alice"],
        );
        assert_eq!(code, 0, "{err}");
        if let Some(l) = json(&out).as_array().unwrap().first() {
            break l.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice's booking was not granted"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(lease["booking"], soon["id"]);
    assert_eq!(lease["hosts"][0], "h00");
    assert_eq!(lease["expires_at"], soon["end"]);
    let (code, out, _) = lab(&server, "alice", &["booking", "list", "--host", "h00"]);
    assert_eq!(code, 0);
    assert!(out.contains("started"), "{out}");
    let soon_id = soon["id"].as_u64().unwrap().to_string();
    // Erin, waiting for h00, is told which booking is in her way.
    let mut erin = std::process::Command::new(lab_tests::bin_path("lab"))
        .args(["lease", "acquire", "--host", "h00", "--ttl", "10m"])
        .env("LAB_SERVER", format!("http://{}", server.addr))
        .env("LAB_TOKEN", "erin")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = erin.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("erin's queue line");
        if line.starts_with("waiting:") {
            break line;
        }
    };
    let _ = erin.kill();
    let _ = erin.wait();
    assert!(
        line.starts_with("waiting: position 1 of 1, ETA ")
            && line.contains(", h00 is booked until ")
            && line.ends_with(&format!("(booking {soon_id})")),
        "{line}"
    );
    // Cancelled by its holder: gone from the list, the lease runs on.
    let (code, _, err) = lab(&server, "bob", &["booking", "cancel", &soon_id]);
    assert_eq!(
        code, 0,
        "development mode: an operator may cancel any ({err})"
    );
    let (code, out, _) = lab(
        &server,
        "alice",
        &["--json", "booking", "list", "--host", "h00"],
    );
    assert_eq!(code, 0);
    assert_eq!(json(&out).as_array().unwrap().len(), 0);
}
