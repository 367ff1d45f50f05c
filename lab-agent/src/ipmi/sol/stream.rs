//! [`SolStream`]: an active SOL payload as a tokio `AsyncRead +
//! AsyncWrite`, on its own RMCP+ session ([`IpmiClient`]). The stream and
//! the session's request task share buffers (`SolShared`); the task drives
//! them through `SolLink`, this module's `Payload`: it hands it the
//! BMC's SOL packets and sends what the [`SolState`] machine produces.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::packet::SolPacket;
use super::state::{SolFailure, SolOptions, SolState};
use crate::ipmi::client::{ConnectOptions, IpmiClient, Keepalive, Payload, PayloadEnd, Transmit};
use crate::ipmi::commands::{
    ActivatePayload, CC_PAYLOAD_ALREADY_ACTIVE, CC_PAYLOAD_ALREADY_INACTIVE, DeactivatePayload,
    GetPayloadInstanceInfo, SolActivation,
};
use crate::ipmi::error::IpmiError;
use crate::ipmi::packet::PayloadType;
use lab_types::Secret;

/// Buffers shared by a [`SolStream`] and the session's socket task.
#[derive(Debug)]
struct SolShared {
    buf: Mutex<SolBuffers>,
    /// Wakes the socket task: data to send, a break, the stream dropped.
    notify: Arc<Notify>,
}

#[derive(Debug)]
struct SolBuffers {
    rx: VecDeque<u8>,
    rx_cap: usize,
    rx_waker: Option<Waker>,
    tx: VecDeque<u8>,
    tx_cap: usize,
    tx_waker: Option<Waker>,
    brk: bool,
    /// Sent data not yet acknowledged (for `flush`).
    busy: bool,
    max_chunk: usize,
    /// Set once: `None` inside means a clean end (EOF).
    end: Option<Option<SolFailure>>,
    endpoint: SocketAddr,
}

impl SolBuffers {
    fn wake_all(&mut self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }

    fn finish(&mut self, failure: Option<SolFailure>) {
        if self.end.is_none() {
            self.end = Some(failure);
        }
        self.wake_all();
    }

    fn end_error(&self) -> Option<io::Error> {
        match &self.end {
            Some(Some(f)) => Some(io::Error::new(
                match f {
                    SolFailure::NoAck { .. } | SolFailure::Keepalive => io::ErrorKind::TimedOut,
                    SolFailure::Deactivated | SolFailure::TakenOver { .. } => {
                        io::ErrorKind::ConnectionAborted
                    }
                },
                SolStreamError {
                    endpoint: self.endpoint,
                    source: f.clone(),
                },
            )),
            Some(None) => Some(io::Error::new(
                io::ErrorKind::BrokenPipe,
                SolStreamError {
                    endpoint: self.endpoint,
                    source: SolFailure::Deactivated,
                },
            )),
            None => None,
        }
    }
}

/// The SOL side of the session's request task: the [`SolState`] machine
/// over the buffers it shares with the [`SolStream`].
struct SolLink {
    shared: Arc<SolShared>,
    state: SolState,
    keepalive: Keepalive,
}

impl Payload for SolLink {
    fn payload_type(&self) -> PayloadType {
        PayloadType::Sol
    }

    fn wakeup(&self) -> Arc<Notify> {
        self.shared.notify.clone()
    }

    fn keepalive(&self) -> Keepalive {
        self.keepalive
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.state.next_deadline()
    }

    fn receive(&mut self, payload: &[u8], now: Instant) -> bool {
        let Ok(sol) = SolPacket::decode(payload) else {
            return true;
        };
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        let room = b.rx_cap.saturating_sub(b.rx.len());
        let got = self.state.receive(&sol, room, now);
        if !got.data.is_empty() {
            b.rx.extend(&got.data);
        }
        b.busy = self.state.busy();
        b.wake_all();
        if got.break_detected || got.trouble {
            tracing::debug!(endpoint = %b.endpoint, status = sol.flags, "SOL status");
        }
        if got.deactivating {
            tracing::info!(endpoint = %b.endpoint, "BMC deactivates SOL");
            b.finish(None);
            return false;
        }
        true
    }

    fn transmit(&mut self, now: Instant) -> Transmit {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        let before = b.tx.len();
        let max_chunk = b.max_chunk;
        let SolBuffers { tx, brk, .. } = &mut *b;
        let r = self.state.poll_transmit(now, tx, brk, max_chunk);
        b.busy = self.state.busy();
        if (b.tx.len() != before || !b.busy)
            && let Some(w) = b.tx_waker.take()
        {
            w.wake();
        }
        match r {
            Ok(Some(pkt)) => Transmit::Send(pkt.encode()),
            Ok(None) => Transmit::Idle,
            Err(f) => {
                tracing::warn!(endpoint = %b.endpoint, error = %f, "SOL failed");
                b.finish(Some(f));
                Transmit::Ended
            }
        }
    }

    fn end(&mut self, why: PayloadEnd) {
        let failure = match why {
            PayloadEnd::Closed => None,
            PayloadEnd::Keepalive => Some(SolFailure::Keepalive),
            PayloadEnd::TakenOver { holder } => Some(SolFailure::TakenOver { holder }),
        };
        self.shared.buf.lock().expect("SOL buffers").finish(failure);
    }
}

/// The error inside the `io::Error`s of a failed [`SolStream`].
#[derive(Debug, thiserror::Error)]
#[error("SOL with {endpoint}")]
pub struct SolStreamError {
    endpoint: SocketAddr,
    #[source]
    source: SolFailure,
}

/// An active SOL payload on its own RMCP+ session: read what the host's
/// serial port prints, write what it should receive.
///
/// Reads end (`Ok(0)`) when the BMC deactivates SOL, and fail when sent
/// data is never acknowledged or the keepalive fails. `flush` waits until
/// the BMC has accepted everything written. Dropping the stream deactivates
/// the payload and closes the session (one attempt each, from the socket
/// task); [`SolStream::close`] does it and reports the outcome.
pub struct SolStream {
    client: Option<IpmiClient>,
    shared: Arc<SolShared>,
    activation: SolActivation,
    endpoint: SocketAddr,
}

impl std::fmt::Debug for SolStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolStream")
            .field("endpoint", &self.endpoint)
            .field("activation", &self.activation)
            .finish_non_exhaustive()
    }
}

impl SolStream {
    /// Open a session and activate SOL on it, with default [`SolOptions`].
    pub async fn connect(
        endpoint: SocketAddr,
        user: &str,
        password: Secret,
        options: ConnectOptions,
    ) -> Result<SolStream, IpmiError> {
        let client = IpmiClient::connect(endpoint, user, password, options).await?;
        SolStream::activate(client, SolOptions::default()).await
    }

    /// Activate SOL on an open session. If the BMC says the payload is
    /// already active (a stale session of ours or someone else's), it is
    /// deactivated and the activation retried. On failure the session is
    /// closed.
    pub async fn activate(client: IpmiClient, options: SolOptions) -> Result<SolStream, IpmiError> {
        let endpoint = client.endpoint();
        let shared = Arc::new(SolShared {
            buf: Mutex::new(SolBuffers {
                rx: VecDeque::new(),
                rx_cap: options.read_buffer.max(1),
                rx_waker: None,
                tx: VecDeque::new(),
                tx_cap: options.write_buffer.max(1),
                tx_waker: None,
                brk: false,
                busy: false,
                max_chunk: 32,
                end: None,
                endpoint,
            }),
            notify: Arc::new(Notify::new()),
        });
        // Attach first: the BMC may send as soon as it has answered.
        let link = SolLink {
            shared: shared.clone(),
            keepalive: Keepalive {
                every: options.keepalive,
                attempts: options.retries + 1,
                timeout: options.retry_timeout,
            },
            state: SolState::new(options),
        };
        client.attach_payload(Box::new(link)).await?;
        let mut stale = 0;
        let activation = loop {
            match client
                .call(&ActivatePayload {
                    encrypt: true,
                    authenticate: true,
                })
                .await
            {
                Ok(a) => break a,
                Err(IpmiError::Completion {
                    code: CC_PAYLOAD_ALREADY_ACTIVE,
                    ..
                }) if stale < 2 => {
                    stale += 1;
                    tracing::info!(%endpoint, "SOL already active in another session; deactivating it");
                    match client.call(&DeactivatePayload).await {
                        Ok(())
                        | Err(IpmiError::Completion {
                            code: CC_PAYLOAD_ALREADY_INACTIVE,
                            ..
                        }) => {}
                        Err(e) => {
                            let _ = client.detach_payload().await;
                            let _ = client.close().await;
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    let _ = client.detach_payload().await;
                    let _ = client.close().await;
                    return Err(e);
                }
            }
        };
        if activation.port != endpoint.port() {
            tracing::debug!(%endpoint, port = activation.port, "BMC names another SOL port; staying on the session's");
        }
        shared.buf.lock().expect("SOL buffers").max_chunk = activation.max_chunk();
        tracing::debug!(%endpoint, ?activation, "SOL active");
        Ok(SolStream {
            client: Some(client),
            shared,
            activation,
            endpoint,
        })
    }

    /// What the BMC answered to Activate Payload.
    pub fn activation(&self) -> SolActivation {
        self.activation
    }

    /// The BMC.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// Send a serial break to the host, after everything written so far
    /// has been accepted; returns once the break packet is sent.
    pub async fn send_break(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::flush(self).await?;
        {
            let mut b = self.shared.buf.lock().expect("SOL buffers");
            if let Some(e) = b.end_error() {
                return Err(e);
            }
            b.brk = true;
        }
        self.shared.notify.notify_one();
        // Wait until it has gone out, so that later writes follow it.
        std::future::poll_fn(|cx| {
            let mut b = self.shared.buf.lock().expect("SOL buffers");
            if let Some(e) = b.end_error() {
                return Poll::Ready(Err(e));
            }
            if !b.brk {
                return Poll::Ready(Ok(()));
            }
            b.tx_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Deactivate SOL (unless another session has taken it over) and close
    /// the session.
    pub async fn close(mut self) -> Result<(), IpmiError> {
        let Some(client) = self.client.take() else {
            return Ok(());
        };
        client.detach_payload().await?;
        self.shared
            .buf
            .lock()
            .expect("SOL buffers")
            .finish(Some(SolFailure::Deactivated));
        // Never deactivate a SOL that another session has taken over.
        match client.call(&GetPayloadInstanceInfo).await {
            Ok(holder) if !client.is_this_session(holder) => {
                tracing::debug!(endpoint = %self.endpoint, holder, "SOL held elsewhere; not deactivating");
                return client.close().await;
            }
            Ok(_) | Err(IpmiError::Completion { .. }) => {}
            Err(e) => {
                let _ = client.close().await;
                return Err(e);
            }
        }
        let r = match client.call(&DeactivatePayload).await {
            Ok(())
            | Err(IpmiError::Completion {
                code: CC_PAYLOAD_ALREADY_INACTIVE,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        };
        let closed = client.close().await;
        r.and(closed)
    }
}

impl AsyncRead for SolStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if !b.rx.is_empty() {
            let n = b.rx.len().min(buf.remaining());
            let (front, back) = b.rx.as_slices();
            let k = front.len().min(n);
            buf.put_slice(&front[..k]);
            buf.put_slice(&back[..n - k]);
            b.rx.drain(..n);
            drop(b);
            // Room again: the socket task may take held-back packets.
            self.shared.notify.notify_one();
            return Poll::Ready(Ok(()));
        }
        match &b.end {
            Some(None) => Poll::Ready(Ok(())),
            Some(Some(_)) => Poll::Ready(Err(b.end_error().expect("ended"))),
            None => {
                b.rx_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for SolStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if let Some(e) = b.end_error() {
            return Poll::Ready(Err(e));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = b.tx_cap.saturating_sub(b.tx.len());
        if room == 0 {
            b.tx_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        b.tx.extend(&data[..n]);
        drop(b);
        self.shared.notify.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut b = self.shared.buf.lock().expect("SOL buffers");
        if let Some(e) = b.end_error() {
            return Poll::Ready(Err(e));
        }
        if b.tx.is_empty() && !b.busy {
            return Poll::Ready(Ok(()));
        }
        b.tx_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
