//! What the core actor measures, for `/metrics`: gauges of its state, set
//! after every batch from the state it owns, and histograms of its work.
//! Everything is a relaxed atomic (no lock on the actor's path); the
//! `crate::metrics` registry reads them at scrape time.

use lab_client::web::AtomicHistogram;
use std::sync::atomic::{AtomicI64, Ordering};

/// The core's gauges and histograms; shared by the actor (writer) and the
/// metrics registry (reader) behind an `Arc`.
#[derive(Debug)]
pub struct CoreStats {
    /// Hosts in each lease-cycle state: available, leased, reclaiming.
    pub hosts_available: AtomicI64,
    pub hosts_leased: AtomicI64,
    pub hosts_reclaiming: AtomicI64,
    /// Hosts in maintenance (any state).
    pub hosts_maintenance: AtomicI64,
    /// Hosts retired from the inventory but still known (being reclaimed).
    pub hosts_retired: AtomicI64,
    /// Hosts that cannot be driven now (agent away, BMC silent).
    pub hosts_unreachable: AtomicI64,
    pub leases_active: AtomicI64,
    /// Waiting requests (attached or detached).
    pub queue_depth: AtomicI64,
    /// Seconds a granted request waited, from its arrival to its grant
    /// (0 for a request granted in the batch that took it).
    pub queue_wait: AtomicHistogram,
    /// Seconds one store commit took (the fsync included).
    pub commit_seconds: AtomicHistogram,
    /// Commands taken into one batch.
    pub batch_commands: AtomicHistogram,
    /// Seconds one scheduling pass took in the actor (the grant decision
    /// and the records of the leases it grants).
    pub schedule_seconds: AtomicHistogram,
    /// The webhook delivery task's counters (it shares the core's stats).
    pub webhooks: std::sync::Arc<crate::webhooks::WebhookStats>,
}

impl Default for CoreStats {
    fn default() -> Self {
        Self {
            hosts_available: AtomicI64::new(0),
            hosts_leased: AtomicI64::new(0),
            hosts_reclaiming: AtomicI64::new(0),
            hosts_maintenance: AtomicI64::new(0),
            hosts_retired: AtomicI64::new(0),
            hosts_unreachable: AtomicI64::new(0),
            leases_active: AtomicI64::new(0),
            queue_depth: AtomicI64::new(0),
            // 0.1 s .. ~1.2 days.
            queue_wait: AtomicHistogram::new(&[
                0.1,
                0.5,
                1.0,
                5.0,
                15.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                4.0 * 3600.0,
                12.0 * 3600.0,
                86_400.0,
            ]),
            // 0.25 ms .. ~4 s.
            commit_seconds: AtomicHistogram::exponential(0.000_25, 2.0, 15),
            // 1 .. 512 (the most one batch takes).
            batch_commands: AtomicHistogram::exponential(1.0, 2.0, 10),
            // 10 µs .. ~2 s, in steps of 1.5×.
            schedule_seconds: AtomicHistogram::exponential(0.000_01, 1.5, 30),
            webhooks: Default::default(),
        }
    }
}

impl CoreStats {
    /// Set the gauges from the actor's state after a batch.
    pub(super) fn set_state(
        &self,
        tally: super::free::Tally,
        unreachable: usize,
        leases_active: usize,
        queue_depth: usize,
    ) {
        let super::free::Tally {
            available: avail,
            leased,
            reclaiming,
            maintenance: maint,
            retired,
        } = tally;
        let set = |g: &AtomicI64, v: i64| g.store(v, Ordering::Relaxed);
        set(&self.hosts_available, avail);
        set(&self.hosts_leased, leased);
        set(&self.hosts_reclaiming, reclaiming);
        set(&self.hosts_maintenance, maint);
        set(&self.hosts_retired, retired);
        set(&self.hosts_unreachable, unreachable as i64);
        set(&self.leases_active, leases_active as i64);
        set(&self.queue_depth, queue_depth as i64);
    }
}
