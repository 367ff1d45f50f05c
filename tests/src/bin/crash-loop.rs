//! `crash-loop`: the real lab-server killed with SIGKILL at random moments
//! under many clients of mixed load, then every acknowledged lease, the
//! whole event log (history checker) and each client's grants checked; see
//! `lab_tests::crash_loop`. Prints the figures; exits non-zero on any loss
//! or double grant.
//!
//! ```text
//! cargo build --workspace
//! cargo run -p lab-tests --bin crash-loop -- [--kills 100] [--clients 64] [--hosts 16] [--seed 1]
//! ```
//!
//! Uses the `lab-server` binary next to this one (debug or release,
//! whichever was built).

use anyhow::{Context, Result, bail};
use lab_tests::crash_loop::{Options, run};

const USAGE: &str = "\
usage: crash-loop [--kills N] [--clients N] [--hosts N] [--seed N] [--uptime-ms MIN,MAX]
  --kills N          SIGKILLs [100]
  --clients N        concurrent clients, one principal and connection each [64]
  --hosts N          hosts in the generated inventory [16]
  --seed N           seed of the clients' and the killer's choices [1]
  --uptime-ms A,B    the server runs between A and B ms between kills [300,2500]
  --etcd             lab-server on a 3-member etcd (started here) instead of redb";

fn parse() -> Result<Options> {
    let mut o = Options {
        kills: 100,
        ..Options::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--kills" => o.kills = value()?.parse()?,
            "--clients" => o.clients = value()?.parse()?,
            "--hosts" => o.hosts = value()?.parse()?,
            "--seed" => o.seed = value()?.parse()?,
            "--uptime-ms" => {
                let v = value()?;
                let (a, b) = v.split_once(',').context("--uptime-ms A,B")?;
                o.uptime = (
                    std::time::Duration::from_millis(a.parse()?),
                    std::time::Duration::from_millis(b.parse()?),
                );
            }
            "--etcd" => o.etcd = Some(String::new()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.hosts < 3 || o.clients == 0 {
        bail!("--hosts must be at least 3 and --clients at least 1");
    }
    Ok(o)
}

fn main() -> Result<()> {
    let mut o = parse()?;
    // Kept until the end: dropping it stops the members.
    let cluster = match &o.etcd {
        Some(_) => Some(lab_tests::etcd::EtcdCluster::start(3)?),
        None => None,
    };
    if let Some(c) = &cluster {
        o.etcd = Some(c.endpoints());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    println!(
        "crash-loop: {} kills, {} clients, {} hosts, seed {}, uptime {:?}..{:?}, store {}",
        o.kills,
        o.clients,
        o.hosts,
        o.seed,
        o.uptime.0,
        o.uptime.1,
        if cluster.is_some() {
            "etcd (3 members)"
        } else {
            "redb"
        }
    );
    match rt.block_on(run(dir.path(), &o)) {
        Ok(report) => {
            println!("{}", report.summary());
            Ok(())
        }
        Err(e) => {
            let kept = dir.keep();
            bail!("{e:#} (kept in {})", kept.display())
        }
    }
}
