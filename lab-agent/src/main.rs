//! `lab-agent --config agent.toml`: the rack agent. Attaches to lab-server
//! for its rack (desired state down, reports up), serves DHCP, TFTP and HTTP
//! for the rack's hosts, drives their BMCs and captures their consoles.
//! `lab-agent manpage DIR` (hidden) writes its man page.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lab_agent::assets::FileSource;
use lab_agent::assets::boot::BootFiles;
use lab_agent::assets::install::MetadataPolicy;
use lab_agent::assets::render::RenderConfig;
use lab_agent::config::AgentConfig;
use lab_agent::dhcp::DhcpServer;
use lab_agent::error_chain;
use lab_agent::hosts::HostTable;
use lab_agent::link::{self, LinkConfig};
use lab_agent::rack::{Rack, RackConfig, ipmi_power_factory};
use lab_agent::tftp::{TftpConfig, TftpServer};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "lab-agent",
    version,
    about = "The rack agent: PXE boot, power and console capture for one rack's hosts"
)]
struct Args {
    /// The agent's configuration file.
    #[arg(long, env = "LAB_AGENT_CONFIG", default_value = "agent.toml")]
    config: PathBuf,
    /// Bearer token for lab-server. On the command line every local user
    /// sees it (ps); prefer LAB_TOKEN, --token-file or `token_file`.
    #[arg(long, env = "LAB_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (else `token_file` from the config).
    #[arg(long, env = "LAB_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https:// server (else `ca_file` from the
    /// config, else the system's roots).
    #[arg(long, env = "LAB_CA")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Everything but the token.
impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("config", &self.config)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("token_file", &self.token_file)
            .field("ca", &self.ca)
            .field("command", &self.command)
            .finish()
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write the man page (lab-agent.1) into DIR.
    #[command(hide = true)]
    Manpage { dir: PathBuf },
}

fn main() -> Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(Cmd::Manpage { dir }) = &args.command {
        std::fs::create_dir_all(dir)?;
        return clap_mangen::generate_to(Args::command(), dir)
            .with_context(|| format!("cannot write the man page to {}", dir.display()));
    }
    lab_client::log::init();
    if matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine) {
        tracing::warn!(
            "the token was given with --token: every local user can read it in the process list; \
             use LAB_TOKEN, --token-file or token_file in the configuration instead"
        );
    }
    // A DHCP packet that makes the decoder panic is caught and counted; keep
    // the default hook from printing a backtrace for each one.
    std::panic::set_hook(Box::new(|info| error!(panic = %info, "panic")));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let cfg = AgentConfig::load(&args.config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    raise_open_files_limit(&cfg);
    let token = match (
        args.token,
        args.token_file.as_ref().or(cfg.token_file.as_ref()),
    ) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read token file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let table = HostTable::default();
    let http_url = cfg.http.as_ref().map(|h| h.url.clone());
    let render = RenderConfig {
        http_url,
        // The address hosts reach TFTP at: the DHCP next-server, else the
        // TFTP listen address unless it is a wildcard.
        tftp_server: cfg
            .dhcp
            .as_ref()
            .map(|d| std::net::IpAddr::V4(d.next_server))
            .or_else(|| {
                cfg.tftp
                    .as_ref()
                    .map(|t| t.listen.ip())
                    .filter(|ip| !ip.is_unspecified())
            }),
        artifacts_url: None,
        grub_http: cfg.http.as_ref().is_some_and(|h| h.grub),
        extra: Default::default(),
    };
    let files: Arc<dyn FileSource> = Arc::new(
        BootFiles::new(
            &cfg.assets_root,
            cfg.artifacts.as_deref(),
            table.clone(),
            render,
        )
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?
        .with_metadata_policy(MetadataPolicy {
            install_profiles: cfg
                .profiles
                .iter()
                .filter(|(_, p)| p.install.is_some())
                .map(|(name, _)| name.clone())
                .collect(),
            dhcp: cfg.dhcp.clone(),
        }),
    );
    let mut tasks = tokio::task::JoinSet::new();
    let mut services = lab_agent::metrics::Services::default();
    let ipmi = lab_agent::ipmi::ConnectOptions {
        cipher_suites: cfg.ipmi_cipher_suites.clone(),
        ..Default::default()
    };
    let rack = Rack::new(
        RackConfig {
            default_profile: cfg.default_profile.clone(),
            profiles: cfg.profiles.clone(),
            data_dir: cfg.data_dir.clone(),
            console_limits: cfg.console_limits,
            bmc_probe_interval: cfg.bmc_probe_interval,
            ipmi: ipmi.clone(),
            capture: Default::default(),
        },
        table.clone(),
        ipmi_power_factory(ipmi),
    );
    let link_cfg = LinkConfig {
        server: cfg.server.clone(),
        token,
        rack: cfg.rack.clone(),
        ca: args.ca.clone().or_else(|| cfg.ca_file.clone()),
        log_reads: cfg.log_reads,
    };
    tasks.spawn(async move {
        link::run(link_cfg, rack).await;
        Ok::<_, anyhow::Error>(())
    });
    if let Some(t) = &cfg.tftp {
        let mut tc = TftpConfig {
            listen: t.listen,
            ..TftpConfig::default()
        };
        if let Some(v) = t.blksize_cap {
            tc.blksize_cap = v;
        }
        if let Some(v) = t.windowsize_cap {
            tc.windowsize_cap = v;
        }
        if let Some(v) = t.max_transfers {
            tc.max_transfers = v;
        }
        if let Some(v) = t.max_transfers_per_client {
            tc.max_transfers_per_client = v;
        }
        if let Some(v) = t.max_timeout {
            tc.max_timeout = v;
        }
        let server = TftpServer::bind(tc, files.clone())
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        let addr = server.local_addr()?;
        services.tftp = Some(server.stats());
        info!(%addr, "TFTP serving");
        println!("lab-agent tftp listening on {addr}");
        tasks.spawn(async move {
            server
                .run()
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        });
    }
    if let Some(h) = &cfg.http {
        let listener = lab_agent::http::bind(h.listen)
            .with_context(|| format!("cannot listen on {}", h.listen))?;
        let server = lab_agent::http::HttpServer::new(listener, files.clone(), h.limits.clone())
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        let addr = server.local_addr()?;
        services.http = Some(server.stats());
        info!(%addr, "HTTP serving");
        println!("lab-agent http listening on {addr}");
        tasks.spawn(async move {
            server
                .run_until(std::future::pending())
                .await
                .context("HTTP server failed")
        });
    }
    if let Some(d) = cfg.dhcp.clone() {
        // DHCP runs on its own single-threaded runtime: one datagram at a
        // time needs no cross-thread wake-ups, which cost more than the
        // work itself (dhcp-bench: ~32,000 vs ~9,000 DORA/s on 2 cores).
        let dhcp_table = table.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        std::thread::Builder::new()
            .name("dhcp".into())
            .spawn(move || {
                let result = (|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let server = DhcpServer::bind(d, dhcp_table)
                            .map_err(|e| anyhow::anyhow!(error_chain(&e)));
                        let server = match server {
                            Ok(s) => {
                                let _ = ready_tx.send(Ok(s.stats()));
                                s
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return Ok(());
                            }
                        };
                        server
                            .run()
                            .await
                            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
                    })
                })();
                let _ = done_tx.send(result);
            })?;
        services.dhcp = Some(ready_rx.await.context("the DHCP thread died")??);
        info!("DHCP serving");
        tasks.spawn(async move { done_rx.await.context("the DHCP thread died")? });
    }
    if let Some(interface) = cfg.ra_interface.clone() {
        tasks.spawn(async move {
            lab_agent::ra::run(interface, std::time::Duration::from_secs(10))
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        });
    }
    if let Some(listen) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} ([metrics] listen)"))?;
        let addr = listener.local_addr()?;
        info!(%addr, "metrics serving");
        println!("lab-agent metrics listening on {addr}");
        let registry = lab_agent::metrics::registry(&cfg.rack, services);
        tasks.spawn(async move {
            lab_agent::metrics::serve(listener, registry)
                .await
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        });
    }
    println!("lab-agent running for rack {}", cfg.rack);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("shutting down"),
        Some(r) = tasks.join_next() => {
            r??;
        }
    }
    Ok(())
}

/// Raise the soft open-files limit to the hard one (the common service
/// default of 1,024 is low for a boot server), log both, and warn when the
/// configured HTTP and TFTP caps could need more descriptors than that. The
/// caps hold whatever the limit: they are what keeps the boot services
/// answering under a flood.
fn raise_open_files_limit(cfg: &AgentConfig) {
    #[cfg(target_os = "linux")]
    let soft = {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return;
        };
        let soft = if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit");
                    soft
                }
            }
        } else {
            soft
        };
        info!(soft, hard, "open files limit");
        soft
    };
    #[cfg(not(target_os = "linux"))]
    let soft = u64::MAX;
    // Each HTTP connection and each TFTP transfer holds a socket and a file;
    // the rest of the agent (listeners, the link, consoles) gets a reserve.
    let http = cfg.http.as_ref().map_or(0, |h| h.limits.max_connections);
    let tftp = cfg.tftp.as_ref().map_or(0, |t| {
        t.max_transfers
            .unwrap_or(TftpConfig::default().max_transfers)
    });
    let needed = 2 * (http + tftp) as u64 + 256;
    if needed > soft {
        tracing::warn!(
            soft,
            needed,
            "the open files limit is below what the HTTP and TFTP caps may use; lower \
             [http] max_connections or [tftp] max_transfers, or raise the limit"
        );
    }
}
