//! Console capture end to end: a TCP console (a test server standing in for
//! QEMU's `-serial tcp:...,server`), the capture task, the on-disk log and
//! live viewers.
//!
//! `LAB_CONSOLE_STRESS_SECS` sets how long the full-speed source writes in
//! `full_speed_source_reaches_three_viewers_and_the_log_exactly` (default
//! 5 s to keep CI fast; the one-minute figure is
//! `LAB_CONSOLE_STRESS_SECS=60`). The run keeps everything it writes on disk
//! under a temporary directory until it ends.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lab_agent::console::log::{list_files, read_slice, records_between};
use lab_agent::console::{
    Capture, CaptureConfig, ConsoleHost, ConsoleLog, Hub, HubConfig, LogLimits, RecordKind,
    TcpSource, ViewerEvent, WriteError, XenDebugKeys, send_keys, xen_debug_sequence,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// xorshift64*: cheap, deterministic pseudo-random bytes.
struct Prng(u64);

impl Prng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn test_capture_config() -> CaptureConfig {
    CaptureConfig {
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        flush_interval: Duration::from_millis(50),
        ..CaptureConfig::default()
    }
}

async fn start(
    root: &Path,
    listener: &TcpListener,
    hub_config: HubConfig,
    limits: LogLimits,
) -> (Capture, ConsoleHost) {
    let host = ConsoleHost::new("node-01").unwrap();
    let log = ConsoleLog::open(root, &host, limits).unwrap();
    let (hub, input) = Hub::new(hub_config);
    let source = TcpSource::new(listener.local_addr().unwrap());
    (
        Capture::spawn(source, log, hub, input, test_capture_config()),
        host,
    )
}

/// Reads viewer bytes until `want` is found (or 10 s pass).
async fn read_until(viewer: &mut lab_agent::console::Viewer, got: &mut Vec<u8>, want: &[u8]) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !got.windows(want.len()).any(|w| w == want) {
            match viewer.next().await {
                Some(ViewerEvent::Data(c)) => got.extend_from_slice(&c.data),
                other => panic!("unexpected viewer event {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {:?}", String::from_utf8_lossy(want)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_speed_source_reaches_three_viewers_and_the_log_exactly() {
    let secs: u64 = std::env::var("LAB_CONSOLE_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (capture, host) = start(
        tmp.path(),
        &listener,
        HubConfig {
            tail_bytes: 4096,
            buffer_bytes: 256 * 1024 * 1024,
            input_queue: 4,
        },
        LogLimits {
            max_file_bytes: 64 * 1024 * 1024,
            max_total_bytes: u64::MAX / 2,
        },
    )
    .await;

    // Viewers join before the source is up: they must see every byte.
    let viewers: Vec<_> = (0..3)
        .map(|_| {
            let mut v = capture.hub().subscribe();
            tokio::spawn(async move {
                let mut hash = Sha256::new();
                let mut expect = 0u64;
                while let Some(ev) = v.next().await {
                    match ev {
                        ViewerEvent::Data(c) => {
                            assert_eq!(c.offset, expect, "viewer saw a gap or a duplicate");
                            expect += c.data.len() as u64;
                            hash.update(&c.data);
                        }
                        ViewerEvent::Lagged { missed, .. } => {
                            panic!("viewer lagged by {missed} bytes")
                        }
                    }
                }
                (expect, hash.finalize())
            })
        })
        .collect();

    let (mut conn, _) = listener.accept().await.unwrap();
    let started = Instant::now();
    let mut prng = Prng(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; 64 * 1024];
    let mut hash = Sha256::new();
    let mut sent = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        prng.fill(&mut buf);
        conn.write_all(&buf).await.unwrap();
        hash.update(&buf);
        sent += buf.len() as u64;
    }
    let source_hash = hash.finalize();
    // Wait until the capture has read everything, then stop it (the
    // connection stays open, so no gap marker is expected).
    tokio::time::timeout(Duration::from_secs(60), async {
        while capture.hub().head() < sent {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("capture did not read everything the source sent");
    let elapsed = started.elapsed();
    capture.stop().await.unwrap();
    drop(conn);

    for v in viewers {
        let (n, h) = v.await.unwrap();
        assert_eq!(n, sent, "viewer byte count");
        assert_eq!(h, source_hash, "viewer content");
    }
    let mut log_hash = Sha256::new();
    let mut log_bytes = 0u64;
    for rec in records_between(tmp.path(), &host, 0, u64::MAX).unwrap() {
        let rec = rec.unwrap();
        assert_eq!(rec.kind, RecordKind::Data, "unexpected gap marker");
        log_bytes += rec.data.len() as u64;
        log_hash.update(&rec.data);
    }
    assert_eq!(log_bytes, sent, "log byte count");
    assert_eq!(log_hash.finalize(), source_hash, "log content");
    let mib = sent as f64 / (1024.0 * 1024.0);
    eprintln!(
        "console stress: {mib:.1} MiB in {elapsed:.2?} ({:.1} MiB/s), 3 viewers and the log identical",
        mib / elapsed.as_secs_f64()
    );
}

#[tokio::test]
async fn source_drop_writes_gap_marker_and_capture_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (capture, host) = start(
        tmp.path(),
        &listener,
        HubConfig::default(),
        LogLimits::default(),
    )
    .await;
    let mut viewer = capture.hub().subscribe();

    let (mut first, _) = listener.accept().await.unwrap();
    first.write_all(b"before").await.unwrap();
    drop(first);
    let (mut second, _) = listener.accept().await.unwrap();
    second.write_all(b"after").await.unwrap();

    let mut seen = Vec::new();
    read_until(&mut viewer, &mut seen, b"after").await;
    let text = String::from_utf8(seen.clone()).unwrap();
    let lost = text.find("[lab: console source lost at ").expect(&text);
    let back = text
        .find("[lab: console source reconnected at ")
        .expect(&text);
    assert!(text.starts_with("before\r\n"), "{text:?}");
    assert!(
        text.contains(": end of stream; reconnecting]\r\n"),
        "{text:?}"
    );
    assert!(lost < back && text.ends_with("]\r\nafter"), "{text:?}");

    capture.stop().await.unwrap();
    let records: Vec<_> = records_between(tmp.path(), &host, 0, u64::MAX)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            RecordKind::Data,
            RecordKind::Gap,
            RecordKind::Gap,
            RecordKind::Data
        ]
    );
    assert_eq!(read_slice(tmp.path(), &host, 0, u64::MAX).unwrap(), seen);
}

#[tokio::test]
async fn unreachable_source_is_marked_once_then_captured() {
    let tmp = tempfile::tempdir().unwrap();
    // Reserve a port, close it: connects are refused until we listen again.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let host = ConsoleHost::new("node-02").unwrap();
    let log = ConsoleLog::open(tmp.path(), &host, LogLimits::default()).unwrap();
    let (hub, input) = Hub::new(HubConfig::default());
    let mut viewer = hub.subscribe();
    let capture = Capture::spawn(TcpSource::new(addr), log, hub, input, test_capture_config());
    let mut seen = Vec::new();
    read_until(&mut viewer, &mut seen, b"; retrying]\r\n").await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let (mut conn, _) = listener.accept().await.unwrap();
    conn.write_all(b"booting").await.unwrap();
    read_until(&mut viewer, &mut seen, b"booting").await;
    let text = String::from_utf8(seen).unwrap();
    assert_eq!(text.matches("unavailable").count(), 1, "{text:?}");
    assert!(
        text.contains("[lab: console source reconnected at "),
        "{text:?}"
    );
    capture.stop().await.unwrap();
}

#[test]
fn time_slice_returns_exactly_the_bytes_between_two_timestamps() {
    let tmp = tempfile::tempdir().unwrap();
    let host = ConsoleHost::new("node-03").unwrap();
    let limits = LogLimits {
        max_file_bytes: 200,
        max_total_bytes: 1 << 30,
    };
    let mut log = ConsoleLog::open(tmp.path(), &host, limits).unwrap();
    let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut prng = Prng(7);
    for i in 0..300u64 {
        let ts = 1_000 + i / 3 * 10; // three records per timestamp
        let mut len = [0u8; 1];
        prng.fill(&mut len);
        let mut data = vec![0u8; 1 + len[0] as usize % 150];
        prng.fill(&mut data);
        log.append(RecordKind::Data, ts, &data).unwrap();
        model.push((ts, data));
    }
    log.flush().unwrap();
    let files = list_files(&host_dir(tmp.path(), &host)).unwrap();
    assert!(
        files.len() > 10,
        "expected rotation, got {} files",
        files.len()
    );
    for (from, to) in [
        (0, u64::MAX),
        (1_000, 1_010),
        (1_005, 1_500),
        (1_500, 1_505),
        (1_990, 5_000),
        (1_250, 1_250),
        (0, 1_000),
    ] {
        let want: Vec<u8> = model
            .iter()
            .filter(|(ts, _)| (from..to).contains(ts))
            .flat_map(|(_, d)| d.iter().copied())
            .collect();
        let got = read_slice(tmp.path(), &host, from, to).unwrap();
        assert_eq!(got, want, "slice {from}..{to}");
    }
}

fn host_dir(root: &Path, host: &ConsoleHost) -> std::path::PathBuf {
    lab_agent::console::log::host_dir(root, host)
}

#[test]
fn rotation_and_retention_keep_the_total_under_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let host = ConsoleHost::new("node-04").unwrap();
    let limits = LogLimits {
        max_file_bytes: 1_000,
        max_total_bytes: 4_000,
    };
    let mut log = ConsoleLog::open(tmp.path(), &host, limits).unwrap();
    let dir = host_dir(tmp.path(), &host);
    let mut all = Vec::new();
    let mut prng = Prng(11);
    for i in 0..500u64 {
        let mut data = vec![0u8; 37 + (i as usize % 90)];
        prng.fill(&mut data);
        log.append(RecordKind::Data, i, &data).unwrap();
        all.extend_from_slice(&data);
        log.flush().unwrap();
        let files = list_files(&dir).unwrap();
        let total: u64 = files.iter().map(|f| f.2).sum();
        assert!(total <= limits.max_total_bytes, "total {total} after {i}");
        assert!(files.iter().all(|f| f.2 <= limits.max_file_bytes));
    }
    let files = list_files(&dir).unwrap();
    assert!(files[0].0 > 0, "oldest files were deleted");
    // What is left is the most recent part of the stream, contiguous.
    let kept = read_slice(tmp.path(), &host, 0, u64::MAX).unwrap();
    assert!(kept.len() >= 2_000, "kept only {} bytes", kept.len());
    assert!(all.ends_with(&kept));
    // Reopening keeps the limits and continues numbering.
    drop(log);
    let log = ConsoleLog::open(tmp.path(), &host, limits).unwrap();
    let after = list_files(&dir).unwrap();
    assert_eq!(after.last().unwrap().0, files.last().unwrap().0 + 1);
    drop(log);
}

#[tokio::test]
async fn second_writer_takes_over_and_first_is_told() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (capture, _) = start(
        tmp.path(),
        &listener,
        HubConfig::default(),
        LogLimits::default(),
    )
    .await;
    let (mut peer, _) = listener.accept().await.unwrap();
    let hub = capture.hub().clone();

    let mut first = hub.try_writer().unwrap();
    assert_eq!(hub.try_writer().unwrap_err(), WriteError::Busy);
    first.write(Bytes::from_static(b"one;")).await.unwrap();
    let second = hub.take_writer();
    tokio::time::timeout(Duration::from_secs(5), first.replaced())
        .await
        .expect("first writer was not told it was replaced");
    assert!(!first.is_current());
    assert_eq!(
        first.write(Bytes::from_static(b"lost;")).await,
        Err(WriteError::Replaced)
    );
    second.write(Bytes::from_static(b"two;")).await.unwrap();

    let mut got = vec![0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"one;two;");
    capture.stop().await.unwrap();
}

#[tokio::test]
async fn xen_debug_keys_reach_the_console_and_the_answer_is_captured() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (capture, host) = start(
        tmp.path(),
        &listener,
        HubConfig::default(),
        LogLimits::default(),
    )
    .await;
    let (mut peer, _) = listener.accept().await.unwrap();
    let mut viewer = capture.hub().subscribe();
    let cfg = XenDebugKeys {
        keys: b"hqr".to_vec(),
        key_interval: Duration::from_millis(5),
        switch_back: true,
    };
    let hub = capture.hub().clone();
    let sender = tokio::spawn(async move { send_keys(&hub, &xen_debug_sequence(&cfg)).await });

    // A tiny Xen: answers each debug key once switched to the hypervisor.
    let mut got = vec![0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), async {
        peer.read_exact(&mut got[..3]).await.unwrap();
        assert_eq!(&got[..3], b"\x01\x01\x01");
        peer.write_all(b"(XEN) *** Serial input to Xen\r\n")
            .await
            .unwrap();
        for i in 3..6 {
            peer.read_exact(&mut got[i..i + 1]).await.unwrap();
            let line = format!("(XEN) '{}' pressed\r\n", got[i] as char);
            peer.write_all(line.as_bytes()).await.unwrap();
        }
        peer.read_exact(&mut got[6..]).await.unwrap();
        peer.write_all(b"*** Serial input to DOM0\r\n")
            .await
            .unwrap();
    })
    .await
    .expect("debug-key sequence did not arrive");
    assert_eq!(&got, b"\x01\x01\x01hqr\x01\x01\x01");
    sender.await.unwrap().unwrap();

    let mut seen = Vec::new();
    read_until(&mut viewer, &mut seen, b"DOM0\r\n").await;
    capture.stop().await.unwrap();
    let log = String::from_utf8(read_slice(tmp.path(), &host, 0, u64::MAX).unwrap()).unwrap();
    assert_eq!(
        log,
        "(XEN) *** Serial input to Xen\r\n(XEN) 'h' pressed\r\n(XEN) 'q' pressed\r\n\
         (XEN) 'r' pressed\r\n*** Serial input to DOM0\r\n"
    );
}
