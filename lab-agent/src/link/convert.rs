//! Protobuf ↔ domain, at the edge: the server's `AgentHost` becomes a
//! [`HostSpec`], a [`Report`] a `HostReport`, a command's power action an
//! IPMI [`PowerAction`] and a [`CommandError`]'s kind a `CommandErrorKind`.
//! Nothing past this file sees a protobuf type.

use crate::hosts::{Arch, Firmware, MacAddr};
use crate::ipmi::PowerAction;
use crate::rack::{
    BmcSpec, BootIdentity, CommandError, ConsoleSpec, ErrorKind, HostSpec, LeaseSpec, Phase,
    Report, ReportSink, SpecError,
};
use lab_proto::v1 as pb;
use lab_types::{
    HostName, InvalidName, InvalidSshKey, LeaseId, Principal, ProfileName, Secret, SshPublicKey,
};
use std::path::PathBuf;
use std::str::FromStr;
use tokio::sync::mpsc;

/// The BMC port when the server names none (IPMI over LAN, RMCP+).
const DEFAULT_BMC_PORT: u16 = 623;
/// The serial speed when the server names none.
const DEFAULT_BAUD: u32 = 115_200;

/// Why an `AgentHost` was not taken (the server validates every field, so
/// this is a server bug; the host is left out and the rest applied).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("bad host name")]
    Name(#[source] InvalidName),
    #[error("host {host}: bad lease id {value:?}")]
    Lease {
        host: String,
        value: String,
        #[source]
        source: <LeaseId as FromStr>::Err,
    },
    #[error("host {host}: bad profile")]
    Profile {
        host: String,
        #[source]
        source: InvalidName,
    },
    #[error("host {host}: BMC port {port} out of range")]
    BmcPort { host: String, port: u32 },
    #[error("host {host}: bad lease holder")]
    Holder {
        host: String,
        #[source]
        source: InvalidName,
    },
    #[error("host {host}: bad SSH public key")]
    SshKey {
        host: String,
        #[source]
        source: InvalidSshKey,
    },
}

/// The host's boot identity, checked in the order the boot table always
/// named the first problem: MAC, IPv4, arch, firmware.
fn boot_identity(h: &pb::AgentHost) -> Result<BootIdentity, SpecError> {
    let mac: MacAddr = h.mac.parse().map_err(|_| SpecError::Mac(h.mac.clone()))?;
    let ipv4 = if h.ipv4.is_empty() {
        None
    } else {
        Some(
            h.ipv4
                .parse()
                .map_err(|_| SpecError::Ipv4(h.ipv4.clone()))?,
        )
    };
    let arch = match pb::Arch::try_from(h.arch) {
        Ok(pb::Arch::X8664) => Arch::X86_64,
        Ok(pb::Arch::Aarch64) => Arch::Aarch64,
        _ => return Err(SpecError::Arch(h.arch)),
    };
    let firmware = match pb::Firmware::try_from(h.firmware) {
        Ok(pb::Firmware::Bios) => Firmware::Bios,
        Ok(pb::Firmware::Uefi) => Firmware::Uefi,
        _ => return Err(SpecError::Firmware(h.firmware)),
    };
    Ok(BootIdentity {
        mac,
        ipv4,
        arch,
        firmware,
    })
}

/// One host's desired state.
pub fn host_spec(h: pb::AgentHost) -> Result<HostSpec, HostError> {
    let boot = boot_identity(&h);
    let name = HostName::new(h.name).map_err(HostError::Name)?;
    let lease = if h.lease_id.is_empty() {
        None
    } else {
        let id = h.lease_id.parse().map_err(|source| HostError::Lease {
            host: name.to_string(),
            value: h.lease_id.clone(),
            source,
        })?;
        let profile = if h.profile.is_empty() {
            None
        } else {
            Some(
                ProfileName::new(h.profile).map_err(|source| HostError::Profile {
                    host: name.to_string(),
                    source,
                })?,
            )
        };
        let holder = if h.holder.is_empty() {
            None
        } else {
            Some(
                Principal::named_by_lab(h.holder).map_err(|source| HostError::Holder {
                    host: name.to_string(),
                    source,
                })?,
            )
        };
        let ssh_public_key = if h.ssh_public_key.is_empty() {
            None
        } else {
            Some(
                SshPublicKey::parse(&h.ssh_public_key).map_err(|source| HostError::SshKey {
                    host: name.to_string(),
                    source,
                })?,
            )
        };
        Some(LeaseSpec {
            id,
            profile,
            holder,
            ssh_public_key,
        })
    };
    let bmc = match h.bmc {
        None => None,
        Some(b) => Some(BmcSpec {
            address: b.address,
            port: match b.port {
                0 => DEFAULT_BMC_PORT,
                p => u16::try_from(p).map_err(|_| HostError::BmcPort {
                    host: name.to_string(),
                    port: p,
                })?,
            },
            user: b.user,
            password: Secret::new(b.password),
        }),
    };
    let console = h.console.unwrap_or_default();
    let console = match pb::ConsoleKind::try_from(console.kind).unwrap_or(pb::ConsoleKind::None) {
        pb::ConsoleKind::Tcp => ConsoleSpec::Tcp {
            target: console.target,
        },
        pb::ConsoleKind::IpmiSol => ConsoleSpec::IpmiSol,
        pb::ConsoleKind::Serial => ConsoleSpec::Serial {
            device: PathBuf::from(console.target),
            baud: if console.baud == 0 {
                DEFAULT_BAUD
            } else {
                console.baud
            },
        },
        pb::ConsoleKind::None | pb::ConsoleKind::Unspecified => ConsoleSpec::None,
    };
    Ok(HostSpec {
        name,
        boot,
        lease,
        bmc,
        console,
    })
}

/// Every host of a rack state; hosts that do not convert are left out
/// (logged).
pub fn rack_hosts(state: pb::RackState) -> Vec<HostSpec> {
    state
        .hosts
        .into_iter()
        .filter_map(|h| {
            host_spec(h)
                .map_err(|e| {
                    tracing::warn!(error = %crate::error_chain(&e), "desired host ignored");
                })
                .ok()
        })
        .collect()
}

pub fn phase(p: Phase) -> pb::ProvisionPhase {
    match p {
        Phase::Pending => pb::ProvisionPhase::Pending,
        Phase::Booting => pb::ProvisionPhase::Booting,
        Phase::Installing => pb::ProvisionPhase::Installing,
        Phase::Ready => pb::ProvisionPhase::Ready,
        Phase::Failed => pb::ProvisionPhase::Failed,
    }
}

pub fn report(r: &Report) -> pb::HostReport {
    let mut out = pb::HostReport {
        host: r.host.to_string(),
        reachable: r.unreachable.is_none(),
        unreachable_reason: r.unreachable.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(p) = &r.provisioning {
        out.lease_id = p.lease.to_string();
        out.phase = phase(p.phase) as i32;
        out.stage.clone_from(&p.stage);
        out.console_tail.clone_from(&p.console_tail);
        out.percent = p.percent;
        out.ready_line.clone_from(&p.ready_line);
    }
    out
}

/// Reports onto the link (never waits: a full link drops the report, and
/// every report goes out again after the next attach).
pub fn report_sink(tx: mpsc::Sender<pb::AgentMessage>) -> ReportSink {
    Box::new(move |r| {
        tx.try_send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Report(report(r))),
        })
        .is_ok()
    })
}

/// A power command's action; `None`: only read the state (also for an
/// unknown value).
pub fn power_action(a: i32) -> Option<PowerAction> {
    match pb::PowerAction::try_from(a).unwrap_or(pb::PowerAction::Status) {
        pb::PowerAction::Status | pb::PowerAction::Unspecified => None,
        pb::PowerAction::On => Some(PowerAction::On),
        pb::PowerAction::Off => Some(PowerAction::Off),
        pb::PowerAction::Cycle => Some(PowerAction::Cycle),
        pb::PowerAction::Reset => Some(PowerAction::HardReset),
    }
}

/// A reclaim command's lease and profile.
pub fn reclaim(r: pb::Reclaim) -> Result<(LeaseId, Option<ProfileName>), CommandError> {
    let bad = |m: String| CommandError::new(ErrorKind::InvalidArgument, m);
    let lease = r
        .lease_id
        .parse()
        .map_err(|_| bad(format!("bad lease id {:?}", r.lease_id)))?;
    let profile = if r.profile.is_empty() {
        None
    } else {
        Some(ProfileName::new(r.profile).map_err(|e| bad(e.to_string()))?)
    };
    Ok((lease, profile))
}

pub fn error_kind(k: ErrorKind) -> pb::CommandErrorKind {
    match k {
        ErrorKind::InvalidArgument => pb::CommandErrorKind::InvalidArgument,
        ErrorKind::NotFound => pb::CommandErrorKind::NotFound,
        ErrorKind::FailedPrecondition => pb::CommandErrorKind::FailedPrecondition,
        ErrorKind::Unimplemented => pb::CommandErrorKind::Unimplemented,
        ErrorKind::Unavailable => pb::CommandErrorKind::Unavailable,
        ErrorKind::Internal => pb::CommandErrorKind::Internal,
        ErrorKind::ResourceExhausted => pb::CommandErrorKind::ResourceExhausted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";

    fn agent_host() -> pb::AgentHost {
        pb::AgentHost {
            name: "h0".into(),
            arch: pb::Arch::X8664 as i32,
            firmware: pb::Firmware::Uefi as i32,
            mac: "52:54:00:00:00:01".into(),
            ipv4: "10.0.0.5".into(),
            lease_id: "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".into(),
            profile: "xen".into(),
            holder: "alice".into(),
            ssh_public_key: KEY.into(),
            bmc: Some(pb::Bmc {
                address: "bmc-h0".into(),
                port: 0,
                user: "admin".into(),
                password: b"pw\xff".to_vec(),
            }),
            console: Some(pb::ConsoleSpec {
                kind: pb::ConsoleKind::Serial as i32,
                target: "/dev/ttyS1".into(),
                baud: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_host_becomes_a_host_spec() {
        let s = host_spec(agent_host()).unwrap();
        assert_eq!(s.name.as_str(), "h0");
        let b = s.boot.clone().unwrap();
        assert_eq!(b.mac.to_string(), "52:54:00:00:00:01");
        assert_eq!((b.arch, b.firmware), (Arch::X86_64, Firmware::Uefi));
        assert!(s.efi());
        assert_eq!(s.profile("local-disk"), "xen");
        let bmc = s.bmc.clone().unwrap();
        assert_eq!((bmc.port, bmc.password.expose()), (623, &b"pw\xff"[..]));
        assert_eq!(
            s.console,
            ConsoleSpec::Serial {
                device: "/dev/ttyS1".into(),
                baud: 115_200
            }
        );
        let boot = s.boot_host("local-disk").unwrap();
        assert_eq!(
            boot.lease.as_deref(),
            Some("7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b")
        );
        assert_eq!(boot.profile, "xen");
        // The holder and its key, for an installing profile's metadata.
        let lease = s.lease.clone().unwrap();
        assert_eq!(lease.holder.unwrap().as_str(), "alice");
        assert_eq!(lease.ssh_public_key.unwrap().as_str(), KEY);
        assert_eq!(s.ipv4(), Some("10.0.0.5".parse().unwrap()));
        // A lease without them (an older server).
        let mut h = agent_host();
        h.holder.clear();
        h.ssh_public_key.clear();
        let lease = host_spec(h).unwrap().lease.unwrap();
        assert_eq!((lease.holder, lease.ssh_public_key), (None, None));
        // The server's health checks hold their leases as `lab-health`, a
        // name no token may have: the agent takes it from the server.
        let mut h = agent_host();
        h.holder = "lab-health".into();
        let lease = host_spec(h).unwrap().lease.unwrap();
        assert_eq!(lease.holder.unwrap().as_str(), "lab-health");
    }

    #[test]
    fn a_host_without_identity_is_driven_but_not_served() {
        // What the server sends for a retired host it no longer describes.
        let h = pb::AgentHost {
            name: "gone".into(),
            retired: true,
            ..Default::default()
        };
        let s = host_spec(h).unwrap();
        assert_eq!(s.boot, Err(SpecError::Mac(String::new())));
        assert!(!s.efi());
        assert_eq!(s.console, ConsoleSpec::None);
        assert_eq!(s.boot_host("d").unwrap_err().to_string(), "bad mac \"\"");
        // The first problem is named, in the boot table's order.
        let mut h = agent_host();
        h.ipv4 = "10.0.0".into();
        h.arch = 0;
        let e = host_spec(h).unwrap().boot.unwrap_err();
        assert_eq!(e.to_string(), "bad ipv4 \"10.0.0\"");
        let mut h = agent_host();
        h.firmware = 9;
        let e = host_spec(h).unwrap().boot.unwrap_err();
        assert_eq!(e.to_string(), "bad firmware 9");
    }

    #[test]
    fn invalid_fields_leave_the_host_out() {
        let mut h = agent_host();
        h.name = "a b".into();
        assert!(matches!(host_spec(h), Err(HostError::Name(_))));
        let mut h = agent_host();
        h.lease_id = "not-a-lease".into();
        assert!(matches!(host_spec(h), Err(HostError::Lease { .. })));
        let mut h = agent_host();
        h.bmc.as_mut().unwrap().port = 70_000;
        let e = host_spec(h).unwrap_err();
        assert_eq!(e.to_string(), "host h0: BMC port 70000 out of range");
        let mut h = agent_host();
        h.ssh_public_key = format!("command=\"sh\" {KEY}");
        assert!(matches!(host_spec(h), Err(HostError::SshKey { .. })));
        let mut h = agent_host();
        h.holder = "a b".into();
        assert!(matches!(host_spec(h), Err(HostError::Holder { .. })));
        let state = pb::RackState {
            rack: "r1".into(),
            hosts: vec![agent_host(), pb::AgentHost::default()],
        };
        assert_eq!(rack_hosts(state).len(), 1);
    }

    #[test]
    fn reports_and_actions_convert() {
        let lease: LeaseId = "7f1c4a8e-3b1d-4c2e-9a55-0d6b1f2e3a4b".parse().unwrap();
        let r = Report {
            host: HostName::new("h0").unwrap(),
            unreachable: Some("BMC silent".into()),
            provisioning: Some(crate::rack::Provisioning {
                lease,
                phase: Phase::Failed,
                stage: "no text".into(),
                console_tail: "panic".into(),
                percent: 0,
                ready_line: String::new(),
            }),
        };
        let p = report(&r);
        assert_eq!(
            (p.reachable, p.unreachable_reason.as_str(), p.phase()),
            (false, "BMC silent", pb::ProvisionPhase::Failed)
        );
        assert_eq!(
            (p.stage.as_str(), p.console_tail.as_str()),
            ("no text", "panic")
        );
        assert_eq!(p.lease_id, lease.to_string());
        let installing = report(&Report {
            provisioning: Some(crate::rack::Provisioning {
                lease,
                phase: Phase::Installing,
                stage: "writing the image".into(),
                console_tail: String::new(),
                percent: 42,
                ready_line: String::new(),
            }),
            ..r.clone()
        });
        assert_eq!(
            (installing.phase(), installing.percent),
            (pb::ProvisionPhase::Installing, 42)
        );
        let facts = "LAB-HEALTH-OK arch=x86_64 cpus=1 mem_kb=503000";
        let ready = report(&Report {
            provisioning: Some(crate::rack::Provisioning {
                lease,
                phase: Phase::Ready,
                stage: "\"LAB-HEALTH-OK\" on the console".into(),
                console_tail: String::new(),
                percent: 0,
                ready_line: facts.into(),
            }),
            ..r.clone()
        });
        assert_eq!(
            (ready.phase(), ready.ready_line.as_str()),
            (pb::ProvisionPhase::Ready, facts)
        );
        let cleared = report(&Report {
            unreachable: None,
            provisioning: None,
            ..r
        });
        assert!(cleared.reachable && cleared.lease_id.is_empty());
        assert_eq!(cleared.phase(), pb::ProvisionPhase::Unspecified);
        assert_eq!(power_action(pb::PowerAction::Unspecified as i32), None);
        assert_eq!(power_action(99), None);
        assert_eq!(
            power_action(pb::PowerAction::Reset as i32),
            Some(PowerAction::HardReset)
        );
    }
}
