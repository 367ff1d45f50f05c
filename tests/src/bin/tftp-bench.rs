//! TFTP throughput, side by side: this agent's server and `in.tftpd`
//! (tftpd-hpa), both on 127.0.0.1, serving the same 64 MiB file to the same
//! client (`atftp`), in three runs: lockstep (blksize 1468), windowsize 16
//! (blksize 1468; tftpd-hpa ignores windowsize, so it stays lockstep), and 50
//! parallel lockstep clients (aggregate). Not a test: run it with
//! `cargo run --release -p lab-tests --bin tftp-bench` as root (in.tftpd
//! wants to chroot). Needs the Debian packages `atftp` and `tftpd-hpa`.

use anyhow::{Context, Result, bail, ensure};
use lab_agent::assets::root::DirRoot;
use lab_agent::tftp::{TftpConfig, TftpServer};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FILE: &str = "bench.bin";
const SIZE: usize = 64 << 20;
const PARALLEL: usize = 50;

/// Removes the work directory and kills in.tftpd on every exit path.
struct Guard {
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .with_context(|| format!("`{tool}` not found: apt-get install -y {package}"))
}

fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Poll until the server answers an RRQ for a missing file.
fn wait_ready(addr: SocketAddr) -> Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        sock.send_to(b"\x00\x01readiness-probe\x00octet\x00", addr)?;
        if sock.recv_from(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("TFTP server on {addr} did not answer within 5 s")
}

/// One atftp download to /dev/null (or `out`), checked for success.
fn fetch(atftp: &Path, addr: SocketAddr, options: &[&str], out: &str) -> Result<()> {
    let mut cmd = Command::new(atftp);
    for o in options {
        cmd.arg("--option").arg(o);
    }
    let out = cmd
        .args(["-g", "-r", FILE, "-l", out])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        out.status.success(),
        "atftp from {addr} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// MB/s (10^6 bytes) for `clients` concurrent downloads of the file.
fn measure(atftp: &Path, addr: SocketAddr, options: &[&str], clients: usize) -> Result<f64> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| s.spawn(|| fetch(atftp, addr, options, "/dev/null")))
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("client thread panicked"))
    })?;
    let secs = start.elapsed().as_secs_f64();
    Ok((SIZE * clients) as f64 / secs / 1e6)
}

/// `tftp-bench serve DIR ADDR`: only run the agent's server (for profiling).
fn serve(dir: &str, addr: &str) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let source = Arc::new(DirRoot::new(Path::new(dir))?);
    let config = TftpConfig {
        listen: addr.parse()?,
        ..TftpConfig::default()
    };
    rt.block_on(async { TftpServer::bind(config, source).await?.run().await })?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, dir, addr] = args.as_slice()
        && cmd == "serve"
    {
        return serve(dir, addr);
    }
    let atftp = which("atftp", "atftp")?;
    let tftpd = which("in.tftpd", "tftpd-hpa")?;

    let dir = std::env::temp_dir().join(format!("tftp-bench-{}", std::process::id()));
    let mut guard = Guard {
        dir: dir.clone(),
        child: None,
    };
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    let mut s: u64 = 0x2545_f491_4f6c_dd1d;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s.to_le_bytes()
        })
        .collect();
    std::fs::write(root.join(FILE), &data)?;
    // in.tftpd drops to an unprivileged user after chroot.
    use std::os::unix::fs::PermissionsExt;
    for p in [&dir, &root] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::set_permissions(root.join(FILE), std::fs::Permissions::from_mode(0o644))?;

    // Ours, on its own runtime thread.
    let rt = tokio::runtime::Runtime::new()?;
    let source = Arc::new(DirRoot::new(&root)?);
    let server = rt.block_on(TftpServer::bind(
        TftpConfig {
            listen: "127.0.0.1:0".parse()?,
            max_transfers: 128,
            ..TftpConfig::default()
        },
        source,
    ))?;
    let ours = server.local_addr()?;
    let stats = server.stats();
    rt.spawn(server.run());

    // tftpd-hpa in the foreground.
    let port = free_port()?;
    let hpa: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    guard.child = Some(
        Command::new(&tftpd)
            .arg("-L")
            .arg("-s")
            .arg(&root)
            .arg("-a")
            .arg(hpa.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start in.tftpd")?,
    );
    wait_ready(ours)?;
    wait_ready(hpa)?;

    // Both serve the same bytes.
    for (name, addr) in [("agent", ours), ("tftpd-hpa", hpa)] {
        let out = dir.join(format!("check-{name}"));
        fetch(&atftp, addr, &["blksize 1468"], out.to_str().unwrap())?;
        ensure!(
            std::fs::read(&out)? == data,
            "{name} served different bytes"
        );
        std::fs::remove_file(out)?;
    }

    let lockstep: &[&str] = &["blksize 1468"];
    let windowed: &[&str] = &["blksize 1468", "windowsize 16"];
    let runs: [(&str, &[&str], usize); 3] = [
        ("lockstep, blksize 1468", lockstep, 1),
        ("windowsize 16, blksize 1468", windowed, 1),
        ("50 parallel clients, lockstep", lockstep, PARALLEL),
    ];
    println!(
        "TFTP throughput, {} MiB file over loopback, client atftp (MB/s = 10^6 bytes/s)",
        SIZE >> 20
    );
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "run", "agent", "tftpd-hpa", "ratio"
    );
    for (label, options, clients) in runs {
        let a = measure(&atftp, ours, options, clients)?;
        let h = measure(&atftp, hpa, options, clients)?;
        println!("{label:<32} {a:>12.1} {h:>12.1} {:>7.2}x", a / h);
    }
    println!(
        "(tftpd-hpa does not implement windowsize: it leaves it out of its OACK and stays lockstep)"
    );
    let s = stats.snapshot();
    println!(
        "agent counters: completed {} failed {} retransmits {} malformed {}",
        s.completed, s.failed, s.retransmits, s.malformed
    );
    drop(guard);
    Ok(())
}
