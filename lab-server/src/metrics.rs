//! `/metrics` of lab-server: the OpenMetrics registry. Gauges of the
//! core's state are read at scrape time from the atomics the actor sets
//! after each batch ([`CoreStats`]); the histograms are lock-free
//! ([`AtomicHistogram`]) and shared with the code that observes them; the
//! count of attached agents is read from the rack registry; the webhook
//! delivery counts and outbox depth from the delivery task's
//! [`WebhookStats`](crate::webhooks::WebhookStats). Nothing here
//! sends a command to the actor, so a scrape never slows a batch.
//! The names, types and meanings are listed in `docs/metrics.md`.

use crate::core::stats::CoreStats;
use crate::racks::RackRegistry;
use lab_client::web::{AtomicHistogram, ProcessCollector};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The server's metrics that are not the core's: observed by the gRPC
/// layer.
#[derive(Debug, Clone)]
pub struct ApiStats {
    /// Seconds from an Acquire call's arrival to its grant (waiting
    /// included).
    pub grant_latency: AtomicHistogram,
}

impl Default for ApiStats {
    fn default() -> Self {
        Self {
            // 1 ms .. ~9 h.
            grant_latency: AtomicHistogram::exponential(0.001, 4.0, 13),
        }
    }
}

/// The registry of lab-server's `/metrics`.
pub fn registry(core: Arc<CoreStats>, api: &ApiStats, racks: RackRegistry) -> Registry {
    let mut r = Registry::default();
    r.register(
        "lab_queue_wait_seconds",
        "Time a granted lease request waited, from its arrival to its grant",
        core.queue_wait.clone(),
    );
    r.register(
        "lab_store_commit_seconds",
        "Time of one store commit (one write transaction with its fsync)",
        core.commit_seconds.clone(),
    );
    r.register(
        "lab_core_batch_commands",
        "Commands the core actor took into one batch (one commit)",
        core.batch_commands.clone(),
    );
    r.register(
        "lab_core_schedule_seconds",
        "Time of one scheduling pass in the core actor: which waiters get which hosts, and the leases it grants",
        core.schedule_seconds.clone(),
    );
    r.register(
        "lab_grant_latency_seconds",
        "Time from an Acquire call's arrival to its grant being sent, waiting included",
        api.grant_latency.clone(),
    );
    r.register(
        "lab_webhook_delivery_seconds",
        "Time of one webhook delivery attempt (connection included), whatever its result",
        core.webhooks.latency.clone(),
    );
    r.register_collector(Box::new(StateCollector { core, racks }));
    r.register_collector(Box::new(ProcessCollector::new()));
    r
}

/// Gauges read at scrape time.
#[derive(Debug)]
struct StateCollector {
    core: Arc<CoreStats>,
    racks: RackRegistry,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.core;
        let load = |a: &AtomicI64| a.load(Ordering::Relaxed);
        {
            let mut family = encoder.encode_descriptor(
                "lab_hosts",
                "Hosts known to the server, by lease-cycle state",
                None,
                MetricType::Gauge,
            )?;
            for (state, v) in [
                ("available", &c.hosts_available),
                ("leased", &c.hosts_leased),
                ("reclaiming", &c.hosts_reclaiming),
            ] {
                family
                    .encode_family(&[("state", state)])?
                    .encode_gauge(&load(v))?;
            }
        }
        gauge(
            &mut encoder,
            "lab_hosts_maintenance",
            "Hosts in maintenance (never granted while so)",
            load(&c.hosts_maintenance),
        )?;
        gauge(
            &mut encoder,
            "lab_hosts_retired",
            "Hosts removed from the inventory that are still being reclaimed",
            load(&c.hosts_retired),
        )?;
        gauge(
            &mut encoder,
            "lab_hosts_unreachable",
            "Hosts that cannot be driven now (their agent is away or their BMC silent)",
            load(&c.hosts_unreachable),
        )?;
        gauge(
            &mut encoder,
            "lab_leases_active",
            "Active leases",
            load(&c.leases_active),
        )?;
        gauge(
            &mut encoder,
            "lab_queue_depth",
            "Lease requests waiting in the queue",
            load(&c.queue_depth),
        )?;
        gauge(
            &mut encoder,
            "lab_agents_attached",
            "Rack agents attached now",
            self.racks.attached_count() as i64,
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "lab_webhook_deliveries",
                "Webhook delivery attempts by hook and result (delivered, http_error, unreachable), and deliveries given up after 24 h (given_up) or dropped from a full outbox (dropped)",
                None,
                MetricType::Counter,
            )?;
            for (hook, result, n) in c.webhooks.deliveries() {
                family
                    .encode_family(&[("hook", hook.as_str()), ("result", result)])?
                    .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&n, None)?;
            }
        }
        gauge(
            &mut encoder,
            "lab_webhook_outbox_rows",
            "Webhook deliveries waiting in the outbox (pending or being retried)",
            load(&c.webhooks.depth),
        )?;
        Ok(())
    }
}
