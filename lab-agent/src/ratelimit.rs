//! Rate-limited logging for floods: a hostile or broken peer can make an
//! event happen thousands of times a second (malformed DHCP packets, TFTP
//! requests to a full server, HTTP connections beyond the caps, accept
//! errors), and a log line per event would fill the disk and cost more CPU
//! than the event itself.
//!
//! A [`LogLimiter`] lets the first occurrence through, then stays silent and
//! counts; once its interval has passed since the last line, the next
//! occurrence is logged with the count of everything since that line, and
//! [`LogLimiter::flush`] (called from the server's periodic tick) reports
//! what a flood that has stopped left uncounted. So a flood costs one line
//! at its start and one line per interval while it lasts, each with a
//! `count` field: how many occurrences that line stands for.
//!
//! ```
//! # use lab_agent::ratelimit::LogLimiter;
//! let malformed = LogLimiter::new(std::time::Duration::from_secs(10));
//! if let Some(count) = malformed.check() {
//!     tracing::warn!(count, "malformed datagram dropped");
//! }
//! // ... and on the server's periodic tick:
//! if let Some(count) = malformed.flush() {
//!     tracing::warn!(count, "malformed datagrams dropped");
//! }
//! ```
//!
//! Time is [`tokio::time::Instant`], so tests can drive it with a paused
//! clock; outside a runtime it is the system's monotonic clock.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How often a flood is summarized, unless a server is configured otherwise.
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of event whose log lines are limited to one per interval.
/// Cheap to check (a short uncontended lock); shareable across threads.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last line was let through.
    last_line: Option<Instant>,
    /// Occurrences since that line, not yet reported.
    pending: u64,
}

impl LogLimiter {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State {
                last_line: None,
                pending: 0,
            }),
        }
    }

    /// One occurrence, now. `Some(count)`: log it, saying it stands for
    /// `count` occurrences (this one and those silenced since the last
    /// line); `None`: stay silent, it is counted for the next line.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`LogLimiter::check`] at a given time.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.lock();
        s.pending += 1;
        match s.last_line {
            Some(t) if now.saturating_duration_since(t) < self.interval => None,
            _ => {
                s.last_line = Some(now);
                Some(std::mem::take(&mut s.pending))
            }
        }
    }

    /// The occurrences silenced since the last line, once the interval since
    /// that line has passed; `None` when there are none or it is too early.
    /// Call it periodically, so that the end of a flood gets its summary.
    pub fn flush(&self) -> Option<u64> {
        self.flush_at(Instant::now())
    }

    /// [`LogLimiter::flush`] at a given time.
    pub fn flush_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.lock();
        let due = s
            .last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if s.pending == 0 || !due {
            return None;
        }
        s.last_line = Some(now);
        Some(std::mem::take(&mut s.pending))
    }

    /// The interval between lines.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two integers: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const SEC: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn first_occurrence_then_one_line_per_interval() {
        let l = LogLimiter::new(10 * SEC);
        assert_eq!(l.check(), Some(1), "the first is logged");
        // A flood of 2,000 in the next 5 s: silent.
        for _ in 0..2000 {
            assert_eq!(l.check(), None);
        }
        advance(5 * SEC).await;
        assert_eq!(l.check(), None);
        assert_eq!(l.flush(), None, "not yet: 5 s since the last line");
        // 10 s after the first line, the next occurrence carries the count.
        advance(5 * SEC).await;
        assert_eq!(l.check(), Some(2002));
        // The flood goes on for a while, then stops.
        advance(3 * SEC).await;
        for _ in 0..7 {
            assert_eq!(l.check(), None);
        }
        assert_eq!(l.flush(), None);
        advance(7 * SEC).await;
        assert_eq!(l.flush(), Some(7), "the tick reports the tail of the flood");
        assert_eq!(l.flush(), None, "once");
        advance(60 * SEC).await;
        assert_eq!(l.flush(), None, "nothing pending");
        // After a quiet interval the next occurrence is a first one again.
        assert_eq!(l.check(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_occurrence_inside_the_interval_after_a_flush_waits_for_the_next_line() {
        let l = LogLimiter::new(10 * SEC);
        assert_eq!(l.check(), Some(1));
        assert_eq!(l.check(), None);
        advance(10 * SEC).await;
        assert_eq!(l.flush(), Some(1));
        advance(SEC).await;
        assert_eq!(l.check(), None, "1 s after the flushed line");
        advance(9 * SEC).await;
        assert_eq!(l.flush(), Some(1));
    }

    #[test]
    fn lines_over_a_long_flood_are_bounded_by_the_interval() {
        // 100 occurrences a second for 60 s with a 10 s interval: at most
        // 1 + 60 / 10 lines, and the counts add up to every occurrence.
        let l = LogLimiter::new(10 * SEC);
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 0..6000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 10);
            lines.extend(l.check_at(now));
            if i % 100 == 0 {
                lines.extend(l.flush_at(now));
            }
        }
        lines.extend(l.flush_at(t0 + 70 * SEC));
        assert!(lines.len() <= 8, "{lines:?}");
        assert_eq!(lines.iter().sum::<u64>(), 6000);
    }
}
