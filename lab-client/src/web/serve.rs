//! The HTTP/1.1 server loop of the daemons' web ports, over an axum
//! [`Router`]. What one peer may take is bounded here: open connections
//! ([`WebLimits::max_connections`]; one more is reset at once), the time to
//! send a request's head ([`WebLimits::header_timeout`], which is also how
//! long an idle keep-alive connection stays open), the head's size, and the
//! TLS handshake's time. Long responses (server-sent events) are bounded by
//! their handlers.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

/// What one web port allows.
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Connections open at once; one more is reset at once.
    pub max_connections: usize,
    /// Time to receive a request's head; also how long a keep-alive
    /// connection may sit idle between requests.
    pub header_timeout: Duration,
    /// Time to complete a TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Largest request head, in bytes.
    pub max_head_bytes: usize,
}

impl Default for WebLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_head_bytes: 16 * 1024,
        }
    }
}

/// Why a web port could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read TLS {what} {}", path.display())]
    ReadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS {what} {} holds no usable PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the TLS certificate and key do not make a server configuration")]
    Tls(#[source] tokio_rustls::rustls::Error),
    #[error("the web listener failed")]
    Accept(#[source] std::io::Error),
}

/// TLS for a web port: the API's certificate chain and key (PEM files).
#[derive(Clone)]
pub struct WebTls(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for WebTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebTls")
    }
}

impl WebTls {
    /// From a certificate chain file and its private key file (PEM).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, ServeError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| ServeError::ReadPem {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let pem_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ServeError::Pem { what, path, source }
        };
        let certs = CertificateDer::pem_slice_iter(&read("certificate", cert)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("certificate", cert))?;
        let key = PrivateKeyDer::from_pem_slice(&read("key", key)?).map_err(pem_err("key", key))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ServeError::Tls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(ServeError::Tls)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// Refused connections are logged at most once per this interval, with a
/// count.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` until `shutdown` resolves; open connections
/// then get `grace` to finish (server-sent event streams end at once:
/// their handlers watch the same shutdown through `app`'s state).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<WebTls>,
    limits: WebLimits,
    shutdown: impl Future<Output = ()> + Send,
    grace: Duration,
) -> Result<(), ServeError> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let refused = AtomicU64::new(0);
    let mut last_refused_log: Option<Instant> = None;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: pause, do not spin.
                    debug!(error = %e, "web accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
            if last_refused_log.is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL) {
                last_refused_log = Some(Instant::now());
                warn!(client = %peer.ip(), refused_total = n, max = limits.max_connections, "web connection refused: too many open");
            }
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = TowerToHyperService::new(app);
            match tls {
                None => serve_conn(&builder, TokioIo::new(stream), service, &mut stop, peer).await,
                Some(WebTls(acceptor)) => {
                    let tls =
                        tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream))
                            .await;
                    match tls {
                        Ok(Ok(s)) => {
                            serve_conn(&builder, TokioIo::new(s), service, &mut stop, peer).await
                        }
                        Ok(Err(e)) => {
                            debug!(client = %peer.ip(), error = %e, "web TLS handshake failed")
                        }
                        Err(_) => debug!(client = %peer.ip(), "web TLS handshake timed out"),
                    }
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    // Let requests in flight finish, for so long.
    let deadline = tokio::time::Instant::now() + grace;
    while slots.available_permits() < limits.max_connections
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!("web server stopped");
    Ok(())
}

async fn serve_conn<I>(
    builder: &hyper::server::conn::http1::Builder,
    io: TokioIo<I>,
    service: TowerToHyperService<Router>,
    stop: &mut watch::Receiver<bool>,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(client = %peer.ip(), error = %e, "web connection ended");
            }
        }
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: WebLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let (tx, mut rx) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            app,
            None,
            limits,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
            Duration::ZERO,
        ));
        (addr, tx)
    }

    /// Reads until EOF or a reset; how long that took.
    async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(limit, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the connection stayed open for {limit:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_silent_peer_is_timed_out_and_the_cap_refuses_one_more() {
        let (addr, _stop) = server(WebLimits {
            max_connections: 1,
            header_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The one slot is taken: the next connection is closed at once.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = extra.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await < Duration::from_millis(250)
        );
        // The silent one is closed after the head timeout, freeing the slot.
        let took = closed_within(&mut silent, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(150), "{took:?}");
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let n = ok.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // An idle keep-alive connection is closed after the same timeout.
        closed_within(&mut ok, Duration::from_secs(5)).await;
    }
}
