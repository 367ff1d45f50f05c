//! Serial-over-LAN against OpenIPMI's `ipmi_sim` on loopback. The test
//! plays the host: it listens on a free port and `ipmi_sim`'s
//! `sol "tcp:127.0.0.1:PORT" 115200` connects to it as the host's serial
//! port. `ipmitool -I lanplus -C 3` is the reference beside ours. Needs the
//! Debian packages `openipmi` and `ipmitool`.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lab_agent::console::{ConsoleSource, SolSource};
use lab_agent::ipmi::{ConnectOptions, Secret, SolOptions, SolStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: the suite must pass on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

mod common;
use common::{PASSWORD, USER};

/// An `ipmi_sim` with SOL wired to a TCP port this test listens on: the
/// test holds the host's side of the serial line.
struct Sim {
    sim: common::Sim,
    /// The host's side of the serial line (ipmi_sim connected to it).
    host: Option<TcpStream>,
}

impl std::ops::Deref for Sim {
    type Target = common::Sim;
    fn deref(&self) -> &common::Sim {
        &self.sim
    }
}

impl Sim {
    async fn start() -> Sim {
        // The serial side listens before ipmi_sim starts: it connects once
        // at start-up (and retries only every 10 s).
        let serial = TcpListener::bind("127.0.0.1:0").expect("bind serial side");
        let serial_port = serial.local_addr().expect("serial addr").port();
        serial.set_nonblocking(true).expect("nonblocking");
        let serial = tokio::net::TcpListener::from_std(serial).expect("tokio listener");
        let mut sim =
            common::Sim::spawn(&format!("  sol \"tcp:127.0.0.1:{serial_port}\" 115200\n"));
        let host = match tokio::time::timeout(WAIT, serial.accept()).await {
            Ok(Ok((s, _))) => s,
            other => panic!(
                "ipmi_sim never connected its SOL port: {other:?}\n{}",
                sim.logs()
            ),
        };
        host.set_nodelay(true).expect("nodelay");
        sim.wait_ready(WAIT);
        Sim {
            sim,
            host: Some(host),
        }
    }

    fn host(&mut self) -> &mut TcpStream {
        self.host.as_mut().expect("host side")
    }

    /// Get Payload Activation Status through the reference: is SOL
    /// instance 1 active (in any session)?
    fn reference_sol_active(&self) -> bool {
        let out = self.ipmitool(&["raw", "0x06", "0x4a", "0x01"]);
        let bytes: Vec<u8> = out
            .split_whitespace()
            .filter_map(|h| u8::from_str_radix(h, 16).ok())
            .collect();
        assert!(bytes.len() >= 2, "activation status: {out}");
        bytes[1] & 0x01 != 0
    }

    async fn sol(&self, options: SolOptions) -> SolStream {
        let client = self.connect().await;
        SolStream::activate(client, options)
            .await
            .unwrap_or_else(|e| panic!("activate: {}\n{}", lab_agent::error_chain(&e), self.logs()))
    }
}

/// Read from `r` until `want` bytes have come (bounded by [`WAIT`]).
async fn read_exactly<R: tokio::io::AsyncRead + Unpin>(r: &mut R, want: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(want);
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("stream ended after {} of {want} bytes", got.len()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read failed after {} of {want} bytes: {e}", got.len()),
            Err(_) => panic!("timed out after {} of {want} bytes", got.len()),
        }
    }
    got
}

/// Read from `r` until `needle` appears (bounded by [`WAIT`]).
async fn read_until<R: tokio::io::AsyncRead + Unpin>(r: &mut R, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !got.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(Ok(0)) => panic!(
                "stream ended before {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("read failed: {e}"),
            Err(_) => panic!(
                "timed out waiting for {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
        }
    }
    got
}

/// Deterministic bytes of every value (xorshift).
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_output_arrives_in_order_small_and_large() {
    let mut sim = Sim::start().await;
    let mut sol = sim.sol(SolOptions::default()).await;
    assert!(sim.reference_sol_active(), "ipmitool sees SOL active");

    sim.host().write_all(b"login: ").await.expect("host write");
    assert_eq!(read_exactly(&mut sol, 7).await, b"login: ");

    let big = pattern(300 * 1024);
    let mut host = sim.host.take().expect("host");
    let writer = {
        let big = big.clone();
        tokio::spawn(async move {
            host.write_all(&big).await.expect("host write big");
            host
        })
    };
    let started = Instant::now();
    let got = read_exactly(&mut sol, big.len()).await;
    let took = started.elapsed();
    assert!(got == big, "300 KiB arrived altered (len {})", got.len());
    eprintln!(
        "SOL host->console: {} bytes in {:?} = {:.0} KiB/s",
        big.len(),
        took,
        big.len() as f64 / 1024.0 / took.as_secs_f64()
    );
    sim.host = Some(writer.await.expect("writer task"));
    sol.close().await.expect("close");
    assert!(!sim.reference_sol_active(), "close deactivated SOL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_input_reaches_the_host() {
    let mut sim = Sim::start().await;
    let mut sol = sim.sol(SolOptions::default()).await;

    sol.write_all(b"root\r\n").await.expect("write");
    sol.flush().await.expect("flush: the BMC accepted it");
    let got = read_until(sim.host(), b"root\r\n").await;
    assert_eq!(got, b"root\r\n");

    // Far more than ipmi_sim's 32-byte inbound buffer: partial accepts and
    // NACKs must be resent without loss or duplication.
    let text = pattern(20 * 1024);
    let started = Instant::now();
    sol.write_all(&text).await.expect("write");
    sol.flush().await.expect("flush");
    let got = read_exactly(sim.host(), text.len()).await;
    let took = started.elapsed();
    assert!(got == text, "20 KiB arrived altered (len {})", got.len());
    eprintln!(
        "SOL console->host: {} bytes in {:?} = {:.1} KiB/s",
        text.len(),
        took,
        text.len() as f64 / 1024.0 / took.as_secs_f64()
    );
    sol.close().await.expect("close");
}

/// A SOL held by a stale session (an `ipmitool sol activate` that was
/// killed) is deactivated and taken over; so is one of our own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_activation_is_deactivated_first() {
    let mut sim = Sim::start().await;

    // ipmitool holds SOL, then dies without deactivating.
    let mut holder = sim
        .ipmitool_cmd()
        .args(["sol", "activate"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ipmitool sol activate");
    let deadline = Instant::now() + WAIT;
    while !sim.reference_sol_active() {
        assert!(Instant::now() < deadline, "ipmitool never activated SOL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.kill().expect("kill ipmitool");
    let _ = holder.wait();
    assert!(sim.reference_sol_active(), "the stale activation remains");

    let mut first = sim.sol(SolOptions::default()).await;
    sim.host().write_all(b"one\r\n").await.expect("host write");
    read_until(&mut first, b"one\r\n").await;

    // A second session of ours takes over from the first.
    let mut second = sim.sol(SolOptions::default()).await;
    sim.host().write_all(b"two\r\n").await.expect("host write");
    read_until(&mut second, b"two\r\n").await;
    // Closing the first (taken over) does not deactivate the second's SOL.
    first.close().await.expect("close the taken-over stream");
    assert!(sim.reference_sol_active());
    sim.host()
        .write_all(b"still\r\n")
        .await
        .expect("host write");
    read_until(&mut second, b"still\r\n").await;

    // Dropping a stream deactivates its SOL (from the socket task).
    drop(second);
    let deadline = Instant::now() + WAIT;
    while sim.reference_sol_active() {
        assert!(Instant::now() < deadline, "drop did not deactivate SOL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the reference can activate it now, with no stale session.
    let mut after = sim.sol(SolOptions::default()).await;
    sim.host()
        .write_all(b"three\r\n")
        .await
        .expect("host write");
    read_until(&mut after, b"three\r\n").await;
    after.close().await.expect("close");
}

/// `ipmitool sol deactivate` from another session ends ours: the keepalive
/// (Get Payload Instance Info) sees SOL held by nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_deactivate_ends_our_stream() {
    let sim = Sim::start().await;
    let info = sim.ipmitool(&["sol", "info"]);
    assert!(info.contains("Enabled") && info.contains("true"), "{info}");
    let mut sol = sim
        .sol(SolOptions {
            keepalive: Duration::from_millis(300),
            ..SolOptions::default()
        })
        .await;
    assert!(sim.reference_sol_active());
    sim.ipmitool(&["sol", "deactivate"]);
    assert!(!sim.reference_sol_active());
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(WAIT, sol.read(&mut buf))
        .await
        .expect("the stream notices within the timeout");
    let e = r.expect_err("taken over is an error");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    assert!(
        lab_agent::error_chain(&e).contains("no longer active"),
        "{}",
        lab_agent::error_chain(&e)
    );
}

/// ipmi_sim's TCP serial backend turns a SOL break into telnet
/// IAC BREAK (0xFF 0xF3) on the serial side: that is what reaches the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_reaches_the_serial_side() {
    let mut sim = Sim::start().await;
    let source = SolSource::new(
        sim.endpoint(),
        USER.into(),
        Secret::from_bytes(PASSWORD.as_bytes()),
        ConnectOptions::default(),
    );
    assert_eq!(source.describe(), format!("sol:{}", sim.endpoint()));
    let mut conn = source.connect().await.expect("SolSource connect");
    conn.write_all(b"before").await.expect("write");
    source.send_break(&mut conn).await.expect("break");
    conn.write_all(b"after").await.expect("write");
    conn.flush().await.expect("flush");
    let got = read_until(sim.host(), b"after").await;
    assert_eq!(got, b"before\xFF\xF3after", "{got:?}");
    conn.close().await.expect("close");
}
