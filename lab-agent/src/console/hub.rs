//! Per-host live fan-out: one shared ring of recent chunks addressed by
//! byte offset, many read-only [`Viewer`]s, at most one [`Writer`].
//!
//! Every chunk carries the time it was captured (the timestamp of its log
//! record), so a viewer can be started no earlier than a given time
//! ([`Hub::subscribe_since`]): a lease's holder never sees what the host
//! printed before the lease began.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

/// Sizes of a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Bytes replayed to a viewer when it joins.
    pub tail_bytes: usize,
    /// Bytes kept in memory; a viewer further behind than this lags (is
    /// told how many bytes it missed). At least `tail_bytes` is kept.
    pub buffer_bytes: usize,
    /// Depth of the queue of writes to the source.
    pub input_queue: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            tail_bytes: 64 * 1024,
            buffer_bytes: 4 * 1024 * 1024,
            input_queue: 64,
        }
    }
}

/// Bytes at a known position of the host's console stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of `data[0]` in the stream since the hub started.
    pub offset: u64,
    /// When the bytes were captured: ms since the Unix epoch, as in the log
    /// (non-decreasing).
    pub ts_ms: u64,
    /// The bytes.
    pub data: Bytes,
}

/// What a viewer receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerEvent {
    /// The next bytes, contiguous with the previous event.
    Data(Chunk),
    /// The viewer fell behind by more than the buffer: `missed` bytes were
    /// skipped and the next `Data` starts at `resume_at`.
    Lagged { missed: u64, resume_at: u64 },
}

/// Something to send to the console source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceInput {
    /// Bytes to write.
    Bytes(Bytes),
    /// A serial break (sources that cannot send one log and skip it).
    Break,
}

/// A write was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    /// Another writer took over.
    #[error("console writer was replaced by a newer writer")]
    Replaced,
    /// The capture task is gone.
    #[error("console capture has stopped")]
    Closed,
    /// The writer seat is taken and takeover was not asked for.
    #[error("console already has a writer")]
    Busy,
}

#[derive(Debug)]
struct Ring {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// Offset of the first byte still held.
    start: u64,
    /// Offset one past the last byte published.
    head: u64,
    closed: bool,
    /// Generation of the current writer, if one holds the seat.
    writer: Option<u64>,
    writer_gen: u64,
}

#[derive(Debug)]
struct Inner {
    config: HubConfig,
    ring: Mutex<Ring>,
    head_tx: watch::Sender<u64>,
    writer_tx: watch::Sender<u64>,
    input: mpsc::Sender<SourceInput>,
}

/// Cloneable handle to one host's fan-out.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// The source side's end of the writer queue.
pub type InputRx = mpsc::Receiver<SourceInput>;

impl Hub {
    /// A hub and the receiver of the bytes writers send to the source.
    pub fn new(config: HubConfig) -> (Hub, InputRx) {
        let (input, rx) = mpsc::channel(config.input_queue.max(1));
        let inner = Inner {
            config: HubConfig {
                buffer_bytes: config.buffer_bytes.max(config.tail_bytes),
                ..config
            },
            ring: Mutex::new(Ring {
                chunks: VecDeque::new(),
                bytes: 0,
                start: 0,
                head: 0,
                closed: false,
                writer: None,
                writer_gen: 0,
            }),
            head_tx: watch::channel(0).0,
            writer_tx: watch::channel(0).0,
            input,
        };
        (
            Hub {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    /// Publishes bytes read from the source at `ts_ms` (ms since the Unix
    /// epoch; clamped so that it never decreases). Never waits for viewers.
    pub fn publish(&self, ts_ms: u64, data: Bytes) {
        if data.is_empty() {
            return;
        }
        crate::metrics::COUNTERS.console_bytes(data.len());
        let head = {
            let mut ring = self.inner.ring.lock().expect("hub lock");
            let offset = ring.head;
            let ts_ms = ring.chunks.back().map_or(ts_ms, |c| ts_ms.max(c.ts_ms));
            ring.head += data.len() as u64;
            ring.bytes += data.len();
            ring.chunks.push_back(Chunk {
                offset,
                ts_ms,
                data,
            });
            let cap = self.inner.config.buffer_bytes;
            while let Some(front) = ring.chunks.front() {
                if ring.bytes - front.data.len() < cap {
                    break;
                }
                let len = front.data.len();
                ring.chunks.pop_front();
                ring.bytes -= len;
                ring.start += len as u64;
            }
            ring.head
        };
        self.inner.head_tx.send_replace(head);
    }

    /// Marks the stream ended: viewers drain what is buffered, then see
    /// `None`.
    pub fn close(&self) {
        let head = {
            let mut ring = self.inner.ring.lock().expect("hub lock");
            ring.closed = true;
            ring.head
        };
        self.inner.head_tx.send_replace(head);
    }

    /// Offset one past the last byte published.
    pub fn head(&self) -> u64 {
        self.inner.ring.lock().expect("hub lock").head
    }

    /// A new viewer that first replays up to `tail_bytes` of recent output,
    /// then follows live output with no gap or duplicate in between.
    pub fn subscribe(&self) -> Viewer {
        self.subscribe_since(self.inner.config.tail_bytes as u64, None)
    }

    /// A new viewer that first replays at most `replay_bytes` (never more
    /// than `tail_bytes`) of recent output, none of it captured before
    /// `not_before_ms` (ms since the Unix epoch), then follows live output.
    pub fn subscribe_since(&self, replay_bytes: u64, not_before_ms: Option<u64>) -> Viewer {
        let mut head_rx = self.inner.head_tx.subscribe();
        head_rx.borrow_and_update();
        let ring = self.inner.ring.lock().expect("hub lock");
        let replay = replay_bytes.min(self.inner.config.tail_bytes as u64);
        let mut pos = ring.head.saturating_sub(replay).max(ring.start);
        if let Some(not_before) = not_before_ms {
            // Timestamps never decrease: the first chunk at or after the
            // bound, else nothing before the head.
            let idx = ring.chunks.partition_point(|c| c.ts_ms < not_before);
            let first = ring.chunks.get(idx).map_or(ring.head, |c| c.offset);
            pos = pos.max(first);
        }
        Viewer {
            hub: self.clone(),
            pos,
            head_rx,
        }
    }

    /// Takes the writer seat if it is free.
    pub fn try_writer(&self) -> Result<Writer, WriteError> {
        self.writer(false)
    }

    /// Takes the writer seat, replacing (and telling) any current writer.
    pub fn take_writer(&self) -> Writer {
        self.writer(true).expect("takeover always succeeds")
    }

    fn writer(&self, takeover: bool) -> Result<Writer, WriteError> {
        let generation = {
            let mut ring = self.inner.ring.lock().expect("hub lock");
            if ring.writer.is_some() && !takeover {
                return Err(WriteError::Busy);
            }
            ring.writer_gen += 1;
            ring.writer = Some(ring.writer_gen);
            ring.writer_gen
        };
        self.inner.writer_tx.send_replace(generation);
        let mut seat_rx = self.inner.writer_tx.subscribe();
        seat_rx.borrow_and_update();
        Ok(Writer {
            hub: self.clone(),
            generation,
            seat_rx,
        })
    }

    /// Queues input for the source on behalf of the agent itself (the Xen
    /// debug-key capture), bypassing the writer seat.
    pub async fn inject(&self, input: SourceInput) -> Result<(), WriteError> {
        self.inner
            .input
            .send(input)
            .await
            .map_err(|_| WriteError::Closed)
    }
}

/// A read-only follower of a host's console.
#[derive(Debug)]
pub struct Viewer {
    hub: Hub,
    pos: u64,
    head_rx: watch::Receiver<u64>,
}

impl Viewer {
    /// Offset of the next byte this viewer will receive.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next event; `None` once the hub is closed and drained.
    pub async fn next(&mut self) -> Option<ViewerEvent> {
        self.next_batch(1).await
    }

    /// Like [`Viewer::next`], but a data event holds every byte already
    /// buffered after the viewer's position, up to `max` bytes (at least one
    /// chunk): a replay or a burst of small serial chunks goes out as a few
    /// messages rather than hundreds, so a viewer that reads a little late
    /// does not overflow the buffers on its way. Its `ts_ms` is its first
    /// byte's.
    pub async fn next_batch(&mut self, max: usize) -> Option<ViewerEvent> {
        loop {
            self.head_rx.borrow_and_update();
            {
                let ring = self.hub.inner.ring.lock().expect("hub lock");
                if self.pos < ring.start {
                    let missed = ring.start - self.pos;
                    self.pos = ring.start;
                    crate::metrics::COUNTERS.viewer_lagged(missed);
                    return Some(ViewerEvent::Lagged {
                        missed,
                        resume_at: self.pos,
                    });
                }
                if self.pos < ring.head {
                    let idx = ring
                        .chunks
                        .partition_point(|c| c.offset + c.data.len() as u64 <= self.pos);
                    let c = &ring.chunks[idx];
                    let skip = (self.pos - c.offset) as usize;
                    let first = c.data.slice(skip..);
                    let mut chunk = Chunk {
                        offset: self.pos,
                        ts_ms: c.ts_ms,
                        data: first.clone(),
                    };
                    let more = ring.chunks.range(idx + 1..);
                    if first.len() < max && more.len() > 0 {
                        let mut joined = bytes::BytesMut::from(&first[..]);
                        for c in more {
                            if joined.len() + c.data.len() > max {
                                break;
                            }
                            joined.extend_from_slice(&c.data);
                        }
                        chunk.data = joined.freeze();
                    }
                    self.pos += chunk.data.len() as u64;
                    return Some(ViewerEvent::Data(chunk));
                }
                if ring.closed {
                    return None;
                }
            }
            if self.head_rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// The holder of the writer seat. Dropping it frees the seat (if it was
/// not already taken over).
#[derive(Debug)]
pub struct Writer {
    hub: Hub,
    generation: u64,
    seat_rx: watch::Receiver<u64>,
}

impl Writer {
    /// Whether this writer still holds the seat.
    pub fn is_current(&self) -> bool {
        *self.seat_rx.borrow() == self.generation
    }

    /// Sends bytes to the source; refused once replaced. Waits while the
    /// input queue is full (e.g. the source is reconnecting).
    pub async fn write(&self, data: Bytes) -> Result<(), WriteError> {
        self.send(SourceInput::Bytes(data)).await
    }

    /// Sends a serial break to the source; refused once replaced.
    pub async fn send_break(&self) -> Result<(), WriteError> {
        self.send(SourceInput::Break).await
    }

    async fn send(&self, input: SourceInput) -> Result<(), WriteError> {
        if !self.is_current() {
            return Err(WriteError::Replaced);
        }
        self.hub.inject(input).await
    }

    /// Resolves when another writer takes over.
    pub async fn replaced(&mut self) {
        while *self.seat_rx.borrow_and_update() == self.generation {
            if self.seat_rx.changed().await.is_err() {
                // The hub is gone: nobody can replace us any more.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let mut ring = self.hub.inner.ring.lock().expect("hub lock");
        if ring.writer == Some(self.generation) {
            ring.writer = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(ev: Option<ViewerEvent>) -> Chunk {
        match ev {
            Some(ViewerEvent::Data(c)) => c,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_duplicate() {
        let (hub, _rx) = Hub::new(HubConfig {
            tail_bytes: 4,
            buffer_bytes: 16,
            input_queue: 1,
        });
        hub.publish(1, Bytes::from_static(b"abcdef"));
        let mut v = hub.subscribe();
        let c = data(v.next().await);
        assert_eq!((c.offset, &c.data[..]), (2, &b"cdef"[..]));
        hub.publish(2, Bytes::from_static(b"gh"));
        let c = data(v.next().await);
        assert_eq!((c.offset, &c.data[..]), (6, &b"gh"[..]));
        hub.close();
        assert_eq!(v.next().await, None);
    }

    #[tokio::test]
    async fn a_batch_joins_buffered_chunks_up_to_its_limit() {
        let (hub, _rx) = Hub::new(HubConfig {
            tail_bytes: 64,
            buffer_bytes: 64,
            input_queue: 1,
        });
        for (i, piece) in ["ab", "cd", "ef", "gh", "ij"].into_iter().enumerate() {
            hub.publish(10 + i as u64, Bytes::from(piece));
        }
        let mut v = hub.subscribe_since(9, None);
        // From offset 1: "b" then whole chunks while they fit in 6 bytes.
        let c = data(v.next_batch(6).await);
        assert_eq!((c.offset, c.ts_ms, &c.data[..]), (1, 10, &b"bcdef"[..]));
        let c = data(v.next_batch(6).await);
        assert_eq!((c.offset, c.ts_ms, &c.data[..]), (6, 13, &b"ghij"[..]));
        // One chunk larger than the limit still goes out whole.
        hub.publish(20, Bytes::from_static(b"0123456789"));
        hub.publish(21, Bytes::from_static(b"x"));
        let c = data(v.next_batch(4).await);
        assert_eq!(&c.data[..], b"0123456789");
        let c = data(v.next_batch(4).await);
        assert_eq!((c.offset, &c.data[..]), (20, &b"x"[..]));
        // `next` is one chunk at a time.
        hub.publish(22, Bytes::from_static(b"y"));
        hub.publish(23, Bytes::from_static(b"z"));
        assert_eq!(&data(v.next().await).data[..], b"y");
        assert_eq!(&data(v.next().await).data[..], b"z");
    }

    /// What `v` replays (everything up to the head).
    async fn replay(hub: &Hub, v: &mut Viewer) -> String {
        let mut out = Vec::new();
        let head = hub.head();
        while v.position() < head {
            out.extend_from_slice(&data(v.next().await).data);
        }
        String::from_utf8(out).unwrap()
    }

    /// A viewer bounded by a time replays nothing captured before it,
    /// however much replay it asks for; without a bound it sees the tail.
    #[tokio::test]
    async fn replay_starts_no_earlier_than_asked() {
        let (hub, _rx) = Hub::new(HubConfig {
            tail_bytes: 64,
            buffer_bytes: 64,
            input_queue: 1,
        });
        hub.publish(100, Bytes::from_static(b"old-1 "));
        hub.publish(200, Bytes::from_static(b"old-2 "));
        hub.publish(300, Bytes::from_static(b"new-1 "));
        // A clock step back keeps the previous stamp.
        hub.publish(250, Bytes::from_static(b"new-2 "));
        // (replay bytes, not before, what is replayed)
        let cases = [
            (64, None, "old-1 old-2 new-1 new-2 "),
            (12, None, "new-1 new-2 "),
            (64, Some(0), "old-1 old-2 new-1 new-2 "),
            (64, Some(150), "old-2 new-1 new-2 "),
            (64, Some(300), "new-1 new-2 "),
            (3, Some(300), "-2 "),
            (64, Some(301), ""),
            (1000, Some(301), ""),
        ];
        for (bytes, not_before, want) in cases {
            let mut v = hub.subscribe_since(bytes, not_before);
            assert_eq!(replay(&hub, &mut v).await, want, "{bytes} {not_before:?}");
        }
        // Live output after the subscription comes through.
        let mut v = hub.subscribe_since(64, Some(10_000));
        hub.publish(400, Bytes::from_static(b"live"));
        let c = data(v.next().await);
        assert_eq!((&c.data[..], c.ts_ms), (&b"live"[..], 400));
    }

    #[tokio::test]
    async fn slow_viewer_is_told_what_it_missed() {
        let (hub, _rx) = Hub::new(HubConfig {
            tail_bytes: 0,
            buffer_bytes: 4,
            input_queue: 1,
        });
        let mut v = hub.subscribe();
        for b in [&b"ab"[..], b"cd", b"ef", b"gh"] {
            hub.publish(1, Bytes::copy_from_slice(b));
        }
        assert_eq!(
            v.next().await,
            Some(ViewerEvent::Lagged {
                missed: 4,
                resume_at: 4
            })
        );
        assert_eq!(&data(v.next().await).data[..], b"ef");
    }

    #[tokio::test]
    async fn takeover_tells_the_previous_writer() {
        let (hub, mut rx) = Hub::new(HubConfig::default());
        let mut first = hub.try_writer().unwrap();
        assert_eq!(hub.try_writer().unwrap_err(), WriteError::Busy);
        first.write(Bytes::from_static(b"1")).await.unwrap();
        let second = hub.take_writer();
        first.replaced().await;
        assert_eq!(
            first.write(Bytes::from_static(b"x")).await,
            Err(WriteError::Replaced)
        );
        second.write(Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(rx.recv().await, Some(SourceInput::Bytes("1".into())));
        assert_eq!(rx.recv().await, Some(SourceInput::Bytes("2".into())));
        drop(first);
        assert_eq!(hub.try_writer().unwrap_err(), WriteError::Busy);
        drop(second);
        assert!(hub.try_writer().is_ok());
    }
}
