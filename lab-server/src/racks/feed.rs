//! What each attached agent is told as events commit, routed once.
//!
//! One task ([`Racks::start`](super::Racks::start)) follows the core's
//! committed events and hands each rack only what touches it: the hosts an
//! event names, grouped by rack, down that rack's [`FeedRx`]; after an
//! inventory change (or when the task's own subscription lagged) a
//! [`Change::Rack`], the whole rack again, to every rack. Each agent link
//! reads its feed and sends the hosts' desired state. An event thus costs
//! one receive and one lookup per host it names, however many racks are
//! attached (with a hundred agents each following every event, the links
//! took a quarter of the server's CPU at 64 clients in `scale-bench`).
//!
//! A feed holds at most [`FEED_CAPACITY`] changes; a rack whose link cannot
//! keep up loses the overflow and, instead, is sent its whole rack again
//! once it reads on ([`FeedRx::next`]).

use crate::types::{HostName, RackName};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Changes a rack's feed holds before it is marked behind.
pub const FEED_CAPACITY: usize = 1024;

/// What a rack's link must send again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These hosts of the rack changed; `reclaiming` when their lease ended
    /// (the holder's console sessions end).
    Hosts {
        hosts: Vec<HostName>,
        reclaiming: bool,
    },
    /// The whole rack.
    Rack,
}

/// The open feeds, one per attached rack.
#[derive(Debug, Default)]
pub struct Feeds {
    open: Mutex<HashMap<RackName, FeedTx>>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct FeedTx {
    id: u64,
    tx: mpsc::Sender<Change>,
    behind: Arc<AtomicBool>,
}

/// One rack's end of its feed.
#[derive(Debug)]
pub struct FeedRx {
    pub id: u64,
    rx: mpsc::Receiver<Change>,
    behind: Arc<AtomicBool>,
}

impl FeedRx {
    /// The next change; [`Change::Rack`] when changes were lost because
    /// the feed was full (what is still queued is then dropped: the whole
    /// rack, read after it, covers it). `None` once the feed was closed or
    /// replaced by a newer attach of the rack.
    pub async fn next(&mut self) -> Option<Change> {
        let c = self.rx.recv().await?;
        if self.behind.swap(false, Ordering::AcqRel) {
            while self.rx.try_recv().is_ok() {}
            return Some(Change::Rack);
        }
        Some(c)
    }
}

impl Feeds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RackName, FeedTx>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `rack`'s feed, replacing an older one (whose reader then ends).
    pub fn open(&self, rack: &RackName) -> FeedRx {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let behind = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            rack.clone(),
            FeedTx {
                id,
                tx,
                behind: behind.clone(),
            },
        );
        FeedRx { id, rx, behind }
    }

    /// Closes `rack`'s feed `id`, unless a newer one replaced it.
    pub fn close(&self, rack: &RackName, id: u64) {
        let mut open = self.lock();
        if open.get(rack).is_some_and(|f| f.id == id) {
            open.remove(rack);
        }
    }

    /// Whether any rack is attached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether `rack` has a feed (for tests).
    #[cfg(test)]
    pub fn has(&self, rack: &RackName) -> bool {
        self.lock().contains_key(rack)
    }

    /// Hands `change` to `rack`'s feed, if it has one; a full feed is
    /// marked behind instead.
    pub fn send(&self, rack: &RackName, change: Change) {
        if let Some(f) = self.lock().get(rack) {
            push(f, change);
        }
    }

    /// Closes every feed (the core stopped: no more events).
    pub fn close_all(&self) {
        self.lock().clear();
    }

    /// [`Change::Rack`] to every feed.
    pub fn send_all_racks(&self) {
        for f in self.lock().values() {
            push(f, Change::Rack);
        }
    }
}

fn push(f: &FeedTx, change: Change) {
    if let Err(mpsc::error::TrySendError::Full(_)) = f.tx.try_send(change) {
        f.behind.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rack(n: &str) -> RackName {
        RackName::new(n).unwrap()
    }

    fn hosts(n: &str) -> Change {
        Change::Hosts {
            hosts: vec![HostName::new(n).unwrap()],
            reclaiming: false,
        }
    }

    #[tokio::test]
    async fn changes_reach_only_their_rack_and_a_full_feed_gets_the_whole_rack() {
        let feeds = Feeds::default();
        let mut a = feeds.open(&rack("a"));
        let mut b = feeds.open(&rack("b"));
        feeds.send(&rack("a"), hosts("a1"));
        feeds.send(&rack("zz"), hosts("z1"));
        assert_eq!(a.next().await, Some(hosts("a1")));
        assert!(b.rx.try_recv().is_err(), "b got a's change");

        // Overflow: the changes past the capacity are lost, and the reader
        // gets the whole rack instead of what was queued.
        for i in 0..FEED_CAPACITY + 10 {
            feeds.send(&rack("b"), hosts(&format!("b{i}")));
        }
        assert_eq!(b.next().await, Some(Change::Rack));
        feeds.send(&rack("b"), hosts("b9"));
        assert_eq!(b.next().await, Some(hosts("b9")));

        feeds.send_all_racks();
        assert_eq!(a.next().await, Some(Change::Rack));
        assert_eq!(b.next().await, Some(Change::Rack));

        // A newer attach replaces the feed: the old reader ends, and closing
        // the old id leaves the new one open.
        let old = a.id;
        let mut a2 = feeds.open(&rack("a"));
        assert_eq!(a.next().await, None);
        feeds.close(&rack("a"), old);
        assert!(feeds.has(&rack("a")));
        feeds.send(&rack("a"), hosts("a2"));
        assert_eq!(a2.next().await, Some(hosts("a2")));
        feeds.close(&rack("a"), a2.id);
        feeds.close(&rack("b"), b.id);
        assert!(feeds.is_empty());
        assert_eq!(a2.next().await, None);
    }
}
