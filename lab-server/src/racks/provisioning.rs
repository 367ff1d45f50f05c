//! What the server remembers of each lease's hosts, from the agents'
//! reports: how far provisioning got (phase, stage, console tail) and when
//! the host's reclaim finished (where the lease's console log ends).
//!
//! In memory only, the latest [`PROVISIONING_KEPT`] of each; a lease's
//! record for a host of an agent's rack that never reported is made up
//! here ("waiting for the rack's agent", "never started"), in one place.

use crate::health::{Attribution, HostVerdict, Rules};
use crate::lease::Lease;
use crate::types::{HostName, LeaseId, Timestamp};
use std::collections::{HashMap, VecDeque};

/// Provisioning records (and reclaim times) kept for display, oldest
/// dropped first.
pub const PROVISIONING_KEPT: usize = 4096;

/// How far booting a host into its lease's profile got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionPhase {
    /// Waiting for the rack's agent to start.
    Pending,
    /// Boot device set, power switched on: the host is booting (for an
    /// install profile: also again from its disk, after the install).
    Booting,
    /// A profile that installs to disk: the installer runs (with a
    /// percentage).
    Installing,
    /// The profile's ready marker appeared (or it has none and the host was
    /// powered on).
    Ready,
    /// The BMC did not answer, the failure marker appeared, or the ready
    /// marker did not appear in time.
    Failed,
    /// A phase this server does not know (a newer agent), or none.
    Unknown,
}

/// The provisioning part of an agent's report on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionReport {
    pub lease: LeaseId,
    pub phase: ProvisionPhase,
    /// The latest stage in words ("powered on", "no … within 180s").
    pub stage: String,
    /// For `Failed`: the last lines of the host's console.
    pub console_tail: String,
    /// For `Installing`: how much of the install is done, 0–100.
    pub percent: u32,
    /// For `Ready`: the console line that matched the profile's ready text
    /// (a health check's facts); empty when none was sent.
    pub ready_line: String,
}

/// One host's provisioning for one lease, as users see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    pub host: HostName,
    pub phase: ProvisionPhase,
    pub stage: String,
    /// When the agent's report came in; `None` for a made-up record.
    pub updated_at: Option<Timestamp>,
    pub console_tail: String,
    /// For `Failed`: whose fault it was (see [`crate::health::attribution`]).
    pub failure: Option<Attribution>,
    /// For `Installing`: 0–100 (0 in other phases).
    pub percent: u32,
}

/// The records, keyed by lease and host.
#[derive(Debug, Default)]
pub(super) struct Records {
    provisioning: HashMap<(LeaseId, HostName), Provisioning>,
    order: VecDeque<(LeaseId, HostName)>,
    /// When each host's reclaim after a lease finished: the end of the
    /// lease's console slice (end-of-lease debug output included).
    reclaimed_at: HashMap<(LeaseId, HostName), Timestamp>,
}

impl Records {
    /// Takes an agent's report on `host`, received at `now`: it replaces
    /// the record of its lease on that host. A percentage belongs to the
    /// installing phase only, and is at most 100; a failure is attributed
    /// by `rules`.
    pub(super) fn update(
        &mut self,
        host: &HostName,
        report: ProvisionReport,
        now: Timestamp,
        rules: &Rules,
    ) -> Option<HostVerdict> {
        let key = (report.lease, host.clone());
        let percent = match report.phase {
            ProvisionPhase::Installing => report.percent.min(100),
            _ => 0,
        };
        let failure = (report.phase == ProvisionPhase::Failed)
            .then(|| rules.classify(&report.stage, &report.console_tail));
        let ready_line = report.ready_line;
        let record = Provisioning {
            host: host.clone(),
            phase: report.phase,
            stage: report.stage,
            updated_at: Some(now),
            console_tail: report.console_tail,
            failure,
            percent,
        };
        let verdict = match (&record.phase, &record.failure) {
            (ProvisionPhase::Failed, Some(f)) => Some(HostVerdict::Failed(f.clone())),
            (ProvisionPhase::Ready, _) => Some(HostVerdict::Ready { ready_line }),
            _ => None,
        };
        let phase = record.phase;
        match self.provisioning.insert(key.clone(), record) {
            None => {
                self.order.push_back(key);
                while self.order.len() > PROVISIONING_KEPT {
                    if let Some(old) = self.order.pop_front() {
                        self.provisioning.remove(&old);
                    }
                }
            }
            // The same phase again (an agent's resent report): said already.
            Some(old) if old.phase == phase => return None,
            Some(_) => {}
        }
        verdict
    }

    /// Records that `host`'s reclaim after `lease` finished at `now`.
    pub(super) fn reclaimed(&mut self, lease: LeaseId, host: &HostName, now: Timestamp) {
        if self.reclaimed_at.len() >= PROVISIONING_KEPT {
            self.reclaimed_at.clear();
        }
        self.reclaimed_at.insert((lease, host.clone()), now);
    }

    /// When `host`'s reclaim after `lease` finished, if this server saw it.
    pub(super) fn reclaimed_at(&self, lease: LeaseId, host: &HostName) -> Option<Timestamp> {
        self.reclaimed_at.get(&(lease, host.clone())).copied()
    }

    /// The provisioning of each of `lease`'s hosts that `has_agent` (hosts
    /// of racks without an agent get none), in the lease's host order.
    pub(super) fn for_lease(
        &self,
        lease: &Lease,
        has_agent: impl Fn(&HostName) -> bool,
    ) -> Vec<Provisioning> {
        lease
            .hosts
            .iter()
            .filter(|h| has_agent(h))
            .map(|h| {
                self.provisioning
                    .get(&(lease.id, h.clone()))
                    .cloned()
                    .unwrap_or_else(|| Provisioning {
                        host: h.clone(),
                        phase: ProvisionPhase::Pending,
                        stage: if lease.is_active() {
                            "waiting for the rack's agent".into()
                        } else {
                            "never started".into()
                        },
                        updated_at: None,
                        console_tail: String::new(),
                        failure: None,
                        percent: 0,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseState;
    use crate::types::{Generation, Principal};

    fn h(name: &str) -> HostName {
        HostName::new(name).unwrap()
    }

    fn lease(hosts: &[&str], state: LeaseState) -> Lease {
        Lease {
            id: LeaseId::random(),
            holder: Principal::new("ci").unwrap(),
            hosts: hosts.iter().map(|n| h(n)).collect(),
            state,
            profile: None,
            priority: 0,
            comment: String::new(),
            ttl_ms: 1000,
            granted_at: Timestamp(0),
            expires_at: Timestamp(1000),
            max_expires_at: Timestamp(1000),
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

    fn report(lease: LeaseId, phase: ProvisionPhase, stage: &str) -> ProvisionReport {
        ProvisionReport {
            lease,
            phase,
            stage: stage.into(),
            console_tail: String::new(),
            percent: 0,
            ready_line: String::new(),
        }
    }

    #[test]
    fn reports_and_made_up_records_merge_in_host_order() {
        let active = lease(&["h1", "h2", "h3"], LeaseState::Active);
        let ended = lease(&["h1", "h2"], LeaseState::Released);
        let mut r = Records::default();
        r.update(
            &h("h2"),
            report(active.id, ProvisionPhase::Booting, "powered on"),
            Timestamp(5),
            &Rules::default(),
        );
        r.update(
            &h("h2"),
            report(active.id, ProvisionPhase::Ready, "ready"),
            Timestamp(7),
            &Rules::default(),
        );
        // (lease, hosts with an agent, [(host, phase, stage, updated_at)])
        type Row<'a> = (&'a str, ProvisionPhase, &'a str, Option<i64>);
        let cases: Vec<(&Lease, Vec<&str>, Vec<Row>)> = vec![
            (
                &active,
                vec!["h1", "h2"],
                vec![
                    (
                        "h1",
                        ProvisionPhase::Pending,
                        "waiting for the rack's agent",
                        None,
                    ),
                    ("h2", ProvisionPhase::Ready, "ready", Some(7)),
                ],
            ),
            (
                &ended,
                vec!["h1", "h2"],
                vec![
                    ("h1", ProvisionPhase::Pending, "never started", None),
                    ("h2", ProvisionPhase::Pending, "never started", None),
                ],
            ),
            (&active, vec![], vec![]),
        ];
        for (l, managed, want) in cases {
            let records = r.for_lease(l, |host| managed.contains(&host.as_str()));
            let got: Vec<Row> = records
                .iter()
                .map(|p| {
                    (
                        p.host.as_str(),
                        p.phase,
                        p.stage.as_str(),
                        p.updated_at.map(|t| t.0),
                    )
                })
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn failures_are_attributed_and_nothing_else_is() {
        let l = lease(&["h1", "h2"], LeaseState::Active);
        let mut r = Records::default();
        let rules = Rules::default();
        let first = r.update(
            &h("h1"),
            ProvisionReport {
                console_tail: "Booting from Hard Disk...\r\nNo bootable device.\r\n".into(),
                ..report(l.id, ProvisionPhase::Failed, "no \"READY\" within 60s")
            },
            Timestamp(1),
            &rules,
        );
        assert!(
            matches!(&first, Some(HostVerdict::Failed(f)) if f.class == crate::health::FailureClass::Host),
            "{first:?}"
        );
        r.update(
            &h("h2"),
            ProvisionReport {
                console_tail: "No bootable device.\r\n".into(),
                ..report(l.id, ProvisionPhase::Booting, "powered on")
            },
            Timestamp(1),
            &rules,
        );
        // Said once: an agent resending the same report says nothing new.
        let again = r.update(
            &h("h1"),
            ProvisionReport {
                console_tail: "Booting from Hard Disk...\r\nNo bootable device.\r\n".into(),
                ..report(l.id, ProvisionPhase::Failed, "no \"READY\" within 60s")
            },
            Timestamp(2),
            &rules,
        );
        assert_eq!(again, None);
        let got = r.for_lease(&l, |_| true);
        let f = got[0].failure.as_ref().expect("h1's failure is attributed");
        assert_eq!(
            (f.class, f.rule.as_str(), f.line.as_str()),
            (
                crate::health::FailureClass::Host,
                "no bootable device",
                "No bootable device."
            )
        );
        assert_eq!(got[1].failure, None, "only a failure is attributed");
    }

    #[test]
    fn only_the_latest_records_are_kept() {
        let mut r = Records::default();
        let first = lease(&["h1"], LeaseState::Active);
        r.update(
            &h("h1"),
            report(first.id, ProvisionPhase::Ready, "first"),
            Timestamp(1),
            &Rules::default(),
        );
        r.reclaimed(first.id, &h("h1"), Timestamp(2));
        for i in 0..PROVISIONING_KEPT {
            let l = LeaseId::random();
            r.update(
                &h("h1"),
                report(l, ProvisionPhase::Booting, "x"),
                Timestamp(3),
                &Rules::default(),
            );
            r.reclaimed(l, &h("h1"), Timestamp(i as i64));
        }
        assert_eq!(r.provisioning.len(), PROVISIONING_KEPT);
        assert_eq!(
            r.for_lease(&first, |_| true)[0].stage,
            "waiting for the rack's agent"
        );
        assert!(r.reclaimed_at.len() <= PROVISIONING_KEPT);
        assert_eq!(r.reclaimed_at(first.id, &h("h1")), None);
    }
}
