//! `AgentService.Attach` at the edge: the agent's stream converted into
//! the rack registry's typed messages and what the registry sends converted
//! back (`lab.v1` ↔ `crate::racks`). No decisions here: the registry checks
//! the hello, the caller and every message.

use super::Api;
use super::convert::arch_to_proto;
use crate::core::policy::AuthMode;
use crate::inventory::ConsoleSource;
use crate::racks::{
    AgentFailure, Command, CommandId, CommandKind, CommandReply, DesiredHost, Done, FailureKind,
    FromAgent, Hello, HostReachability, HostReport, LinkError, PowerAction, ProvisionPhase,
    ProvisionReport, RackState, SessionData, ToAgent,
};
use crate::types::{Firmware, HostName, RackName};
use futures::{Stream, StreamExt};
use lab_proto::convert::timestamp_from_millis;
use lab_proto::v1 as pb;
use lab_proto::v1::agent_service_server::AgentService;
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Api {
    type AttachStream = AttachStream;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let caller = self.any_caller(&req)?;
        let mode = if self.auth_is_insecure_dev() {
            AuthMode::InsecureDev
        } else {
            AuthMode::Tokens
        };
        let inbound = req.into_inner().map(|m| match m {
            Ok(m) => from_agent(m),
            Err(status) => Err(LinkError::Broken(Box::new(status))),
        });
        let rx = self.racks.attach(caller, mode, Box::pin(inbound)).await?;
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|m| m.map(to_agent).map_err(Status::from));
        Ok(Response::new(Box::pin(outbound)))
    }
}

// ------------------------------------------------------------ up

/// One message from an agent.
pub(crate) fn from_agent(m: pb::AgentMessage) -> Result<FromAgent, LinkError> {
    use pb::agent_message::Msg;
    Ok(match m.msg.ok_or(LinkError::Empty)? {
        Msg::Hello(h) => FromAgent::Hello(Hello {
            rack: RackName::new(h.rack).map_err(|source| LinkError::BadHello { source })?,
            version: h.version,
        }),
        Msg::Report(r) => FromAgent::Report(HostReport {
            host: HostName::new(r.host).map_err(|source| LinkError::BadReport { source })?,
            reachability: if r.reachable {
                HostReachability::Reachable
            } else {
                HostReachability::Unreachable {
                    reason: r.unreachable_reason,
                }
            },
            // A report without a (readable) lease carries no provisioning.
            provisioning: r.lease_id.parse().ok().map(|lease| ProvisionReport {
                lease,
                phase: phase_from_proto(r.phase),
                stage: r.stage,
                console_tail: r.console_tail,
                percent: r.percent,
                ready_line: r.ready_line,
            }),
        }),
        Msg::Reply(r) => FromAgent::Reply(CommandReply {
            id: CommandId(r.id),
            outcome: if r.error.is_empty() {
                Ok(Done { on: r.on })
            } else {
                Err(AgentFailure {
                    kind: failure_kind(r.code),
                    message: r.error,
                })
            },
        }),
        Msg::Data(d) => FromAgent::Data(SessionData {
            id: CommandId(d.id),
            output: d.output,
            notice: d.notice,
            end: d.end,
            credit: d.credit,
            lease_ended: false,
        }),
    })
}

/// The kind of an agent's failed command; a kind this server does not know
/// (a newer agent) is `Internal`.
pub(crate) fn failure_kind(code: i32) -> FailureKind {
    use pb::CommandErrorKind as K;
    match K::try_from(code) {
        Ok(K::InvalidArgument) => FailureKind::InvalidArgument,
        Ok(K::NotFound) => FailureKind::NotFound,
        Ok(K::FailedPrecondition) => FailureKind::FailedPrecondition,
        Ok(K::PermissionDenied) => FailureKind::PermissionDenied,
        Ok(K::DeadlineExceeded) => FailureKind::DeadlineExceeded,
        Ok(K::Unimplemented) => FailureKind::Unimplemented,
        Ok(K::Unavailable) => FailureKind::Unavailable,
        Ok(K::ResourceExhausted) => FailureKind::ResourceExhausted,
        Ok(K::Internal | K::Unspecified) | Err(_) => FailureKind::Internal,
    }
}

pub(crate) fn phase_from_proto(v: i32) -> ProvisionPhase {
    match pb::ProvisionPhase::try_from(v) {
        Ok(pb::ProvisionPhase::Pending) => ProvisionPhase::Pending,
        Ok(pb::ProvisionPhase::Booting) => ProvisionPhase::Booting,
        Ok(pb::ProvisionPhase::Installing) => ProvisionPhase::Installing,
        Ok(pb::ProvisionPhase::Ready) => ProvisionPhase::Ready,
        Ok(pb::ProvisionPhase::Failed) => ProvisionPhase::Failed,
        Ok(pb::ProvisionPhase::Unspecified) | Err(_) => ProvisionPhase::Unknown,
    }
}

pub(crate) fn phase_to_proto(p: ProvisionPhase) -> pb::ProvisionPhase {
    match p {
        ProvisionPhase::Pending => pb::ProvisionPhase::Pending,
        ProvisionPhase::Booting => pb::ProvisionPhase::Booting,
        ProvisionPhase::Installing => pb::ProvisionPhase::Installing,
        ProvisionPhase::Ready => pb::ProvisionPhase::Ready,
        ProvisionPhase::Failed => pb::ProvisionPhase::Failed,
        ProvisionPhase::Unknown => pb::ProvisionPhase::Unspecified,
    }
}

// ------------------------------------------------------------ down

/// One message to an agent.
pub(crate) fn to_agent(m: ToAgent) -> pb::ServerMessage {
    use pb::server_message::Msg;
    let msg = match m {
        ToAgent::Rack(r) => Msg::Rack(rack_state(r)),
        ToAgent::Host(h) => Msg::Host(agent_host(h)),
        ToAgent::Command(c) => Msg::Command(command(c)),
        ToAgent::Input(i) => Msg::Input(pb::SessionInput {
            id: i.id.0,
            input: i.input,
            send_break: i.send_break,
            credit: i.credit,
            eof: i.eof,
        }),
    };
    pb::ServerMessage { msg: Some(msg) }
}

fn rack_state(r: RackState) -> pb::RackState {
    pb::RackState {
        rack: r.rack.to_string(),
        hosts: r.hosts.into_iter().map(agent_host).collect(),
    }
}

/// A host's desired state, with the BMC password (this stream only).
fn agent_host(d: DesiredHost) -> pb::AgentHost {
    let mut h = pb::AgentHost {
        name: d.name.to_string(),
        retired: d.retired,
        ..Default::default()
    };
    if let Some(l) = d.lease {
        h.lease_id = l.id.to_string();
        h.profile = l.profile.map(|p| p.to_string()).unwrap_or_default();
        h.holder = l.holder.to_string();
        h.ssh_public_key = l.ssh_public_key.map(String::from).unwrap_or_default();
    }
    let Some(hw) = d.hardware else { return h };
    h.arch = arch_to_proto(hw.arch) as i32;
    h.firmware = match hw.firmware {
        Firmware::Bios => pb::Firmware::Bios,
        Firmware::Uefi => pb::Firmware::Uefi,
    } as i32;
    h.mac = hw.mac.to_string();
    h.ipv4 = hw.ipv4.map(|a| a.to_string()).unwrap_or_default();
    h.flags = hw.flags.iter().map(|f| f.to_string()).collect();
    h.bmc = hw.bmc.map(|b| pb::Bmc {
        address: b.endpoint.host,
        port: u32::from(b.endpoint.port),
        user: b.user,
        password: b.password.expose().to_vec(),
    });
    h.console = Some(match hw.console {
        ConsoleSource::None => pb::ConsoleSpec {
            kind: pb::ConsoleKind::None as i32,
            ..Default::default()
        },
        ConsoleSource::IpmiSol => pb::ConsoleSpec {
            kind: pb::ConsoleKind::IpmiSol as i32,
            ..Default::default()
        },
        ConsoleSource::Serial { device, baud } => pb::ConsoleSpec {
            kind: pb::ConsoleKind::Serial as i32,
            target: device.display().to_string(),
            baud,
        },
        ConsoleSource::Tcp { address } => pb::ConsoleSpec {
            kind: pb::ConsoleKind::Tcp as i32,
            target: address,
            baud: 0,
        },
    });
    h
}

fn command(c: Command) -> pb::AgentCommand {
    use pb::agent_command::Cmd;
    let cmd = match c.kind {
        CommandKind::Power(a) => Cmd::Power(power_action_to_proto(a) as i32),
        CommandKind::Reclaim { lease, profile } => Cmd::Reclaim(pb::Reclaim {
            lease_id: lease.to_string(),
            profile: profile.map(|p| p.to_string()).unwrap_or_default(),
        }),
        CommandKind::Console(o) => Cmd::Console(pb::ConsoleOpen {
            host: o.host.to_string(),
            write: o.write,
            replay_bytes: o.replay_bytes,
            not_before: o.not_before.map(|t| timestamp_from_millis(t.millis())),
        }),
        CommandKind::Log(l) => Cmd::Log(pb::LogRead {
            from: Some(timestamp_from_millis(l.from.millis())),
            to: l.to.map(|t| timestamp_from_millis(t.millis())),
            window: l.window,
        }),
        CommandKind::CloseSession => Cmd::CloseSession(true),
        CommandKind::Forward(o) => Cmd::Forward(pb::ForwardOpen {
            host: o.host.to_string(),
            port: u32::from(o.port),
        }),
    };
    pb::AgentCommand {
        id: c.id.0,
        host: c.host.to_string(),
        cmd: Some(cmd),
    }
}

pub(crate) fn power_action_to_proto(a: PowerAction) -> pb::PowerAction {
    match a {
        PowerAction::Status => pb::PowerAction::Status,
        PowerAction::On => pb::PowerAction::On,
        PowerAction::Off => pb::PowerAction::Off,
        PowerAction::Cycle => pb::PowerAction::Cycle,
        PowerAction::Reset => pb::PowerAction::Reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::racks::{ActiveLease, BmcAccess, Hardware};
    use crate::types::{Arch, LeaseId, ProfileName};
    use lab_types::{MacAddr, Secret};

    fn report(host: &str, lease_id: &str, phase: i32) -> pb::AgentMessage {
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Report(pb::HostReport {
                host: host.into(),
                reachable: false,
                unreachable_reason: "bmc silent".into(),
                lease_id: lease_id.into(),
                phase,
                stage: "powered on".into(),
                console_tail: String::new(),
                percent: 0,
                ready_line: String::new(),
            })),
        }
    }

    #[test]
    fn messages_from_an_agent() {
        let hello = |rack: &str| pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::AgentHello {
                rack: rack.into(),
                version: "1".into(),
            })),
        };
        assert!(matches!(
            from_agent(pb::AgentMessage { msg: None }),
            Err(LinkError::Empty)
        ));
        assert_eq!(
            from_agent(hello("r1")).unwrap(),
            FromAgent::Hello(Hello {
                rack: RackName::new("r1").unwrap(),
                version: "1".into()
            })
        );
        let bad = from_agent(hello("r 1")).unwrap_err();
        assert!(
            lab_types::error_chain(&bad).starts_with("hello.rack: invalid rack name"),
            "{}",
            lab_types::error_chain(&bad)
        );
        assert!(matches!(
            from_agent(report("h 1", "", 0)),
            Err(LinkError::BadReport { .. })
        ));
        let lease = LeaseId::random();
        let FromAgent::Report(r) = from_agent(report(
            "h1",
            &lease.to_string(),
            pb::ProvisionPhase::Booting as i32,
        ))
        .unwrap() else {
            panic!("a report")
        };
        assert_eq!(
            r.reachability,
            HostReachability::Unreachable {
                reason: "bmc silent".into()
            }
        );
        assert_eq!(
            r.provisioning,
            Some(ProvisionReport {
                lease,
                phase: ProvisionPhase::Booting,
                stage: "powered on".into(),
                console_tail: String::new(),
                percent: 0,
                ready_line: String::new(),
            })
        );
        // No lease, or an unreadable one: no provisioning.
        for id in ["", "not-a-uuid"] {
            let Ok(FromAgent::Report(r)) = from_agent(report("h1", id, 3)) else {
                panic!("a report")
            };
            assert_eq!(r.provisioning, None, "{id:?}");
        }
    }

    #[test]
    fn reply_codes_map_exhaustively() {
        use pb::CommandErrorKind as K;
        let cases = [
            (K::Unspecified as i32, FailureKind::Internal),
            (K::InvalidArgument as i32, FailureKind::InvalidArgument),
            (K::NotFound as i32, FailureKind::NotFound),
            (
                K::FailedPrecondition as i32,
                FailureKind::FailedPrecondition,
            ),
            (K::PermissionDenied as i32, FailureKind::PermissionDenied),
            (K::DeadlineExceeded as i32, FailureKind::DeadlineExceeded),
            (K::Unimplemented as i32, FailureKind::Unimplemented),
            (K::Unavailable as i32, FailureKind::Unavailable),
            (K::Internal as i32, FailureKind::Internal),
            (K::ResourceExhausted as i32, FailureKind::ResourceExhausted),
            (99, FailureKind::Internal),
        ];
        for (code, want) in cases {
            assert_eq!(failure_kind(code), want, "{code}");
        }
        let reply = |error: &str, code| pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Reply(pb::CommandReply {
                id: 7,
                error: error.into(),
                code,
                on: true,
            })),
        };
        // Success is an empty error, whatever the code says.
        assert_eq!(
            from_agent(reply("", K::NotFound as i32)).unwrap(),
            FromAgent::Reply(CommandReply {
                id: CommandId(7),
                outcome: Ok(Done { on: true })
            })
        );
        assert_eq!(
            from_agent(reply("no such host", K::NotFound as i32)).unwrap(),
            FromAgent::Reply(CommandReply {
                id: CommandId(7),
                outcome: Err(AgentFailure {
                    kind: FailureKind::NotFound,
                    message: "no such host".into()
                })
            })
        );
    }

    #[test]
    fn phases_round_trip() {
        for p in [
            ProvisionPhase::Pending,
            ProvisionPhase::Booting,
            ProvisionPhase::Installing,
            ProvisionPhase::Ready,
            ProvisionPhase::Failed,
            ProvisionPhase::Unknown,
        ] {
            assert_eq!(phase_from_proto(phase_to_proto(p) as i32), p);
        }
        assert_eq!(phase_from_proto(42), ProvisionPhase::Unknown);
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOuh4OcpxcXZ0on7BGD4fbymSERhtuT9fCPMkdT4nrGI alice@ci";

    #[test]
    fn desired_state_carries_the_password_as_bytes() {
        let host = DesiredHost {
            name: HostName::new("h1").unwrap(),
            retired: false,
            lease: Some(ActiveLease {
                id: LeaseId::random(),
                profile: Some(ProfileName::new("xen").unwrap()),
                holder: crate::types::Principal::new("alice").unwrap(),
                ssh_public_key: Some(KEY.parse().unwrap()),
            }),
            hardware: Some(Hardware {
                arch: Arch::X86_64,
                firmware: Firmware::Uefi,
                mac: "52:54:00:00:00:01".parse::<MacAddr>().unwrap(),
                ipv4: None,
                flags: Default::default(),
                bmc: Some(BmcAccess {
                    endpoint: crate::inventory::BmcEndpoint {
                        host: "10.0.0.1".into(),
                        port: 623,
                    },
                    user: "admin".into(),
                    password: Secret::new(b"pw\xff-XYZ".to_vec()),
                }),
                console: ConsoleSource::IpmiSol,
            }),
        };
        let pb = agent_host(host.clone());
        assert_eq!(pb.profile, "xen");
        // The holder and its key go down for an installing profile.
        assert_eq!(
            (pb.holder.as_str(), pb.ssh_public_key.as_str()),
            ("alice", KEY)
        );
        assert_eq!(pb.firmware, pb::Firmware::Uefi as i32);
        let bmc = pb.bmc.clone().unwrap();
        assert_eq!(
            (bmc.address.as_str(), bmc.port, bmc.password),
            ("10.0.0.1", 623, b"pw\xff-XYZ".to_vec())
        );
        assert_eq!(pb.console.unwrap().kind, pb::ConsoleKind::IpmiSol as i32);
        // Neither form prints the password (as text or as bytes).
        for printed in [format!("{host:?}"), format!("{:?}", pb.bmc)] {
            assert!(
                !printed.contains("XYZ") && !printed.contains("112, 119"),
                "{printed}"
            );
        }
        let bare = agent_host(DesiredHost {
            hardware: None,
            lease: None,
            ..host
        });
        assert_eq!(
            (bare.lease_id.as_str(), bare.bmc, bare.console),
            ("", None, None)
        );
    }
}
