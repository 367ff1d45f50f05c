//! A histogram for hot paths: fixed buckets of relaxed atomic counters and
//! an atomic sum, encoded by prometheus-client like its own `Histogram`.
//!
//! A scrape that races an `observe` may see the bucket counted before the
//! sum (or the reverse); the count is derived from the buckets, so `_count`
//! always equals the `+Inf` bucket.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Observations in buckets with the given upper bounds (and `+Inf`). Cheap to
/// clone: clones share the counters.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bounds: Vec<f64>,
    /// One per bound, then `+Inf`; not cumulative.
    counts: Vec<AtomicU64>,
    /// The sum, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// Buckets with these upper bounds, which must increase.
    pub fn new(bounds: &[f64]) -> Self {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "bounds must increase"
        );
        Self(Arc::new(Inner {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Bounds from `start`, each `factor` times the previous (like
    /// prometheus-client's `exponential_buckets`).
    pub fn exponential(start: f64, factor: f64, count: usize) -> Self {
        let bounds: Vec<f64> = std::iter::successors(Some(start), |b| Some(b * factor))
            .take(count)
            .collect();
        Self::new(&bounds)
    }

    pub fn observe(&self, v: f64) {
        let i = self.0.bounds.partition_point(|b| *b < v);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        // Lock-free add of an f64: retry while another thread added.
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of the observations so far.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum.load(Ordering::Relaxed))
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn encodes_cumulative_buckets_and_a_count_equal_to_inf() {
        let h = AtomicHistogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0, 3.0] {
            h.observe(v);
        }
        let mut r = Registry::default();
        r.register("t", "test", h.clone());
        let text = crate::web::encode(&r);
        assert!(text.contains("t_bucket{le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"1.0\"} 3\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("t_count 5\n"), "{text}");
        assert!(text.contains("t_sum 5.65\n"), "{text}");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = AtomicHistogram::exponential(0.001, 2.0, 10);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        h.observe(0.25);
                    }
                });
            }
        });
        assert_eq!(h.count(), 40_000);
        assert!((h.sum() - 10_000.0).abs() < 1e-6);
    }
}
