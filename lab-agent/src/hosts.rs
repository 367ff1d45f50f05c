//! The agent's view of its rack's hosts: what each host is (MAC, address,
//! arch, firmware) and which boot profile it should get now. Every protocol
//! server reads it; the link to lab-server keeps it current.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

/// A MAC address (lower-case `aa:bb:cc:dd:ee:ff` when displayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(m))
    }
}

impl Mac {
    /// `aa-bb-cc-dd-ee-ff`, as iPXE's `${net0/mac:hexhyp}` prints it.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
}

/// One host of the rack, as the boot services need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootHost {
    pub name: String,
    pub mac: Mac,
    pub ipv4: Option<Ipv4Addr>,
    pub arch: Arch,
    pub firmware: Firmware,
    /// Boot profile now in force (`xen`, `local-disk`, …).
    pub profile: String,
    /// The lease holding it, if any (for templates and logs).
    pub lease: Option<String>,
}

/// The rack's hosts by MAC; cheap to clone, shared by all servers.
#[derive(Debug, Clone, Default)]
pub struct HostTable {
    inner: Arc<RwLock<BTreeMap<Mac, BootHost>>>,
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

    pub fn by_mac(&self, mac: &Mac) -> Option<BootHost> {
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

    /// Set one host's profile and lease; false if the MAC is unknown.
    pub fn set_profile(&self, mac: &Mac, profile: &str, lease: Option<String>) -> bool {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        match g.get_mut(mac) {
            Some(h) => {
                h.profile = profile.to_owned();
                h.lease = lease;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_forms() {
        let m: Mac = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(m.hyphenated(), "52-54-00-ab-cd-01");
        assert!("52:54:00".parse::<Mac>().is_err());
        assert!("zz:54:00:ab:cd:01".parse::<Mac>().is_err());
    }
}
