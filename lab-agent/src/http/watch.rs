//! Progress timeouts for one HTTP connection: [`Watched`] wraps the socket
//! and notes when a byte last moved and whether a send is blocked on the
//! client; [`watchdog`] resolves once the connection has made no progress
//! for too long, and the server then drops the connection.
//!
//! - While a send is blocked (the client does not read), the connection may
//!   go `send_timeout` without a byte sent.
//! - Otherwise it may go `idle_timeout` with no byte moving either way.
//!
//! Any progress restarts the clock, so a slow client that keeps reading is
//! never cut, however long its download takes. Waiting for a request's
//! headers is bounded separately (hyper's header timeout).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last made progress, shared by its [`Watched`] I/O and
/// its [`watchdog`].
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last progress.
    last_ms: AtomicU64,
    /// A send returned `Pending` and has not completed since.
    sending: AtomicBool,
}

impl Progress {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            sending: AtomicBool::new(false),
        })
    }

    fn touch(&self) {
        let ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        self.last_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn set_sending(&self, blocked: bool) {
        self.sending.store(blocked, Ordering::Relaxed);
    }

    fn sending(&self) -> bool {
        self.sending.load(Ordering::Relaxed)
    }
}

/// Which timeout ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No byte moved for `idle_timeout`.
    Idle,
    /// A send stayed blocked for `send_timeout`: the client does not read.
    Send,
}

/// Resolves when `progress` shows none for the applicable timeout. Wakes at
/// most once per `min(idle, send)` while the connection progresses.
pub async fn watchdog(progress: &Progress, idle: Duration, send: Duration) -> Expired {
    let recheck = idle.min(send);
    loop {
        let now = Instant::now();
        let (limit, why) = if progress.sending() {
            (send, Expired::Send)
        } else {
            (idle, Expired::Idle)
        };
        let deadline = progress.last() + limit;
        if now >= deadline {
            return why;
        }
        // Whether a send blocks may change while asleep: look again at
        // least every `recheck`.
        tokio::time::sleep_until(deadline.min(now + recheck)).await;
    }
}

/// An I/O object that records its progress in a [`Progress`].
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    progress: Arc<Progress>,
    /// Adds the bytes written (for `/metrics`).
    sent: Option<Arc<AtomicU64>>,
}

impl<T> Watched<T> {
    pub fn new(io: T, progress: Arc<Progress>) -> Self {
        Self {
            io,
            progress,
            sent: None,
        }
    }

    /// Also add every byte written to `sent`.
    pub fn counting(mut self, sent: Arc<AtomicU64>) -> Self {
        self.sent = Some(sent);
        self
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.progress.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> Watched<T> {
    fn note(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Pending => self.progress.set_sending(true),
            Poll::Ready(Ok(n)) => {
                if *n > 0 {
                    self.progress.touch();
                    if let Some(sent) = &self.sent {
                        sent.fetch_add(*n as u64, Ordering::Relaxed);
                    }
                }
                self.progress.set_sending(false);
            }
            Poll::Ready(Err(_)) => self.progress.set_sending(false),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.note(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.progress.set_sending(r.is_pending());
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progress.set_sending(r.is_pending());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SEC: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(60);
    const SEND: Duration = Duration::from_secs(30);

    /// Send `len` bytes through a 4 KiB pipe, racing the watchdog; the
    /// client side is run by `client`. Returns the watchdog's verdict (or
    /// `None` if the send completed) and when it ended.
    async fn send_against<F, Fut>(len: usize, client: F) -> (Option<Expired>, Duration)
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (server, peer) = tokio::io::duplex(4096);
        let progress = Progress::new();
        let mut io = Watched::new(server, progress.clone());
        let client = tokio::spawn(client(peer));
        let t0 = Instant::now();
        let data = vec![7u8; len];
        let out = tokio::select! {
            r = io.write_all(&data) => { r.unwrap(); None }
            why = watchdog(&progress, IDLE, SEND) => Some(why),
        };
        client.abort();
        (out, t0.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_is_dropped_after_the_send_timeout() {
        let (out, took) = send_against(1 << 20, |peer| async move {
            // Holds the connection open and never reads.
            let _peer = peer;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(out, Some(Expired::Send));
        assert!(took >= SEND && took < SEND + SEC, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_keeps_reading_is_never_cut() {
        // 1 MiB at 4 KiB per 20 s: ~85 minutes, each pause below the
        // send timeout.
        let (out, took) = send_against(1 << 20, |mut peer| async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::time::sleep(20 * SEC).await;
                if peer.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        })
        .await;
        assert_eq!(out, None, "cut after {took:?}");
        assert!(took > 80 * 60 * SEC, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_midway_is_dropped() {
        let (out, took) = send_against(1 << 20, |mut peer| async move {
            let mut buf = vec![0u8; 4096];
            for _ in 0..10 {
                tokio::time::sleep(10 * SEC).await;
                let _ = peer.read(&mut buf).await;
            }
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(out, Some(Expired::Send));
        // Progress at 10 s .. 100 s, then 30 s without.
        assert!(took >= 130 * SEC && took < 131 * SEC, "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_both_ways_is_dropped_after_the_idle_timeout() {
        let (server, mut peer) = tokio::io::duplex(4096);
        let progress = Progress::new();
        let mut io = Watched::new(server, progress.clone());
        let t0 = Instant::now();
        // The client sends one byte after 50 s, then nothing.
        tokio::spawn(async move {
            tokio::time::sleep(50 * SEC).await;
            peer.write_all(b"x").await.unwrap();
            std::future::pending::<()>().await;
        });
        let mut buf = [0u8; 16];
        let why = tokio::select! {
            _ = async { loop { let _ = io.read(&mut buf).await; } } => unreachable!(),
            why = watchdog(&progress, IDLE, SEND) => why,
        };
        assert_eq!(why, Expired::Idle);
        let took = t0.elapsed();
        assert!(took >= 110 * SEC && took < 111 * SEC, "{took:?}");
    }
}
