//! Conversions between domain types and `lab.v1` messages. Requests are
//! checked here: a bad field becomes INVALID_ARGUMENT naming it.

use super::agent::phase_to_proto;
use super::status::invalid;
use crate::core::{AcquireRequest, BookingRequest, HostView, LeaseKey};
use crate::events::{EventKind, EventRecord};
use crate::inventory::ConsoleSource;
use crate::lease::booking::{Booking, BookingKind, BookingState};
use crate::lease::machine::Health;
use crate::lease::{HostState, Lease, LeaseSpec, LeaseState};
use crate::racks::{ConsoleOpen, ForwardOpen, PowerAction, Provisioning};
use crate::types::{
    Arch, Firmware, Flag, HostName, LeaseId, ProfileName, RequestId, Role, SshPublicKey, Timestamp,
};
use lab_proto::convert::{duration_from_proto, duration_to_proto, timestamp_from_millis};
use lab_proto::v1 as pb;
use std::collections::BTreeSet;
use std::time::Duration;
use tonic::Status;

fn ts(t: Timestamp) -> prost_types::Timestamp {
    timestamp_from_millis(t.millis())
}

pub fn arch_to_proto(a: Arch) -> pb::Arch {
    match a {
        Arch::X86_64 => pb::Arch::X8664,
        Arch::Aarch64 => pb::Arch::Aarch64,
    }
}

/// `None` for ARCH_UNSPECIFIED (any arch).
pub fn arch_from_proto(field: &str, v: i32) -> Result<Option<Arch>, Status> {
    match pb::Arch::try_from(v) {
        Ok(pb::Arch::Unspecified) => Ok(None),
        Ok(pb::Arch::X8664) => Ok(Some(Arch::X86_64)),
        Ok(pb::Arch::Aarch64) => Ok(Some(Arch::Aarch64)),
        Err(_) => Err(invalid(field, format!("unknown arch value {v}"))),
    }
}

pub fn flags_from_proto(field: &str, v: Vec<String>) -> Result<BTreeSet<Flag>, Status> {
    v.into_iter()
        .map(|f| Flag::new(f).map_err(|e| invalid(field, e)))
        .collect()
}

pub fn host_name(field: &str, v: String) -> Result<HostName, Status> {
    HostName::new(v).map_err(|e| invalid(field, e))
}

pub fn lease_id(field: &str, v: &str) -> Result<LeaseId, Status> {
    if v.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    v.parse()
        .map_err(|_| invalid(field, format!("{v:?} is not a lease id (a UUID)")))
}

/// Most bytes of free text a person writes into a request (a lease's
/// comment, a maintenance reason).
pub const MAX_TEXT: usize = 1024;

/// Free text that ends up in the event log and on other people's
/// terminals: at most [`MAX_TEXT`] bytes and no control characters (C0
/// including tab and newline, DEL, C1).
pub fn text(field: &str, s: String) -> Result<String, Status> {
    if s.len() > MAX_TEXT {
        return Err(invalid(field, format!("at most {MAX_TEXT} bytes")));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(invalid(
            field,
            format!("must not contain control characters (found {c:?})"),
        ));
    }
    Ok(s)
}

/// An optional request id (empty: none).
pub fn request_id(field: &str, v: String) -> Result<Option<RequestId>, Status> {
    if v.is_empty() {
        return Ok(None);
    }
    RequestId::new(v).map(Some).map_err(|e| invalid(field, e))
}

/// The Acquire call, validated; `default_ttl` fills an unset TTL.
pub fn acquire_request(
    r: pb::AcquireRequest,
    default_ttl: Duration,
) -> Result<AcquireRequest, Status> {
    let preemptible = r.request.as_ref().is_some_and(|q| q.preemptible);
    Ok(AcquireRequest {
        spec: lease_spec(r.request, default_ttl)?,
        no_wait: r.no_wait,
        request_id: request_id("request_id", r.request_id)?,
        preemptible,
    })
}

// Page tokens are opaque to clients: hex of a tagged key, so that a token
// of one list is refused by the other.

/// The `next_page_token` after a lease with this key.
pub fn lease_page_token(key: LeaseKey) -> String {
    hex::encode(format!("L{}/{}", key.0.millis(), key.1))
}

/// The key a lease page token continues after; `None` for the first page.
pub fn lease_page_after(field: &str, token: &str) -> Result<Option<LeaseKey>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let parse = || -> Option<LeaseKey> {
        let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
        let (ms, id) = text.strip_prefix('L')?.split_once('/')?;
        Some((Timestamp(ms.parse().ok()?), id.parse().ok()?))
    };
    parse()
        .map(Some)
        .ok_or_else(|| invalid(field, "not a token this server returned for ListLeases"))
}

/// The `next_page_token` after the event `seq`.
pub fn event_page_token(seq: u64) -> String {
    hex::encode(format!("E{seq}"))
}

/// The seq an event page token continues after; `None` for the first page.
pub fn event_page_after(field: &str, token: &str) -> Result<Option<u64>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let parse = || -> Option<u64> {
        let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
        text.strip_prefix('E')?.parse().ok()
    };
    parse()
        .map(Some)
        .ok_or_else(|| invalid(field, "not a token this server returned for ListEvents"))
}

pub fn duration(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) => match duration_from_proto(&d) {
            Some(d) if !d.is_zero() => Ok(Some(d)),
            _ => Err(invalid(field, "must be a positive duration")),
        },
    }
}

/// The lease request, validated; `default_ttl` fills an unset TTL.
pub fn lease_spec(r: Option<pb::LeaseRequest>, default_ttl: Duration) -> Result<LeaseSpec, Status> {
    let r = r.ok_or_else(|| invalid("request", "is required"))?;
    let hosts: BTreeSet<HostName> = r
        .hosts
        .into_iter()
        .map(|h| host_name("request.hosts", h))
        .collect::<Result<_, _>>()?;
    let count = if r.count == 0 { 1 } else { r.count };
    if count > 1024 {
        return Err(invalid("request.count", "at most 1024 hosts in one lease"));
    }
    if !hosts.is_empty() && (count as usize) > hosts.len() {
        return Err(invalid(
            "request.count",
            format!("{count} hosts asked for but only {} named", hosts.len()),
        ));
    }
    let profile = if r.profile.is_empty() {
        None
    } else {
        Some(ProfileName::new(r.profile).map_err(|e| invalid("request.profile", e))?)
    };
    let comment = text("request.comment", r.comment)?;
    let ssh_public_key = if r.ssh_public_key.is_empty() {
        None
    } else {
        Some(
            SshPublicKey::parse(&r.ssh_public_key)
                .map_err(|e| invalid("request.ssh_public_key", e))?,
        )
    };
    Ok(LeaseSpec {
        arch: arch_from_proto("request.arch", r.arch)?,
        flags: flags_from_proto("request.flags", r.flags)?,
        hosts,
        count,
        profile,
        ttl: duration("request.ttl", r.ttl)?.unwrap_or(default_ttl),
        priority: r.priority,
        comment,
        ssh_public_key,
        min_ttl: duration("request.min_ttl", r.min_ttl)?,
    })
}

/// A booking request, its names parsed (the core checks the rest).
pub fn booking_request(r: pb::CreateBookingRequest) -> Result<BookingRequest, Status> {
    let kind = match pb::BookingKind::try_from(r.kind) {
        Ok(pb::BookingKind::Lease | pb::BookingKind::Unspecified) => BookingKind::Lease,
        Ok(pb::BookingKind::Maintenance) => BookingKind::Maintenance,
        Err(_) => return Err(invalid("kind", "must be LEASE or MAINTENANCE")),
    };
    let hosts: Vec<HostName> = r
        .hosts
        .into_iter()
        .map(|h| host_name("hosts", h))
        .collect::<Result<_, _>>()?;
    if hosts.len() > 1024 || r.count > 1024 {
        return Err(invalid("hosts", "at most 1024 hosts in one booking"));
    }
    if !hosts.is_empty() && (!r.flags.is_empty() || r.count > 0) {
        return Err(invalid(
            "hosts",
            "name hosts, or ask for a count with flags, not both",
        ));
    }
    let start = r
        .start
        .as_ref()
        .map(lab_proto::convert::millis_from_timestamp)
        .map(Timestamp)
        .ok_or_else(|| invalid("start", "is required"))?;
    let duration =
        duration("duration", r.duration)?.ok_or_else(|| invalid("duration", "is required"))?;
    let profile = if r.profile.is_empty() {
        None
    } else {
        Some(ProfileName::new(r.profile).map_err(|e| invalid("profile", e))?)
    };
    Ok(BookingRequest {
        kind,
        hosts,
        flags: flags_from_proto("flags", r.flags)?,
        arch: arch_from_proto("arch", r.arch)?,
        count: r.count.max(1),
        start,
        duration,
        comment: text("comment", r.comment)?,
        profile,
    })
}

pub fn booking_to_proto(b: &Booking) -> pb::Booking {
    pb::Booking {
        id: b.id,
        kind: match b.kind {
            BookingKind::Lease => pb::BookingKind::Lease,
            BookingKind::Maintenance => pb::BookingKind::Maintenance,
        } as i32,
        holder: b.holder.to_string(),
        hosts: b.hosts.iter().map(ToString::to_string).collect(),
        start: Some(ts(b.start)),
        end: Some(ts(b.end)),
        comment: b.comment.clone(),
        profile: b
            .profile
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        state: match b.state {
            BookingState::Scheduled => pb::BookingState::Scheduled,
            BookingState::Started => pb::BookingState::Started,
        } as i32,
        lease_id: b.lease.map(|l| l.to_string()).unwrap_or_default(),
        created_at: Some(ts(b.created_at)),
    }
}

pub fn spec_to_proto(s: &LeaseSpec) -> pb::LeaseRequest {
    pb::LeaseRequest {
        arch: s.arch.map_or(pb::Arch::Unspecified, arch_to_proto) as i32,
        flags: s.flags.iter().map(|f| f.to_string()).collect(),
        hosts: s.hosts.iter().map(|h| h.to_string()).collect(),
        count: s.count,
        profile: s
            .profile
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        ttl: Some(duration_to_proto(s.ttl)),
        min_ttl: s.min_ttl.map(duration_to_proto),
        priority: s.priority,
        comment: s.comment.clone(),
        // Not part of the spec: a LEASE_REQUESTED event says it in its
        // detail.
        preemptible: false,
        ssh_public_key: s
            .ssh_public_key
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

/// A power action to run; UNSPECIFIED is refused.
pub fn power_action(field: &str, v: i32) -> Result<PowerAction, Status> {
    match pb::PowerAction::try_from(v) {
        Ok(pb::PowerAction::Status) => Ok(PowerAction::Status),
        Ok(pb::PowerAction::On) => Ok(PowerAction::On),
        Ok(pb::PowerAction::Off) => Ok(PowerAction::Off),
        Ok(pb::PowerAction::Cycle) => Ok(PowerAction::Cycle),
        Ok(pb::PowerAction::Reset) => Ok(PowerAction::Reset),
        Ok(pb::PowerAction::Unspecified) | Err(_) => Err(invalid(
            field,
            "must be one of STATUS, ON, OFF, CYCLE, RESET",
        )),
    }
}

/// The console a user asks to open (a `not_before` in the request is
/// ignored: only the server sets it).
pub fn console_open(o: pb::ConsoleOpen) -> Result<ConsoleOpen, Status> {
    Ok(ConsoleOpen {
        host: host_name("open.host", o.host)?,
        write: o.write,
        replay_bytes: o.replay_bytes,
        not_before: None,
    })
}

/// The forward a user asks to open: a host and a port (1-65535).
pub fn forward_open(o: pb::ForwardOpen) -> Result<ForwardOpen, Status> {
    let port = u16::try_from(o.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            invalid(
                "open.port",
                format!("{} is not a TCP port (1-65535)", o.port),
            )
        })?;
    Ok(ForwardOpen {
        host: host_name("open.host", o.host)?,
        port,
    })
}

pub fn provisioning_to_proto(p: &Provisioning) -> pb::HostProvisioning {
    pb::HostProvisioning {
        host: p.host.to_string(),
        phase: phase_to_proto(p.phase) as i32,
        stage: p.stage.clone(),
        updated_at: p.updated_at.map(ts),
        console_tail: p.console_tail.clone(),
        percent: p.percent,
        failure_class: p
            .failure
            .as_ref()
            .map_or(pb::FailureClass::Unspecified, |f| {
                failure_class_to_proto(f.class)
            }) as i32,
        failure_rule: p
            .failure
            .as_ref()
            .map(|f| f.rule.clone())
            .unwrap_or_default(),
        failure_line: p
            .failure
            .as_ref()
            .map(|f| f.line.clone())
            .unwrap_or_default(),
    }
}

fn failure_class_to_proto(c: crate::health::FailureClass) -> pb::FailureClass {
    use crate::health::FailureClass as C;
    match c {
        C::Host => pb::FailureClass::Host,
        C::Job => pb::FailureClass::Job,
        C::Infra => pb::FailureClass::Infra,
        C::Unknown => pb::FailureClass::Unknown,
    }
}

/// The lease with its hosts' provisioning (from the rack registry).
pub fn lease_to_proto(l: &Lease, provisioning: &[Provisioning]) -> pb::Lease {
    pb::Lease {
        id: l.id.to_string(),
        holder: l.holder.to_string(),
        hosts: l.hosts.iter().map(|h| h.to_string()).collect(),
        state: match l.state {
            LeaseState::Active => pb::LeaseState::Active,
            LeaseState::Released => pb::LeaseState::Released,
            LeaseState::Expired => pb::LeaseState::Expired,
        } as i32,
        profile: l
            .profile
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        priority: l.priority,
        comment: l.comment.clone(),
        ttl: Some(duration_to_proto(l.ttl())),
        granted_at: Some(ts(l.granted_at)),
        expires_at: Some(ts(l.expires_at)),
        max_expires_at: Some(ts(l.max_expires_at)),
        ended_at: l.ended_at.map(ts),
        generation: l.generation.0,
        waiter_id: l.waiter_id,
        booking_id: l.booking.unwrap_or(0),
        provisioning: provisioning.iter().map(provisioning_to_proto).collect(),
        ssh_public_key: l
            .ssh_public_key
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        preemptible: l.preemptible,
        preempted_at: l.preempted_at.map(ts),
    }
}

pub fn host_to_proto(v: &HostView) -> pb::Host {
    let r = &v.record;
    let state = match r.state {
        _ if r.retired => pb::HostState::Retired,
        HostState::Leased(_) => pb::HostState::Leased,
        HostState::Reclaiming(_) => pb::HostState::Reclaiming,
        HostState::Available if r.maintenance => pb::HostState::Maintenance,
        HostState::Available => pb::HostState::Available,
    };
    let mut h = pb::Host {
        name: r.name.to_string(),
        state: state as i32,
        maintenance: r.maintenance,
        lease_id: r.lease().map(|l| l.to_string()).unwrap_or_default(),
        generation: r.generation.0,
        reachable: v.unreachable.is_none(),
        unreachable_reason: v.unreachable.clone().unwrap_or_default(),
        ..Default::default()
    };
    match &r.health {
        Health::Healthy => h.health = pb::HostHealth::Healthy as i32,
        Health::Suspect { reason, since } => {
            h.health = pb::HostHealth::Suspect as i32;
            h.health_reason = reason.clone();
            h.health_since = Some(ts(*since));
        }
        Health::Quarantined {
            reason, since, by, ..
        } => {
            h.health = pb::HostHealth::Quarantined as i32;
            h.health_reason = format!("{reason} (by {by})");
            h.health_since = Some(ts(*since));
        }
    }
    if let Some(l) = &v.lease {
        h.holder = l.holder.to_string();
        if l.is_active() {
            h.lease_expires_at = Some(ts(l.expires_at));
        }
    }
    if let Some(s) = &v.spec {
        h.arch = arch_to_proto(s.arch) as i32;
        h.firmware = match s.firmware {
            Firmware::Bios => pb::Firmware::Bios,
            Firmware::Uefi => pb::Firmware::Uefi,
        } as i32;
        h.rack = s.rack.to_string();
        h.mac = s.mac.to_string();
        h.ipv4 = s.ipv4.map(|a| a.to_string()).unwrap_or_default();
        h.flags = s.flags.iter().map(|f| f.to_string()).collect();
        // The endpoint only: user and password never leave the server.
        h.bmc = s
            .bmc
            .as_ref()
            .map(|b| b.endpoint.to_string())
            .unwrap_or_default();
        h.console = match s.console {
            ConsoleSource::None => pb::ConsoleKind::None,
            ConsoleSource::IpmiSol => pb::ConsoleKind::IpmiSol,
            ConsoleSource::Serial { .. } => pb::ConsoleKind::Serial,
            ConsoleSource::Tcp { .. } => pb::ConsoleKind::Tcp,
        } as i32;
    }
    h
}

pub fn event_kind_to_proto(k: EventKind) -> pb::EventKind {
    use pb::EventKind as P;
    match k {
        EventKind::LeaseRequested => P::LeaseRequested,
        EventKind::LeaseGranted => P::LeaseGranted,
        EventKind::LeaseRenewed => P::LeaseRenewed,
        EventKind::LeaseReleased => P::LeaseReleased,
        EventKind::LeaseExpired => P::LeaseExpired,
        EventKind::RequestWithdrawn => P::RequestWithdrawn,
        EventKind::HostReclaiming => P::HostReclaiming,
        EventKind::HostAvailable => P::HostAvailable,
        EventKind::HostMaintenanceOn => P::HostMaintenanceOn,
        EventKind::HostMaintenanceOff => P::HostMaintenanceOff,
        EventKind::InventoryLoaded => P::InventoryLoaded,
        EventKind::HostAdded => P::HostAdded,
        EventKind::HostRetired => P::HostRetired,
        EventKind::HostRemoved => P::HostRemoved,
        EventKind::HostUnreachable => P::HostUnreachable,
        EventKind::HostReachable => P::HostReachable,
        EventKind::ForwardOpened => P::ForwardOpened,
        EventKind::ForwardClosed => P::ForwardClosed,
        EventKind::AgentAttached => P::AgentAttached,
        EventKind::AgentDetached => P::AgentDetached,
        EventKind::HostHealth => P::HostHealth,
        EventKind::HealthCheckStarted => P::HealthCheckStarted,
        EventKind::HealthCheckPassed => P::HealthCheckPassed,
        EventKind::HealthCheckFailed => P::HealthCheckFailed,
        EventKind::LeaseExpiring => P::LeaseExpiring,
        EventKind::WebhookUndelivered => P::WebhookUndelivered,
        EventKind::LeasePreempted => P::LeasePreempted,
        EventKind::BookingCreated => P::BookingCreated,
        EventKind::BookingStarted => P::BookingStarted,
        EventKind::BookingEnded => P::BookingEnded,
        EventKind::BookingCancelled => P::BookingCancelled,
    }
}

pub fn event_to_proto(e: &EventRecord) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: Some(ts(e.time)),
        actor: e.actor.to_string(),
        kind: event_kind_to_proto(e.kind) as i32,
        hosts: e.hosts.iter().map(|h| h.to_string()).collect(),
        lease_id: e.lease.map(|l| l.to_string()).unwrap_or_default(),
        waiter_id: e.waiter.unwrap_or(0),
        request: e.request.as_ref().map(spec_to_proto),
        detail: e.detail.clone(),
        booking_id: e.booking.unwrap_or(0),
    }
}

pub fn role_to_proto(r: Role) -> pb::Role {
    match r {
        Role::Ci => pb::Role::Ci,
        Role::Developer => pb::Role::Developer,
        Role::Operator => pb::Role::Operator,
        Role::Agent => pb::Role::Agent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Webhook configurations and payloads name kinds as the API does.
    #[test]
    fn event_kind_names_are_the_api_names() {
        for k in EventKind::ALL {
            let api = event_kind_to_proto(k).as_str_name();
            assert_eq!(Some(k.name()), api.strip_prefix("EVENT_KIND_"), "{k:?}");
            assert_eq!(EventKind::from_name(k.name()), Some(k));
        }
    }

    fn req() -> pb::LeaseRequest {
        pb::LeaseRequest {
            count: 1,
            ..Default::default()
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let d = Duration::from_secs(60);
        let mut cases: Vec<(pb::LeaseRequest, &str)> = vec![
            (
                pb::LeaseRequest { arch: 9, ..req() },
                "request.arch: unknown arch value 9",
            ),
            (
                pb::LeaseRequest {
                    flags: vec!["a b".into()],
                    ..req()
                },
                "request.flags: invalid flag",
            ),
            (
                pb::LeaseRequest {
                    hosts: vec!["".into()],
                    ..req()
                },
                "request.hosts: invalid host name",
            ),
            (
                pb::LeaseRequest {
                    count: 2,
                    hosts: vec!["a".into()],
                    ..req()
                },
                "request.count: 2 hosts asked for",
            ),
            (
                pb::LeaseRequest {
                    count: 5000,
                    ..req()
                },
                "request.count: at most 1024",
            ),
            (
                pb::LeaseRequest {
                    profile: "x/y".into(),
                    ..req()
                },
                "request.profile: invalid profile name",
            ),
            (
                pb::LeaseRequest {
                    ttl: Some(prost_types::Duration {
                        seconds: -5,
                        nanos: 0,
                    }),
                    ..req()
                },
                "request.ttl: must be a positive duration",
            ),
            (
                pb::LeaseRequest {
                    ssh_public_key: format!("{KEY}\nssh-rsa AAAA"),
                    ..req()
                },
                "request.ssh_public_key: must be one line without control characters",
            ),
            (
                pb::LeaseRequest {
                    ssh_public_key: format!("command=\"sh\" {KEY}"),
                    ..req()
                },
                "request.ssh_public_key: unknown key type",
            ),
        ];
        cases.push((
            pb::LeaseRequest {
                comment: "x".repeat(1025),
                ..req()
            },
            "request.comment: at most 1024 bytes",
        ));
        for (r, want) in cases {
            let s = lease_spec(Some(r.clone()), d).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with(want), "{r:?}: {}", s.message());
        }
        assert_eq!(
            lease_spec(None, d).unwrap_err().message(),
            "request: is required"
        );
        let ok = lease_spec(Some(pb::LeaseRequest { count: 0, ..req() }), d).unwrap();
        assert_eq!((ok.count, ok.ttl, ok.ssh_public_key), (1, d, None));
        let keyed = pb::LeaseRequest {
            ssh_public_key: KEY.into(),
            ..req()
        };
        let ok = lease_spec(Some(keyed.clone()), d).unwrap();
        assert_eq!(ok.ssh_public_key.as_ref().unwrap().as_str(), KEY);
        assert_eq!(spec_to_proto(&ok).ssh_public_key, KEY);
        // Control characters (C0 including tab and newline, DEL, C1) are
        // refused and named escaped, never as themselves.
        for (c, shown) in [
            ('\n', "'\\n'"),
            ('\t', "'\\t'"),
            ('\x1b', "'\\u{1b}'"),
            ('\x7f', "'\\u{7f}'"),
            ('\u{9b}', "'\\u{9b}'"),
        ] {
            let r = pb::LeaseRequest {
                comment: format!("job 42{c}"),
                ..req()
            };
            let s = lease_spec(Some(r), d).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                s.message(),
                format!("request.comment: must not contain control characters (found {shown})")
            );
        }
        // Printable text of any script is fine.
        let ok = lease_spec(
            Some(pb::LeaseRequest {
                comment: "CI job https://ci.example/42 — grüße, 日本".into(),
                ..req()
            }),
            d,
        )
        .unwrap();
        assert!(ok.comment.starts_with("CI job"));
    }

    #[test]
    fn maintenance_reasons_refuse_control_characters() {
        assert_eq!(
            text("reason", "fan replacement".into()).unwrap(),
            "fan replacement"
        );
        let e = text("reason", "fan\x1b[2J".into()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            e.message(),
            "reason: must not contain control characters (found '\\u{1b}')"
        );
    }

    #[test]
    fn request_ids_and_page_tokens() {
        assert_eq!(request_id("request_id", String::new()).unwrap(), None);
        assert!(
            request_id("request_id", "ci-42:try.1".into())
                .unwrap()
                .is_some()
        );
        let e = request_id("request_id", "a b".into()).unwrap_err();
        assert!(
            e.message().starts_with("request_id: invalid request id"),
            "{}",
            e.message()
        );

        let key = (
            Timestamp(1_700_000_000_123),
            LeaseId(uuid::Uuid::from_u128(7)),
        );
        let t = lease_page_token(key);
        assert_eq!(lease_page_after("page_token", &t).unwrap(), Some(key));
        assert_eq!(lease_page_after("page_token", "").unwrap(), None);
        assert_eq!(
            event_page_after("page_token", &event_page_token(42)).unwrap(),
            Some(42)
        );
        // A token of the other list, or made up, is refused.
        for bad in [event_page_token(42).as_str(), "zz", "4c31", "deadbeef"] {
            let e = lease_page_after("page_token", bad).unwrap_err();
            assert!(e.message().starts_with("page_token: not a token"), "{bad}");
        }
        assert!(event_page_after("page_token", &t).is_err());
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";

    #[test]
    fn forward_ports_are_checked() {
        let open = |port| pb::ForwardOpen {
            host: "h1".into(),
            port,
        };
        assert_eq!(forward_open(open(22)).unwrap().port, 22);
        for bad in [0, 65_536] {
            let s = forward_open(open(bad)).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with("open.port: "), "{}", s.message());
        }
    }
}
