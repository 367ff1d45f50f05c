//! The HTTP socket loop: accepts connections, serves each with hyper's
//! HTTP/1.1 connection driver, and answers from a [`FileSource`].

use super::request::{RangeDecision, decode_path, parse_range};
use crate::assets::{Content, FileSource, OpenError};
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tracing::Instrument;

/// Bytes read from a file per body frame.
const CHUNK: usize = 64 * 1024;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve `source` on `listener` until `shutdown` completes, then let open
/// connections finish for a bounded grace period.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn FileSource>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Per-connection failures (ECONNABORTED, EMFILE): keep serving.
                    tracing::warn!(error = &e as &dyn std::error::Error, "http accept failed");
                    tokio::task::yield_now().await;
                    continue;
                }
            },
        };
        let source = source.clone();
        let service = hyper::service::service_fn(move |req| {
            let source = source.clone();
            async move { Ok::<_, Infallible>(handle(req, source, peer).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(client = %peer, error = &e as &dyn std::error::Error, "http connection ended");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("http connections still open after the shutdown grace period");
    }
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    source: Arc<dyn FileSource>,
    peer: SocketAddr,
) -> Response<Body> {
    let span = tracing::info_span!("http", client = %peer.ip(), path = %req.uri().path());
    async {
        let resp = respond(&req, source, peer.ip()).await;
        tracing::debug!(method = %req.method(), status = resp.status().as_u16(), "http request");
        resp
    }
    .instrument(span)
    .await
}

async fn respond(
    req: &Request<Incoming>,
    source: Arc<dyn FileSource>,
    client: IpAddr,
) -> Response<Body> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = status(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let Some(path) = decode_path(req.uri().path()) else {
        return status(StatusCode::BAD_REQUEST);
    };
    // Opening may canonicalize paths, read files and render templates.
    let opened = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || source.open(&path, Some(client))).await
    };
    let content = match opened {
        Ok(Ok(c)) => c,
        Err(e) => {
            tracing::error!(
                error = &e as &dyn std::error::Error,
                "http open task failed"
            );
            return status(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Ok(Err(e)) => return open_error(e),
    };
    let len = content.len();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (code, start, end) = match parse_range(range, len) {
        RangeDecision::Full => (StatusCode::OK, 0, len),
        RangeDecision::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        RangeDecision::Unsatisfiable => {
            let mut r = status(StatusCode::RANGE_NOT_SATISFIABLE);
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
            );
            return r;
        }
    };
    let body = if head {
        Body::Empty
    } else {
        match content {
            Content::Bytes(b) => {
                Body::Bytes(Some(Bytes::from(b).slice(start as usize..end as usize)))
            }
            Content::File { mut file, .. } => {
                if let Err(e) = file.seek(SeekFrom::Start(start)) {
                    tracing::warn!(error = &e as &dyn std::error::Error, "http seek failed");
                    return status(StatusCode::INTERNAL_SERVER_ERROR);
                }
                Body::File(FileBody {
                    file: tokio::fs::File::from_std(file),
                    remaining: end - start,
                    buf: vec![0; CHUNK],
                })
            }
        }
    };
    let mut r = Response::new(body);
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if path.ends_with(".ipxe") || path.ends_with(".preseed") {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        }),
    );
    if code == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)).expect("ascii"),
        );
    }
    r
}

fn open_error(e: OpenError) -> Response<Body> {
    match e {
        OpenError::NotFound => status(StatusCode::NOT_FOUND),
        OpenError::Forbidden(why) => {
            tracing::info!(why, "http request refused");
            status(StatusCode::FORBIDDEN)
        }
        OpenError::Io(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, "http open failed");
            status(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// An empty response with `code` (and `Content-Length: 0`).
fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
    r
}

/// A response body: nothing, generated bytes, or a file streamed in chunks.
pub enum Body {
    Empty,
    Bytes(Option<Bytes>),
    File(FileBody),
}

/// A file region, read 64 KiB per frame.
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::File(f) => {
                if f.remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (f.remaining.min(CHUNK as u64)) as usize;
                let mut rb = ReadBuf::new(&mut f.buf[..want]);
                match Pin::new(&mut f.file).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            // The file shrank under us: fail rather than send short.
                            return Poll::Ready(Some(
                                Err(std::io::ErrorKind::UnexpectedEof.into()),
                            ));
                        }
                        f.remaining -= n as u64;
                        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Bytes(b) => b.is_none(),
            Body::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::Empty => http_body::SizeHint::with_exact(0),
            Body::Bytes(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            Body::File(f) => http_body::SizeHint::with_exact(f.remaining),
        }
    }
}
