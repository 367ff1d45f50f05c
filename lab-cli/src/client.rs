//! The connection to lab-server: what `--server`, `--ca` and `--token`
//! accept, and the four service clients over one lazy channel. The
//! endpoint (TLS, timeouts, keepalive) and the bearer-token interceptor
//! come from `lab-client`, shared with lab-agent.
//!
//! `--server` may name several replicas (comma-separated; lab-server on
//! etcd, docs/multi-site.md): [`Lab::find_leader`] picks the one that
//! leads before the first call, and [`Lab::failover`] moves to another
//! after UNAVAILABLE or a broken stream — to the one a standby named in
//! its `lab-leader` metadata, else the next in the list.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lab_client::{BearerAuth, BearerToken, ChannelSettings, EndpointError, ServerEndpoint};
use lab_proto::v1::admin_service_client::AdminServiceClient;
use lab_proto::v1::event_service_client::EventServiceClient;
use lab_proto::v1::host_service_client::HostServiceClient;
use lab_proto::v1::lease_service_client::LeaseServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7621";

/// How long to wait for the TCP connection before giving up (exit 7).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The CLI's connection: fail fast on connect; a lease request may wait for
/// hours, so notice a dead server.
const SETTINGS: ChannelSettings = ChannelSettings {
    connect_timeout: CONNECT_TIMEOUT,
    keep_alive_interval: Duration::from_secs(30),
    keep_alive_timeout: Duration::from_secs(10),
    keep_alive_while_idle: false,
};

/// A checked `--server` (one URL or several, comma-separated);
/// [`Server::endpoints`] adds `--ca`.
#[derive(Clone, Debug)]
pub struct Server {
    urls: Vec<String>,
    /// The URLs joined again (what a child `lab` is given).
    url: String,
}

impl Server {
    /// The URL, or the URLs comma-separated.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The endpoints. For an https:// server: trust the CA certificate
    /// (PEM) in `ca`, or the system's roots when there is none. An http://
    /// server with a CA given is refused (the CA would silently not be used).
    pub fn endpoints(&self, ca: Option<&Path>) -> Result<Vec<ServerEndpoint>, String> {
        self.urls
            .iter()
            .map(|url| {
                ServerEndpoint::new(url, ca, &SETTINGS).map_err(|e| match e {
                    EndpointError::CaWithoutTls { url } => {
                        format!("--ca/LAB_CA is set but the server {url} is not https://")
                    }
                    e => format!("{:#}", anyhow::Error::from(e)),
                })
            })
            .collect()
    }
}

/// clap value parser for `--server`: `http://host:port`, `https://host:port`
/// or `host:port` (http assumed), or several of them comma-separated (the
/// replicas of one lab). For https, [`Server::endpoints`] sets the trusted
/// roots.
pub fn parse_server(s: &str) -> Result<Server, String> {
    // An empty LAB_SERVER (as CI systems like to set) means the default.
    let s = if s.is_empty() { DEFAULT_SERVER } else { s };
    let urls = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(parse_one)
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err("no server URL".to_owned());
    }
    Ok(Server {
        url: urls.join(","),
        urls,
    })
}

fn parse_one(s: &str) -> Result<String, String> {
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err("the server URL must start with http:// or https://".to_owned());
    }
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| format!("not a URL: {e}"))?;
    if endpoint.uri().host().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    Ok(url)
}

/// `--token` / `LAB_TOKEN`: the bearer token, or none when the value was
/// empty. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Token(Option<BearerToken>, Option<lab_types::Secret>);

impl Token {
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The token as given, for the `LAB_TOKEN` of a child `lab` (`lab run`'s
    /// command, `lab ssh`'s proxy): in an environment variable, never on a
    /// command line that `ps` shows.
    pub fn expose(&self) -> Option<&str> {
        self.1
            .as_ref()
            .and_then(|s| std::str::from_utf8(s.expose()).ok())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// clap value parser for `--token` / `LAB_TOKEN`. An empty token (an empty
/// `LAB_TOKEN`, as CI systems like to set) means none.
pub fn parse_token(s: &str) -> Result<Token, String> {
    if s.is_empty() {
        return Ok(Token(None, None));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".to_owned());
    }
    let token = BearerToken::new(s).map_err(|e| e.to_string())?;
    Ok(Token(
        Some(token),
        Some(lab_types::Secret::from_bytes(s.as_bytes())),
    ))
}

/// The token in `path` (`--token-file`, `LAB_TOKEN_FILE`), surrounding
/// white space trimmed; the error names the file, never its content.
pub fn read_token_file(path: &std::path::Path) -> Result<Token, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    parse_token(text.trim()).map_err(|e| format!("the token file {}: {e}", path.display()))
}

pub type Svc = InterceptedService<Channel, BearerAuth>;

/// The metadata key in which a standby lab-server names the leader.
pub const LEADER_HEADER: &str = "lab-leader";

/// The server's clients. Nothing touches the network until the first call.
#[derive(Clone, Debug)]
pub struct Lab {
    /// Each server's URL and lazy channel.
    servers: Arc<Vec<(String, Channel)>>,
    /// The one calls go to.
    current: Arc<AtomicUsize>,
    auth: BearerAuth,
}

impl Lab {
    /// Must be called inside a tokio runtime (the channels spawn their
    /// workers). `endpoints` is not empty.
    pub fn connect_lazy(endpoints: &[ServerEndpoint], token: Option<Token>) -> Self {
        Lab {
            servers: Arc::new(
                endpoints
                    .iter()
                    .map(|e| (e.url().to_owned(), e.connect_lazy()))
                    .collect(),
            ),
            current: Arc::new(AtomicUsize::new(0)),
            auth: BearerAuth::new(token.and_then(|t| t.0)),
        }
    }

    fn channel(&self) -> Channel {
        let i = self.current.load(Ordering::Relaxed) % self.servers.len();
        self.servers[i].1.clone()
    }

    /// The URL calls go to now.
    pub fn current(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()].0
    }

    /// With several servers: the index of the one `status` names as the
    /// leader (`lab-leader`), if it is in the list.
    fn named_leader(&self, status: &tonic::Status) -> Option<usize> {
        let leader = status.metadata().get(LEADER_HEADER)?.to_str().ok()?;
        let leader = leader.trim_end_matches('/');
        self.servers
            .iter()
            .position(|(url, _)| url.trim_end_matches('/') == leader)
    }

    /// After `err` (UNAVAILABLE, a broken stream): move to the server a
    /// standby named, else to the next one. Returns whether it moved.
    pub fn failover(&self, err: &anyhow::Error) -> bool {
        let n = self.servers.len();
        if n < 2 {
            return false;
        }
        let now = self.current.load(Ordering::Relaxed) % n;
        let next = err
            .downcast_ref::<tonic::Status>()
            .and_then(|s| self.named_leader(s))
            .filter(|&i| i != now)
            .unwrap_or((now + 1) % n);
        self.current.store(next, Ordering::Relaxed);
        true
    }

    /// With several servers: ask each (in order, from the one in use,
    /// `WhoAmI`) until one is not a standby, and use it; a standby's
    /// `lab-leader` is followed at once. Nothing is asked with a single
    /// server. If none answers, the one in use stays (its error is the one
    /// reported).
    pub async fn find_leader(&self) {
        let n = self.servers.len();
        if n < 2 {
            return;
        }
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut i = first;
        for _ in 0..n + 1 {
            let channel = self.servers[i].1.clone();
            let mut admin = AdminServiceClient::with_interceptor(channel, self.auth.clone());
            let answer = tokio::time::timeout(
                CONNECT_TIMEOUT * 2,
                admin.who_am_i(lab_proto::v1::WhoAmIRequest::default()),
            )
            .await;
            match answer {
                // Answered (even refused: a bad token is a leader's answer).
                Ok(Ok(_)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return;
                }
                Ok(Err(s))
                    if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown =>
                {
                    self.current.store(i, Ordering::Relaxed);
                    return;
                }
                Ok(Err(s)) => match self.named_leader(&s) {
                    Some(l) if l != i => {
                        i = l;
                        continue;
                    }
                    _ => {}
                },
                Err(_) => {}
            }
            i = (i + 1) % n;
        }
    }

    pub fn hosts(&self) -> HostServiceClient<Svc> {
        HostServiceClient::with_interceptor(self.channel(), self.auth.clone())
    }

    pub fn leases(&self) -> LeaseServiceClient<Svc> {
        LeaseServiceClient::with_interceptor(self.channel(), self.auth.clone())
    }

    pub fn events(&self) -> EventServiceClient<Svc> {
        EventServiceClient::with_interceptor(self.channel(), self.auth.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Svc> {
        AdminServiceClient::with_interceptor(self.channel(), self.auth.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::Ascii;
    use tonic::service::Interceptor;

    #[test]
    fn server_urls() {
        assert_eq!(parse_server(DEFAULT_SERVER).unwrap().url(), DEFAULT_SERVER);
        assert_eq!(parse_server("lab:7621").unwrap().url(), "http://lab:7621");
        assert_eq!(
            parse_server("[::1]:7621").unwrap().url(),
            "http://[::1]:7621"
        );
        assert_eq!(
            parse_server("https://lab:7621").unwrap().url(),
            "https://lab:7621"
        );
        assert!(parse_server("ftp://lab:7621").is_err());
        assert_eq!(parse_server("").unwrap().url(), DEFAULT_SERVER);
        assert!(parse_server("http://").is_err());
        assert!(parse_server("http://a b").is_err());
        let several = parse_server("a:1, https://b:2,").unwrap();
        assert_eq!(several.url(), "http://a:1,https://b:2");
        assert_eq!(several.endpoints(None).unwrap().len(), 2);
        assert!(parse_server("a:1,ftp://b:2").is_err());
        assert!(parse_server(",").is_err());
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "s3cr3t\n").unwrap();
        let t = read_token_file(&good).unwrap();
        assert_eq!(t.expose(), Some("s3cr3t"));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "two words-s3cr3t\n").unwrap();
        let e = read_token_file(&bad).unwrap_err();
        assert!(e.contains("bad") && !e.contains("s3cr3t"), "{e}");
        let e = read_token_file(&dir.path().join("none")).unwrap_err();
        assert!(e.starts_with("cannot read the token file"), "{e}");
    }

    #[test]
    fn tokens() {
        assert!(!parse_token("").unwrap().is_set());
        assert!(parse_token("has space").is_err());
        assert!(parse_token("tök").is_err());
        let t = parse_token("s3cr3t.token-_~").unwrap();
        assert_eq!(format!("{t:?}"), "Token(..)");
        let value = header(Some(t)).unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t.token-_~");
    }

    /// The `authorization` header that the clients of [`Lab`] send.
    fn header(token: Option<Token>) -> Option<tonic::metadata::MetadataValue<Ascii>> {
        let mut auth = BearerAuth::new(token.and_then(|t| t.0));
        let req = auth.call(tonic::Request::new(())).unwrap();
        req.metadata().get("authorization").cloned()
    }

    #[test]
    fn interceptor_sets_the_header_only_with_a_token() {
        let with = header(Some(parse_token("abc").unwrap()));
        assert_eq!(with.unwrap(), "Bearer abc");
        assert!(header(Some(parse_token("").unwrap())).is_none());
        assert!(header(None).is_none());
    }

    #[test]
    fn a_ca_needs_https() {
        let ca = Path::new("/nonexistent/ca.pem");
        let http = parse_server("lab:7621").unwrap();
        assert_eq!(
            http.endpoints(Some(ca)).unwrap_err(),
            "--ca/LAB_CA is set but the server http://lab:7621 is not https://"
        );
        let https = parse_server("https://lab:7621").unwrap();
        let err = https.endpoints(Some(ca)).unwrap_err();
        assert!(
            err.starts_with("cannot read CA file /nonexistent/ca.pem: "),
            "{err}"
        );
        assert!(http.endpoints(None).is_ok());
    }
}
