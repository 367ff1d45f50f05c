//! The desired state the server pushes to an agent: each host of its rack
//! as the core sees it (description, active lease and its profile, BMC
//! access with the password, console; the lease's holder and SSH public
//! key, for profiles that install an OS), built from the core's
//! [`HostView`]s. The agent reconciles its rack against it.
//!
//! BMC passwords are resolved here, at the time of sending, and only ever
//! go into the stream of the agent that serves the host; [`Secret`] never
//! prints.

use crate::core::HostView;
use crate::inventory::{BmcEndpoint, ConsoleSource};
use crate::lease::HostState;
use crate::types::{
    Arch, Firmware, Flag, HostName, LeaseId, Principal, ProfileName, RackName, SshPublicKey,
};
use lab_types::{MacAddr, Secret};
use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use tracing::warn;

/// Every host of a rack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RackState {
    pub rack: RackName,
    pub hosts: Vec<DesiredHost>,
}

/// One host as its agent should drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredHost {
    pub name: HostName,
    /// Removed from the inventory: stop driving it once reclaimed.
    pub retired: bool,
    /// The active lease on the host; `None` when it is available or being
    /// reclaimed.
    pub lease: Option<ActiveLease>,
    /// `None` for a retired host the server no longer has a description of.
    pub hardware: Option<Hardware>,
}

/// The lease a host serves and the profile to boot into for it (`None`:
/// the agent's default), with who holds it and the holder's SSH key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveLease {
    pub id: LeaseId,
    pub profile: Option<ProfileName>,
    pub holder: Principal,
    pub ssh_public_key: Option<SshPublicKey>,
}

/// The host's description from the inventory, with what the agent needs to
/// drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    pub arch: Arch,
    pub firmware: Firmware,
    pub mac: MacAddr,
    pub ipv4: Option<Ipv4Addr>,
    pub flags: BTreeSet<Flag>,
    pub bmc: Option<BmcAccess>,
    pub console: ConsoleSource,
}

/// How the agent reaches a host's BMC, password included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmcAccess {
    pub endpoint: BmcEndpoint,
    pub user: String,
    /// Empty when the inventory's reference could not be read (logged).
    pub password: Secret,
}

impl DesiredHost {
    /// The desired state of the host `view` shows.
    pub fn of(view: &HostView) -> DesiredHost {
        let lease = match (&view.record.state, &view.lease) {
            (HostState::Leased(_), Some(l)) if l.is_active() => Some(ActiveLease {
                id: l.id,
                profile: l.profile.clone(),
                holder: l.holder.clone(),
                ssh_public_key: l.ssh_public_key.clone(),
            }),
            _ => None,
        };
        let hardware = view.spec.as_ref().map(|s| Hardware {
            arch: s.arch,
            firmware: s.firmware,
            mac: s.mac,
            ipv4: s.ipv4,
            flags: s.flags.clone(),
            bmc: s.bmc.as_ref().map(|b| BmcAccess {
                endpoint: b.endpoint.clone(),
                user: b.user.clone(),
                password: b.password.resolve().unwrap_or_else(|e| {
                    // The reference (variable or file name), never a value.
                    warn!(host = %s.name, error = %e, "cannot resolve the BMC password");
                    Secret::new(Vec::new())
                }),
            }),
            console: s.console.clone(),
        });
        DesiredHost {
            name: view.record.name.clone(),
            retired: view.record.retired,
            lease,
            hardware,
        }
    }
}

impl RackState {
    /// The hosts of `rack` among `views`, in the order given.
    pub fn of(rack: &RackName, views: &[HostView]) -> RackState {
        RackState {
            rack: rack.clone(),
            hosts: views
                .iter()
                .filter(|v| v.spec.as_ref().is_some_and(|s| &s.rack == rack))
                .map(DesiredHost::of)
                .collect(),
        }
    }
}
