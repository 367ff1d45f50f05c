//! The health loop's rules, pure: what a health check's result does to its
//! host's health. The core applies them ([`after_check`]) when a check
//! lease ends in READY (its facts compared with the inventory), FAILED, or
//! runs out before READY.
//!
//! ```text
//! fail ──► quarantined (by lab-health, "health check failed: …")
//!          the K-th failure within the window (K = --quarantine-after,
//!          window = --quarantine-window): quarantined until an operator
//!          releases it (`lab host release-quarantine`)
//! pass ──► healthy, unless the quarantine is an operator's or is kept
//!          until released (then it stays)
//! ```
//!
//! Failures are counted on the host record (durable); a pass does not
//! forget them (a flapping host still reaches K), an operator's release
//! does.

use crate::lease::machine::Health;
use crate::types::{Principal, Timestamp};
use std::time::Duration;

/// The profile a health check's lease boots.
pub const CHECK_PROFILE: &str = "health-check";

/// How a health check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Pass,
    /// Why (a facts mismatch, a failed boot, no READY in time).
    Fail(String),
}

/// `--quarantine-after` and `--quarantine-window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopRules {
    pub quarantine_after: usize,
    pub window: Duration,
}

/// A host's health and its recent check failures after a check: the
/// failures within the window (this one included) and the new health.
pub fn after_check(
    health: &Health,
    failures: &[Timestamp],
    result: &CheckResult,
    now: Timestamp,
    rules: LoopRules,
) -> (Health, Vec<Timestamp>) {
    let mut recent: Vec<Timestamp> = failures
        .iter()
        .copied()
        .filter(|t| now.since(*t) <= rules.window)
        .collect();
    let held = match health {
        Health::Quarantined {
            by, until_released, ..
        } => *until_released || !is_automatic(by),
        _ => false,
    };
    let next = match result {
        CheckResult::Pass if held => health.clone(),
        CheckResult::Pass => Health::Healthy,
        CheckResult::Fail(why) => {
            recent.push(now);
            let since = match health {
                Health::Quarantined { since, .. } => *since,
                _ => now,
            };
            let n = recent.len();
            if held {
                health.clone()
            } else if n >= rules.quarantine_after.max(1) {
                Health::Quarantined {
                    reason: format!(
                        "{n} failed health checks within {}; stays quarantined until \
                         `lab host release-quarantine`; the last: {why}",
                        humantime::format_duration(rules.window)
                    ),
                    since,
                    by: Principal::health(),
                    until_released: true,
                }
            } else {
                Health::Quarantined {
                    reason: format!("health check failed: {why}"),
                    since,
                    by: Principal::health(),
                    until_released: false,
                }
            }
        }
    };
    (next, recent)
}

/// Quarantined by the server itself (its checks, its failure count), not
/// by an operator.
fn is_automatic(by: &Principal) -> bool {
    *by == Principal::health() || *by == Principal::server()
}

/// Should a host that is reachable again be checked? Yes when it was the
/// host itself that did not answer (its BMC), not when its rack's agent was
/// away (an agent restart says nothing about the hosts).
pub fn check_when_back(unreachable_reason: &str) -> bool {
    !(unreachable_reason.starts_with("agent ") && unreachable_reason.ends_with(" is not attached"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp(s * 1000)
    }

    fn q(reason: &str, by: Principal, until_released: bool) -> Health {
        Health::Quarantined {
            reason: reason.into(),
            since: t(1),
            by,
            until_released,
        }
    }

    /// Every starting health × pass/fail × failures before, with K = 2
    /// within 1 h, at t = 5000 s.
    #[test]
    fn loop_rule_table() {
        let rules = LoopRules {
            quarantine_after: 2,
            window: Duration::from_secs(3600),
        };
        let now = t(5000);
        let fail = CheckResult::Fail("memory 495 MiB, inventory expects 1024 MiB".into());
        let operator = Principal::new("root").unwrap();
        let suspect = Health::Suspect {
            reason: "no bootable device".into(),
            since: t(2),
        };
        let by_check = q("health check failed: x", Principal::health(), false);
        let by_server = q("2 host failures", Principal::server(), false);
        let sticky = q("2 failed health checks", Principal::health(), true);
        let by_operator = q("fan", operator.clone(), true);
        let old_operator = q("fan", operator.clone(), false);
        let once = "health check failed: memory 495 MiB, inventory expects 1024 MiB";
        let twice = "2 failed health checks within 1h; stays quarantined until \
                     `lab host release-quarantine`; the last: memory 495 MiB, inventory expects 1024 MiB";
        // (health, failures before (s), result, expected health as
        // (name, reason prefix, by, until_released), failures after (s))
        type Want<'a> = (&'a str, &'a str, Option<&'a Principal>, bool);
        let health = Principal::health();
        type Case<'a> = (Health, Vec<i64>, CheckResult, Want<'a>, Vec<i64>);
        let cases: Vec<Case> = vec![
            // Pass: healthy, unless held.
            (
                Health::Healthy,
                vec![],
                CheckResult::Pass,
                ("healthy", "", None, false),
                vec![],
            ),
            (
                suspect.clone(),
                vec![],
                CheckResult::Pass,
                ("healthy", "", None, false),
                vec![],
            ),
            (
                by_check.clone(),
                vec![4000],
                CheckResult::Pass,
                ("healthy", "", None, false),
                vec![4000],
            ),
            (
                by_server.clone(),
                vec![],
                CheckResult::Pass,
                ("healthy", "", None, false),
                vec![],
            ),
            (
                sticky.clone(),
                vec![4000, 4500],
                CheckResult::Pass,
                ("quarantined", "2 failed", Some(&health), true),
                vec![4000, 4500],
            ),
            (
                by_operator.clone(),
                vec![],
                CheckResult::Pass,
                ("quarantined", "fan", Some(&operator), true),
                vec![],
            ),
            (
                old_operator.clone(),
                vec![],
                CheckResult::Pass,
                ("quarantined", "fan", Some(&operator), false),
                vec![],
            ),
            // A pass forgets failures outside the window only.
            (
                Health::Healthy,
                vec![1000, 4000],
                CheckResult::Pass,
                ("healthy", "", None, false),
                vec![4000],
            ),
            // Fail: quarantined by lab-health; the K-th within the window sticks.
            (
                Health::Healthy,
                vec![],
                fail.clone(),
                ("quarantined", once, Some(&health), false),
                vec![5000],
            ),
            (
                suspect.clone(),
                vec![1000],
                fail.clone(),
                ("quarantined", once, Some(&health), false),
                vec![5000],
            ),
            (
                Health::Healthy,
                vec![4000],
                fail.clone(),
                ("quarantined", twice, Some(&health), true),
                vec![4000, 5000],
            ),
            (
                by_check.clone(),
                vec![1401],
                fail.clone(),
                ("quarantined", twice, Some(&health), true),
                vec![1401, 5000],
            ),
            (
                by_check.clone(),
                vec![1399],
                fail.clone(),
                ("quarantined", once, Some(&health), false),
                vec![5000],
            ),
            (
                by_server.clone(),
                vec![],
                fail.clone(),
                ("quarantined", once, Some(&health), false),
                vec![5000],
            ),
            // Held quarantines keep their reason; the failure still counts.
            (
                by_operator.clone(),
                vec![4000],
                fail.clone(),
                ("quarantined", "fan", Some(&operator), true),
                vec![4000, 5000],
            ),
            (
                sticky.clone(),
                vec![],
                fail.clone(),
                ("quarantined", "2 failed", Some(&health), true),
                vec![5000],
            ),
        ];
        for (before, failures, result, want, after) in cases {
            let failures: Vec<Timestamp> = failures.into_iter().map(t).collect();
            let (got, recent) = after_check(&before, &failures, &result, now, rules);
            let label = format!("{before:?} {failures:?} {result:?}");
            assert_eq!(got.name(), want.0, "{label}: {got:?}");
            if let Health::Quarantined {
                reason,
                by,
                until_released,
                since,
            } = &got
            {
                assert!(reason.starts_with(want.1), "{label}: {reason}");
                assert_eq!(Some(by), want.2, "{label}");
                assert_eq!(*until_released, want.3, "{label}");
                let expected_since = if before.is_quarantined() { t(1) } else { now };
                assert_eq!(*since, expected_since, "{label}");
            }
            assert_eq!(
                recent,
                after.into_iter().map(t).collect::<Vec<_>>(),
                "{label}"
            );
        }
    }

    #[test]
    fn back_from_a_silent_bmc_is_checked_back_from_an_absent_agent_is_not() {
        assert!(check_when_back(
            "BMC 10.0.0.1:623 does not answer: timed out"
        ));
        assert!(!check_when_back(
            "agent agent-rack1 of rack rack1 is not attached"
        ));
    }
}
