//! The connection to lab-server: endpoint parsing, the bearer-token
//! interceptor and the four service clients over one lazy channel.

use std::fmt;
use std::time::Duration;

use lab_proto::v1::admin_service_client::AdminServiceClient;
use lab_proto::v1::event_service_client::EventServiceClient;
use lab_proto::v1::host_service_client::HostServiceClient;
use lab_proto::v1::lease_service_client::LeaseServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7621";

/// How long to wait for the TCP connection before giving up (exit 7).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A validated server endpoint, as given (for messages) and as tonic wants it.
#[derive(Clone, Debug)]
pub struct Server {
    url: String,
    endpoint: Endpoint,
}

impl Server {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// For an https:// server: trust the CA certificate (PEM) in `ca`, or
    /// the system's roots when there is none. An http:// server with a CA
    /// given is refused (the CA would silently not be used).
    pub fn with_tls(mut self, ca: Option<&std::path::Path>) -> Result<Server, String> {
        let https = self.url.starts_with("https://");
        match (https, ca) {
            (false, None) => Ok(self),
            (false, Some(_)) => Err(format!(
                "--ca/LAB_CA is set but the server {} is not https://",
                self.url
            )),
            (true, ca) => {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                tls = match ca {
                    Some(path) => {
                        let pem = std::fs::read(path)
                            .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
                        tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                    }
                    None => tls.with_native_roots(),
                };
                self.endpoint = self
                    .endpoint
                    .tls_config(tls)
                    .map_err(|e| format!("TLS set-up failed: {e}"))?;
                Ok(self)
            }
        }
    }
}

/// clap value parser for `--server`: `http://host:port`, `https://host:port`
/// or `host:port` (http assumed). For https, [`Server::with_tls`] sets the
/// trusted roots.
pub fn parse_server(s: &str) -> Result<Server, String> {
    // An empty LAB_SERVER (as CI systems like to set) means the default.
    let s = if s.is_empty() { DEFAULT_SERVER } else { s };
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
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // A lease request may wait for hours: notice a dead server.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(Server { url, endpoint })
}

/// The `authorization: Bearer <token>` value, marked sensitive, or none
/// when the token given was empty. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Token {
    pub fn is_set(&self) -> bool {
        self.0.is_some()
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
        return Ok(Token(None));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".to_owned());
    }
    let mut value = MetadataValue::try_from(format!("Bearer {s}"))
        .map_err(|_| "the token is not a valid header value".to_owned())?;
    value.set_sensitive(true);
    Ok(Token(Some(value)))
}

/// Adds the bearer token to every call; adds nothing when there is none.
#[derive(Clone, Debug)]
pub struct Auth(Option<Token>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(Token(Some(value))) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

pub type Svc = InterceptedService<Channel, Auth>;

/// The server's clients. Nothing touches the network until the first call.
#[derive(Clone, Debug)]
pub struct Lab {
    channel: Channel,
    auth: Auth,
}

impl Lab {
    /// Must be called inside a tokio runtime (the channel spawns its worker).
    pub fn connect_lazy(server: &Server, token: Option<Token>) -> Self {
        Lab {
            channel: server.endpoint.connect_lazy(),
            auth: Auth(token),
        }
    }

    pub fn hosts(&self) -> HostServiceClient<Svc> {
        HostServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn leases(&self) -> LeaseServiceClient<Svc> {
        LeaseServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn events(&self) -> EventServiceClient<Svc> {
        EventServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Svc> {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn tokens() {
        assert!(!parse_token("").unwrap().is_set());
        assert!(parse_token("has space").is_err());
        assert!(parse_token("tök").is_err());
        let t = parse_token("s3cr3t.token-_~").unwrap();
        assert_eq!(format!("{t:?}"), "Token(..)");
        let value = t.0.unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Bearer s3cr3t.token-_~");
    }

    #[test]
    fn interceptor_sets_the_header_only_with_a_token() {
        let mut with = Auth(Some(parse_token("abc").unwrap()));
        let req = with.call(Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");

        let mut without = Auth(None);
        let req = without.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
