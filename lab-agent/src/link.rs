//! The agent's one connection to lab-server: `AgentService.Attach`, a
//! bidirectional stream. The agent says hello with its rack, receives the
//! rack's desired state (then updates) and applies it to the [`Rack`],
//! answers commands (power, reclaim, console sessions, console log reads,
//! forwards to a host's TCP port) by id, and reports each host's
//! reachability and provisioning. When the
//! stream breaks it reconnects with backoff ([`retry_delay`]: 0.2 s doubling
//! to 5 s) and
//! gets the full state again; reports are sent again after every attach.
//! `server` may name several lab-server replicas (comma-separated; lab-server
//! on etcd): after a failure the agent attaches to the leader a standby
//! named in its `lab-leader` metadata, else to the next in the list
//! ([`next_server`]).
//! The endpoint (TLS, timeouts, keepalive) and the bearer-token interceptor
//! come from `lab-client`, as for the CLI.
//!
//! [`convert`] turns the wire messages into the rack's domain types and
//! back; nothing past it sees a protobuf type. [`forward`] carries a
//! forward's bytes with its credit window; [`console`] serves live console
//! sessions and streams console log reads.
//!
//! A session (console, log read, forward) is registered under its command's
//! id as soon as the command arrives, before it is opened, and a
//! `close_session` is handled in the order it arrives: a session the server
//! closed while it was being opened (its lease ended meanwhile) never
//! starts.

pub mod console;
pub mod convert;
pub mod forward;

pub use console::LogReadLimits;

use crate::console::Writer;
use crate::rack::{CommandError, ErrorKind, Rack};
use lab_client::endpoint::is_https;
use lab_client::{BearerAuth, BearerToken, ChannelSettings, EndpointError, ServerEndpoint};
use lab_proto::v1 as pb;
use lab_proto::v1::agent_service_client::AgentServiceClient;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How the agent reaches the server.
#[derive(Clone)]
pub struct LinkConfig {
    pub server: String,
    pub token: Option<String>,
    pub rack: String,
    /// CA certificate (PEM) for an https:// server; `None`: system roots.
    pub ca: Option<std::path::PathBuf>,
    /// Console log reads streaming at once.
    pub log_reads: LogReadLimits,
}

/// Everything but the token.
impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("rack", &self.rack)
            .field("ca", &self.ca)
            .field("log_reads", &self.log_reads)
            .finish()
    }
}

/// The link's connection: a long-lived stream, watched by HTTP/2 PINGs even
/// while idle so that a dead server, or one cut off with its site (no RST
/// reaches the agent), is noticed within 7 s: until then the rack's hosts
/// are unreachable to a new leader. One PING every 3 s on one connection
/// per rack costs nothing.
const CHANNEL: ChannelSettings = ChannelSettings {
    connect_timeout: Duration::from_secs(5),
    keep_alive_interval: Duration::from_secs(3),
    keep_alive_timeout: Duration::from_secs(4),
    keep_alive_while_idle: true,
};

/// How long to wait before the next attach after `failures` failed ones in
/// a row, over a list of `servers`: 0.2 s, doubling after each round of the
/// whole list, at most 5 s. With several replicas, each is tried at the
/// short delay before the wait grows, so the leader's loss costs one quick
/// round rather than a back-off grown on the dead one.
pub fn retry_delay(failures: u32, servers: usize) -> Duration {
    let rounds = failures / (servers.max(1) as u32);
    Duration::from_millis(200)
        .saturating_mul(1 << rounds.min(5))
        .min(MAX_RETRY_DELAY)
}

/// The longest wait between attaches.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Why an attach ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("bad server address {0:?}")]
    BadAddress(String),
    #[error("TLS set-up for {server}")]
    Tls {
        server: String,
        #[source]
        source: EndpointError,
    },
    #[error("the bearer token cannot be sent")]
    Token(#[source] lab_client::InvalidToken),
    #[error("cannot connect to {server}")]
    Connect {
        server: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the server refused the attach")]
    Refused(#[source] tonic::Status),
    #[error("the link broke")]
    Broken(#[source] tonic::Status),
}

/// A console session, log read or forward; registered (empty) when its
/// command arrives, filled once it is open.
#[derive(Default)]
struct Session {
    /// A console session's input (when opened for writing).
    writer: Option<Arc<Writer>>,
    /// A forward's input and credit.
    forward: Option<forward::ForwardInput>,
    /// A log read's credit.
    log_credit: Option<Arc<Semaphore>>,
    /// `None` while it is being opened.
    task: Option<JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

type Sessions = Arc<Mutex<HashMap<u64, Session>>>;

fn lock(sessions: &Sessions) -> std::sync::MutexGuard<'_, HashMap<u64, Session>> {
    sessions.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fills in session `id` now that it is open, unless the server closed it
/// meanwhile (then it is stopped at once).
fn install(sessions: &Sessions, id: u64, session: Session) -> Result<(), CommandError> {
    match lock(sessions).get_mut(&id) {
        Some(s) => {
            *s = session;
            Ok(())
        }
        // Dropping `session` stops its task.
        None => Err(CommandError::new(
            ErrorKind::FailedPrecondition,
            "the session was closed while it was being opened",
        )),
    }
}

/// The servers of `server` (comma-separated), in order.
pub fn servers(server: &str) -> Vec<String> {
    let list: Vec<String> = server
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        vec![server.to_owned()]
    } else {
        list
    }
}

/// Which of `servers` to attach to after `err` on `servers[now]`: the
/// leader a standby named (`lab-leader`), else the next one.
pub fn next_server(servers: &[String], now: usize, err: &LinkError) -> usize {
    let named = match err {
        LinkError::Refused(s) | LinkError::Broken(s) => s
            .metadata()
            .get("lab-leader")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| {
                servers
                    .iter()
                    .position(|s| s.trim_end_matches('/') == l.trim_end_matches('/'))
            }),
        _ => None,
    };
    named
        .filter(|&i| i != now)
        .unwrap_or((now + 1) % servers.len().max(1))
}

/// Keeps the rack attached to the server, forever.
pub async fn run(cfg: LinkConfig, rack: Rack) {
    let mut failures: u32 = 0;
    let log_reads = console::LogReads::new(cfg.log_reads);
    let servers = servers(&cfg.server);
    let mut now = 0;
    loop {
        let t0 = tokio::time::Instant::now();
        let mut one = cfg.clone();
        one.server = servers[now].clone();
        match attach_once(&one, &rack, &log_reads).await {
            Ok(()) => info!(server = %one.server, "the server closed the link"),
            Err(e) => {
                warn!(server = %one.server, error = %crate::error_chain(&e), "link to lab-server lost");
                if servers.len() > 1 {
                    now = next_server(&servers, now, &e);
                }
            }
        }
        rack.set_outbound(None);
        if t0.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        let delay = retry_delay(failures, servers.len());
        failures = failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

async fn attach_once(
    cfg: &LinkConfig,
    rack: &Rack,
    log_reads: &console::LogReads,
) -> Result<(), LinkError> {
    // A CA (LAB_CA may be set for the CLI) is not used for an http:// server.
    let ca = cfg.ca.as_deref().filter(|_| is_https(&cfg.server));
    let server = ServerEndpoint::new(&cfg.server, ca, &CHANNEL).map_err(|e| match e {
        EndpointError::Url(_) => LinkError::BadAddress(cfg.server.clone()),
        source => LinkError::Tls {
            server: cfg.server.clone(),
            source,
        },
    })?;
    let token = match &cfg.token {
        Some(t) => Some(BearerToken::new(t).map_err(LinkError::Token)?),
        None => None,
    };
    let channel = server
        .connect()
        .await
        .map_err(|source| LinkError::Connect {
            server: cfg.server.clone(),
            source,
        })?;
    let mut client = AgentServiceClient::with_interceptor(channel, BearerAuth::new(token));
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    tx.send(pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::AgentHello {
            rack: cfg.rack.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        })),
    })
    .await
    .expect("receiver held");
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(LinkError::Refused)?
        .into_inner();
    let sessions: Sessions = Arc::default();
    let mut first = true;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => return Err(LinkError::Broken(e)),
        };
        match msg.msg {
            Some(pb::server_message::Msg::Rack(state)) => {
                let n = state.hosts.len();
                rack.apply_rack(convert::rack_hosts(state));
                rack.set_outbound(Some(convert::report_sink(tx.clone())));
                rack.resend_reports();
                if first {
                    info!(hosts = n, "attached to lab-server");
                    // For scripts and tests that wait for it; nobody may be
                    // reading any more (println! would panic on EPIPE).
                    let _ = writeln!(
                        std::io::stdout(),
                        "lab-agent attached to {} ({n} hosts)",
                        cfg.server
                    );
                    first = false;
                }
            }
            Some(pb::server_message::Msg::Host(h)) => match convert::host_spec(h) {
                Ok(spec) => rack.apply_host(spec),
                Err(e) => warn!(error = %crate::error_chain(&e), "desired host ignored"),
            },
            Some(pb::server_message::Msg::Command(c)) => {
                use pb::agent_command::Cmd;
                // Sessions are registered, and closed, in the order their
                // commands arrive (not when a spawned task gets to them).
                match c.cmd {
                    Some(Cmd::CloseSession(_)) => {
                        lock(&sessions).remove(&c.id);
                        continue;
                    }
                    Some(Cmd::Console(_) | Cmd::Log(_) | Cmd::Forward(_)) => {
                        lock(&sessions).insert(c.id, Session::default());
                    }
                    _ => {}
                }
                let rack = rack.clone();
                let tx = tx.clone();
                let sessions = sessions.clone();
                let log_reads = log_reads.clone();
                tokio::spawn(async move { command(rack, c, tx, sessions, log_reads).await });
            }
            Some(pb::server_message::Msg::Input(i)) => {
                let (writer, fwd, log_credit) = lock(&sessions)
                    .get(&i.id)
                    .map(|s| (s.writer.clone(), s.forward.clone(), s.log_credit.clone()))
                    .unwrap_or_default();
                if let Some(credit) = log_credit {
                    console::add_credit(&credit, i.credit);
                } else if let Some(f) = fwd {
                    // Never waits: the window bounds what is queued.
                    let id = i.id;
                    if let Err(e) = f.take(i) {
                        warn!(session = id, error = %e, "closing the forward");
                        lock(&sessions).remove(&id);
                        let _ = tx.send(data(id, Vec::new(), &e.to_string(), true)).await;
                    }
                } else if let Some(w) = writer {
                    let r = if i.send_break {
                        w.send_break().await
                    } else {
                        w.write(i.input.into()).await
                    };
                    if let Err(e) = r {
                        debug!(session = i.id, error = %e, "console input refused");
                        let _ = tx
                            .send(data(
                                i.id,
                                Vec::new(),
                                &format!("input refused: {e}"),
                                false,
                            ))
                            .await;
                    }
                }
            }
            None => {}
        }
    }
}

fn data(id: u64, output: Vec<u8>, notice: &str, end: bool) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Data(pb::SessionData {
            id,
            output,
            notice: notice.to_owned(),
            end,
            credit: 0,
        })),
    }
}

async fn command(
    rack: Rack,
    c: pb::AgentCommand,
    tx: mpsc::Sender<pb::AgentMessage>,
    sessions: Sessions,
    log_reads: console::LogReads,
) {
    let id = c.id;
    let mut reply = pb::CommandReply {
        id,
        ..Default::default()
    };
    let result: Result<(), CommandError> = match c.cmd {
        Some(pb::agent_command::Cmd::Power(a)) => rack
            .power(&c.host, convert::power_action(a))
            .await
            .map(|on| reply.on = on),
        Some(pb::agent_command::Cmd::Reclaim(r)) => match convert::reclaim(r) {
            Ok((lease, profile)) => rack.reclaim(&c.host, lease, profile).await,
            Err(e) => Err(e),
        },
        Some(pb::agent_command::Cmd::Console(open)) => {
            console::open_console(&rack, id, &c.host, open, tx.clone())
                .await
                .and_then(|o| install(&sessions, id, opened(o)))
        }
        Some(pb::agent_command::Cmd::Log(l)) => {
            console::read_log(&rack, &log_reads, id, &c.host, l, tx.clone())
                .await
                .and_then(|o| install(&sessions, id, opened(o)))
        }
        Some(pb::agent_command::Cmd::Forward(f)) => open_forward(&rack, id, &c.host, f, tx.clone())
            .await
            .and_then(|(input, task)| {
                install(
                    &sessions,
                    id,
                    Session {
                        writer: None,
                        forward: Some(input),
                        log_credit: None,
                        task: Some(task),
                    },
                )
            }),
        // Handled as it arrived.
        Some(pb::agent_command::Cmd::CloseSession(_)) => return,
        None => Err(CommandError::new(
            ErrorKind::Unimplemented,
            "unknown command",
        )),
    };
    if let Err(e) = result {
        // A session that did not open is no session.
        lock(&sessions).remove(&id);
        reply.error = e.message;
        reply.code = convert::error_kind(e.kind) as i32;
    }
    let _ = tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Reply(reply)),
        })
        .await;
}

fn opened(o: console::Opened) -> Session {
    Session {
        writer: o.writer,
        forward: None,
        log_credit: o.credit,
        task: Some(o.task),
    }
}

async fn open_forward(
    rack: &Rack,
    id: u64,
    host: &str,
    open: pb::ForwardOpen,
    tx: mpsc::Sender<pb::AgentMessage>,
) -> Result<(forward::ForwardInput, JoinHandle<()>), CommandError> {
    let port = u16::try_from(open.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            CommandError::new(
                ErrorKind::InvalidArgument,
                format!("{} is not a TCP port", open.port),
            )
        })?;
    let target = rack.forward_target(host, port)?;
    let (input, task) = forward::open(host, target, id, tx).await?;
    info!(host = %host, port, %target, session = id, "forward opened");
    Ok((input, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_servers_and_which_is_next() {
        let list = servers("http://a:1, http://b:2,http://c:3");
        assert_eq!(list, ["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(servers("http://a:1"), ["http://a:1"]);
        let unavailable = |leader: Option<&str>| {
            let mut s = tonic::Status::unavailable("standby");
            if let Some(l) = leader {
                s.metadata_mut().insert("lab-leader", l.parse().unwrap());
            }
            LinkError::Refused(s)
        };
        // No leader named: the next one, round the list.
        assert_eq!(next_server(&list, 0, &unavailable(None)), 1);
        assert_eq!(next_server(&list, 2, &unavailable(None)), 0);
        // A standby named the leader: straight to it.
        assert_eq!(next_server(&list, 0, &unavailable(Some("http://c:3"))), 2);
        // Named a server not in the list, or itself: the next one.
        assert_eq!(next_server(&list, 0, &unavailable(Some("http://z:9"))), 1);
        assert_eq!(next_server(&list, 1, &unavailable(Some("http://b:2/"))), 2);
    }

    #[test]
    fn retry_delay_grows_per_round_of_the_list() {
        let ms = |failures, servers| retry_delay(failures, servers).as_millis();
        // (failures in a row, servers in the list) -> wait in ms
        let table: &[(u32, usize, u128)] = &[
            (0, 1, 200),
            (1, 1, 400),
            (3, 1, 1600),
            (4, 1, 3200),
            (5, 1, 5000),
            (1000, 1, 5000),
            (0, 3, 200),
            (2, 3, 200),
            (3, 3, 400),
            (5, 3, 400),
            (6, 3, 800),
            (15, 3, 5000),
            (u32::MAX, 3, 5000),
            (0, 0, 200),
        ];
        for &(failures, servers, want) in table {
            assert_eq!(
                ms(failures, servers),
                want,
                "{failures} failures over {servers}"
            );
        }
    }
}
