//! The tonic endpoint for a lab-server URL.
//!
//! [`ServerEndpoint::new`] parses the URL, applies the caller's
//! [`ChannelSettings`] (connect timeout, HTTP/2 keepalive; `TCP_NODELAY`
//! always) and, for an `https://` URL, TLS that trusts the given CA
//! certificate (PEM) or else the system's roots. The scheme decides: TLS
//! for `https://`, plaintext otherwise. A CA given for a plaintext URL is
//! refused rather than silently unused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How a caller connects and watches its connection. Each caller states its
/// own values (the CLI fails fast; the agent link keeps a long-lived
/// stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSettings {
    /// How long to wait for the TCP connection (and TLS handshake).
    pub connect_timeout: Duration,
    /// An HTTP/2 PING this often notices a server that went away.
    pub keep_alive_interval: Duration,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keep_alive_timeout: Duration,
    /// PING also while no call is open.
    pub keep_alive_while_idle: bool,
}

/// Why no endpoint could be made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("not a URL")]
    Url(#[source] tonic::transport::Error),
    #[error("cannot read CA file {}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS set-up failed")]
    Tls(#[source] tonic::transport::Error),
    #[error("a CA certificate is given but the server {url} is not https://")]
    CaWithoutTls { url: String },
}

/// A server URL, as given (for messages) and as tonic wants it. Nothing
/// touches the network until [`ServerEndpoint::connect`] or the first call
/// on a [`ServerEndpoint::connect_lazy`] channel.
#[derive(Clone, Debug)]
pub struct ServerEndpoint {
    url: String,
    endpoint: Endpoint,
}

impl ServerEndpoint {
    /// `url` is taken as tonic parses it; callers that read it from users
    /// check its form first (the CLI wants `http://` or `https://` and a
    /// host). `ca`: the CA certificate (PEM) to trust for an `https://`
    /// URL, else the system's roots.
    pub fn new(
        url: &str,
        ca: Option<&Path>,
        settings: &ChannelSettings,
    ) -> Result<ServerEndpoint, EndpointError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(EndpointError::Url)?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(settings.keep_alive_interval)
            .keep_alive_timeout(settings.keep_alive_timeout)
            .keep_alive_while_idle(settings.keep_alive_while_idle);
        let endpoint = match (is_https(url), ca) {
            (false, None) => endpoint,
            (false, Some(_)) => {
                return Err(EndpointError::CaWithoutTls {
                    url: url.to_owned(),
                });
            }
            (true, ca) => {
                let tls = ClientTlsConfig::new();
                let tls = match ca {
                    Some(path) => {
                        let pem = std::fs::read(path).map_err(|source| EndpointError::CaFile {
                            path: path.to_owned(),
                            source,
                        })?;
                        tls.ca_certificate(Certificate::from_pem(pem))
                    }
                    None => tls.with_native_roots(),
                };
                endpoint.tls_config(tls).map_err(EndpointError::Tls)?
            }
        };
        Ok(ServerEndpoint {
            url: url.to_owned(),
            endpoint,
        })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The tonic endpoint, for callers that build their channel themselves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connects now (within the connect timeout).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint.connect().await
    }

    /// A channel that connects on its first call (and again after a
    /// failure). Must be called inside a tokio runtime.
    pub fn connect_lazy(&self) -> Channel {
        self.endpoint.connect_lazy()
    }
}

/// Whether `url` gets TLS.
pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    const SETTINGS: ChannelSettings = ChannelSettings {
        connect_timeout: Duration::from_secs(2),
        keep_alive_interval: Duration::from_secs(30),
        keep_alive_timeout: Duration::from_secs(10),
        keep_alive_while_idle: false,
    };

    #[test]
    fn plaintext_and_tls_by_scheme() {
        let e = ServerEndpoint::new("http://127.0.0.1:7621", None, &SETTINGS).unwrap();
        assert_eq!(e.url(), "http://127.0.0.1:7621");
        assert_eq!(e.endpoint().uri().port_u16(), Some(7621));
        // System roots: no file needed.
        ServerEndpoint::new("https://lab.example:7621", None, &SETTINGS).unwrap();
    }

    #[test]
    fn a_ca_for_plaintext_is_refused() {
        let err =
            ServerEndpoint::new("http://lab:1", Some(Path::new("/ca.pem")), &SETTINGS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a CA certificate is given but the server http://lab:1 is not https://"
        );
    }

    #[test]
    fn an_unreadable_ca_names_the_file() {
        let missing = Path::new("/nonexistent/lab-ca.pem");
        let err = ServerEndpoint::new("https://lab:1", Some(missing), &SETTINGS).unwrap_err();
        assert!(matches!(err, EndpointError::CaFile { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "cannot read CA file /nonexistent/lab-ca.pem"
        );
        let io = err.source().unwrap().downcast_ref::<std::io::Error>();
        assert_eq!(io.unwrap().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn not_a_url() {
        let err = ServerEndpoint::new("http://a b", None, &SETTINGS).unwrap_err();
        assert!(matches!(err, EndpointError::Url(_)), "{err:?}");
    }
}
