//! What the agent tells lab-server about each host ([`Report`]: reachable
//! or why not, and the provisioning of its lease with a domain [`Phase`]),
//! and [`Reports`], the last report of every host: updated by the host
//! tasks, sent on every change while attached, sent again after every
//! attach, and persisted (lease, phase, stage) through the one
//! [`Persister`].

use super::persist::{Persister, Record, Ticket};
use lab_types::{HostName, LeaseId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use tracing::debug;

/// Where a lease's provisioning is. Persisted by name (`pending`,
/// `booting`, `installing`, `ready`, `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Started: setting the boot device, switching the power.
    Pending,
    /// Powered on (or to be powered by hand): the host is booting; for an
    /// install, also from its disk after the install.
    Booting,
    /// An install profile's installer runs on the host.
    Installing,
    /// The profile's ready text appeared (or it has none).
    Ready,
    /// A BMC error, a failure text, no ready text in time, or the console
    /// capture stopped.
    Failed,
}

impl Phase {
    /// Not finished yet: a restarted agent watches such a boot again.
    pub fn is_under_way(self) -> bool {
        matches!(self, Phase::Pending | Phase::Booting | Phase::Installing)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Pending => "pending",
            Phase::Booting => "booting",
            Phase::Installing => "installing",
            Phase::Ready => "ready",
            Phase::Failed => "failed",
        })
    }
}

/// By name; also the protobuf numbers (1–5) that files written by earlier
/// agents hold, so that an upgraded agent neither forgets nor repeats a
/// provisioning.
impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Phase;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("pending, booting, installing, ready or failed")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Phase, E> {
                match v {
                    "pending" => Ok(Phase::Pending),
                    "booting" => Ok(Phase::Booting),
                    "installing" => Ok(Phase::Installing),
                    "ready" => Ok(Phase::Ready),
                    "failed" => Ok(Phase::Failed),
                    _ => Err(E::unknown_variant(
                        v,
                        &["pending", "booting", "installing", "ready", "failed"],
                    )),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Phase, E> {
                match v {
                    1 => Ok(Phase::Pending),
                    2 => Ok(Phase::Booting),
                    3 => Ok(Phase::Ready),
                    4 => Ok(Phase::Failed),
                    5 => Ok(Phase::Installing),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Phase, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(V)
    }
}

/// The provisioning of one lease on a host, as last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    pub lease: LeaseId,
    pub phase: Phase,
    /// The latest stage in words ("boot device PXE", "powered on", …).
    pub stage: String,
    /// For a failure: the last lines of the console.
    pub console_tail: String,
    /// For [`Phase::Installing`]: how much of the install is done (0–100;
    /// not persisted: a restarted agent installs again).
    pub percent: u32,
    /// For [`Phase::Ready`]: the console line that held the profile's ready
    /// text (the health check's facts line); not persisted.
    pub ready_line: String,
}

/// What the agent reports about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub host: HostName,
    /// `None`: reachable; else why its BMC is not.
    pub unreachable: Option<String>,
    /// The provisioning of its current (or last unreclaimed) lease.
    pub provisioning: Option<Provisioning>,
}

impl Report {
    fn new(host: HostName) -> Self {
        Report {
            host,
            unreachable: None,
            provisioning: None,
        }
    }

    fn record(&self) -> Option<Record> {
        self.provisioning.as_ref().map(|p| Record {
            lease: p.lease,
            phase: p.phase,
            stage: p.stage.clone(),
        })
    }
}

/// Where reports go: the link to the server, which converts them to its
/// wire form. Returns false when the report could not be queued (the link
/// is busy or gone; every report goes out again after the next attach).
pub type ReportSink = Box<dyn Fn(&Report) -> bool + Send + Sync>;

/// The last report of every host.
pub struct Reports {
    inner: Mutex<Inner>,
    persister: Persister,
}

struct Inner {
    last: BTreeMap<HostName, Report>,
    out: Option<ReportSink>,
}

impl Reports {
    /// Starts from what `provisioning.toml` held (reported as reachable
    /// until a host's task knows better).
    pub fn new(persisted: BTreeMap<HostName, Record>, persister: Persister) -> Self {
        let last = persisted
            .into_iter()
            .map(|(host, r)| {
                let report = Report {
                    provisioning: Some(Provisioning {
                        lease: r.lease,
                        phase: r.phase,
                        stage: r.stage,
                        console_tail: String::new(),
                        percent: 0,
                        ready_line: String::new(),
                    }),
                    ..Report::new(host.clone())
                };
                (host, report)
            })
            .collect();
        Reports {
            inner: Mutex::new(Inner { last, out: None }),
            persister,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or clears) where reports go.
    pub fn set_outbound(&self, out: Option<ReportSink>) {
        self.lock().out = out;
    }

    /// Sends every host's last report again (after an attach).
    pub fn resend(&self) {
        let g = self.lock();
        if let Some(out) = &g.out {
            for r in g.last.values() {
                if !out(r) {
                    debug!("link busy or gone; the report goes out again after the next attach");
                }
            }
        }
    }

    /// A host's current provisioning, if any.
    pub fn provisioning(&self, host: &HostName) -> Option<Provisioning> {
        self.lock().last.get(host)?.provisioning.clone()
    }

    /// Updates one host's report with `f` and, if it changed, sends it. A
    /// change of lease, phase or stage is also persisted: the returned
    /// ticket says when it is on disk. Sending and persisting happen under
    /// the lock (neither blocks), so the server and the file always end
    /// with the latest state, whatever the order of the hosts' updates.
    pub fn update(&self, host: &HostName, f: impl FnOnce(&mut Report)) -> Option<Ticket> {
        let mut g = self.lock();
        let Inner { last, out } = &mut *g;
        let r = last
            .entry(host.clone())
            .or_insert_with(|| Report::new(host.clone()));
        let before = r.clone();
        f(r);
        if *r == before {
            return None;
        }
        let ticket = (r.record() != before.record()).then(|| {
            let snapshot = last
                .iter()
                .filter_map(|(h, r)| Some((h.clone(), r.record()?)))
                .collect();
            self.persister.save(snapshot)
        });
        if let Some(out) = out
            && !out(&last[host])
        {
            debug!("link busy or gone; the report goes out again after the next attach");
        }
        ticket
    }

    /// Waits until every persisted change is on disk.
    pub async fn flush(&self) {
        self.persister.flush().await;
    }

    /// Waits until the change behind `ticket` is on disk.
    pub async fn durable(&self, ticket: Ticket) {
        self.persister.durable(ticket).await;
    }
}
