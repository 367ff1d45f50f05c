//! Caps on what clients may hold at once: a global number of slots (HTTP
//! connections, TFTP transfers), a number per client IP address, and at
//! most one slot per key (TFTP keys a transfer by the client's address,
//! port and request, so that a retransmitted request does not start a
//! second transfer; HTTP by the connection's address and port).
//!
//! The per-address cap is what keeps one host's flood from taking every
//! slot; the global cap bounds the server's file descriptors, threads and
//! memory whatever the number of addresses. Both refuse at once (the caller
//! answers cheaply: HTTP closes the connection, TFTP sends "server busy").
//!
//! A [`Slot`] is released when dropped, wherever the work ends.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps. Both must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    pub total: usize,
    pub per_client: usize,
}

/// Why a slot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("all {0} slots are taken")]
    Full(usize),
    #[error("the client already holds its {0} slots")]
    ClientFull(usize),
    #[error("the same key already holds a slot")]
    Duplicate,
}

/// The slots of one server, each held under a key of type `K`.
#[derive(Debug)]
pub struct Slots<K> {
    limits: SlotLimits,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K> {
    per_ip: HashMap<IpAddr, usize>,
    held: HashSet<K>,
}

impl<K: Hash + Eq + Clone> Slots<K> {
    pub fn new(limits: SlotLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::new(State {
                per_ip: HashMap::new(),
                held: HashSet::new(),
            }),
        })
    }

    /// A slot for client address `ip` under `key`, or why not. Checked in
    /// this order: `key` already holds one, `ip` holds `per_client`, all
    /// `total` are taken.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, key: K) -> Result<Slot<K>, Refused> {
        let mut s = self.lock();
        if s.held.contains(&key) {
            return Err(Refused::Duplicate);
        }
        let held = s.per_ip.get(&ip).copied().unwrap_or(0);
        if held >= self.limits.per_client {
            return Err(Refused::ClientFull(self.limits.per_client));
        }
        if s.held.len() >= self.limits.total {
            return Err(Refused::Full(self.limits.total));
        }
        s.held.insert(key.clone());
        *s.per_ip.entry(ip).or_default() += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
            key: Some(key),
        })
    }

    /// Slots held now.
    pub fn active(&self) -> usize {
        self.lock().held.len()
    }

    pub fn limits(&self) -> SlotLimits {
        self.limits
    }

    fn release(&self, ip: IpAddr, key: &K) {
        let mut s = self.lock();
        if s.held.remove(key)
            && let Some(n) = s.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&ip);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // Every update completes under the lock: a poisoned state is whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One held slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq + Clone> {
    slots: Arc<Slots<K>>,
    ip: IpAddr,
    key: Option<K>,
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.slots.release(self.ip, &key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Slots keyed by the client's address and port, as HTTP's.
    fn take(slots: &Arc<Slots<SocketAddr>>, peer: &str) -> Result<Slot<SocketAddr>, Refused> {
        let peer = at(peer);
        slots.try_acquire(peer.ip(), peer)
    }

    #[test]
    fn per_client_then_total_then_release() {
        let slots = Slots::new(SlotLimits {
            total: 3,
            per_client: 2,
        });
        let a1 = take(&slots, "10.0.0.1:1000").unwrap();
        let a2 = take(&slots, "10.0.0.1:1001").unwrap();
        assert_eq!(
            take(&slots, "10.0.0.1:1002").unwrap_err(),
            Refused::ClientFull(2)
        );
        let b1 = take(&slots, "10.0.0.2:1000").unwrap();
        assert_eq!(slots.active(), 3);
        assert_eq!(take(&slots, "10.0.0.3:1000").unwrap_err(), Refused::Full(3));
        // The per-client refusal wins over "full" for a client at its cap.
        assert_eq!(
            take(&slots, "10.0.0.1:1003").unwrap_err(),
            Refused::ClientFull(2)
        );
        drop(a1);
        assert_eq!(slots.active(), 2);
        let c1 = take(&slots, "10.0.0.3:1000").unwrap();
        drop((a2, b1, c1));
        assert_eq!(slots.active(), 0);
        assert!(slots.lock().per_ip.is_empty(), "no stale entries");
    }

    #[test]
    fn the_same_key_holds_one_slot() {
        // Keyed as TFTP does: client address and port, and the request.
        let slots: Arc<Slots<(SocketAddr, &str)>> = Slots::new(SlotLimits {
            total: 10,
            per_client: 10,
        });
        let c = at("10.0.0.1:1000");
        let s = slots.try_acquire(c.ip(), (c, "RRQ a")).unwrap();
        assert_eq!(
            slots.try_acquire(c.ip(), (c, "RRQ a")).unwrap_err(),
            Refused::Duplicate,
            "a retransmission"
        );
        // Another request from the same port, or the same from another port.
        let t = slots.try_acquire(c.ip(), (c, "RRQ b")).unwrap();
        let d = at("10.0.0.1:1001");
        let u = slots.try_acquire(d.ip(), (d, "RRQ a")).unwrap();
        drop(s);
        let again = slots.try_acquire(c.ip(), (c, "RRQ a")).unwrap();
        assert_eq!(slots.active(), 3);
        drop((t, u, again));
        assert_eq!(slots.active(), 0);
        assert!(slots.lock().per_ip.is_empty());
    }
}
