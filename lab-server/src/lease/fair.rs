//! Fair share's measure of recent use: a project's **decayed host-seconds**,
//! pure arithmetic on timestamps.
//!
//! Holding `n` hosts adds `n` host-seconds per second; everything counted
//! decays exponentially with the policy's half-life `h` (rate
//! `λ = ln 2 / h`). So `U' = n − λU`, and a lease of `k` hosts from `g` to
//! `e` counts, at `t ≥ e`, `k (1 − e^{−λ(e−g)}) / λ · e^{−λ(t−e)}`.
//!
//! [`Usage`] keeps this in O(1) per change, without summing leases: the
//! ended part `E` and, for the leases still running, `S = Σ kᵢ e^{−λ(t−gᵢ)}`
//! both simply decay; then `U(t) = E + (n − S) / λ`. A grant adds `k` to
//! `n` and to `S`; an end moves the lease's share from `S` to `E`.
//! [`Usage::replay`] computes the same from a list of leases (at start and
//! after the policy changed who belongs where).

use crate::types::Timestamp;
use std::time::Duration;

/// One project's decayed host-seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Decayed host-seconds of ended leases, at `at`.
    ended: f64,
    /// `Σ kᵢ e^{−λ(at−gᵢ)}` over running leases.
    s: f64,
    /// Hosts held now.
    held: u32,
    at: Timestamp,
    /// λ, per millisecond.
    rate: f64,
}

impl Usage {
    pub fn new(half_life: Duration, now: Timestamp) -> Self {
        let ms = half_life.as_millis().max(1) as f64;
        Self {
            ended: 0.0,
            s: 0.0,
            held: 0,
            at: now,
            rate: std::f64::consts::LN_2 / ms,
        }
    }

    fn decay(&self, from: Timestamp, to: Timestamp) -> f64 {
        let dt = (to.0 - from.0).max(0) as f64;
        (-self.rate * dt).exp()
    }

    /// Moves the reference time to `now` (never backwards).
    fn advance(&mut self, now: Timestamp) {
        if now.0 > self.at.0 {
            let f = self.decay(self.at, now);
            self.ended *= f;
            self.s *= f;
            self.at = now;
        }
    }

    /// `hosts` hosts were granted at `now`.
    pub fn grant(&mut self, now: Timestamp, hosts: u32) {
        self.advance(now);
        self.held += hosts;
        self.s += f64::from(hosts) * self.decay(now, self.at);
    }

    /// A lease of `hosts` hosts granted at `granted` ended at `now`.
    pub fn end(&mut self, now: Timestamp, granted: Timestamp, hosts: u32) {
        self.advance(now);
        let k = f64::from(hosts);
        let since = self.decay(granted, now);
        self.ended += k * (1.0 - since) / self.rate / 1000.0;
        self.s = (self.s - k * since).max(0.0);
        self.held = self.held.saturating_sub(hosts);
    }

    /// Decayed host-seconds at `now` (not before the last change).
    pub fn value(&self, now: Timestamp) -> f64 {
        let mut u = *self;
        u.advance(now);
        let running = (f64::from(u.held) - u.s).max(0.0) / u.rate / 1000.0;
        u.ended + running
    }

    /// Hosts held now.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// The usage at `now` of leases `(granted, ended or None if running,
    /// hosts)`, in any order.
    pub fn replay(
        half_life: Duration,
        now: Timestamp,
        leases: impl IntoIterator<Item = (Timestamp, Option<Timestamp>, u32)>,
    ) -> Self {
        let mut u = Self::new(half_life, now);
        for (g, e, k) in leases {
            let kf = f64::from(k);
            match e {
                Some(e) => {
                    // Its share at its end, decayed to now.
                    let at_end = kf * (1.0 - u.decay(g, e.max(g))) / u.rate / 1000.0;
                    u.ended += at_end * u.decay(e.max(g), now);
                }
                None => {
                    u.held += k;
                    u.s += kf * u.decay(g, now);
                }
            }
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    fn t(s: i64) -> Timestamp {
        Timestamp(s * 1000)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn decayed_host_seconds_as_tabled() {
        // (what happens, expected value afterwards, at time)
        let mut u = Usage::new(H, t(0));
        assert_eq!(u.value(t(0)), 0.0);
        u.grant(t(0), 2);
        // 2 hosts for a short while: almost 2 host-seconds per second.
        assert!(close(
            u.value(t(10)),
            2.0 * (1.0 - 0.5f64.powf(10.0 / 3600.0)) * 3600.0 / std::f64::consts::LN_2
        ));
        // For one half-life: 2·h·(1−½)/ln2 host-seconds.
        let one_h = 2.0 * 3600.0 * 0.5 / std::f64::consts::LN_2;
        assert!(close(u.value(t(3600)), one_h), "{}", u.value(t(3600)));
        u.end(t(3600), t(0), 2);
        assert!(close(u.value(t(3600)), one_h));
        assert_eq!(u.held(), 0);
        // Then it halves every half-life.
        assert!(close(u.value(t(7200)), one_h / 2.0));
        assert!(close(u.value(t(3600 * 11)), one_h / 1024.0));
    }

    #[test]
    fn incremental_and_replayed_agree() {
        let leases = [
            (t(0), Some(t(600)), 1),
            (t(100), Some(t(5000)), 3),
            (t(200), None, 2),
            (t(4000), None, 1),
            (t(4500), Some(t(4600)), 4),
        ];
        let mut u = Usage::new(H, t(0));
        // Events in time order: grants at g, ends at e.
        let mut evs: Vec<(Timestamp, bool, usize)> = Vec::new();
        for (i, (g, e, _)) in leases.iter().enumerate() {
            evs.push((*g, true, i));
            if let Some(e) = e {
                evs.push((*e, false, i));
            }
        }
        evs.sort_by_key(|(at, grant, _)| (*at, !*grant));
        for (at, grant, i) in evs {
            let (g, _, k) = leases[i];
            if grant {
                u.grant(at, k);
            } else {
                u.end(at, g, k);
            }
        }
        let now = t(6000);
        let r = Usage::replay(H, now, leases);
        assert!(
            close(u.value(now), r.value(now)),
            "{} vs {}",
            u.value(now),
            r.value(now)
        );
        assert_eq!(u.held(), 3);
        assert_eq!(r.held(), 3);
    }
}
