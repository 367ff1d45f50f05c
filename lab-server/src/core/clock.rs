//! Time for the core: wall-clock milliseconds (persisted, so TTLs survive a
//! restart) derived from tokio's clock, so tests can pause and advance time.

use crate::types::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the core reads the time and how it turns a deadline into a timer.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// The tokio instant at which `t` will be reached.
    fn instant_at(&self, t: Timestamp) -> tokio::time::Instant;
}

/// Wall clock at start plus the time tokio has counted since then. Under
/// `tokio::time::pause()` it advances only when the test advances it.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: Timestamp,
    base_instant: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self::starting_at(Timestamp(ms))
    }

    /// A clock that reads `base` now.
    pub fn starting_at(base: Timestamp) -> Self {
        Self {
            base,
            base_instant: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.saturating_add(self.base_instant.elapsed())
    }

    fn instant_at(&self, t: Timestamp) -> tokio::time::Instant {
        self.base_instant + t.since(self.base)
    }
}
