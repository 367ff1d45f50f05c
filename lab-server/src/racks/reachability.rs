//! Which hosts cannot be driven now, and why. A host of a rack that has an
//! agent is unreachable while that agent is not attached, or while the
//! agent reports it unreachable (its BMC silent). Hosts of racks without an
//! agent are always reachable. Pure: the registry feeds it the inventory,
//! the attached racks and the reports, and hands the result to the core
//! (`Core::set_unreachable`), which grants no unreachable host.
//!
//! It also knows which rack each managed host is in: an agent speaks only
//! for its own rack's hosts, and a report counts only while the host is in
//! the rack whose agent sent it.

use crate::inventory::Inventory;
use crate::types::{HostName, RackName};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What an agent last said about driving a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostReachability {
    Reachable,
    Unreachable { reason: String },
}

/// The agents' last word on each host, and which hosts have an agent.
#[derive(Debug, Default)]
pub(super) struct Reachability {
    /// The last report on each host, with the rack whose agent sent it.
    reports: HashMap<HostName, (RackName, HostReachability)>,
    /// The reports that say unreachable (what a refresh reads).
    silent: HashMap<HostName, (RackName, String)>,
    /// Hosts whose rack has an agent, with that rack, as of the last
    /// [`Self::refresh`].
    managed: HashMap<HostName, RackName>,
    /// The inventory `managed` was built from: it is built again only for
    /// a new one (a refresh then costs the racks and the unreachable hosts,
    /// not a walk of every host).
    seen: Option<Arc<Inventory>>,
}

impl Reachability {
    /// Records a report from `rack`'s agent (the caller checked that the
    /// host is in it); true when it changes what is known of the host.
    pub(super) fn report(
        &mut self,
        rack: &RackName,
        host: HostName,
        now: HostReachability,
    ) -> bool {
        match &now {
            HostReachability::Unreachable { reason } => {
                self.silent
                    .insert(host.clone(), (rack.clone(), reason.clone()));
            }
            HostReachability::Reachable => {
                self.silent.remove(&host);
            }
        }
        let now = (rack.clone(), now);
        self.reports.insert(host, now.clone()) != Some(now)
    }

    /// Does `host`'s rack have an agent?
    pub(super) fn is_managed(&self, host: &HostName) -> bool {
        self.managed.contains_key(host)
    }

    /// The rack of `host`, if that rack has an agent.
    pub(super) fn rack_of(&self, host: &HostName) -> Option<&RackName> {
        self.managed.get(host)
    }

    /// The unreachable hosts of `inventory` with why, given which racks
    /// have their agent attached.
    pub(super) fn refresh(
        &mut self,
        inventory: &Arc<Inventory>,
        attached: impl Fn(&RackName) -> bool,
    ) -> BTreeMap<HostName, String> {
        if !self
            .seen
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, inventory))
        {
            self.managed.clear();
            for h in &inventory.hosts {
                if inventory.rack(&h.rack).is_some_and(|r| r.agent.is_some()) {
                    self.managed.insert(h.name.clone(), h.rack.clone());
                }
            }
            self.seen = Some(inventory.clone());
        }
        let mut unreachable = BTreeMap::new();
        for rack in &inventory.racks {
            let Some(agent) = &rack.agent else {
                continue;
            };
            if !attached(&rack.name) {
                for h in inventory.hosts_in_rack(&rack.name) {
                    unreachable.insert(
                        h.name.clone(),
                        format!("agent {agent} of rack {} is not attached", rack.name),
                    );
                }
            }
        }
        for (host, (from, reason)) in &self.silent {
            // A report from the host's former rack no longer counts.
            if self.managed.get(host) == Some(from) && attached(from) {
                unreachable.insert(host.clone(), reason.clone());
            }
        }
        unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const INVENTORY: &str = r#"
[[rack]]
name = "r1"
agent = "a1"

[[rack]]
name = "r2"

[[host]]
name = "h1"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:01"

[[host]]
name = "h2"
arch = "x86_64"
firmware = "bios"
rack = "r1"
mac = "52:54:00:00:00:02"

[[host]]
name = "h3"
arch = "x86_64"
firmware = "bios"
rack = "r2"
mac = "52:54:00:00:00:03"
"#;

    fn h(name: &str) -> HostName {
        HostName::new(name).unwrap()
    }

    fn rack(name: &str) -> RackName {
        RackName::new(name).unwrap()
    }

    fn silent(reason: &str) -> HostReachability {
        HostReachability::Unreachable {
            reason: reason.into(),
        }
    }

    #[test]
    fn agent_presence_and_reports_decide() {
        let inv = Arc::new(Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap());
        let away = "agent a1 of rack r1 is not attached";
        // (r1 attached, reports, unreachable hosts)
        type Case<'a> = (
            bool,
            Vec<(&'a str, HostReachability)>,
            Vec<(&'a str, &'a str)>,
        );
        let cases: Vec<Case> = vec![
            (false, vec![], vec![("h1", away), ("h2", away)]),
            // An absent agent's reports do not count.
            (
                false,
                vec![("h1", silent("bmc"))],
                vec![("h1", away), ("h2", away)],
            ),
            (true, vec![], vec![]),
            (
                true,
                vec![("h1", silent("bmc of h1 silent"))],
                vec![("h1", "bmc of h1 silent")],
            ),
            (
                true,
                vec![("h1", silent("x")), ("h1", HostReachability::Reachable)],
                vec![],
            ),
            // r2 has no agent: h3 is never unreachable.
            (true, vec![("h3", silent("x"))], vec![]),
        ];
        for (attached, reports, want) in cases {
            let mut r = Reachability::default();
            for (host, rep) in reports.clone() {
                r.report(&rack("r1"), h(host), rep);
            }
            let got = r.refresh(&inv, |rack| attached && rack.as_str() == "r1");
            let want: BTreeMap<HostName, String> =
                want.iter().map(|(k, v)| (h(k), v.to_string())).collect();
            assert_eq!(got, want, "attached={attached} {reports:?}");
            assert!(r.is_managed(&h("h1")) && r.is_managed(&h("h2")));
            assert!(!r.is_managed(&h("h3")));
            assert_eq!(r.rack_of(&h("h1")), Some(&rack("r1")));
            assert_eq!(r.rack_of(&h("h3")), None);
        }
    }

    #[test]
    fn a_report_from_a_former_rack_does_not_count() {
        let inv = Arc::new(Inventory::parse(INVENTORY, Path::new("inv.toml")).unwrap());
        let mut r = Reachability::default();
        r.report(&rack("r9"), h("h1"), silent("said r9"));
        assert_eq!(r.refresh(&inv, |_| true), BTreeMap::new());
        r.report(&rack("r1"), h("h1"), silent("said r1"));
        assert_eq!(
            r.refresh(&inv, |_| true),
            BTreeMap::from([(h("h1"), "said r1".to_owned())])
        );
    }

    #[test]
    fn only_a_change_is_news() {
        let mut r = Reachability::default();
        let r1 = rack("r1");
        assert!(r.report(&r1, h("h1"), HostReachability::Reachable));
        assert!(!r.report(&r1, h("h1"), HostReachability::Reachable));
        assert!(r.report(&r1, h("h1"), silent("a")));
        assert!(!r.report(&r1, h("h1"), silent("a")));
        assert!(r.report(&r1, h("h1"), silent("b")));
        assert!(r.report(&r1, h("h1"), HostReachability::Reachable));
    }
}
