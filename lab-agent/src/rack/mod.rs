//! The agent's model of its rack, driven by the desired state lab-server
//! sends (converted at the edge, `link/convert.rs`): a [`Rack`] handle that
//! routes each host's desired state and commands to that host's own task,
//! and keeps the boot [`HostTable`] (what DHCP, TFTP and HTTP serve).
//!
//! - [`spec`]: the desired state of a host ([`HostSpec`]: boot identity,
//!   lease and profile, BMC, console).
//! - [`host`]: one reconciler task per host, owning its BMC
//!   ([`PowerControl`] and the probe that notices a silent one), its
//!   always-on console [`Capture`](crate::console::Capture), its
//!   provisioning and reclaim, and its power commands. A slow or dead BMC
//!   of one host never delays another; no lock is held across I/O.
//! - [`provision`]: provisioning and reclaim as a pure machine of plans
//!   and steps, tested as a table; the host task carries out its actions.
//! - [`install`]: the console lines of an install to disk (the
//!   installer's `LAB-INSTALL` progress, the installed disk's ready line)
//!   as pure parsers, for the install plan.
//! - [`report`]: what is reported per host ([`Report`], with a domain
//!   [`Phase`]), sent on every change and again after every attach.
//! - [`persist`]: `data_dir/provisioning.toml` (lease, phase by name,
//!   stage per host), written by one writer off the async threads, so that
//!   a restarted agent neither repeats (no second power cycle) nor forgets
//!   a provisioning, and watches a boot that was under way again.
//!
//! Provisioning a lease: boot device PXE (once, EFI flag per firmware),
//! power on (or hard reset if already on), then watch the console for the
//! profile's ready text (or failure text) within its timeout. A profile
//! that installs to disk (`install = true`, e.g. `xen-install`) first
//! follows the installer to its end and its power-off, then boots the
//! host's disk (boot device disk, persistent for the lease) and watches
//! for the installed system's ready line. Reclaiming a
//! host after its lease: the profile's Xen debug keys (if any) are played
//! into the console and their output captured, then the host is powered
//! off and its boot device override cleared.

pub mod host;
pub mod install;
pub mod persist;
pub mod provision;
pub mod report;
pub mod spec;
#[cfg(test)]
mod tests;

pub use report::{Phase, Provisioning, Report, ReportSink};
pub use spec::{BmcSpec, BootIdentity, ConsoleSpec, HostSpec, LeaseSpec, SpecError};

use crate::config::ProfileSettings;
use crate::console::{CaptureConfig, Hub, LogLimits};
use crate::hosts::{BootHost, HostTable};
use crate::ipmi::{ConnectOptions, PowerAction};
use crate::power::{IpmiPower, PowerControl, PowerError};
use host::{Consoles, Context, HostHandle, Request};
use lab_types::{HostName, LeaseId, ProfileName};
use persist::Persister;
use report::Reports;
use std::collections::BTreeMap;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Settings of the rack model.
#[derive(Debug, Clone)]
pub struct RackConfig {
    pub default_profile: String,
    pub profiles: BTreeMap<String, ProfileSettings>,
    /// Console logs go to `data_dir/console`; provisioning state to
    /// `data_dir/provisioning.toml`.
    pub data_dir: PathBuf,
    pub console_limits: LogLimits,
    pub bmc_probe_interval: Duration,
    pub ipmi: ConnectOptions,
    pub capture: CaptureConfig,
}

impl RackConfig {
    /// A profile's settings (the defaults for an unknown profile).
    pub fn settings(&self, profile: &str) -> ProfileSettings {
        self.profiles.get(profile).cloned().unwrap_or_default()
    }

    pub fn console_root(&self) -> PathBuf {
        self.data_dir.join("console")
    }
}

/// Builds the power control of a host's BMC (tests substitute simulators).
/// Called on a blocking thread: it may resolve a DNS name.
pub type PowerFactory =
    Arc<dyn Fn(&str, &BmcSpec) -> Result<Arc<dyn PowerControl>, String> + Send + Sync>;

/// The IPMI implementation of [`PowerFactory`].
pub fn ipmi_power_factory(options: ConnectOptions) -> PowerFactory {
    Arc::new(move |_host, bmc| {
        let endpoint = resolve(&bmc.address, bmc.port)?;
        Ok(Arc::new(IpmiPower::new(
            endpoint,
            bmc.user.clone(),
            bmc.password.clone(),
            options.clone(),
        )) as Arc<dyn PowerControl>)
    })
}

/// A BMC's address (blocking: DNS).
fn resolve(address: &str, port: u16) -> Result<SocketAddr, String> {
    (address, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve BMC address {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("BMC address {address} resolves to nothing"))
}

/// What kind of failure a command had, for the user's gRPC status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was malformed.
    InvalidArgument,
    /// The agent does not know the host.
    NotFound,
    /// The hardware refused (the BMC said no, the console is not captured).
    FailedPrecondition,
    /// This agent cannot do that command.
    Unimplemented,
    /// The BMC (or the console source) did not answer.
    Unavailable,
    /// A bug or an unexpected failure in the agent.
    Internal,
    /// A limit of the agent is reached (concurrent console log reads).
    ResourceExhausted,
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CommandError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CommandError {
            kind,
            message: message.into(),
        }
    }

    fn power(e: &PowerError) -> Self {
        let kind = match e {
            PowerError::Unreachable { .. } => ErrorKind::Unavailable,
            PowerError::Refused { .. } => ErrorKind::FailedPrecondition,
        };
        CommandError::new(kind, crate::error_chain(e))
    }
}

/// The rack; cheap to clone.
#[derive(Clone)]
pub struct Rack(Arc<Inner>);

struct Inner {
    ctx: Arc<Context>,
    table: HostTable,
    hosts: Mutex<Hosts>,
}

/// The host tasks. Only ever locked for short sections without I/O.
#[derive(Default)]
struct Hosts {
    live: BTreeMap<HostName, HostHandle>,
    /// Tasks of hosts removed from the rack, until they have stopped (a
    /// host of the same name added again waits for its predecessor).
    leaving: BTreeMap<HostName, JoinHandle<()>>,
}

impl Rack {
    /// A rack with no hosts yet; loads the persisted provisioning state.
    /// Must be called within a tokio runtime (it starts the state's writer).
    pub fn new(cfg: RackConfig, table: HostTable, power_factory: PowerFactory) -> Rack {
        Rack::with_consoles(cfg, table, power_factory, Consoles::Real)
    }

    pub(crate) fn with_consoles(
        cfg: RackConfig,
        table: HostTable,
        power_factory: PowerFactory,
        consoles: Consoles,
    ) -> Rack {
        let persisted = persist::load(&cfg.data_dir);
        let persister = Persister::spawn(cfg.data_dir.clone());
        let reports = Reports::new(persisted, persister);
        Rack(Arc::new(Inner {
            ctx: Arc::new(Context {
                cfg,
                power_factory,
                consoles,
                reports,
            }),
            table,
            hosts: Mutex::new(Hosts::default()),
        }))
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, Hosts> {
        self.0.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops everything the rack runs (captures, probes, provisioning) and
    /// detaches it from the link: what a process exit does. Returns once
    /// every capture is synced and the provisioning state is on disk.
    pub async fn shutdown(&self) {
        self.set_outbound(None);
        let tasks: Vec<JoinHandle<()>> = {
            let mut hosts = self.hosts();
            let live = std::mem::take(&mut hosts.live);
            let leaving = std::mem::take(&mut hosts.leaving);
            live.into_values()
                .map(HostHandle::stop)
                .chain(leaving.into_values())
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
        self.0.ctx.reports.flush().await;
    }

    pub fn console_root(&self) -> PathBuf {
        self.0.ctx.cfg.console_root()
    }

    /// Sets (or clears) where reports go.
    pub fn set_outbound(&self, out: Option<ReportSink>) {
        self.0.ctx.reports.set_outbound(out);
    }

    /// Sends every host's last report again (after an attach).
    pub fn resend_reports(&self) {
        self.0.ctx.reports.resend();
    }

    // ------------------------------------------------------------ desired state

    /// Replaces the whole rack; the boot table is rebuilt once.
    pub fn apply_rack(&self, specs: Vec<HostSpec>) {
        let mut hosts = self.hosts();
        let names: Vec<HostName> = specs.iter().map(|s| s.name.clone()).collect();
        for spec in specs {
            self.upsert(&mut hosts, spec);
        }
        let stale: Vec<HostName> = hosts
            .live
            .keys()
            .filter(|k| !names.contains(k))
            .cloned()
            .collect();
        for name in stale {
            if let Some(h) = hosts.live.remove(&name) {
                info!(host = %name, "host no longer in the rack");
                hosts.leaving.insert(name, h.stop());
            }
        }
        self.refresh_table(&hosts);
    }

    /// Applies one host's desired state.
    pub fn apply_host(&self, spec: HostSpec) {
        let mut hosts = self.hosts();
        self.upsert(&mut hosts, spec);
        self.refresh_table(&hosts);
    }

    fn upsert(&self, hosts: &mut Hosts, spec: HostSpec) {
        hosts.leaving.retain(|_, t| !t.is_finished());
        if let Some(h) = hosts.live.get(&spec.name) {
            h.set_spec(spec);
            return;
        }
        let name = spec.name.clone();
        let predecessor = hosts.leaving.remove(&name);
        let handle = HostHandle::spawn(self.0.ctx.clone(), spec, predecessor);
        hosts.live.insert(name, handle);
    }

    fn refresh_table(&self, hosts: &Hosts) {
        let default_profile = &self.0.ctx.cfg.default_profile;
        let boot: Vec<BootHost> = hosts
            .live
            .values()
            .map(HostHandle::spec)
            .filter_map(|s| match s.boot_host(default_profile) {
                Ok(b) => Some(b),
                Err(e) => {
                    warn!(host = %s.name, error = %e, "host not served");
                    None
                }
            })
            .collect();
        self.0.table.replace(boot);
    }

    // ------------------------------------------------------------ commands

    /// Sends a request to a host's task and waits for its answer.
    async fn ask<T>(
        &self,
        host: &str,
        request: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, CommandError> {
        let not_found =
            || CommandError::new(ErrorKind::NotFound, format!("no host {host} in this rack"));
        let requests = {
            let name = HostName::new(host).map_err(|_| not_found())?;
            let hosts = self.hosts();
            let h = hosts.live.get(&name).ok_or_else(not_found)?;
            h.requests()
        };
        let (tx, rx) = oneshot::channel();
        if requests.send(request(tx)).await.is_err() {
            return Err(not_found());
        }
        rx.await.map_err(|_| {
            CommandError::new(
                ErrorKind::Unavailable,
                format!("host {host} left the rack before answering"),
            )
        })
    }

    /// Where a forward to `host`'s `port` connects: the host's own IPv4
    /// from the inventory (never an address a user names).
    pub fn forward_target(&self, host: &str, port: u16) -> Result<SocketAddrV4, CommandError> {
        let not_found =
            || CommandError::new(ErrorKind::NotFound, format!("no host {host} in this rack"));
        let name = HostName::new(host).map_err(|_| not_found())?;
        let spec = self.hosts().live.get(&name).ok_or_else(not_found)?.spec();
        let ip = spec.ipv4().ok_or_else(|| {
            CommandError::new(
                ErrorKind::FailedPrecondition,
                format!("host {host} has no ipv4 in the inventory"),
            )
        })?;
        Ok(SocketAddrV4::new(ip, port))
    }

    /// Flushes a host's console capture to its log (before a log read).
    pub async fn flush_console(&self, host: &str) {
        let _ = self.ask(host, |reply| Request::Flush { reply }).await;
    }

    /// The console hub of a host, if its console is captured.
    pub async fn hub(&self, host: &str) -> Option<Hub> {
        self.ask(host, |reply| Request::Hub { reply })
            .await
            .ok()
            .flatten()
    }

    /// A power command (`None`: only read the state); answers the power
    /// state read back.
    pub async fn power(
        &self,
        host: &str,
        action: Option<PowerAction>,
    ) -> Result<bool, CommandError> {
        self.ask(host, |reply| Request::Power { action, reply })
            .await?
    }

    /// The reclaim step after `lease`: debug keys, power off, boot device
    /// override cleared.
    pub async fn reclaim(
        &self,
        host: &str,
        lease: LeaseId,
        profile: Option<ProfileName>,
    ) -> Result<(), CommandError> {
        self.ask(host, |reply| Request::Reclaim {
            lease,
            profile,
            reply,
        })
        .await?
    }
}
