//! The desired state of a host, as the rack model sees it: [`HostSpec`]
//! (converted from the server's `AgentHost` at the link, see
//! `link/convert.rs`), and what the boot services make of it
//! ([`HostSpec::boot_host`]).

use crate::hosts::{Arch, BootHost, Firmware, MacAddr};
use lab_types::{HostName, LeaseId, Principal, ProfileName, Secret, SshPublicKey};
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Why a host cannot be served by DHCP, TFTP and HTTP (its other parts,
/// BMC, console and provisioning, are still driven). The server sends no
/// identity for a retired host it no longer describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("bad mac {0:?}")]
    Mac(String),
    #[error("bad ipv4 {0:?}")]
    Ipv4(String),
    #[error("bad arch {0}")]
    Arch(i32),
    #[error("bad firmware {0}")]
    Firmware(i32),
}

/// How the boot services recognise a host and what it boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootIdentity {
    pub mac: MacAddr,
    pub ipv4: Option<Ipv4Addr>,
    pub arch: Arch,
    pub firmware: Firmware,
}

/// The lease holding a host, as the server wants it served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSpec {
    pub id: LeaseId,
    /// The profile to boot; `None`: the agent's `default_profile`.
    pub profile: Option<ProfileName>,
    /// Who holds it (`None` from a server that does not say).
    pub holder: Option<Principal>,
    /// The holder's OpenSSH public key for root, for profiles that install
    /// an OS (into root's `authorized_keys`); `None`: no key.
    pub ssh_public_key: Option<SshPublicKey>,
}

/// A host's BMC (the password travels only this way, never into logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcSpec {
    /// An IP address or a DNS name (resolved on the host's own task).
    pub address: String,
    pub port: u16,
    pub user: String,
    pub password: Secret,
}

/// Where a host's console is captured from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleSpec {
    /// Not captured.
    #[default]
    None,
    /// Serial-over-LAN through the host's BMC.
    IpmiSol,
    /// A serial device on the agent's machine.
    Serial { device: PathBuf, baud: u32 },
    /// A TCP stream (`host:port`: a terminal server, QEMU's `-serial tcp:`).
    Tcp { target: String },
}

/// What lab-server wants of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub name: HostName,
    pub boot: Result<BootIdentity, SpecError>,
    /// The active lease; `None`: available, or being reclaimed.
    pub lease: Option<LeaseSpec>,
    pub bmc: Option<BmcSpec>,
    pub console: ConsoleSpec,
}

impl HostSpec {
    /// Whether its firmware is UEFI (the EFI flag of the boot device).
    pub fn efi(&self) -> bool {
        self.boot
            .as_ref()
            .is_ok_and(|b| b.firmware == Firmware::Uefi)
    }

    /// The host's own address on the boot network (the inventory's IPv4),
    /// the only address a forward to the host dials.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.boot.as_ref().ok().and_then(|b| b.ipv4)
    }

    /// The profile in force: the lease's, else `default_profile`.
    pub fn profile<'a>(&'a self, default_profile: &'a str) -> &'a str {
        self.lease
            .as_ref()
            .and_then(|l| l.profile.as_ref())
            .map_or(default_profile, ProfileName::as_str)
    }

    /// The host as the boot services need it.
    pub fn boot_host(&self, default_profile: &str) -> Result<BootHost, SpecError> {
        let id = self.boot.clone()?;
        Ok(BootHost {
            name: self.name.to_string(),
            mac: id.mac,
            ipv4: id.ipv4,
            arch: id.arch,
            firmware: id.firmware,
            profile: self.profile(default_profile).to_owned(),
            lease: self.lease.as_ref().map(|l| l.id.to_string()),
            holder: self
                .lease
                .as_ref()
                .and_then(|l| l.holder.as_ref())
                .map(ToString::to_string),
            ssh_key: self
                .lease
                .as_ref()
                .and_then(|l| l.ssh_public_key.as_ref())
                .map(|k| k.as_str().to_owned()),
        })
    }
}
