//! What `--json` prints: serializable views of the proto messages.
//!
//! The views are the CLI's own stable output schema, decoupled from the
//! generated types: enums are lower-case strings (`"x86_64"`,
//! `"available"`, `"lease-granted"`), empty strings and unset fields are
//! `null`, timestamps are RFC 3339 in UTC, durations are whole seconds.
//! Strings are the server's as they are: the renderers escape them for the
//! terminal (`sanitize`), `--json` included (`output::json`).

use std::time::SystemTime;

use lab_proto::convert;
use lab_proto::v1::{
    Arch, ConsoleKind, Event, EventKind, Firmware, Host, HostProvisioning, HostState, Lease,
    LeaseRequest, LeaseState, PowerResponse, ProvisionPhase, ReloadInventoryResponse, Role,
    WhoAmIResponse,
};
use serde::{Serialize, Serializer};

/// A point in time; serializes as RFC 3339 UTC with whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time(pub SystemTime);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(self.0))
    }
}

/// A point in time; serializes as RFC 3339 UTC with milliseconds (events,
/// where several happen within a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreciseTime(pub SystemTime);

impl Serialize for PreciseTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<Time> {
    ts.map(|t| Time(convert::system_time(t)))
}

fn secs(d: Option<&prost_types::Duration>) -> Option<u64> {
    d.and_then(convert::duration_from_proto)
        .map(|d| d.as_secs())
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

pub fn arch_name(v: i32) -> &'static str {
    match Arch::try_from(v) {
        Ok(Arch::X8664) => "x86_64",
        Ok(Arch::Aarch64) => "aarch64",
        Ok(Arch::Unspecified) => "any",
        Err(_) => "unknown",
    }
}

pub fn firmware_name(v: i32) -> &'static str {
    match Firmware::try_from(v) {
        Ok(Firmware::Bios) => "bios",
        Ok(Firmware::Uefi) => "uefi",
        Ok(Firmware::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn host_state_name(v: i32) -> &'static str {
    match HostState::try_from(v) {
        Ok(HostState::Available) => "available",
        Ok(HostState::Leased) => "leased",
        Ok(HostState::Reclaiming) => "reclaiming",
        Ok(HostState::Maintenance) => "maintenance",
        Ok(HostState::Retired) => "retired",
        Ok(HostState::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn console_name(v: i32) -> &'static str {
    match ConsoleKind::try_from(v) {
        Ok(ConsoleKind::None) => "none",
        Ok(ConsoleKind::IpmiSol) => "ipmi-sol",
        Ok(ConsoleKind::Serial) => "serial",
        Ok(ConsoleKind::Tcp) => "tcp",
        Ok(ConsoleKind::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn lease_state_name(v: i32) -> &'static str {
    match LeaseState::try_from(v) {
        Ok(LeaseState::Active) => "active",
        Ok(LeaseState::Released) => "released",
        Ok(LeaseState::Expired) => "expired",
        Ok(LeaseState::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn event_kind_name(v: i32) -> &'static str {
    match EventKind::try_from(v) {
        Ok(EventKind::LeaseRequested) => "lease-requested",
        Ok(EventKind::LeaseGranted) => "lease-granted",
        Ok(EventKind::LeaseRenewed) => "lease-renewed",
        Ok(EventKind::LeaseReleased) => "lease-released",
        Ok(EventKind::LeaseExpired) => "lease-expired",
        Ok(EventKind::RequestWithdrawn) => "request-withdrawn",
        Ok(EventKind::HostReclaiming) => "host-reclaiming",
        Ok(EventKind::HostAvailable) => "host-available",
        Ok(EventKind::HostMaintenanceOn) => "host-maintenance-on",
        Ok(EventKind::HostMaintenanceOff) => "host-maintenance-off",
        Ok(EventKind::InventoryLoaded) => "inventory-loaded",
        Ok(EventKind::HostAdded) => "host-added",
        Ok(EventKind::HostRetired) => "host-retired",
        Ok(EventKind::HostRemoved) => "host-removed",
        Ok(EventKind::HostUnreachable) => "host-unreachable",
        Ok(EventKind::HostReachable) => "host-reachable",
        Ok(EventKind::ForwardOpened) => "forward-opened",
        Ok(EventKind::ForwardClosed) => "forward-closed",
        Ok(EventKind::AgentAttached) => "agent-attached",
        Ok(EventKind::AgentDetached) => "agent-detached",
        Ok(EventKind::HostHealth) => "host-health",
        Ok(EventKind::HealthCheckStarted) => "health-check-started",
        Ok(EventKind::HealthCheckPassed) => "health-check-passed",
        Ok(EventKind::HealthCheckFailed) => "health-check-failed",
        Ok(EventKind::LeaseExpiring) => "lease-expiring",
        Ok(EventKind::WebhookUndelivered) => "webhook-undelivered",
        Ok(EventKind::LeasePreempted) => "lease-preempted",
        Ok(EventKind::BookingCreated) => "booking-created",
        Ok(EventKind::BookingStarted) => "booking-started",
        Ok(EventKind::BookingEnded) => "booking-ended",
        Ok(EventKind::BookingCancelled) => "booking-cancelled",
        Ok(EventKind::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn health_name(v: i32) -> &'static str {
    use lab_proto::v1::HostHealth;
    match HostHealth::try_from(v) {
        Ok(HostHealth::Healthy) => "healthy",
        Ok(HostHealth::Suspect) => "suspect",
        Ok(HostHealth::Quarantined) => "quarantined",
        // A server from before health: every host was healthy.
        Ok(HostHealth::Unspecified) => "healthy",
        Err(_) => "unknown",
    }
}

pub fn phase_name(v: i32) -> &'static str {
    match ProvisionPhase::try_from(v) {
        Ok(ProvisionPhase::Pending) => "pending",
        Ok(ProvisionPhase::Booting) => "booting",
        Ok(ProvisionPhase::Installing) => "installing",
        Ok(ProvisionPhase::Ready) => "ready",
        Ok(ProvisionPhase::Failed) => "failed",
        Ok(ProvisionPhase::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

pub fn role_name(v: i32) -> &'static str {
    match Role::try_from(v) {
        Ok(Role::Ci) => "ci",
        Ok(Role::Developer) => "developer",
        Ok(Role::Operator) => "operator",
        Ok(Role::Agent) => "agent",
        Ok(Role::Unspecified) => "unspecified",
        Err(_) => "unknown",
    }
}

#[derive(Debug, Serialize)]
pub struct HostView {
    pub name: String,
    pub arch: &'static str,
    pub firmware: &'static str,
    pub rack: String,
    pub mac: String,
    pub ipv4: Option<String>,
    pub flags: Vec<String>,
    pub state: &'static str,
    pub maintenance: bool,
    pub lease_id: Option<String>,
    pub holder: Option<String>,
    pub lease_expires_at: Option<Time>,
    pub bmc: Option<String>,
    pub console: &'static str,
    pub generation: u64,
    /// False while the host cannot be driven (agent away, BMC silent).
    pub reachable: bool,
    pub unreachable_reason: Option<String>,
    /// `healthy`, `suspect` or `quarantined` (never granted).
    pub health: &'static str,
    pub health_reason: Option<String>,
    pub health_since: Option<Time>,
}

impl From<&Host> for HostView {
    fn from(h: &Host) -> Self {
        HostView {
            name: h.name.clone(),
            arch: arch_name(h.arch),
            firmware: firmware_name(h.firmware),
            rack: h.rack.clone(),
            mac: h.mac.clone(),
            ipv4: non_empty(&h.ipv4),
            flags: h.flags.clone(),
            state: host_state_name(h.state),
            maintenance: h.maintenance,
            lease_id: non_empty(&h.lease_id),
            holder: non_empty(&h.holder),
            lease_expires_at: time(h.lease_expires_at.as_ref()),
            bmc: non_empty(&h.bmc),
            console: console_name(h.console),
            generation: h.generation,
            reachable: h.reachable,
            unreachable_reason: non_empty(&h.unreachable_reason),
            health: health_name(h.health),
            health_reason: non_empty(&h.health_reason),
            health_since: time(h.health_since.as_ref()),
        }
    }
}

impl HostView {
    /// The state as a table shows it: a pending maintenance on a host that is
    /// still leased (or reclaiming) is appended, e.g. `leased+maint`, and an
    /// unreachable host says so and why, e.g.
    /// `available (unreachable: BMC does not answer)`.
    pub fn state_label(&self) -> String {
        let mut label = if self.maintenance && self.state != "maintenance" {
            format!("{}+maint", self.state)
        } else {
            self.state.to_owned()
        };
        if !self.reachable {
            label.push_str(&format!(" ({})", self.reachability()));
        }
        label
    }

    /// `reachable`, `unreachable` or `unreachable: <reason>`.
    pub fn reachability(&self) -> String {
        match (self.reachable, &self.unreachable_reason) {
            (true, _) => "reachable".to_owned(),
            (false, None) => "unreachable".to_owned(),
            (false, Some(why)) => format!("unreachable: {}", why.replace('\n', " ")),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LeaseView {
    pub id: String,
    pub holder: String,
    pub hosts: Vec<String>,
    pub state: &'static str,
    pub profile: Option<String>,
    pub priority: i32,
    pub comment: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub granted_at: Option<Time>,
    pub expires_at: Option<Time>,
    pub max_expires_at: Option<Time>,
    pub ended_at: Option<Time>,
    pub generation: u64,
    pub waiter_id: Option<u64>,
    /// How far each host got booting into the profile; empty when the
    /// server reports nothing.
    pub provisioning: Vec<ProvisioningView>,
    /// The lease's SSH public key by type and fingerprint, e.g.
    /// `ssh-ed25519 SHA256:… (alice@ci)`; never the whole key.
    pub ssh_key: Option<String>,
    /// It may be preempted for a request that is not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
    /// When its preemption was noticed (it ends at `expires_at`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preempted_at: Option<Time>,
    /// The booking it was granted for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub booking: Option<u64>,
}

/// A booking or maintenance window (`lab booking list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BookingView {
    pub id: u64,
    /// `lease` or `maintenance`.
    pub kind: &'static str,
    pub holder: String,
    pub hosts: Vec<String>,
    pub start: Option<Time>,
    pub end: Option<Time>,
    /// `scheduled` or `started`.
    pub state: &'static str,
    pub comment: Option<String>,
    pub profile: Option<String>,
    pub lease_id: Option<String>,
    pub created_at: Option<Time>,
}

impl From<&lab_proto::v1::Booking> for BookingView {
    fn from(b: &lab_proto::v1::Booking) -> Self {
        use lab_proto::v1::{BookingKind, BookingState};
        BookingView {
            id: b.id,
            kind: match BookingKind::try_from(b.kind) {
                Ok(BookingKind::Lease) => "lease",
                Ok(BookingKind::Maintenance) => "maintenance",
                _ => "unknown",
            },
            holder: b.holder.clone(),
            hosts: b.hosts.clone(),
            start: time(b.start.as_ref()),
            end: time(b.end.as_ref()),
            state: match BookingState::try_from(b.state) {
                Ok(BookingState::Scheduled) => "scheduled",
                Ok(BookingState::Started) => "started",
                _ => "unknown",
            },
            comment: non_empty(&b.comment),
            profile: non_empty(&b.profile),
            lease_id: non_empty(&b.lease_id),
            created_at: time(b.created_at.as_ref()),
        }
    }
}

/// One host's boot progress within a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProvisioningView {
    pub host: String,
    /// `pending`, `booting`, `installing`, `ready` or `failed`.
    pub phase: &'static str,
    pub stage: Option<String>,
    /// For `installing`: how much of the install is done (0–100).
    pub percent: Option<u32>,
    pub updated_at: Option<Time>,
    /// For `failed`: the last lines of the host's console.
    pub console_tail: Option<String>,
    /// For `failed`: whose fault it was, by the server's rules.
    pub failure: Option<FailureView>,
}

/// The server's attribution of a failed provisioning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureView {
    /// `host`, `job`, `infra` or `unknown`.
    pub class: &'static str,
    /// The rule that matched.
    pub rule: Option<String>,
    /// The console line (or stage) it matched.
    pub line: Option<String>,
}

impl FailureView {
    fn from_proto(p: &HostProvisioning) -> Option<Self> {
        use lab_proto::v1::FailureClass as C;
        let class = match C::try_from(p.failure_class).unwrap_or(C::Unspecified) {
            C::Unspecified => return None,
            C::Host => "host",
            C::Job => "job",
            C::Infra => "infra",
            C::Unknown => "unknown",
        };
        Some(FailureView {
            class,
            rule: non_empty(&p.failure_rule),
            line: non_empty(&p.failure_line),
        })
    }
}

impl From<&HostProvisioning> for ProvisioningView {
    fn from(p: &HostProvisioning) -> Self {
        ProvisioningView {
            host: p.host.clone(),
            phase: phase_name(p.phase),
            stage: non_empty(&p.stage),
            percent: (p.phase == ProvisionPhase::Installing as i32).then_some(p.percent.min(100)),
            updated_at: time(p.updated_at.as_ref()),
            console_tail: non_empty(&p.console_tail),
            failure: FailureView::from_proto(p),
        }
    }
}

impl ProvisioningView {
    /// `booting — powered on`, `installing 42 % — writing the image`, or
    /// just the phase when there is no stage.
    pub fn progress(&self) -> String {
        let phase = self.phase_percent();
        match &self.stage {
            Some(stage) => format!("{phase} \u{2014} {stage}"),
            None => phase,
        }
    }

    /// The phase, with the percentage when installing (`installing 42 %`).
    pub fn phase_percent(&self) -> String {
        match self.percent {
            Some(p) => format!("{} {p} %", self.phase),
            None => self.phase.to_owned(),
        }
    }
}

/// The power state read back after `lab power`.
#[derive(Debug, Serialize)]
pub struct PowerView {
    pub host: String,
    pub on: bool,
    /// `on` or `off`, for readers that prefer a word.
    pub power: &'static str,
}

impl From<&PowerResponse> for PowerView {
    fn from(p: &PowerResponse) -> Self {
        PowerView {
            host: p.host.clone(),
            on: p.on,
            power: if p.on { "on" } else { "off" },
        }
    }
}

impl From<&Lease> for LeaseView {
    fn from(l: &Lease) -> Self {
        LeaseView {
            id: l.id.clone(),
            holder: l.holder.clone(),
            hosts: l.hosts.clone(),
            state: lease_state_name(l.state),
            profile: non_empty(&l.profile),
            priority: l.priority,
            comment: non_empty(&l.comment),
            ttl_seconds: secs(l.ttl.as_ref()),
            granted_at: time(l.granted_at.as_ref()),
            expires_at: time(l.expires_at.as_ref()),
            max_expires_at: time(l.max_expires_at.as_ref()),
            ended_at: time(l.ended_at.as_ref()),
            generation: l.generation,
            waiter_id: (l.waiter_id != 0).then_some(l.waiter_id),
            provisioning: l.provisioning.iter().map(ProvisioningView::from).collect(),
            ssh_key: (!l.ssh_public_key.is_empty())
                .then(|| crate::sshkey::describe(&l.ssh_public_key)),
            preemptible: l.preemptible,
            preempted_at: time(l.preempted_at.as_ref()),
            booking: (l.booking_id != 0).then_some(l.booking_id),
        }
    }
}

impl LeaseView {
    /// One cell for the lease table: `ready` when every host is in the same
    /// phase, else `x1:ready,x2:booting`; empty when nothing is reported.
    pub fn boot_summary(&self) -> String {
        let phases: Vec<&str> = self.provisioning.iter().map(|p| p.phase).collect();
        match phases.first() {
            None => String::new(),
            Some(first) if phases.iter().all(|p| p == first) => (*first).to_owned(),
            Some(_) => self
                .provisioning
                .iter()
                .map(|p| format!("{}:{}", p.host, p.phase))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// What a lease request asked for (in `lease-requested` events).
#[derive(Debug, Serialize)]
pub struct RequestView {
    pub arch: &'static str,
    pub flags: Vec<String>,
    pub hosts: Vec<String>,
    pub count: u32,
    pub profile: Option<String>,
    pub ttl_seconds: Option<u64>,
    pub priority: i32,
    pub comment: Option<String>,
}

impl From<&LeaseRequest> for RequestView {
    fn from(r: &LeaseRequest) -> Self {
        RequestView {
            arch: arch_name(r.arch),
            flags: r.flags.clone(),
            hosts: r.hosts.clone(),
            count: r.count.max(1),
            profile: non_empty(&r.profile),
            ttl_seconds: secs(r.ttl.as_ref()),
            priority: r.priority,
            comment: non_empty(&r.comment),
        }
    }
}

impl RequestView {
    /// `count=2 arch=x86_64 flags=gpu hosts=h1,h2 ttl=30m profile=xen priority=5`.
    pub fn summary(&self) -> String {
        let mut parts = vec![
            format!("count={}", self.count),
            format!("arch={}", self.arch),
        ];
        if !self.flags.is_empty() {
            parts.push(format!("flags={}", self.flags.join(",")));
        }
        if !self.hosts.is_empty() {
            parts.push(format!("hosts={}", self.hosts.join(",")));
        }
        if let Some(ttl) = self.ttl_seconds {
            let ttl = std::time::Duration::from_secs(ttl);
            parts.push(format!("ttl={}", humantime::format_duration(ttl)));
        }
        if let Some(p) = &self.profile {
            parts.push(format!("profile={p}"));
        }
        if self.priority != 0 {
            parts.push(format!("priority={}", self.priority));
        }
        parts.join(" ")
    }
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub time: Option<PreciseTime>,
    pub actor: String,
    pub kind: &'static str,
    pub hosts: Vec<String>,
    pub lease_id: Option<String>,
    pub waiter_id: Option<u64>,
    pub request: Option<RequestView>,
    pub detail: Option<String>,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> Self {
        EventView {
            seq: e.seq,
            time: e
                .time
                .as_ref()
                .map(|t| PreciseTime(convert::system_time(t))),
            actor: e.actor.clone(),
            kind: event_kind_name(e.kind),
            hosts: e.hosts.clone(),
            lease_id: non_empty(&e.lease_id),
            waiter_id: (e.waiter_id != 0).then_some(e.waiter_id),
            request: e.request.as_ref().map(RequestView::from),
            detail: non_empty(&e.detail),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WhoAmIView {
    pub principal: String,
    pub role: &'static str,
    /// Empty from a server without projects.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub project: String,
}

impl From<&WhoAmIResponse> for WhoAmIView {
    fn from(w: &WhoAmIResponse) -> Self {
        WhoAmIView {
            principal: w.principal.clone(),
            role: role_name(w.role),
            project: w.project.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReloadView {
    pub hosts: u32,
    pub added: u32,
    pub removed: u32,
}

impl From<&ReloadInventoryResponse> for ReloadView {
    fn from(r: &ReloadInventoryResponse) -> Self {
        ReloadView {
            hosts: r.hosts,
            added: r.added,
            removed: r.removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_proto::convert::timestamp_from_millis;

    #[test]
    fn enum_names_are_lower_case_and_total() {
        assert_eq!(arch_name(Arch::X8664 as i32), "x86_64");
        assert_eq!(arch_name(Arch::Aarch64 as i32), "aarch64");
        assert_eq!(arch_name(99), "unknown");
        assert_eq!(host_state_name(HostState::Available as i32), "available");
        assert_eq!(console_name(ConsoleKind::IpmiSol as i32), "ipmi-sol");
        assert_eq!(
            event_kind_name(EventKind::LeaseGranted as i32),
            "lease-granted"
        );
        assert_eq!(
            event_kind_name(EventKind::HostMaintenanceOff as i32),
            "host-maintenance-off"
        );
        // Every event kind has a short name of its own.
        for v in 1..=16 {
            let name = event_kind_name(v);
            assert!(!matches!(name, "unknown" | "unspecified"), "{v}");
            let proto = EventKind::try_from(v).unwrap().as_str_name();
            let expect = proto
                .trim_start_matches("EVENT_KIND_")
                .to_lowercase()
                .replace('_', "-");
            assert_eq!(name, expect);
        }
    }

    #[test]
    fn lease_json_uses_nulls_strings_and_rfc3339() {
        let lease = Lease {
            id: "L1".into(),
            holder: "alice".into(),
            hosts: vec!["h1".into()],
            state: LeaseState::Active as i32,
            ttl: Some(convert::duration_to_proto(std::time::Duration::from_secs(
                1800,
            ))),
            expires_at: Some(timestamp_from_millis(1_700_000_000_500)),
            ..Default::default()
        };
        let v = serde_json::to_value(LeaseView::from(&lease)).unwrap();
        assert_eq!(v["state"], "active");
        assert_eq!(v["profile"], serde_json::Value::Null);
        assert_eq!(v["ttl_seconds"], 1800);
        assert_eq!(v["expires_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["ended_at"], serde_json::Value::Null);
        assert_eq!(v["waiter_id"], serde_json::Value::Null);
    }

    #[test]
    fn event_time_keeps_milliseconds() {
        let e = Event {
            seq: 7,
            time: Some(timestamp_from_millis(1_700_000_000_123)),
            kind: EventKind::LeaseRequested as i32,
            request: Some(LeaseRequest {
                arch: Arch::X8664 as i32,
                flags: vec!["gpu".into()],
                count: 2,
                ttl: Some(convert::duration_to_proto(std::time::Duration::from_secs(
                    1800,
                ))),
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = EventView::from(&e);
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["kind"], "lease-requested");
        assert_eq!(
            view.request.unwrap().summary(),
            "count=2 arch=x86_64 flags=gpu ttl=30m"
        );
    }

    #[test]
    fn maintenance_pending_shows_in_the_state_label() {
        let host = Host {
            state: HostState::Leased as i32,
            maintenance: true,
            reachable: true,
            ..Default::default()
        };
        assert_eq!(HostView::from(&host).state_label(), "leased+maint");
        let host = Host {
            state: HostState::Maintenance as i32,
            maintenance: true,
            reachable: true,
            ..Default::default()
        };
        assert_eq!(HostView::from(&host).state_label(), "maintenance");
    }

    #[test]
    fn unreachable_shows_in_the_state_label_with_its_reason() {
        let mut host = Host {
            state: HostState::Available as i32,
            reachable: false,
            unreachable_reason: "BMC does not answer".into(),
            ..Default::default()
        };
        assert_eq!(
            HostView::from(&host).state_label(),
            "available (unreachable: BMC does not answer)"
        );
        host.unreachable_reason.clear();
        assert_eq!(
            HostView::from(&host).state_label(),
            "available (unreachable)"
        );
        let v = serde_json::to_value(HostView::from(&host)).unwrap();
        assert_eq!(v["reachable"], false);
        assert_eq!(v["unreachable_reason"], serde_json::Value::Null);
    }

    #[test]
    fn provisioning_views_and_summary() {
        let p = |host: &str, phase: ProvisionPhase, stage: &str| HostProvisioning {
            host: host.into(),
            phase: phase as i32,
            stage: stage.into(),
            ..Default::default()
        };
        let mut lease = Lease {
            provisioning: vec![
                p("x1", ProvisionPhase::Ready, "ready marker seen"),
                p("x2", ProvisionPhase::Ready, ""),
            ],
            ..Default::default()
        };
        let v = LeaseView::from(&lease);
        assert_eq!(v.boot_summary(), "ready");
        assert_eq!(
            v.provisioning[0].progress(),
            "ready \u{2014} ready marker seen"
        );
        assert_eq!(v.provisioning[1].progress(), "ready");
        lease.provisioning[1] = p("x2", ProvisionPhase::Booting, "powered on");
        assert_eq!(
            LeaseView::from(&lease).boot_summary(),
            "x1:ready,x2:booting"
        );
        lease.provisioning[1] = HostProvisioning {
            percent: 42,
            ..p("x2", ProvisionPhase::Installing, "writing the image")
        };
        let v = LeaseView::from(&lease);
        assert_eq!(v.boot_summary(), "x1:ready,x2:installing");
        assert_eq!(
            v.provisioning[1].progress(),
            "installing 42 % \u{2014} writing the image"
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["provisioning"][1]["phase"], "installing");
        assert_eq!(json["provisioning"][1]["percent"], 42);
        assert_eq!(json["provisioning"][0]["percent"], serde_json::Value::Null);
        // A percentage belongs to the installing phase only.
        lease.provisioning[1] = HostProvisioning {
            percent: 42,
            ..p("x2", ProvisionPhase::Booting, "booting from disk")
        };
        assert_eq!(
            LeaseView::from(&lease).provisioning[1].progress(),
            "booting \u{2014} booting from disk"
        );
        lease.provisioning.clear();
        assert_eq!(LeaseView::from(&lease).boot_summary(), "");
        let json = serde_json::to_value(LeaseView::from(&lease)).unwrap();
        assert_eq!(json["provisioning"], serde_json::json!([]));
    }

    #[test]
    fn power_view() {
        let v = PowerView::from(&PowerResponse {
            host: "x1".into(),
            on: true,
        });
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({"host": "x1", "on": true, "power": "on"})
        );
    }
}
