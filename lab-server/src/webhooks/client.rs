//! The HTTP/1.1 client of the webhooks: one connection per delivery
//! (hyper's connection API over a TCP stream, wrapped in rustls for
//! `https://`, trusting the system's roots), connect and whole-request
//! timeouts, the answer's status and nothing more read.

use hyper::Request;
use hyper_util::rt::TokioIo;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// Where a hook posts: scheme, host, port and path (with query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL (no user name or password:
    /// the signature authenticates the server to the receiver).
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "invalid URL {url:?}: must start with http:// or https://"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("invalid URL {url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err("invalid URL: credentials in the URL are not allowed (the receiver checks X-Lab-Signature instead)".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("invalid URL {url:?}: no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        Ok(Target {
            https,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

/// Why a POST got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {target} took longer than {timeout:?}")]
    ConnectTimeout { target: String, timeout: Duration },
    #[error("TLS with {target} failed")]
    Tls {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("HTTP exchange with {target} failed")]
    Http {
        target: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

/// Timeouts of one POST.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// The whole exchange, connection included.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(10),
        }
    }
}

/// The TLS configuration of https hooks: the system's roots, loaded once.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "cannot load a system root certificate (for https webhooks)");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system roots loaded for https webhooks");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// POSTs `body` with `headers` to `target`; the answer's status.
pub async fn post(
    target: &Target,
    headers: &[(&str, String)],
    body: String,
    timeouts: Timeouts,
) -> Result<u16, PostError> {
    let name = target.to_string();
    let mut req = Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("lab-server/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req.body(body).expect("valid request parts");
    let exchange = async {
        let tcp = tokio::time::timeout(
            timeouts.connect,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| PostError::ConnectTimeout {
            target: name.clone(),
            timeout: timeouts.connect,
        })?
        .map_err(|source| PostError::Connect {
            target: name.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        if target.https {
            let server =
                rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|_| {
                    PostError::ServerName {
                        host: target.host.clone(),
                    }
                })?;
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(server, tcp)
                .await
                .map_err(|source| PostError::Tls {
                    target: name.clone(),
                    source,
                })?;
            send(TokioIo::new(tls), req, &name).await
        } else {
            send(TokioIo::new(tcp), req, &name).await
        }
    };
    tokio::time::timeout(timeouts.request, exchange)
        .await
        .map_err(|_| PostError::Timeout {
            target: name.clone(),
            timeout: timeouts.request,
        })?
}

async fn send<I>(io: I, req: Request<String>, target: &str) -> Result<u16, PostError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |source| PostError::Http {
        target: target.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, String>(io)
        .await
        .map_err(http)?;
    let mut conn = std::pin::pin!(conn);
    let mut answer = std::pin::pin!(sender.send_request(req));
    // Drive the connection while the request is in flight; the status is
    // all that is wanted, so the connection is dropped (closed) after it.
    // A receiver that answers and closes at once may end the connection
    // before the answer is taken: it is taken then.
    tokio::select! {
        biased;
        r = &mut answer => r.map(|resp| resp.status().as_u16()).map_err(http),
        r = &mut conn => match r {
            Err(e) => Err(http(e)),
            Ok(()) => answer.await.map(|resp| resp.status().as_u16()).map_err(http),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://ci.example.org/hooks/lab?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                https: true,
                host: "ci.example.org".into(),
                port: 443,
                path: "/hooks/lab?x=1".into()
            }
        );
        assert_eq!(t.to_string(), "https://ci.example.org/hooks/lab?x=1");
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(t.to_string(), "http://[::1]:8080/");
        for bad in [
            "ftp://x/",
            "x.example.org/a",
            "http:///a",
            "https://u:pw@x/",
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid URL"), "{bad}: {e}");
            assert!(!e.contains("pw@"), "{e}");
        }
    }
}
