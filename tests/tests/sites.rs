//! A site cut off while leases run (`lab_tests::sites`: three sites in
//! network namespaces, each with an etcd member, a lab-server replica on
//! etcd and the rack agent of its two hosts). Site a's replica leads; a
//! client on every site holds a lease on its site's host; then site a's
//! link is cut:
//!
//! - sites b and c keep renewing, releasing and granting (the `lab` CLI
//!   run inside them with every replica listed, its own first): a replica
//!   there takes over once site a's election lease runs out;
//! - site a's replica never grants (an acquire sent to it alone fails),
//!   loses the lead and stops (`lost the etcd leadership`); its client
//!   cannot renew meanwhile, but its lease stays active on the new leader;
//! - site a's agent keeps serving its host's boot files from its last
//!   state (the lease's Xen script over HTTP and TFTP, fetched inside the
//!   cut site);
//! - healed: site a's replica (started again, as its service manager
//!   would) stands by naming the new leader, its agent re-attaches (its
//!   hosts reachable again), its client renews;
//! - then a site whose replica stands by is cut: a release on the
//!   leader's site is acknowledged at once (or after an etcd election);
//! - nothing acknowledged is lost: every lease has the state its client
//!   was last told, `mallory`'s acquire on the cut site left no lease, and
//!   the whole event log passes the history checker.
//!
//! Root only (namespaces); needs etcd (`etcd-server`), curl and the
//! workspace's binaries (`cargo build --workspace`).

use lab_tests::json;
use lab_tests::sites::{Sites, SitesOptions, ipxe_script};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Until `f` holds, polling every 100 ms (a deadline, no fixed sleep);
/// how long it took.
fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// A spawned `lab`'s end: (exit code, stdout, stderr); killed if it runs
/// past `within`.
fn finish(mut child: Child, within: Duration) -> (i32, String, String) {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < within {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_site_cut_off_while_leases_run() {
    let t0 = Instant::now();
    let mut lab = Sites::start(SitesOptions::default()).unwrap();
    let (a, b, c) = (0, 1, 2);
    eprintln!("three sites up in {:?}", t0.elapsed());
    assert_eq!(lab.leader(&[a, b, c]), Some(a));

    // A lease on every site, by a client there, on its own rack's host.
    let mut held = Vec::new();
    for (k, user) in [(a, "alice"), (b, "bob"), (c, "carol")] {
        let site = &lab.sites[k];
        let host = format!("{}0", site.name);
        let (code, out, err) = site.lab(
            user,
            &[
                "--json",
                "lease",
                "acquire",
                "--host",
                &host,
                "--profile",
                "xen",
                "--ttl",
                "10m",
            ],
        );
        assert_eq!(code, 0, "{user} on site {}: {err}", site.name);
        held.push(json(&out)["id"].as_str().unwrap().to_owned());
    }
    // Site a's agent serves a0 the Xen script of alice's lease.
    let script = lab.sites[a].agent_http(&ipxe_script(a, 0));
    until(
        "a0's script names its lease",
        Duration::from_secs(15),
        || lab.sites[a].curl(&script).1.contains(&held[0]),
    );

    // Site a, whose replica leads, is cut off.
    lab.cut(a);
    let cut = Instant::now();
    assert!(lab.is_cut(a));

    // On the cut site: an acquire sent to its own replica alone, and
    // alice renewing through every replica.
    let piped = |mut cmd: std::process::Command| {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mallory = piped(lab.sites[a].lab_command(
        &lab.sites[a].url(),
        "mallory",
        &[
            "--json",
            "lease",
            "acquire",
            "--host",
            "a1",
            "--ttl",
            "10m",
            "--no-wait",
        ],
    ));
    let alice_renew = piped(lab.sites[a].lab_command(
        &lab.sites[a].servers,
        "alice",
        &["lease", "renew", &held[0], "--ttl", "20m"],
    ));

    // Sites b and c go on: bob's renewal is acknowledged once a replica
    // there leads.
    let renewed = until("bob renews from site b", Duration::from_secs(30), || {
        let (code, out, _) = lab.sites[b].lab(
            "bob",
            &["--json", "lease", "renew", &held[1], "--ttl", "20m"],
        );
        code == 0 && json(&out)["state"] == "active"
    });
    eprintln!("site b: bob's renewal acknowledged {renewed:?} after the cut");
    let new = lab.leader(&[b, c]).expect("site b or c leads");
    let new_url = lab.sites[new].url();
    eprintln!("site {} leads now", lab.sites[new].name);
    let (code, out, err) = lab.sites[c].lab("carol", &["--json", "lease", "show", &held[2]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "active");
    // alice's lease (held on the cut site) is still active there.
    let (code, out, err) = lab.sites[c].lab("operator", &["--json", "lease", "show", &held[0]]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["state"], "active", "{out}");
    // carol releases; new leases are granted on b and c (once their agents,
    // which notice the old leader's loss by keep-alive, are attached to
    // the new one).
    let (code, _, err) = lab.sites[c].lab("carol", &["lease", "release", &held[2]]);
    assert_eq!(code, 0, "{err}");
    let mut granted = Vec::new();
    for (k, user, host) in [(c, "dave", "c1"), (b, "erin", "b1")] {
        let mut id = String::new();
        let took = until(
            &format!("{user} is granted {host} on site {}", lab.sites[k].name),
            Duration::from_secs(30),
            || {
                let (code, out, _) = lab.sites[k].lab(
                    user,
                    &[
                        "--json",
                        "lease",
                        "acquire",
                        "--host",
                        host,
                        "--ttl",
                        "10m",
                        "--no-wait",
                    ],
                );
                if code == 0 {
                    id = json(&out)["id"].as_str().unwrap().to_owned();
                }
                code == 0
            },
        );
        eprintln!(
            "{user} granted {host} {:?} after the cut ({took:?})",
            cut.elapsed()
        );
        granted.push((k, user, id));
    }
    let (k, user, id) = &granted[0];
    let (code, _, err) = lab.sites[*k].lab(user, &["lease", "release", id]);
    assert_eq!(code, 0, "{err}");

    // The cut site's agent serves a0's boot files from its last state.
    let (ok, body) = lab.sites[a].curl(&script);
    assert!(ok && body.contains(&held[0]), "{body}");
    let (ok, tftp) = lab.sites[a].curl(&lab.sites[a].agent_tftp(&ipxe_script(a, 0)));
    assert!(ok);
    assert_eq!(tftp, body);

    // Its replica loses the lead and stops; nothing it was asked was
    // granted or renewed.
    let stopped = until("site a's lab-server stops", Duration::from_secs(30), || {
        lab.server(a).unwrap().child.try_wait().unwrap().is_some()
    });
    let status = lab.server(a).unwrap().child.wait().unwrap();
    assert!(!status.success());
    assert!(
        lab.sites[a]
            .server_log()
            .contains("lost the etcd leadership"),
        "{}",
        lab.sites[a].server_log()
    );
    eprintln!(
        "site a's lab-server stopped {:?} after the cut (waited {stopped:?})",
        cut.elapsed()
    );
    // (Still running: it was never answered; killed, it cannot be later.)
    let (code, out, err) = finish(mallory, Duration::ZERO);
    eprintln!("mallory's acquire on the cut site: exit {code} {out}{err}");
    assert_ne!(code, 0, "the cut site granted a lease: {out}");
    let (code, out, err) = finish(alice_renew, Duration::from_secs(10));
    eprintln!("alice's renewal on the cut site: exit {code} {out}{err}");
    assert_ne!(code, 0, "a renewal was acknowledged on the cut site: {out}");
    // Still cut (what the above showed happened with the link down).
    assert!(lab.is_cut(a));
    let (ok, _) = lab.sites[a].curl(&lab.sites[new].agent_http(&ipxe_script(new, 0)));
    assert!(!ok, "site a reaches site {} while cut", lab.sites[new].name);

    // Healed: site a's replica, started again, stands by; its agent
    // re-attaches; alice renews.
    lab.heal(a);
    let healed = Instant::now();
    lab.start_server(a).unwrap();
    let attached = until(
        "site a's hosts are reachable on the new leader",
        Duration::from_secs(40),
        || {
            lab.reachable(new)
                .is_ok_and(|r| r.iter().any(|h| h == "a0") && r.iter().any(|h| h == "a1"))
        },
    );
    eprintln!("site a's agent re-attached {attached:?} after the heal");
    until(
        "site a's replica stands by, naming the new leader",
        Duration::from_secs(20),
        || lab.sites[a].ask("operator").err().as_deref() == Some(new_url.as_str()),
    );
    until("alice renews from site a", Duration::from_secs(20), || {
        lab.sites[a]
            .lab("alice", &["lease", "renew", &held[0], "--ttl", "20m"])
            .0
            == 0
    });
    eprintln!("alice renewed {:?} after the heal", healed.elapsed());
    assert!(lab.sites[a].agent_log_contains(&new_url));

    // A site that does not lead cut off: the leader's site goes on at once
    // (at most an etcd election, if that site's member led etcd).
    let standby = if new == b { c } else { b };
    lab.cut(standby);
    assert!(lab.is_cut(standby));
    let (k, user, id) = &granted[1];
    let took = until(
        "a release while a standby's site is cut",
        Duration::from_secs(20),
        || lab.sites[new].lab(user, &["lease", "release", id]).0 == 0,
    );
    eprintln!(
        "site {} cut: {user}'s release (site {}) acknowledged after {took:?}",
        lab.sites[standby].name, lab.sites[*k].name
    );
    lab.heal(standby);

    // Nothing acknowledged is lost. (The leader may have changed again: a
    // cut of the site whose etcd member led etcd can outlast the leader's
    // 2 s election lease; a one-shot call then exits 7 and is run again.)
    let mut out = String::new();
    until(
        "the leases listed from site b",
        Duration::from_secs(30),
        || {
            let (code, o, _) = lab.sites[b].lab("operator", &["--json", "lease", "list", "--all"]);
            out = o;
            code == 0
        },
    );
    let leases = json(&out);
    let leases = leases.as_array().unwrap();
    let state = |id: &str| {
        leases
            .iter()
            .find(|l| l["id"] == id)
            .unwrap_or_else(|| panic!("lease {id} is lost: {leases:#?}"))["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(state(&held[0]), "active");
    assert_eq!(state(&held[1]), "active");
    assert_eq!(state(&held[2]), "released");
    assert_eq!(state(&granted[0].2), "released");
    assert_eq!(state(&granted[1].2), "released");
    assert_eq!(leases.len(), 5, "{leases:#?}");
    assert!(leases.iter().all(|l| l["holder"] != "mallory"));
    let mut events = Vec::new();
    until(
        "the whole log from the leader",
        Duration::from_secs(30),
        || {
            let Some(l) = lab.leader(&[a, b, c]) else {
                return false;
            };
            let read = lab.sites[b].block_on(|| async {
                let mut cl = lab.sites[l].clients("operator").await.ok()?;
                lab_tests::crash_loop::all_events(&mut cl.events).await.ok()
            });
            match read {
                Some(e) => {
                    events = e;
                    true
                }
                None => false,
            }
        },
    );
    let history = lab_tests::history::check_history(&events, &lab.hosts);
    eprintln!("history: {history:?}; the test took {:?}", t0.elapsed());
    assert_eq!(history.grants, 5, "{history:?}");
}
