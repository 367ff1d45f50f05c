//! Webhooks of the real `lab-server`, delivered to a receiver on loopback
//! (an HTTP/1.1 server in this test) that checks every signature with an
//! HMAC of its own: signed deliveries of LEASE_GRANTED, LEASE_EXPIRING,
//! LEASE_EXPIRED and HOST_HEALTH (a quarantine through `lab host
//! quarantine`); then the receiver answers 503, the server is SIGKILLed
//! with those deliveries pending, restarted on the same data directory,
//! the receiver answers 200 again, and every pending delivery arrives
//! (none lost; duplicates allowed and counted by delivery id).

use hmac::{Hmac, Mac};
use lab_proto::v1 as pb;
use lab_tests::{Clients, ServerProcess, bin_path, eventually, inventory_toml};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const SECRET: &str = "webhook-test-secret";

/// One POST the receiver took, with the status it answered.
#[derive(Debug, Clone)]
struct Delivery {
    event: String,
    delivery: String,
    body: serde_json::Value,
    status: u16,
    signature_ok: bool,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Delivery>>,
    /// What to answer (200 or 503).
    status: AtomicU16,
}

impl Receiver {
    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Kinds delivered (answered 200).
    fn kinds_delivered(&self) -> BTreeSet<String> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.status == 200)
            .map(|d| d.event)
            .collect()
    }
}

fn verify(ts: &str, body: &[u8], signature: &str) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    want == signature
}

/// A minimal HTTP/1.1 server: one request per connection.
async fn receive(listener: TcpListener, rx: Arc<Receiver>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stream);
            let mut headers = BTreeMap::new();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.starts_with("POST /hook "), "{line}");
            loop {
                line.clear();
                r.read_line(&mut line).await.unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
            let len: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0; len];
            r.read_exact(&mut body).await.unwrap();
            let status = rx.status.load(Ordering::SeqCst);
            let h = |k: &str| headers.get(k).cloned().unwrap_or_default();
            rx.got.lock().unwrap().push(Delivery {
                event: h("x-lab-event"),
                delivery: h("x-lab-delivery"),
                signature_ok: verify(&h("x-lab-timestamp"), &body, &h("x-lab-signature")),
                body: serde_json::from_slice(&body).unwrap(),
                status,
            });
            let reason = if status == 200 {
                "OK"
            } else {
                "Service Unavailable"
            };
            let mut stream = r.into_inner();
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        });
    }
}

fn spawn(dir: &Path) -> ServerProcess {
    let hooks = dir.join("webhooks.toml");
    ServerProcess::spawn_dev_with(
        dir,
        &inventory_toml(2),
        &[
            "--webhooks",
            &hooks.to_string_lossy(),
            "--expiry-warning",
            "2s",
        ],
        "server.log",
    )
    .unwrap()
}

fn lab(server: &ServerProcess, args: &[&str]) {
    let out = Command::new(bin_path("lab"))
        .args(args)
        .env("LAB_SERVER", format!("http://{}", server.addr))
        .env("LAB_TOKEN", "root")
        .output()
        .expect("run lab");
    assert!(
        out.status.success(),
        "lab {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn grant(server: &ServerProcess, who: &str, host: &str, ttl_s: i64) -> pb::Lease {
    let mut c = Clients::connect(server.addr, Some(who)).await.unwrap();
    c.grant_now(pb::LeaseRequest {
        count: 1,
        hosts: vec![host.into()],
        ttl: Some(prost_types::Duration {
            seconds: ttl_s,
            nanos: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// `/metrics` of the server's web port.
async fn metrics(server: &ServerProcess) -> String {
    let mut s = tokio::net::TcpStream::connect(server.web.unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: lab\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deliveries_survive_a_sigkill_with_none_lost() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let rx = Arc::new(Receiver::default());
    rx.status.store(200, Ordering::SeqCst);
    tokio::spawn(receive(listener, rx.clone()));
    std::fs::write(dir.path().join("hook.secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(
        dir.path().join("webhooks.toml"),
        format!(
            "[[webhook]]\nname = \"rx\"\nurl = \"http://127.0.0.1:{port}/hook\"\nevents = [\"LEASE_GRANTED\", \"LEASE_EXPIRING\", \"LEASE_EXPIRED\", \"HOST_HEALTH\"]\nsecret_file = \"hook.secret\"\n"
        ),
    )
    .unwrap();
    let mut server = spawn(dir.path());

    // Grant → expiring (2 s before) → expired (4 s TTL); a quarantine.
    let lease = grant(&server, "ci", "h00", 4).await;
    lab(
        &server,
        &["host", "quarantine", "h01", "--reason", "flaky NIC"],
    );
    let wanted: BTreeSet<String> = [
        "LEASE_GRANTED",
        "LEASE_EXPIRING",
        "LEASE_EXPIRED",
        "HOST_HEALTH",
    ]
    .map(String::from)
    .into();
    eventually("the four kinds delivered", Duration::from_secs(15), || {
        rx.kinds_delivered() == wanted
    })
    .await;
    for d in rx.deliveries() {
        assert!(d.signature_ok, "bad signature: {d:?}");
        assert_eq!(d.body["kind"], d.event.as_str(), "{d:?}");
        match d.event.as_str() {
            "HOST_HEALTH" => {
                assert_eq!(d.body["host"], "h01");
                assert!(
                    d.body["detail"].as_str().unwrap().contains("flaky NIC"),
                    "{d:?}"
                );
                assert_eq!(d.body["principal"], "root");
            }
            _ => {
                assert_eq!(d.body["lease"], lease.id.as_str(), "{d:?}");
                assert_eq!(d.body["principal"], "ci");
                assert_eq!(d.body["host"], "h00");
            }
        }
    }

    // The receiver fails: new events are tried, answered 503, and wait.
    rx.status.store(503, Ordering::SeqCst);
    let before = rx.deliveries().len();
    let second = grant(&server, "ci", "h00", 60).await;
    lab(&server, &["host", "release-quarantine", "h01"]);
    let third = grant(&server, "bob", "h01", 60).await;
    eventually(
        "three deliveries answered 503",
        Duration::from_secs(10),
        || {
            let failed: BTreeSet<String> = rx.deliveries()[before..]
                .iter()
                .filter(|d| d.status == 503)
                .map(|d| d.delivery.clone())
                .collect();
            failed.len() == 3
        },
    )
    .await;
    server.kill();
    let pending: BTreeSet<String> = rx.deliveries()[before..]
        .iter()
        .map(|d| d.delivery.clone())
        .collect();
    assert_eq!(pending.len(), 3);

    // Back: the receiver answers 200 and the restarted server delivers
    // every pending delivery.
    rx.status.store(200, Ordering::SeqCst);
    let server = spawn(dir.path());
    eventually(
        "every pending delivery delivered after the restart",
        Duration::from_secs(20),
        || {
            let ok: BTreeSet<String> = rx
                .deliveries()
                .iter()
                .filter(|d| d.status == 200)
                .map(|d| d.delivery.clone())
                .collect();
            pending.is_subset(&ok)
        },
    )
    .await;
    let all = rx.deliveries();
    assert!(all.iter().all(|d| d.signature_ok), "{all:?}");
    // A delivery id names one event, whatever the attempt.
    let mut bodies: BTreeMap<&str, &serde_json::Value> = BTreeMap::new();
    for d in &all {
        let first = bodies.entry(&d.delivery).or_insert(&d.body);
        assert_eq!(*first, &d.body, "delivery {} changed", d.delivery);
    }
    let leases: BTreeSet<&str> = all[before..]
        .iter()
        .filter(|d| d.event == "LEASE_GRANTED")
        .filter_map(|d| d.body["lease"].as_str())
        .collect();
    assert_eq!(leases, [second.id.as_str(), third.id.as_str()].into());
    let delivered_twice = all
        .iter()
        .filter(|d| d.status == 200)
        .fold(BTreeMap::<&str, usize>::new(), |mut m, d| {
            *m.entry(&d.delivery).or_default() += 1;
            m
        })
        .into_values()
        .filter(|n| *n > 1)
        .count();
    eprintln!(
        "{} POSTs, {} deliveries, {} pending at the SIGKILL, {delivered_twice} delivered more than once",
        all.len(),
        bodies.len(),
        pending.len()
    );

    // What the operator sees: the deliveries counted, the outbox empty.
    let mut text = String::new();
    for _ in 0..300 {
        text = metrics(&server).await;
        if text.contains("lab_webhook_outbox_rows 0\n")
            && text.contains("lab_webhook_deliveries_total{hook=\"rx\",result=\"delivered\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(text.contains("lab_webhook_outbox_rows 0\n"), "{text}");
    assert!(
        text.contains("lab_webhook_deliveries_total{hook=\"rx\",result=\"delivered\"}"),
        "{text}"
    );
    assert!(!server.log_text().contains(SECRET), "the secret was logged");
}
