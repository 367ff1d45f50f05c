//! The agent's view of its rack's hosts: what each host is (MAC, address,
//! arch, firmware) and which boot profile it should get now. Every protocol
//! server reads it; the link to lab-server keeps it current.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

pub use lab_types::{Arch, Firmware, MacAddr};

/// One host of the rack, as the boot services need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootHost {
    pub name: String,
    pub mac: MacAddr,
    pub ipv4: Option<Ipv4Addr>,
    pub arch: Arch,
    pub firmware: Firmware,
    /// Boot profile now in force (`xen`, `local-disk`, …).
    pub profile: String,
    /// The lease holding it, if any (for templates and logs).
    pub lease: Option<String>,
    /// Who holds that lease, if the server said (for the lease metadata
    /// of an install).
    pub holder: Option<String>,
    /// The lease's OpenSSH public key for root, if any (validated by the
    /// server and again at the link).
    pub ssh_key: Option<String>,
}

/// The rack's hosts by MAC; cheap to clone, shared by all servers.
#[derive(Debug, Clone, Default)]
pub struct HostTable {
    inner: Arc<RwLock<BTreeMap<MacAddr, BootHost>>>,
}

impl HostTable {
    pub fn new(hosts: impl IntoIterator<Item = BootHost>) -> Self {
        let t = Self::default();
        t.replace(hosts);
        t
    }

    /// Replace every host (after a resync with the server).
    pub fn replace(&self, hosts: impl IntoIterator<Item = BootHost>) {
        let map = hosts.into_iter().map(|h| (h.mac, h)).collect();
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    pub fn by_mac(&self, mac: &MacAddr) -> Option<BootHost> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(mac)
            .cloned()
    }

    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<BootHost> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|h| h.ipv4 == Some(ip))
            .cloned()
    }

    pub fn all(&self) -> Vec<BootHost> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Set one host's profile and lease (without holder or key); false if
    /// the MAC is unknown.
    pub fn set_profile(&self, mac: &MacAddr, profile: &str, lease: Option<String>) -> bool {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match g.get_mut(mac) {
            Some(h) => {
                h.profile = profile.to_owned();
                h.lease = lease;
                h.holder = None;
                h.ssh_key = None;
                true
            }
            None => false,
        }
    }
}
