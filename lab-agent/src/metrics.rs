//! `/metrics` of the agent (`[metrics] listen = …` in agent.toml):
//! OpenMetrics from prometheus-client.
//!
//! The boot services keep their own relaxed-atomic counters
//! ([`DhcpStats`], [`TftpStats`], [`HttpStats`]), read at scrape time. What
//! happens deep in the host tasks — BMC commands, console bytes, viewers
//! that fell behind — is counted in this module's process-wide
//! [`AgentCounters`] (one agent per process), also relaxed atomics and a
//! lock-free histogram, so counting costs no lock on those paths either.
//! The names, types and meanings are listed in `docs/metrics.md`.

use crate::dhcp::DhcpStats;
use crate::http::HttpStats;
use crate::tftp::TftpStats;
use lab_client::web::{AtomicHistogram, ProcessCollector};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// A BMC operation, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcOp {
    ChassisStatus,
    ChassisControl,
    BootOptions,
}

impl BmcOp {
    const ALL: [BmcOp; 3] = [
        BmcOp::ChassisStatus,
        BmcOp::ChassisControl,
        BmcOp::BootOptions,
    ];

    fn label(self) -> &'static str {
        match self {
            BmcOp::ChassisStatus => "chassis_status",
            BmcOp::ChassisControl => "chassis_control",
            BmcOp::BootOptions => "boot_options",
        }
    }
}

/// How a BMC command ended, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BmcOutcome {
    Ok,
    /// No session (no answer, wrong credentials, …).
    Unreachable,
    /// The BMC answered with a failure.
    Refused,
}

impl BmcOutcome {
    const ALL: [BmcOutcome; 3] = [BmcOutcome::Ok, BmcOutcome::Unreachable, BmcOutcome::Refused];

    fn label(self) -> &'static str {
        match self {
            BmcOutcome::Ok => "ok",
            BmcOutcome::Unreachable => "unreachable",
            BmcOutcome::Refused => "refused",
        }
    }
}

/// The agent's process-wide counters.
#[derive(Debug)]
pub struct AgentCounters {
    /// By `BmcOp` × `BmcOutcome`.
    bmc: [[AtomicU64; 3]; 3],
    bmc_seconds: AtomicHistogram,
    console_bytes: AtomicU64,
    viewer_lags: AtomicU64,
    viewer_missed_bytes: AtomicU64,
}

/// The counters of this process.
pub static COUNTERS: LazyLock<AgentCounters> = LazyLock::new(|| AgentCounters {
    bmc: Default::default(),
    // 1 ms .. ~16 s.
    bmc_seconds: AtomicHistogram::exponential(0.001, 2.0, 15),
    console_bytes: AtomicU64::new(0),
    viewer_lags: AtomicU64::new(0),
    viewer_missed_bytes: AtomicU64::new(0),
});

impl AgentCounters {
    /// One BMC command (a session, the command, the close) and its time.
    pub fn bmc(&self, op: BmcOp, outcome: BmcOutcome, took: Duration) {
        self.bmc[op as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.bmc_seconds.observe_duration(took);
    }

    /// Console bytes captured from a host.
    pub fn console_bytes(&self, n: usize) {
        self.console_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A live console viewer fell behind and skipped `missed` bytes.
    pub fn viewer_lagged(&self, missed: u64) {
        self.viewer_lags.fetch_add(1, Ordering::Relaxed);
        self.viewer_missed_bytes
            .fetch_add(missed, Ordering::Relaxed);
    }
}

/// The boot services whose counters `/metrics` shows (those configured).
#[derive(Debug, Default, Clone)]
pub struct Services {
    pub dhcp: Option<Arc<DhcpStats>>,
    pub tftp: Option<Arc<TftpStats>>,
    pub http: Option<Arc<HttpStats>>,
}

/// The registry of the agent's `/metrics`.
pub fn registry(rack: &str, services: Services) -> Registry {
    let mut r = Registry::default();
    r.register(
        "lab_agent_bmc_command_seconds",
        "Time of one BMC command (session, command and close)",
        COUNTERS.bmc_seconds.clone(),
    );
    r.register_collector(Box::new(AgentCollector {
        rack: rack.to_owned(),
        services,
    }));
    r.register_collector(Box::new(ProcessCollector::new()));
    r
}

#[derive(Debug)]
struct AgentCollector {
    rack: String,
    services: Services,
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn labelled(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in values {
        let labels = [(label, *value)];
        let mut m = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => {
                m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(v, None)?
            }
            _ => m.encode_gauge(&(*v as i64))?,
        }
    }
    Ok(())
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &*COUNTERS;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        {
            let info = prometheus_client::metrics::info::Info::new(vec![(
                "rack".to_owned(),
                self.rack.clone(),
            )]);
            info.encode(e.encode_descriptor(
                "lab_agent",
                "The rack this agent serves",
                None,
                info.metric_type(),
            )?)?;
        }
        {
            let mut family = e.encode_descriptor(
                "lab_agent_bmc_commands",
                "BMC commands by operation and outcome",
                None,
                MetricType::Counter,
            )?;
            for op in BmcOp::ALL {
                for outcome in BmcOutcome::ALL {
                    family
                        .encode_family(&[("op", op.label()), ("outcome", outcome.label())])?
                        .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                            &load(&c.bmc[op as usize][outcome as usize]),
                            None,
                        )?;
                }
            }
        }
        counter(
            &mut e,
            "lab_agent_console_bytes",
            "Console bytes captured from the hosts",
            load(&c.console_bytes),
        )?;
        counter(
            &mut e,
            "lab_agent_console_viewer_lags",
            "Times a live console viewer fell behind the buffer and skipped output",
            load(&c.viewer_lags),
        )?;
        counter(
            &mut e,
            "lab_agent_console_viewer_missed_bytes",
            "Console bytes live viewers skipped because they fell behind",
            load(&c.viewer_missed_bytes),
        )?;
        if let Some(d) = &self.services.dhcp {
            let s = d.snapshot();
            labelled(
                &mut e,
                "lab_agent_dhcp_packets",
                "DHCP datagrams by what became of them",
                MetricType::Counter,
                "result",
                &[
                    ("received", s.received),
                    ("replied", s.replied),
                    ("ignored_unknown", s.ignored_unknown),
                    ("ignored_other", s.ignored_other),
                    ("malformed", s.malformed),
                    ("send_error", s.send_errors),
                ],
            )?;
        }
        if let Some(t) = &self.services.tftp {
            let s = t.snapshot();
            counter(
                &mut e,
                "lab_agent_tftp_requests",
                "TFTP read requests received",
                s.requests,
            )?;
            labelled(
                &mut e,
                "lab_agent_tftp_transfers",
                "TFTP transfers and refused requests by outcome",
                MetricType::Counter,
                "outcome",
                &[
                    ("completed", s.completed),
                    ("failed", s.failed),
                    ("not_found", s.not_found),
                    ("forbidden", s.forbidden),
                    ("refused", s.refused),
                    ("busy", s.busy + s.client_busy),
                ],
            )?;
            counter(
                &mut e,
                "lab_agent_tftp_bytes",
                "TFTP payload bytes sent, retransmits included",
                s.bytes_sent,
            )?;
            counter(
                &mut e,
                "lab_agent_tftp_retransmits",
                "TFTP packets sent again after a timeout",
                s.retransmits,
            )?;
            let g = prometheus_client::metrics::gauge::ConstGauge::new(s.active as i64);
            g.encode(e.encode_descriptor(
                "lab_agent_tftp_active",
                "TFTP transfers running now",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(h) = &self.services.http {
            let s = h.snapshot();
            counter(
                &mut e,
                "lab_agent_http_requests",
                "HTTP requests answered, any status",
                s.requests,
            )?;
            counter(
                &mut e,
                "lab_agent_http_bytes",
                "HTTP bytes sent (headers and bodies)",
                s.bytes_sent,
            )?;
            labelled(
                &mut e,
                "lab_agent_http_connections",
                "HTTP connections accepted, refused or ended by a timeout",
                MetricType::Counter,
                "outcome",
                &[
                    ("accepted", s.accepted),
                    ("refused", s.refused_full + s.refused_client),
                    (
                        "timeout",
                        s.header_timeouts + s.idle_timeouts + s.send_timeouts,
                    ),
                ],
            )?;
            let g = prometheus_client::metrics::gauge::ConstGauge::new(s.active as i64);
            g.encode(e.encode_descriptor(
                "lab_agent_http_active",
                "HTTP connections open now",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Serve the agent's `/metrics` on `listener` (plain HTTP: keep it on a
/// management network or loopback) until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
) -> Result<(), lab_client::web::ServeError> {
    use axum::extract::State;
    use axum::routing::get;
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |State(r): State<Arc<Registry>>, headers: axum::http::HeaderMap| async move {
                    let accept = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    lab_client::web::metrics_response(&r, accept)
                },
            ),
        )
        .with_state(registry);
    let limits = lab_client::web::WebLimits {
        max_connections: 16,
        ..Default::default()
    };
    lab_client::web::serve(
        listener,
        app,
        None,
        limits,
        std::future::pending(),
        Duration::ZERO,
    )
    .await
}
