//! `lab-server`: the gRPC control plane of the lab.
//!
//! `lab-server --inventory inventory.toml --data-dir /var/lib/lab --tokens tokens.toml`
//! serves `lab.v1` on `--listen`. `lab-server token new --principal NAME --role ROLE`
//! prints a fresh token and the line for the tokens file; with
//! `--tokens-file PATH` it adds that line to the file itself and prints only
//! the token. `lab-server manpage DIR` (hidden) writes the man pages.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lab_server::auth::{self, Authenticator};
use lab_server::core::clock::TokioClock;
use lab_server::core::{Core, CoreConfig, error_chain};
use lab_server::grpc::{self, Api};
use lab_server::health::Rules;
use lab_server::inventory::Inventory;
use lab_server::projects::Policy;
use lab_server::racks::{ForwardLimits, RackRegistry};
use lab_server::store::Store;
use lab_server::store::etcd::election::Election;
use lab_server::store::etcd::{EtcdConfig, EtcdStore};
use lab_server::store::redb::RedbStore;
use lab_server::types::{Caller, Principal, Role};
use lab_server::webhooks::{SharedWebhooks, Webhooks};
use lab_types::Secret;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "lab-server",
    version,
    about = "The lab's control plane: inventory, leases, gRPC API"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Address to serve gRPC on.
    #[arg(long, env = "LAB_LISTEN", default_value = "127.0.0.1:7621")]
    listen: SocketAddr,
    /// Address of the web port: /metrics and the dashboard (TLS as the API).
    #[arg(long, env = "LAB_WEB_LISTEN", default_value = "127.0.0.1:7622")]
    web_listen: SocketAddr,
    /// Connections the web port keeps open at once (more are refused).
    #[arg(long, env = "LAB_WEB_MAX_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    web_max_connections: u32,
    /// The inventory file (re-read on SIGHUP and by `lab inventory reload`).
    #[arg(long, env = "LAB_INVENTORY", default_value = "inventory.toml")]
    inventory: PathBuf,
    /// Directory of the durable store (`lab.redb`).
    #[arg(long, env = "LAB_DATA_DIR", default_value = ".lab-data")]
    data_dir: PathBuf,
    /// Where the state lives: `redb` (one server, in --data-dir) or `etcd`
    /// (replicas on several sites; docs/multi-site.md).
    #[arg(long, env = "LAB_STORE", value_enum, default_value = "redb")]
    store: StoreKind,
    /// etcd client URLs (`http://` or `https://`), comma-separated.
    #[arg(
        long,
        env = "LAB_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL[,URL...]"
    )]
    etcd_endpoints: Vec<String>,
    /// Every key of the lab in etcd is under this prefix.
    #[arg(long, env = "LAB_ETCD_PREFIX", default_value = "/lab/")]
    etcd_prefix: String,
    /// CA certificate (PEM) of https:// etcd endpoints (else the system's roots).
    #[arg(long, env = "LAB_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's --client-cert-auth; needs --etcd-key.
    #[arg(long, env = "LAB_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "LAB_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user; its password comes from --etcd-password-file or the
    /// environment variable LAB_ETCD_PASSWORD, never the command line.
    #[arg(long, env = "LAB_ETCD_USER")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (trailing newlines removed).
    #[arg(long, env = "LAB_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// With --store etcd: the URL clients are sent to while this server
    /// leads (default: http(s)://<the --listen address>).
    #[arg(long, env = "LAB_ADVERTISE", value_name = "URL")]
    advertise: Option<String>,
    /// Most operations in one etcd transaction; must not exceed etcd's
    /// --max-txn-ops (raise that: docs/multi-site.md).
    #[arg(long, env = "LAB_ETCD_MAX_TXN_OPS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(16..))]
    etcd_max_txn_ops: u32,
    /// Tokens file mapping token digests to principals and roles.
    #[arg(long, env = "LAB_TOKENS")]
    tokens: Option<PathBuf>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "LAB_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LAB_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// DEVELOPMENT ONLY: accept every caller as an operator named by its token.
    #[arg(long, env = "LAB_DEV_INSECURE_NO_AUTH", conflicts_with = "tokens")]
    dev_insecure_no_auth: bool,
    /// TTL of lease requests that name none.
    #[arg(long, env = "LAB_DEFAULT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    default_ttl: Duration,
    /// Longest TTL a request or renewal may ask for.
    #[arg(long, env = "LAB_MAX_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
    /// Hard cap on a lease's life from its grant, renewals included.
    #[arg(long, env = "LAB_MAX_LIFETIME", default_value = "7days", value_parser = humantime::parse_duration)]
    max_lifetime: Duration,
    /// Forwards (`lab forward`, `lab ssh`) open at once per lease.
    #[arg(long, env = "LAB_FORWARDS_PER_LEASE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    forwards_per_lease: u16,
    /// A forward with no bytes either way for this long is closed.
    #[arg(long, env = "LAB_FORWARD_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    forward_idle_timeout: Duration,
    /// Highest lease priority roles ci and developer may ask for (operators: any).
    #[arg(
        long,
        env = "LAB_MAX_USER_PRIORITY",
        default_value_t = 10,
        allow_negative_numbers = true
    )]
    max_user_priority: i32,
    /// Most requests one principal may have waiting in the queue at once.
    #[arg(long, env = "LAB_MAX_WAITING_PER_PRINCIPAL", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_waiting_per_principal: u32,
    /// How long a waiting request keeps its place after a restart for its
    /// client to resume it (by request id) before it is withdrawn.
    #[arg(long, env = "LAB_REATTACH_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    reattach_grace: Duration,
    /// Ended leases and events older than this are removed from the store
    /// (archive the log first: `lab --json events`).
    #[arg(long, env = "LAB_RETENTION", default_value = "90days", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Signature rules that attribute provisioning failures to the host, the
    /// job or the lab (tried before the shipped ones; see
    /// docs/operations.md, "Failure attribution").
    #[arg(long, env = "LAB_FAILURE_RULES")]
    failure_rules: Option<PathBuf>,
    /// This many provisioning failures attributed to a host, or this many
    /// failed health checks, within --quarantine-window quarantine it until
    /// an operator releases it (fewer failures make it suspect; one failed
    /// check quarantines it until a check passes).
    #[arg(long, env = "LAB_QUARANTINE_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    quarantine_after: u32,
    #[arg(long, env = "LAB_QUARANTINE_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    quarantine_window: Duration,
    /// A health check (profile health-check, held by lab-health) fails when
    /// its host is not READY within this long.
    #[arg(long, env = "LAB_HEALTH_CHECK_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    health_check_timeout: Duration,
    /// Check a host after every N leases (0: never).
    #[arg(long, env = "LAB_HEALTH_CHECK_EVERY", default_value_t = 0)]
    health_check_every: u32,
    /// Check a host that has been free this long ("off": never).
    #[arg(long, env = "LAB_HEALTH_CHECK_IDLE", default_value = "off", value_parser = parse_off_duration)]
    health_check_idle: OffDuration,
    /// Webhooks: where events are POSTed, signed (re-read on SIGHUP; see
    /// docs/operations.md, "Webhooks").
    #[arg(long, env = "LAB_WEBHOOKS")]
    webhooks: Option<PathBuf>,
    /// Most webhook deliveries the outbox keeps (the oldest dropped beyond).
    #[arg(long, env = "LAB_WEBHOOK_OUTBOX_MAX", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    webhook_outbox_max: u64,
    /// Projects, fair shares and quotas (re-read on SIGHUP; see
    /// docs/leases.md, "Projects and fair share"). Without it everyone is
    /// in project `default`.
    #[arg(long, env = "LAB_POLICY")]
    policy: Option<PathBuf>,
    /// A preemptible lease ends this long after the notice that a request
    /// which is not needs its hosts (LEASE_PREEMPTED).
    #[arg(long, env = "LAB_PREEMPT_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    preempt_grace: Duration,
    /// A LEASE_EXPIRING event this long before a lease expires (0: none).
    #[arg(long, env = "LAB_EXPIRY_WARNING", default_value = "10m", value_parser = humantime::parse_duration)]
    expiry_warning: Duration,
}

/// The store backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Redb,
    Etcd,
}

/// A duration, or `off`.
#[derive(Debug, Clone, Copy)]
struct OffDuration(Option<Duration>);

fn parse_off_duration(s: &str) -> Result<OffDuration, humantime::DurationError> {
    if s == "off" || s == "0" {
        return Ok(OffDuration(None));
    }
    humantime::parse_duration(s).map(|d| OffDuration(Some(d)))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Token management.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Write the man pages (lab-server.1, lab-server-token-new.1, ...) into DIR.
    #[command(hide = true)]
    Manpage { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Print a new random token and the tokens-file entry for it.
    ///
    /// With --tokens-file, add the entry to that file instead (its mode,
    /// owner and group kept; replaced atomically; a principal that already
    /// has a token is refused) and print only the token, once, on stdout.
    /// Then reload the server (SIGHUP, `systemctl reload lab-server`).
    New {
        /// Who the token is for: letters, digits, '-', '_', '.' (not "server").
        #[arg(long)]
        principal: String,
        /// ci, developer, operator or agent.
        #[arg(long)]
        role: Role,
        /// Add the entry to this tokens file (created with mode 0600 if missing).
        #[arg(long, value_name = "PATH")]
        tokens_file: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Cmd::Token {
            command:
                TokenCmd::New {
                    principal,
                    role,
                    tokens_file,
                },
        }) => return token_new(principal, *role, tokens_file.as_deref()),
        Some(Cmd::Manpage { dir }) => {
            use clap::CommandFactory;
            std::fs::create_dir_all(dir)?;
            return clap_mangen::generate_to(Args::command(), dir)
                .with_context(|| format!("cannot write man pages to {}", dir.display()));
        }
        None => {}
    }
    lab_client::log::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args));
    if result.is_err() {
        // Failing, do not wait for blocking tasks: a leader that lost etcd
        // may have a commit that retries for 30 s and can never land (its
        // fence is gone); what was acknowledged is already durable.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    }
    result
}

/// The store `--store` names: redb in --data-dir, or etcd.
async fn open_store(args: &Args) -> Result<(Arc<dyn Store>, Option<Arc<EtcdStore>>)> {
    match args.store {
        StoreKind::Redb => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
            let db_path = args.data_dir.join("lab.redb");
            let store = RedbStore::open(&db_path)
                .map_err(|e| anyhow::anyhow!("{}: {}", db_path.display(), error_chain(&e)))?;
            Ok((Arc::new(store), None))
        }
        StoreKind::Etcd => {
            let config = etcd_config(args)?;
            let endpoints = config.endpoints.join(",");
            info!(endpoints = %endpoints, prefix = %config.prefix, user = ?config.user, "connecting to etcd");
            // Connecting waits for an answer: off the async workers.
            let store = tokio::task::spawn_blocking(move || EtcdStore::connect(config))
                .await?
                .map_err(|e| anyhow::anyhow!("etcd {endpoints}: {}", error_chain(&e)))?;
            let store = Arc::new(store);
            Ok((store.clone(), Some(store)))
        }
    }
}

/// The etcd options as a client configuration; the password from its file
/// or LAB_ETCD_PASSWORD.
fn etcd_config(args: &Args) -> Result<EtcdConfig> {
    if args.etcd_endpoints.is_empty() {
        bail!("--store etcd needs --etcd-endpoints URL[,URL...]");
    }
    for url in &args.etcd_endpoints {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--etcd-endpoints: {url} is not an http:// or https:// URL");
        }
    }
    if !args.etcd_prefix.starts_with('/') || !args.etcd_prefix.ends_with('/') {
        bail!("--etcd-prefix must start and end with '/' (like /lab/)");
    }
    let mut config = EtcdConfig::new(args.etcd_endpoints.clone());
    config.prefix = args.etcd_prefix.clone();
    config.ca = args.etcd_ca.clone();
    config.cert = args.etcd_cert.clone();
    config.key = args.etcd_key.clone();
    config.max_txn_ops = args.etcd_max_txn_ops as usize;
    if let Some(user) = &args.etcd_user {
        let password = match (
            &args.etcd_password_file,
            std::env::var_os("LAB_ETCD_PASSWORD"),
        ) {
            (Some(path), _) => {
                let mut p = Secret::new(
                    std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                );
                p.trim_trailing_newlines();
                p
            }
            (None, Some(v)) => Secret::new(v.into_encoded_bytes()),
            (None, None) => bail!(
                "--etcd-user needs a password: --etcd-password-file PATH or LAB_ETCD_PASSWORD"
            ),
        };
        config.user = Some(user.clone());
        config.password = Some(password);
    }
    Ok(config)
}

/// `token new`: a fresh token, printed with its entry, or added to the
/// tokens file with only the token printed.
fn token_new(principal: &str, role: Role, tokens_file: Option<&std::path::Path>) -> Result<()> {
    let principal = Principal::new(principal.to_owned())?;
    let token = auth::new_token();
    match tokens_file {
        None => {
            println!("# give this token to {principal}; store only the digest below");
            println!("# token: {token}");
            print!("{}", auth::entry(&principal, role, &token));
        }
        Some(path) => {
            auth::append_token(path, &principal, role, &token)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            eprintln!(
                "added a token for {principal} (role {role}) to {}; give it to {principal} (it is not stored) and reload lab-server (systemctl reload lab-server, or SIGHUP)",
                path.display()
            );
            println!("{token}");
        }
    }
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    for addr in [args.listen, args.web_listen] {
        if args.dev_insecure_no_auth && !addr.ip().is_loopback() {
            bail!(
                "--dev-insecure-no-auth refuses to listen on {addr}: in development mode every caller is an operator, so only a loopback address (127.0.0.1, ::1) is allowed",
            );
        }
    }
    if args.retention.is_zero() {
        bail!("--retention must be more than 0");
    }
    let auth = if args.dev_insecure_no_auth {
        for _ in 0..3 {
            warn!(
                "DEVELOPMENT MODE: no authentication. Every caller is an operator named by its token. Never expose this server."
            );
        }
        Authenticator::InsecureDev
    } else {
        let path = args
            .tokens
            .as_ref()
            .context("--tokens is required (or --dev-insecure-no-auth)")?;
        Authenticator::load(path).map_err(|e| anyhow::anyhow!(error_chain(&e)))?
    };
    let inventory =
        Inventory::load(&args.inventory).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let (store, etcd) = open_store(&args).await?;
    if args.default_ttl > args.max_ttl {
        bail!("--default-ttl must not exceed --max-ttl");
    }
    if args.max_ttl > args.max_lifetime {
        bail!("--max-ttl must not exceed --max-lifetime");
    }
    let web_tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            lab_client::web::WebTls::from_pem_files(cert, key)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))?,
        ),
        _ => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p).with_context(|| format!("cannot read TLS {what} {}", p.display()))
            };
            let identity =
                tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
            Some(tonic::transport::ServerTlsConfig::new().identity(identity))
        }
        _ => {
            if !args.listen.ip().is_loopback() {
                warn!(listen = %args.listen, "serving without TLS on a non-loopback address: tokens and BMC passwords (sent to agents) cross the network in clear text; use --tls-cert/--tls-key");
            }
            None
        }
    };
    let scheme = if tls.is_some() { "TLS" } else { "plaintext" };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let data = match args.store {
        StoreKind::Redb => args.data_dir.join("lab.redb").display().to_string(),
        StoreKind::Etcd => format!("etcd {}{}", args.etcd_endpoints.join(","), args.etcd_prefix),
    };
    let web_listener = tokio::net::TcpListener::bind(args.web_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--web-listen)", args.web_listen))?;
    let web_addr = web_listener.local_addr()?;
    let web_scheme = if web_tls.is_some() { "https" } else { "http" };
    // Said once the server answers: with redb when the core has started;
    // with etcd at once (a standby answers too).
    let announce = || {
        info!(%addr, %data, inventory = %args.inventory.display(), transport = scheme, "lab-server listening");
        info!(addr = %web_addr, transport = scheme, "web port listening (/metrics, dashboard)");
        // Scripts read the first line only; a closed stdout is no error.
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "lab-server listening on {addr}");
        let _ = writeln!(
            out,
            "lab-server web listening on {web_addr} ({web_scheme}://{web_addr}/)"
        );
        let _ = out.flush();
    };
    // With etcd: a standby until elected (every call answered UNAVAILABLE
    // with the leader's address), then the leader, its writes fenced.
    let mut listener = listener;
    let mut web_listener = web_listener;
    let mut leadership = None;
    if let Some(etcd) = &etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let me = args
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}"));
        let election = Election::new(etcd.client(), etcd.prefix(), me.clone());
        let (leader_tx, leader_rx) = tokio::sync::watch::channel(None);
        let shared = listener.into_std()?;
        let standby_listener = tokio::net::TcpListener::from_std(shared.try_clone()?)?;
        listener = tokio::net::TcpListener::from_std(shared)?;
        let web_shared = web_listener.into_std()?;
        let standby_web_listener = tokio::net::TcpListener::from_std(web_shared.try_clone()?)?;
        web_listener = tokio::net::TcpListener::from_std(web_shared)?;
        let (standby_stop, standby_stopped) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let standby_web = tokio::spawn(lab_client::web::serve(
            standby_web_listener,
            lab_server::web::standby::standby_router(leader_rx.clone()),
            web_tls.clone(),
            lab_client::web::WebLimits {
                max_connections: args.web_max_connections as usize,
                ..Default::default()
            },
            stopped(standby_stopped.clone()),
            Duration::from_millis(200),
        ));
        let standby = tokio::spawn(grpc::standby::serve_standby(
            standby_listener,
            tls.clone(),
            leader_rx,
            stopped(standby_stopped),
        ));
        announce();
        info!(advertise = %me, "standby: campaigning for the lead (etcd election)");
        let won = tokio::select! {
            won = election.until_leader(&leader_tx) => won,
            () = shutdown_signal() => {
                let _ = standby_stop.send(true);
                let _ = standby.await;
                let _ = standby_web.await;
                info!("lab-server stopped (standby)");
                return Ok(());
            }
        };
        let _ = standby_stop.send(true);
        let _ = standby.await;
        let _ = standby_web.await;
        info!(
            advertise = %me,
            fence = won.fence.create_revision,
            "elected the leader: loading the state from etcd"
        );
        etcd.set_fence(Some(won.fence.clone()));
        leadership = Some(won);
    }
    let mut config = CoreConfig::new(args.inventory.clone());
    config.max_ttl = args.max_ttl;
    config.max_lifetime = args.max_lifetime;
    config.max_user_priority = args.max_user_priority;
    config.max_waiting_per_principal = args.max_waiting_per_principal as usize;
    config.reattach_grace = args.reattach_grace;
    config.retention = args.retention;
    config.quarantine_after = args.quarantine_after as usize;
    config.quarantine_window = args.quarantine_window;
    config.health_check_timeout = args.health_check_timeout;
    config.health_check_every = args.health_check_every;
    config.health_check_idle = args.health_check_idle.0;
    config.expiry_warning = args.expiry_warning;
    config.preempt_grace = args.preempt_grace;
    let webhooks: SharedWebhooks = match &args.webhooks {
        Some(path) => {
            let w = Webhooks::load(path).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            info!(path = %path.display(), hooks = w.hooks.len(), "webhooks loaded");
            Arc::new(w)
        }
        None => SharedWebhooks::default(),
    };
    config.webhooks = webhooks.clone();
    if let Some(path) = &args.policy {
        let p = Policy::load(path).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        info!(path = %path.display(), projects = p.projects().len(), "policy loaded");
        config.policy = Arc::new(p);
    }
    // The reclaim step goes through the rack agents (hosts of racks without
    // an agent are reclaimed at once).
    let clock = Arc::new(TokioClock::new());
    let failure_rules = match &args.failure_rules {
        Some(path) => {
            let rules = Rules::load(path).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            info!(
                path = %path.display(),
                rules = rules.configured(),
                "failure attribution rules loaded"
            );
            rules
        }
        None => Rules::default(),
    };
    let racks = RackRegistry::with_failure_rules(clock.clone(), failure_rules);
    racks.set_forward_limits(ForwardLimits {
        per_lease: usize::from(args.forwards_per_lease),
        idle_timeout: args.forward_idle_timeout,
    });
    let (core, actor) = Core::start(config, store, inventory, racks.reclaimer(), clock)
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let (webhooks_tx, webhooks_rx) = tokio::sync::watch::channel(webhooks);
    lab_server::webhooks::deliver::spawn(
        core.clone(),
        webhooks_rx,
        lab_server::webhooks::deliver::DeliveryConfig {
            outbox_max: args.webhook_outbox_max,
            ..Default::default()
        },
    );

    // SIGHUP: reload the inventory, the tokens file and the webhooks; keep
    // the last good one of each on error.
    let auth = Arc::new(std::sync::RwLock::new(auth));
    let hup_core = core.clone();
    let hup_auth = auth.clone();
    let webhooks_path = args.webhooks.clone();
    let policy_path = args.policy.clone();
    let tokens_path = args.tokens.clone().filter(|_| !args.dev_insecure_no_auth);
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        let server = Caller {
            principal: Principal::server(),
            role: Role::Operator,
        };
        while hup.recv().await.is_some() {
            if let Some(path) = &tokens_path {
                match Authenticator::load(path) {
                    Ok(a) => {
                        *hup_auth.write().unwrap_or_else(|p| p.into_inner()) = a;
                        info!(tokens = %path.display(), "tokens reloaded on SIGHUP");
                    }
                    Err(e) => {
                        error!(error = %error_chain(&e), "tokens reload failed; keeping the last good tokens")
                    }
                }
            }
            if let Some(path) = &webhooks_path {
                match Webhooks::load(path) {
                    Ok(w) => {
                        let w = Arc::new(w);
                        let hooks = w.hooks.len();
                        match hup_core.set_webhooks(w.clone()).await {
                            Ok(()) => {
                                webhooks_tx.send_replace(w);
                                info!(webhooks = %path.display(), hooks, "webhooks reloaded on SIGHUP");
                            }
                            Err(e) => {
                                error!(error = %error_chain(&e), "webhooks reload failed; keeping the last good webhooks")
                            }
                        }
                    }
                    Err(e) => {
                        error!(error = %error_chain(&e), "webhooks reload failed; keeping the last good webhooks")
                    }
                }
            }
            if let Some(path) = &policy_path {
                let loaded = Policy::load(path).map_err(|e| error_chain(&e));
                match loaded {
                    Ok(p) => match hup_core.set_policy(Arc::new(p)).await {
                        Ok(()) => info!(policy = %path.display(), "policy reloaded on SIGHUP"),
                        Err(e) => {
                            error!(error = %error_chain(&e), "policy reload failed; keeping the last good policy")
                        }
                    },
                    Err(e) => {
                        error!(error = %e, "policy reload failed; keeping the last good policy")
                    }
                }
            }
            match hup_core.reload_inventory(&server).await {
                Ok(s) => info!(
                    hosts = s.hosts,
                    added = s.added,
                    removed = s.removed,
                    "inventory reloaded on SIGHUP"
                ),
                Err(e) => {
                    error!(error = %error_chain(&e), "inventory reload failed; keeping the last good inventory")
                }
            }
        }
    });

    if etcd.is_none() {
        announce();
    }
    let api = Api::with_racks(core, auth, args.default_ttl, racks);
    let (web_stop_tx, web_stop_rx) = tokio::sync::watch::channel(false);
    let web_state =
        lab_server::web::WebState::new(api.clone(), web_scheme == "https", web_stop_rx.clone());
    let web_limits = lab_client::web::WebLimits {
        max_connections: args.web_max_connections as usize,
        ..Default::default()
    };
    let mut web_stop_rx = web_stop_rx;
    let web = tokio::spawn(lab_client::web::serve(
        web_listener,
        lab_server::web::router(web_state),
        web_tls,
        web_limits,
        async move {
            let _ = web_stop_rx.wait_for(|s| *s).await;
        },
        SHUTDOWN_GRACE,
    ));
    // Graceful shutdown waits for open streams (waiting acquires, event
    // watchers) only so long: every acknowledged change is already durable,
    // and waiting clients see the connection end and may retry.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let serve = grpc::serve_tls(listener, api, tls, async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
        let _ = web_stop_tx.send(true);
    });
    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = serve => r.map_err(|e| anyhow::anyhow!("gRPC server failed: {e}"))?,
        () = lost => {
            error!("lost the lead (the etcd election lease is gone): stopping; start again as a standby");
            web.abort();
            drop(actor);
            bail!("lost the etcd leadership");
        }
        () = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!(grace = ?SHUTDOWN_GRACE, "open streams did not end in time; closing them"),
    }
    web.abort();
    drop(actor);
    if let Some(l) = leadership {
        // A standby takes over at once rather than after the lease's TTL.
        l.resign().await;
    }
    info!("lab-server stopped");
    Ok(())
}

/// How long a shutdown waits for open streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}
