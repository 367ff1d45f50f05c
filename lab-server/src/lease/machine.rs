//! The lease and host lifecycles as pure state machines.
//!
//! `apply(&self, event) -> Result<Self, TransitionError>`: no I/O, no clock
//! (time comes in the event), every accepted transition bumps the record's
//! generation. The store writes with compare-and-set on that generation.
//!
//! ```text
//! lease:  Active --renew--> Active
//!         Active --release--> Released          (terminal)
//!         Active --expire (now >= expires_at)--> Expired   (terminal)
//!
//! host:   Available --grant--> Leased --end-lease--> Reclaiming --reclaimed--> Available
//!         maintenance and retired are flags: set or cleared in any state;
//!         health (healthy, suspect, quarantined) is set in any state;
//!         a host is grantable only when Available, not in maintenance, not
//!         retired, not quarantined; a health check's lease (grant-check) may
//!         take a quarantined host too. Grants count toward the next check
//!         (`--health-check-every`); a check's grant resets the count.
//! ```

use crate::types::{
    Generation, HostName, LeaseId, Principal, ProfileName, RequestId, SshPublicKey, Timestamp,
    WaiterId,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A transition the state machine refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("lease {lease} is {state}, not active")]
    LeaseNotActive { lease: LeaseId, state: LeaseState },
    #[error("lease {lease} expired at {expires_at}")]
    LeaseExpired {
        lease: LeaseId,
        expires_at: Timestamp,
    },
    #[error("lease {lease} does not expire before {expires_at}")]
    NotYetExpired {
        lease: LeaseId,
        expires_at: Timestamp,
    },
    #[error(
        "lease {lease} is being preempted (notice at {at}): it ends at {expires_at} and cannot be renewed"
    )]
    Preempted {
        lease: LeaseId,
        at: Timestamp,
        expires_at: Timestamp,
    },
    #[error("lease {lease} cannot be preempted (not preemptible, already noticed, or expired)")]
    NotPreemptible { lease: LeaseId },
    #[error("lease {lease} runs until {expires_at}, past {at}")]
    RunsPast {
        lease: LeaseId,
        expires_at: Timestamp,
        at: Timestamp,
    },
    #[error("host {host} is {state}, cannot {action}")]
    Host {
        host: HostName,
        state: &'static str,
        action: &'static str,
    },
}

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Active,
    Released,
    Expired,
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LeaseState::Active => "active",
            LeaseState::Released => "released",
            LeaseState::Expired => "expired",
        })
    }
}

/// A granted lease, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub holder: Principal,
    pub hosts: Vec<HostName>,
    pub state: LeaseState,
    pub profile: Option<ProfileName>,
    pub priority: i32,
    pub comment: String,
    /// TTL used by renewals that name none.
    pub ttl_ms: u64,
    pub granted_at: Timestamp,
    pub expires_at: Timestamp,
    /// Hard cap: renewals never extend past it.
    pub max_expires_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub waiter_id: WaiterId,
    /// The client's id of the request this lease was granted to, if it gave
    /// one: a retry with the same id gets this lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    pub generation: Generation,
    /// The holder's OpenSSH public key for root on the hosts, from the
    /// request. Leases stored before keys existed load with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<SshPublicKey>,
    /// Asked for with `preemptible`: it may be reclaimed, after a notice and
    /// a grace period, for a request that is not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub preemptible: bool,
    /// When the notice of its preemption was given (its `expires_at` was
    /// then brought forward to the end of the grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempted_at: Option<Timestamp>,
    /// The booking it was granted for (`lease::booking`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booking: Option<u64>,
}

/// What can happen to a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Extend to `now + ttl`, capped at `max_expires_at`.
    Renew { now: Timestamp, ttl: Duration },
    /// The holder (or an operator) gives the hosts back.
    Release { now: Timestamp },
    /// The server reclaims a lease whose TTL ran out.
    Expire { now: Timestamp },
    /// Notice to a preemptible lease that a request which is not needs its
    /// hosts: it now expires `grace` from `now` (or earlier, as it would
    /// have), and can no longer be renewed.
    Preempt { now: Timestamp, grace: Duration },
    /// A booking of one of its hosts starts at `at`: the hard cap comes
    /// down to `at` (renewals stop there). Refused when the lease already
    /// runs past `at`.
    Cap { at: Timestamp },
}

impl Lease {
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    pub fn is_active(&self) -> bool {
        self.state == LeaseState::Active
    }

    /// The pure transition function of the lease lifecycle.
    pub fn apply(&self, event: &LeaseEvent) -> Result<Lease, TransitionError> {
        if self.state != LeaseState::Active {
            return Err(TransitionError::LeaseNotActive {
                lease: self.id,
                state: self.state,
            });
        }
        let mut next = self.clone();
        next.generation = self.generation.next();
        match *event {
            LeaseEvent::Renew { now, ttl } => {
                if let Some(at) = self.preempted_at {
                    return Err(TransitionError::Preempted {
                        lease: self.id,
                        at,
                        expires_at: self.expires_at,
                    });
                }
                if now >= self.expires_at {
                    return Err(TransitionError::LeaseExpired {
                        lease: self.id,
                        expires_at: self.expires_at,
                    });
                }
                next.expires_at = now
                    .saturating_add(ttl)
                    .min(self.max_expires_at)
                    .max(self.expires_at);
            }
            LeaseEvent::Release { now } => {
                // A release that arrives after the TTL ran out (but before the
                // server noticed) is an expiry: the lease was already lost.
                if now >= self.expires_at {
                    next.state = LeaseState::Expired;
                    next.ended_at = Some(self.expires_at);
                } else {
                    next.state = LeaseState::Released;
                    next.ended_at = Some(now);
                }
            }
            LeaseEvent::Preempt { now, grace } => {
                if !self.preemptible || self.preempted_at.is_some() || now >= self.expires_at {
                    return Err(TransitionError::NotPreemptible { lease: self.id });
                }
                next.preempted_at = Some(now);
                next.expires_at = self.expires_at.min(now.saturating_add(grace));
            }
            LeaseEvent::Cap { at } => {
                if self.expires_at > at {
                    return Err(TransitionError::RunsPast {
                        lease: self.id,
                        expires_at: self.expires_at,
                        at,
                    });
                }
                next.max_expires_at = self.max_expires_at.min(at);
            }
            LeaseEvent::Expire { now } => {
                if now < self.expires_at {
                    return Err(TransitionError::NotYetExpired {
                        lease: self.id,
                        expires_at: self.expires_at,
                    });
                }
                next.state = LeaseState::Expired;
                next.ended_at = Some(self.expires_at);
            }
        }
        Ok(next)
    }
}

/// Where a host is in its lease cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "lease")]
pub enum HostState {
    Available,
    Leased(LeaseId),
    /// The lease ended; the host is being powered off and reset.
    Reclaiming(LeaseId),
}

/// A host's lease-cycle record, as persisted (its description lives in the
/// inventory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: HostName,
    pub state: HostState,
    pub maintenance: bool,
    /// No longer in the inventory: never granted again, deleted once free.
    pub retired: bool,
    /// The machine's own condition (records written before health existed
    /// load as healthy).
    #[serde(default, skip_serializing_if = "Health::is_healthy")]
    pub health: Health,
    /// When its recent health checks failed (oldest first), for
    /// `--quarantine-after` within `--quarantine-window`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub check_failures: Vec<Timestamp>,
    /// Leases granted since its last health check (`--health-check-every`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leases_since_check: u32,
    pub generation: Generation,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A host's own condition, apart from who holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    #[default]
    Healthy,
    /// A failure was attributed to the host; it is still granted.
    Suspect { reason: String, since: Timestamp },
    /// Never granted until released (by an operator, or a passing check).
    Quarantined {
        reason: String,
        since: Timestamp,
        by: Principal,
        /// Only an operator releases it (an operator's quarantine, or too
        /// many failures within the window); a passing check does not.
        #[serde(default)]
        until_released: bool,
    },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        *self == Health::Healthy
    }

    pub fn is_quarantined(&self) -> bool {
        matches!(self, Health::Quarantined { .. })
    }

    /// `healthy`, `suspect` or `quarantined`.
    pub fn name(&self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Suspect { .. } => "suspect",
            Health::Quarantined { .. } => "quarantined",
        }
    }
}

/// What can happen to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    Grant(LeaseId),
    /// A health check's lease: granted in any health, not in maintenance.
    GrantCheck(LeaseId),
    /// Its lease was released or expired.
    EndLease(LeaseId),
    /// The reclaim step (power off, boot device reset) finished.
    Reclaimed(LeaseId),
    SetMaintenance(bool),
    SetRetired(bool),
    SetHealth(Health),
    /// The times of its recent failed health checks.
    SetCheckFailures(Vec<Timestamp>),
}

impl HostRecord {
    pub fn new(name: HostName) -> Self {
        Self {
            name,
            state: HostState::Available,
            maintenance: false,
            retired: false,
            health: Health::Healthy,
            check_failures: Vec::new(),
            leases_since_check: 0,
            generation: Generation(1),
        }
    }

    /// May a new lease take this host now?
    pub fn is_grantable(&self) -> bool {
        self.is_checkable() && !self.health.is_quarantined()
    }

    /// May a health check's lease take this host now (whatever its health)?
    pub fn is_checkable(&self) -> bool {
        self.state == HostState::Available && !self.maintenance && !self.retired
    }

    /// The lease holding it (or being reclaimed from it).
    pub fn lease(&self) -> Option<LeaseId> {
        match self.state {
            HostState::Available => None,
            HostState::Leased(l) | HostState::Reclaiming(l) => Some(l),
        }
    }

    /// Short name of the state for messages.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            HostState::Available if self.retired => "retired",
            HostState::Available if self.maintenance => "in maintenance",
            HostState::Available if self.health.is_quarantined() => "quarantined",
            HostState::Available => "available",
            HostState::Leased(_) => "leased",
            HostState::Reclaiming(_) => "reclaiming",
        }
    }

    /// The pure transition function of the host lifecycle.
    pub fn apply(&self, event: HostEvent) -> Result<HostRecord, TransitionError> {
        let refuse = |action| TransitionError::Host {
            host: self.name.clone(),
            state: self.state_name(),
            action,
        };
        let mut next = self.clone();
        next.generation = self.generation.next();
        match event {
            HostEvent::Grant(l) => {
                if !self.is_grantable() {
                    return Err(refuse("be granted"));
                }
                next.state = HostState::Leased(l);
                next.leases_since_check = self.leases_since_check.saturating_add(1);
            }
            HostEvent::GrantCheck(l) => {
                if !self.is_checkable() {
                    return Err(refuse("be checked"));
                }
                next.state = HostState::Leased(l);
                next.leases_since_check = 0;
            }
            HostEvent::EndLease(l) => {
                if self.state != HostState::Leased(l) {
                    return Err(refuse("end a lease it does not hold"));
                }
                next.state = HostState::Reclaiming(l);
            }
            HostEvent::Reclaimed(l) => {
                if self.state != HostState::Reclaiming(l) {
                    return Err(refuse("finish a reclaim it is not in"));
                }
                next.state = HostState::Available;
            }
            HostEvent::SetMaintenance(on) => next.maintenance = on,
            HostEvent::SetRetired(on) => next.retired = on,
            HostEvent::SetHealth(health) => next.health = health,
            HostEvent::SetCheckFailures(times) => next.check_failures = times,
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(state: LeaseState) -> Lease {
        Lease {
            id: LeaseId(uuid::Uuid::from_u128(1)),
            holder: Principal::new("ci").unwrap(),
            hosts: vec![HostName::new("h1").unwrap()],
            state,
            profile: None,
            priority: 0,
            comment: String::new(),
            ttl_ms: 60_000,
            granted_at: Timestamp(1_000),
            expires_at: Timestamp(61_000),
            max_expires_at: Timestamp(100_000),
            ended_at: None,
            waiter_id: 1,
            request_id: None,
            generation: Generation(1),
            ssh_public_key: None,
            preemptible: false,
            preempted_at: None,
            booking: None,
        }
    }

    /// A booking ahead caps a lease's renewals; one that would cut the
    /// running TTL short is refused.
    #[test]
    fn cap_table() {
        let l = lease(LeaseState::Active);
        // (cap at, expected max_expires_at or None for refused)
        let table: &[(i64, Option<i64>)] = &[
            (l.expires_at.0, Some(l.expires_at.0)),
            (l.expires_at.0 + 1, Some(l.expires_at.0 + 1)),
            (l.max_expires_at.0 + 5, Some(l.max_expires_at.0)),
            (l.expires_at.0 - 1, None),
        ];
        for &(at, want) in table {
            let got = l.apply(&LeaseEvent::Cap { at: Timestamp(at) });
            assert_eq!(
                got.as_ref().ok().map(|n| n.max_expires_at.0),
                want,
                "cap at {at}"
            );
            if let Ok(n) = got {
                assert_eq!(n.expires_at, l.expires_at, "a cap never moves the expiry");
                let renewed = n
                    .apply(&LeaseEvent::Renew {
                        now: l.granted_at,
                        ttl: Duration::from_secs(1_000_000),
                    })
                    .unwrap();
                assert_eq!(
                    renewed.expires_at, n.max_expires_at,
                    "renewals stop at the cap"
                );
            }
        }
        let ended = lease(LeaseState::Released);
        assert!(ended.apply(&LeaseEvent::Cap { at: Timestamp(0) }).is_err());
    }

    /// A preemptible lease: noticed, it ends within the grace period and
    /// is not renewed; others are not preempted.
    #[test]
    fn preemption_table() {
        let grace = Duration::from_secs(10);
        let p = Lease {
            preemptible: true,
            ..lease(LeaseState::Active)
        };
        // (lease, event, expected expires_at or None for refused)
        let noticed = p
            .apply(&LeaseEvent::Preempt {
                now: Timestamp(20_000),
                grace,
            })
            .unwrap();
        assert_eq!(noticed.preempted_at, Some(Timestamp(20_000)));
        let table: Vec<(&Lease, LeaseEvent, Option<i64>)> = vec![
            (
                &p,
                LeaseEvent::Preempt {
                    now: Timestamp(20_000),
                    grace,
                },
                Some(30_000),
            ),
            // Never later than it would have ended anyway.
            (
                &p,
                LeaseEvent::Preempt {
                    now: Timestamp(58_000),
                    grace,
                },
                Some(61_000),
            ),
            (
                &p,
                LeaseEvent::Preempt {
                    now: Timestamp(61_000),
                    grace,
                },
                None,
            ),
            (
                &noticed,
                LeaseEvent::Preempt {
                    now: Timestamp(21_000),
                    grace,
                },
                None,
            ),
            (
                &noticed,
                LeaseEvent::Renew {
                    now: Timestamp(21_000),
                    ttl: Duration::from_secs(60),
                },
                None,
            ),
            (
                &noticed,
                LeaseEvent::Expire {
                    now: Timestamp(30_000),
                },
                Some(30_000),
            ),
        ];
        for (l, event, expected) in table {
            let got = l.apply(&event).map(|n| n.expires_at.0);
            assert_eq!(
                got.ok(),
                expected,
                "{event:?} on preempted_at {:?}",
                l.preempted_at
            );
        }
        let plain = lease(LeaseState::Active);
        let e = plain
            .apply(&LeaseEvent::Preempt {
                now: Timestamp(20_000),
                grace,
            })
            .unwrap_err();
        assert!(matches!(e, TransitionError::NotPreemptible { .. }));
        // A noticed lease's renewal says when it ends.
        let e = noticed
            .apply(&LeaseEvent::Renew {
                now: Timestamp(21_000),
                ttl: Duration::from_secs(60),
            })
            .unwrap_err();
        assert!(e.to_string().contains("is being preempted"), "{e}");
    }

    #[test]
    fn leases_stored_before_ssh_keys_load_without_one() {
        let plain = lease(LeaseState::Active);
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("ssh_public_key"), "{json}");
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), plain);
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI a@b";
        let keyed = Lease {
            ssh_public_key: Some(key.parse().unwrap()),
            ..plain
        };
        let json = serde_json::to_string(&keyed).unwrap();
        assert!(
            json.contains(&format!("\"ssh_public_key\":\"{key}\"")),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), keyed);
        // A stored key that no longer validates is a corrupt record.
        let bad = json.replace("ssh-ed25519 ", "ssh-dss ");
        assert!(serde_json::from_str::<Lease>(&bad).is_err());
    }

    /// Every lease state × event, at a time before and after expiry.
    #[test]
    fn lease_state_event_table() {
        use LeaseState::*;
        let ttl = Duration::from_secs(60);
        let before = Timestamp(30_000);
        let after = Timestamp(61_000);
        // (state, event, expected state or None for refused, expected expires_at, ended_at)
        type Expected = Option<(LeaseState, i64, Option<i64>)>;
        let table: Vec<(LeaseState, LeaseEvent, Expected)> = vec![
            (
                Active,
                LeaseEvent::Renew { now: before, ttl },
                Some((Active, 90_000, None)),
            ),
            (Active, LeaseEvent::Renew { now: after, ttl }, None),
            (
                Active,
                LeaseEvent::Release { now: before },
                Some((Released, 61_000, Some(30_000))),
            ),
            (
                Active,
                LeaseEvent::Release { now: after },
                Some((Expired, 61_000, Some(61_000))),
            ),
            (Active, LeaseEvent::Expire { now: before }, None),
            (
                Active,
                LeaseEvent::Expire { now: after },
                Some((Expired, 61_000, Some(61_000))),
            ),
            (Released, LeaseEvent::Renew { now: before, ttl }, None),
            (Released, LeaseEvent::Release { now: before }, None),
            (Released, LeaseEvent::Expire { now: after }, None),
            (Expired, LeaseEvent::Renew { now: before, ttl }, None),
            (Expired, LeaseEvent::Release { now: before }, None),
            (Expired, LeaseEvent::Expire { now: after }, None),
        ];
        for (state, event, expected) in table {
            let l = lease(state);
            let got = l.apply(&event);
            match expected {
                None => assert!(
                    got.is_err(),
                    "{state:?} × {event:?} should be refused, got {got:?}"
                ),
                Some((s, exp, ended)) => {
                    let n = got.unwrap_or_else(|e| panic!("{state:?} × {event:?}: {e}"));
                    assert_eq!(n.state, s, "{state:?} × {event:?}");
                    assert_eq!(n.expires_at, Timestamp(exp), "{state:?} × {event:?}");
                    assert_eq!(n.ended_at, ended.map(Timestamp), "{state:?} × {event:?}");
                    assert_eq!(
                        n.generation,
                        Generation(2),
                        "every transition bumps the generation"
                    );
                }
            }
        }
    }

    #[test]
    fn renew_is_capped_and_never_shortens() {
        let l = lease(LeaseState::Active);
        let n = l
            .apply(&LeaseEvent::Renew {
                now: Timestamp(50_000),
                ttl: Duration::from_secs(600),
            })
            .unwrap();
        assert_eq!(n.expires_at, Timestamp(100_000), "capped at max_expires_at");
        let n = l
            .apply(&LeaseEvent::Renew {
                now: Timestamp(2_000),
                ttl: Duration::from_secs(1),
            })
            .unwrap();
        assert_eq!(
            n.expires_at,
            Timestamp(61_000),
            "a short renewal does not shorten the lease"
        );
    }

    /// Every host state (× maintenance × retired × health) × event.
    #[test]
    fn host_state_event_table() {
        let suspect = Health::Suspect {
            reason: "disk I/O error".into(),
            since: Timestamp(5),
        };
        let quarantined = Health::Quarantined {
            reason: "2 host failures".into(),
            since: Timestamp(6),
            by: Principal::server(),
            until_released: true,
        };
        let a = LeaseId(uuid::Uuid::from_u128(1));
        let b = LeaseId(uuid::Uuid::from_u128(2));
        let states = [
            HostState::Available,
            HostState::Leased(a),
            HostState::Reclaiming(a),
        ];
        let events = [
            HostEvent::Grant(b),
            HostEvent::GrantCheck(b),
            HostEvent::EndLease(a),
            HostEvent::EndLease(b),
            HostEvent::Reclaimed(a),
            HostEvent::Reclaimed(b),
            HostEvent::SetMaintenance(true),
            HostEvent::SetMaintenance(false),
            HostEvent::SetRetired(true),
            HostEvent::SetRetired(false),
            HostEvent::SetHealth(suspect.clone()),
            HostEvent::SetHealth(quarantined.clone()),
            HostEvent::SetHealth(Health::Healthy),
            HostEvent::SetCheckFailures(vec![Timestamp(9)]),
        ];
        for state in states {
            for maintenance in [false, true] {
                for retired in [false, true] {
                    for health in [Health::Healthy, suspect.clone(), quarantined.clone()] {
                        let h = HostRecord {
                            name: HostName::new("h1").unwrap(),
                            state,
                            maintenance,
                            retired,
                            health: health.clone(),
                            check_failures: Vec::new(),
                            leases_since_check: 3,
                            generation: Generation(7),
                        };
                        for event in &events {
                            let expected: Option<HostRecord> = match (state, event.clone()) {
                                (HostState::Available, HostEvent::Grant(l))
                                    if !maintenance && !retired && !health.is_quarantined() =>
                                {
                                    Some(HostRecord {
                                        state: HostState::Leased(l),
                                        leases_since_check: 4,
                                        ..h.clone()
                                    })
                                }
                                // A check takes a quarantined host too.
                                (HostState::Available, HostEvent::GrantCheck(l))
                                    if !maintenance && !retired =>
                                {
                                    Some(HostRecord {
                                        state: HostState::Leased(l),
                                        leases_since_check: 0,
                                        ..h.clone()
                                    })
                                }
                                (HostState::Leased(x), HostEvent::EndLease(l)) if x == l => {
                                    Some(HostRecord {
                                        state: HostState::Reclaiming(l),
                                        ..h.clone()
                                    })
                                }
                                (HostState::Reclaiming(x), HostEvent::Reclaimed(l)) if x == l => {
                                    Some(HostRecord {
                                        state: HostState::Available,
                                        ..h.clone()
                                    })
                                }
                                (_, HostEvent::SetMaintenance(m)) => Some(HostRecord {
                                    maintenance: m,
                                    ..h.clone()
                                }),
                                (_, HostEvent::SetRetired(r)) => Some(HostRecord {
                                    retired: r,
                                    ..h.clone()
                                }),
                                (_, HostEvent::SetHealth(health)) => Some(HostRecord {
                                    health,
                                    ..h.clone()
                                }),
                                (_, HostEvent::SetCheckFailures(times)) => Some(HostRecord {
                                    check_failures: times,
                                    ..h.clone()
                                }),
                                _ => None,
                            };
                            let got = h.apply(event.clone());
                            match expected {
                                None => {
                                    assert!(got.is_err(), "{h:?} × {event:?} should be refused")
                                }
                                Some(e) => {
                                    let got = got
                                        .unwrap_or_else(|err| panic!("{h:?} × {event:?}: {err}"));
                                    assert_eq!(
                                        got,
                                        HostRecord {
                                            generation: Generation(8),
                                            ..e
                                        },
                                        "{h:?} × {event:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Records stored before health checks load with none of their fields.
    #[test]
    fn host_records_stored_before_checks_load() {
        let old = r#"{"name":"h1","state":{"state":"available"},"maintenance":false,"retired":false,"health":{"Quarantined":{"reason":"r","since":5,"by":"root"}},"generation":3}"#;
        let h: HostRecord = serde_json::from_str(old).unwrap();
        assert_eq!(
            h.health,
            Health::Quarantined {
                reason: "r".into(),
                since: Timestamp(5),
                by: Principal::new("root").unwrap(),
                until_released: false,
            }
        );
        assert!(h.check_failures.is_empty() && h.leases_since_check == 0);
        let fresh = serde_json::to_string(&HostRecord::new(HostName::new("h2").unwrap())).unwrap();
        assert!(!fresh.contains("check_failures") && !fresh.contains("leases_since_check"));
    }

    #[test]
    fn refusal_names_host_and_state() {
        let h = HostRecord {
            maintenance: true,
            ..HostRecord::new(HostName::new("x86-01").unwrap())
        };
        let e = h
            .apply(HostEvent::Grant(LeaseId(uuid::Uuid::from_u128(3))))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "host x86-01 is in maintenance, cannot be granted"
        );
    }
}
