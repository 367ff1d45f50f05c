//! The actor's index of its hosts for the hot path: which hosts may be
//! granted (or checked) now, in inventory order, and how many are in each
//! state (for `/metrics`). It follows every host record the actor writes,
//! so a scheduling pass looks at the free hosts only and a batch's
//! bookkeeping does not walk the inventory: a grant costs the same with 10
//! hosts or 10,000.
//!
//! Changes the actor makes in bulk (a state reloaded from the store, a new
//! inventory, reachability reported by agents, a host removed) mark it
//! stale; it is rebuilt (one walk of the hosts) before its next use.

use crate::inventory::Inventory;
use crate::lease::{HostRecord, HostState};
use crate::types::HostName;
use std::collections::{BTreeMap, BTreeSet};

/// Hosts per state, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub available: i64,
    pub leased: i64,
    pub reclaiming: i64,
    pub maintenance: i64,
    pub retired: i64,
}

impl Tally {
    fn count(&mut self, r: &HostRecord, sign: i64) {
        match r.state {
            HostState::Available => self.available += sign,
            HostState::Leased(_) => self.leased += sign,
            HostState::Reclaiming(_) => self.reclaiming += sign,
        }
        self.maintenance += sign * i64::from(r.maintenance);
        self.retired += sign * i64::from(r.retired);
    }
}

#[derive(Debug, Default)]
pub(super) struct HostIndex {
    /// (inventory position, name) of the hosts that may be granted or
    /// checked now and are reachable.
    free: BTreeSet<(usize, HostName)>,
    tally: Tally,
    stale: bool,
}

fn is_free(r: &HostRecord) -> bool {
    r.is_grantable() || r.is_checkable()
}

impl HostIndex {
    pub(super) fn stale() -> Self {
        HostIndex {
            stale: true,
            ..HostIndex::default()
        }
    }

    /// Something changed in bulk: rebuild before the next use.
    pub(super) fn invalidate(&mut self) {
        self.stale = true;
    }

    /// Makes the index current (a walk of the hosts, only when stale).
    pub(super) fn refresh(
        &mut self,
        inventory: &Inventory,
        hosts: &BTreeMap<HostName, HostRecord>,
        unreachable: &BTreeMap<HostName, String>,
    ) {
        if !self.stale {
            return;
        }
        self.free.clear();
        self.tally = Tally::default();
        for r in hosts.values() {
            self.tally.count(r, 1);
            if is_free(r)
                && !unreachable.contains_key(&r.name)
                && let Some(i) = inventory.position(&r.name)
            {
                self.free.insert((i, r.name.clone()));
            }
        }
        self.stale = false;
    }

    /// A host record was written (`old` → `new`); `unreachable`: whether
    /// the host cannot be driven now.
    pub(super) fn changed(
        &mut self,
        inventory: &Inventory,
        old: Option<&HostRecord>,
        new: &HostRecord,
        unreachable: bool,
    ) {
        if self.stale {
            return;
        }
        if let Some(o) = old {
            self.tally.count(o, -1);
        }
        self.tally.count(new, 1);
        if let Some(i) = inventory.position(&new.name) {
            let key = (i, new.name.clone());
            if is_free(new) && !unreachable {
                self.free.insert(key);
            } else {
                self.free.remove(&key);
            }
        }
    }

    /// Free hosts in inventory order (call [`HostIndex::refresh`] first).
    pub(super) fn free(&self) -> impl Iterator<Item = &HostName> {
        debug_assert!(!self.stale, "the host index is used while stale");
        self.free.iter().map(|(_, n)| n)
    }

    /// How many hosts are free.
    pub(super) fn free_len(&self) -> usize {
        self.free.len()
    }

    pub(super) fn tally(&self) -> Tally {
        self.tally
    }
}
