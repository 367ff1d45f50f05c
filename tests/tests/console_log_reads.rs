//! Console log reads cost the agent bounded memory (hardening item 4: eight
//! parallel reads of a 40 MiB slice took the agent from 25 to 399 MiB).
//!
//! The real `lab-server` and `lab-agent` processes on loopback; the test
//! plays h00's serial console over TCP and pushes 40 MiB through it during
//! a lease. Then eight readers ask for that lease's log at once and stop
//! reading: the agent streams at most its per-host limit of them (the
//! others are refused with RESOURCE_EXHAUSTED), holds back its disk reads
//! while nobody reads, and its resident memory stays far below the slice.
//! The streaming readers, resumed, get the whole slice byte for byte.

use lab_proto::v1 as pb;
use lab_tests::agent::{AgentProcess, rss_kib};
use lab_tests::{Clients, ServerProcess, eventually};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const SLICE: usize = 40 * 1024 * 1024;
const LINE: usize = 128;
const READERS: usize = 8;

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Line `i` of the pushed output: numbered, so a lost or repeated piece
/// shows in the comparison.
fn line(i: usize) -> Vec<u8> {
    let mut l = format!("console line {i:08} ").into_bytes();
    l.resize(LINE - 2, b'.');
    l.extend_from_slice(b"\r\n");
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_log_reads_of_a_40_mib_slice_keep_the_agent_small() {
    let dir = tempfile::tempdir().unwrap();
    let console = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inventory = format!(
        "[[rack]]\nname = \"r1\"\nagent = \"agent-r1\"\n\n[[host]]\nname = \"h00\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"r1\"\nmac = \"52:54:00:00:00:00\"\n[host.console]\nkind = \"tcp\"\naddress = \"{}\"\n",
        console.local_addr().unwrap()
    );
    let server = ServerProcess::spawn_dev(dir.path(), &inventory).unwrap();
    let agent = AgentProcess::spawn(dir.path(), server.addr, "").unwrap();
    let (mut serial, _) = tokio::time::timeout(Duration::from_secs(15), console.accept())
        .await
        .expect("the agent connects to h00's console")
        .unwrap();
    let mut c = Clients::connect(server.addr, Some("ci")).await.unwrap();
    let lease = {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match c
                .grant_now(pb::LeaseRequest {
                    hosts: vec!["h00".into()],
                    ..Default::default()
                })
                .await
            {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for h00: {}", e.message());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("h00 never granted: {e:?}"),
            }
        }
    };

    // 40 MiB through the console during the lease.
    let mut pushed = Vec::with_capacity(SLICE);
    for i in 0..SLICE / LINE {
        pushed.extend_from_slice(&line(i));
    }
    let t = Instant::now();
    for chunk in pushed.chunks(1 << 20) {
        serial.write_all(chunk).await.unwrap();
    }
    serial.flush().await.unwrap();
    // Captured when the files hold it all and stop growing (the records'
    // headers make them a little larger than the data).
    let data = agent.data_dir.clone();
    let mut last = (0, Instant::now());
    eventually(
        "the agent's console files hold the 40 MiB",
        Duration::from_secs(120),
        || {
            let n = dir_bytes(&data);
            if n != last.0 {
                last = (n, Instant::now());
            }
            n >= SLICE as u64 && last.1.elapsed() > Duration::from_millis(500)
        },
    )
    .await;
    println!(
        "captured {} MiB in {:.1} s",
        SLICE >> 20,
        t.elapsed().as_secs_f64()
    );
    c.leases
        .release(pb::ReleaseRequest {
            lease_id: lease.id.clone(),
        })
        .await
        .unwrap();

    let pid = agent.pid();
    let before = rss_kib(pid).expect("agent RSS");
    let server_before = rss_kib(server.child.id()).expect("server RSS");

    // Eight readers at once, each taking one message and then stopping.
    let mut streams = Vec::new();
    let mut refused = 0;
    for _ in 0..READERS {
        let mut r = Clients::connect(server.addr, Some("ci")).await.unwrap();
        let opened = r
            .hosts
            .console_log(pb::ConsoleLogRequest {
                lease_id: lease.id.clone(),
            })
            .await;
        let mut s = match opened {
            Ok(s) => s.into_inner(),
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
                refused += 1;
                continue;
            }
        };
        match s.message().await {
            Ok(Some(first)) => streams.push((r, s, vec![first])),
            Ok(None) => panic!("a log read ended at once"),
            Err(st) => {
                assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
                refused += 1;
            }
        }
    }
    // Nobody reads for three seconds: the agent must not fill its memory
    // with the slice meanwhile.
    let mut peak = before;
    let mut server_peak = server_before;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        server_peak = server_peak.max(rss_kib(server.child.id()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{} readers streaming, {refused} refused; agent RSS {} → peak {} MiB, server {} → peak {} MiB",
        streams.len(),
        before >> 10,
        peak >> 10,
        server_before >> 10,
        server_peak >> 10
    );
    assert!(
        !streams.is_empty(),
        "no log read was served at all ({refused} refused)"
    );
    assert!(
        streams.len() < READERS,
        "all {READERS} reads of one host streamed at once: no per-host limit"
    );
    assert_eq!(streams.len() + refused, READERS);
    assert!(
        peak - before < 32 * 1024,
        "the agent grew by {} MiB while {} stalled readers held a {} MiB slice",
        (peak - before) >> 10,
        streams.len(),
        SLICE >> 20
    );

    // The streaming readers resume and get every byte, in order.
    for (_, mut s, first) in streams {
        let mut got = Vec::with_capacity(SLICE + 4096);
        let mut push = |m: pb::ConsoleResponse| {
            if let Some(pb::console_response::Msg::Output(b)) = m.msg {
                got.extend_from_slice(&b);
            }
        };
        first.into_iter().for_each(&mut push);
        while let Some(m) = tokio::time::timeout(Duration::from_secs(60), s.message())
            .await
            .expect("the log read goes on once read")
            .unwrap()
        {
            push(m);
        }
        assert_eq!(got.len(), pushed.len(), "the log read lost or added bytes");
        assert!(got == pushed, "the log read differs from what h00 printed");
    }
}
