//! Who may do what: every permission rule of the server, in one place.
//!
//! | Who | May |
//! |-----|-----|
//! | anyone but an agent | every user call (hosts, leases, events, who-am-i) |
//! | a lease's holder, an operator | renew or release the lease, read its console log |
//! | the holder of a host's active lease, an operator | switch the host's power, open its console, forward to its TCP ports |
//! | any user | read a host's power state |
//! | an operator | maintenance (and maintenance windows), inventory reloads |
//! | any user | book hosts ahead (within the booking limits) |
//! | a booking's holder, an operator | cancel the booking |
//! | `ci`, `developer`: up to the maximum user priority; an operator: any | a lease request's priority |
//! | an agent | attach, for the rack whose `agent` it is (in the development mode, `--dev-insecure-no-auth`: anyone, for any rack) |
//!
//! The core applies the lease and operator rules, the rack registry
//! (`crate::racks`) the host and attach rules, the gRPC layer the first
//! one. Each rule is a plain function of the caller and what it acts on; a
//! refusal is a [`Denied`] naming the principal and the action.

use super::HostView;
use crate::lease::{HostState, Lease};
use crate::types::{Caller, HostName, LeaseId, Principal, RackName, Role};

/// A refusal: who may not do what, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// Agents only attach; they make no user calls.
    #[error("{principal} is an agent: agents may only attach")]
    AgentsOnlyAttach { principal: Principal },
    /// Renewing or releasing someone else's lease.
    #[error("{principal} may not {action} lease {lease} held by {holder}")]
    NotLeaseHolder {
        principal: Principal,
        action: &'static str,
        lease: LeaseId,
        holder: Principal,
    },
    /// Maintenance and inventory reloads.
    #[error("{principal} may not {action} (operators only)")]
    OperatorsOnly {
        principal: Principal,
        action: &'static str,
    },
    /// Driving (power, console) a host without holding its active lease.
    #[error("{principal} may not {action} host {host}: it does not hold the host's active lease")]
    NotHolder {
        principal: Principal,
        host: HostName,
        action: &'static str,
    },
    /// Cancelling someone else's booking.
    #[error("{principal} may not cancel booking {booking} made by {holder}")]
    NotBookingHolder {
        principal: Principal,
        booking: u64,
        holder: Principal,
    },
    /// Reading the console log of someone else's lease.
    #[error("{principal} may not read the console log of lease {lease} (held by {holder})")]
    NotLogReader {
        principal: Principal,
        lease: LeaseId,
        holder: Principal,
    },
    /// Attaching without being an agent (or an operator).
    #[error("{principal} ({role}) is not an agent")]
    NotAnAgent { principal: Principal, role: Role },
    /// A lease request above the priority the caller's role may use.
    #[error(
        "{principal} ({role}) may not ask for priority {priority}: at most {max} for roles ci and developer"
    )]
    PriorityAboveLimit {
        principal: Principal,
        role: Role,
        priority: i32,
        max: i32,
    },
    /// A priority above the caller's project's (or role's) limit in the
    /// policy file.
    #[error(
        "{principal} may not ask for priority {priority}: at most {max} in project {project} (policy)"
    )]
    PriorityAboveProjectLimit {
        principal: Principal,
        project: String,
        priority: i32,
        max: i32,
    },
    /// Attaching for a rack whose agent is someone else.
    #[error("{principal} may not attach for rack {rack} (its agent is {agent})")]
    NotTheRacksAgent {
        principal: Principal,
        rack: RackName,
        agent: String,
    },
}

/// User calls: anyone but an agent.
pub fn may_call(caller: &Caller) -> Result<(), Denied> {
    if caller.role == Role::Agent {
        return Err(Denied::AgentsOnlyAttach {
            principal: caller.principal.clone(),
        });
    }
    Ok(())
}

/// Renewing or releasing `lease`: its holder, or an operator.
pub fn may_manage_lease(
    caller: &Caller,
    lease: &Lease,
    action: &'static str,
) -> Result<(), Denied> {
    if caller.principal == lease.holder || caller.role.is_operator() {
        return Ok(());
    }
    Err(Denied::NotLeaseHolder {
        principal: caller.principal.clone(),
        action,
        lease: lease.id,
        holder: lease.holder.clone(),
    })
}

/// Operators only (maintenance, inventory reloads).
pub fn operators_only(caller: &Caller, action: &'static str) -> Result<(), Denied> {
    if caller.role.is_operator() {
        return Ok(());
    }
    Err(Denied::OperatorsOnly {
        principal: caller.principal.clone(),
        action,
    })
}

/// Cancelling a booking: its holder, or an operator.
pub fn may_cancel_booking(
    caller: &Caller,
    booking: &crate::lease::booking::Booking,
) -> Result<(), Denied> {
    if caller.role.is_operator() || caller.principal == booking.holder {
        return Ok(());
    }
    Err(Denied::NotBookingHolder {
        principal: caller.principal.clone(),
        booking: booking.id,
        holder: booking.holder.clone(),
    })
}

/// A lease request's priority: at most `max` for `ci` and `developer`,
/// anything for an operator. (Lower priorities only hurt the asker.)
pub fn may_use_priority(caller: &Caller, priority: i32, max: i32) -> Result<(), Denied> {
    if caller.role.is_operator() || priority <= max {
        return Ok(());
    }
    Err(Denied::PriorityAboveLimit {
        principal: caller.principal.clone(),
        role: caller.role,
        priority,
        max,
    })
}

/// Driving a host (switching its power, opening its console): the holder
/// of its active lease, or an operator.
pub fn may_drive_host(
    caller: &Caller,
    host: &HostView,
    action: &'static str,
) -> Result<(), Denied> {
    if caller.role.is_operator() {
        return Ok(());
    }
    let holds = matches!(host.record.state, HostState::Leased(_))
        && host
            .lease
            .as_ref()
            .is_some_and(|l| l.is_active() && l.holder == caller.principal);
    if holds {
        return Ok(());
    }
    Err(Denied::NotHolder {
        principal: caller.principal.clone(),
        host: host.record.name.clone(),
        action,
    })
}

/// Forwarding to a host's TCP ports: the holder of its active lease, or an
/// operator (the rule of [`may_drive_host`]: a port of a leased host is
/// the lease's, like its console).
pub fn may_forward(caller: &Caller, host: &HostView) -> Result<(), Denied> {
    may_drive_host(caller, host, "forward to")
}

/// Reading the console captured during `lease`: its holder, or an operator.
pub fn may_read_console_log(caller: &Caller, lease: &Lease) -> Result<(), Denied> {
    if caller.role.is_operator() || caller.principal == lease.holder {
        return Ok(());
    }
    Err(Denied::NotLogReader {
        principal: caller.principal.clone(),
        lease: lease.id,
        holder: lease.holder.clone(),
    })
}

/// How callers are authenticated: what the agent rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Tokens from the tokens file, each with its role.
    Tokens,
    /// The development mode (`--dev-insecure-no-auth`): no authentication,
    /// every caller an operator; anyone may attach as any rack's agent.
    InsecureDev,
}

/// Opening an agent link at all (before the hello names a rack): agents
/// (anyone in the development mode). An operator's token is no agent's: it
/// would receive the rack's BMC passwords and replace the real agent.
pub fn may_link(caller: &Caller, mode: AuthMode) -> Result<(), Denied> {
    if caller.role == Role::Agent || mode == AuthMode::InsecureDev {
        return Ok(());
    }
    Err(Denied::NotAnAgent {
        principal: caller.principal.clone(),
        role: caller.role,
    })
}

/// Attaching for `rack`, whose agent is `agent`: that agent (anyone, for
/// any rack, in the development mode).
pub fn may_attach(
    caller: &Caller,
    rack: &RackName,
    agent: &str,
    mode: AuthMode,
) -> Result<(), Denied> {
    if mode == AuthMode::InsecureDev
        || (caller.role == Role::Agent && caller.principal.as_str() == agent)
    {
        return Ok(());
    }
    Err(Denied::NotTheRacksAgent {
        principal: caller.principal.clone(),
        rack: rack.clone(),
        agent: agent.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{HostRecord, LeaseState};
    use crate::types::{Generation, Timestamp};

    fn caller(name: &str, role: Role) -> Caller {
        Caller {
            principal: Principal::new(name).unwrap(),
            role,
        }
    }

    fn lease(holder: &str, state: LeaseState) -> Lease {
        Lease {
            id: LeaseId::random(),
            holder: Principal::new(holder).unwrap(),
            hosts: vec![HostName::new("h1").unwrap()],
            state,
            profile: None,
            priority: 0,
            comment: String::new(),
            ttl_ms: 60_000,
            granted_at: Timestamp(0),
            expires_at: Timestamp(60_000),
            max_expires_at: Timestamp(600_000),
            ended_at: None,
            waiter_id: 1,
            request_id: None,
            generation: Generation(1),
            ssh_public_key: None,
            preemptible: false,
            preempted_at: None,
            booking: None,
        }
    }

    fn host(lease: Option<Lease>, leased: bool) -> HostView {
        let mut record = HostRecord::new(HostName::new("h1").unwrap());
        if leased {
            record.state = HostState::Leased(lease.as_ref().unwrap().id);
        }
        HostView {
            spec: None,
            record,
            lease,
            unreachable: None,
        }
    }

    #[test]
    fn each_rule_allows_and_refuses_whom_it_should() {
        use LeaseState::{Active, Released};
        use Role::{Agent, Ci, Developer, Operator};
        // (rule, caller, allowed)
        type Rule = Box<dyn Fn(&Caller) -> Result<(), Denied>>;
        let held = || host(Some(lease("alice", Active)), true);
        let rules: Vec<(&str, Rule)> = vec![
            ("call", Box::new(may_call)),
            (
                "manage",
                Box::new(|c| may_manage_lease(c, &lease("alice", Active), "renew")),
            ),
            (
                "operate",
                Box::new(|c| operators_only(c, "reload the inventory")),
            ),
            (
                "drive",
                Box::new(move |c| may_drive_host(c, &held(), "open the console of")),
            ),
            ("forward", Box::new(move |c| may_forward(c, &held()))),
            (
                "forward free",
                Box::new(|c| may_forward(c, &host(None, false))),
            ),
            (
                "drive ended",
                Box::new(|c| may_drive_host(c, &host(Some(lease("alice", Released)), true), "x")),
            ),
            (
                "drive free",
                Box::new(|c| may_drive_host(c, &host(None, false), "x")),
            ),
            (
                "log",
                Box::new(|c| may_read_console_log(c, &lease("alice", Released))),
            ),
            ("link", Box::new(|c| may_link(c, AuthMode::Tokens))),
            ("priority", Box::new(|c| may_use_priority(c, i32::MAX, 10))),
            (
                "attach",
                Box::new(|c| {
                    may_attach(
                        c,
                        &RackName::new("r1").unwrap(),
                        "agent-r1",
                        AuthMode::Tokens,
                    )
                }),
            ),
            ("dev link", Box::new(|c| may_link(c, AuthMode::InsecureDev))),
            (
                "dev attach",
                Box::new(|c| {
                    may_attach(
                        c,
                        &RackName::new("r1").unwrap(),
                        "agent-r1",
                        AuthMode::InsecureDev,
                    )
                }),
            ),
        ];
        let callers = [
            ("alice", Ci),
            ("bob", Developer),
            ("root", Operator),
            ("agent-r1", Agent),
            ("agent-r2", Agent),
            // An operator's token: no agent, outside the development mode.
            ("agent-r1", Operator),
        ];
        #[rustfmt::skip]
        let want: [(&str, [bool; 6]); 14] = [
            //              alice  bob    root   agent1 agent2 op-named-agent1
            ("call",        [true,  true,  true,  false, false, true]),
            ("manage",      [true,  false, true,  false, false, true]),
            ("operate",     [false, false, true,  false, false, true]),
            ("drive",       [true,  false, true,  false, false, true]),
            ("forward",     [true,  false, true,  false, false, true]),
            ("forward free",[false, false, true,  false, false, true]),
            ("drive ended", [false, false, true,  false, false, true]),
            ("drive free",  [false, false, true,  false, false, true]),
            ("log",         [true,  false, true,  false, false, true]),
            ("link",        [false, false, false, true,  true,  false]),
            ("priority",    [false, false, true,  false, false, true]),
            ("attach",      [false, false, false, true,  false, false]),
            ("dev link",    [true,  true,  true,  true,  true,  true]),
            ("dev attach",  [true,  true,  true,  true,  true,  true]),
        ];
        for ((name, rule), (want_name, allowed)) in rules.iter().zip(want) {
            assert_eq!(*name, want_name);
            for ((who, role), allowed) in callers.iter().zip(allowed) {
                let got = rule(&caller(who, *role));
                assert_eq!(got.is_ok(), allowed, "{name} by {who}: {got:?}");
                if let Err(e) = got {
                    assert!(e.to_string().starts_with(who), "{name}: {e}");
                }
            }
        }
    }

    #[test]
    fn user_priorities_are_capped_operators_are_not() {
        let ci = caller("ci", Role::Ci);
        let root = caller("root", Role::Operator);
        for (priority, allowed) in [(i32::MIN, true), (-5, true), (10, true), (11, false)] {
            assert_eq!(
                may_use_priority(&ci, priority, 10).is_ok(),
                allowed,
                "{priority}"
            );
        }
        assert!(may_use_priority(&root, i32::MAX, 10).is_ok());
    }

    #[test]
    fn refusals_name_the_principal_and_the_action() {
        let l = lease("alice", LeaseState::Active);
        let bob = caller("bob", Role::Developer);
        let cases: Vec<(Denied, String)> =
            vec![
            (
                may_call(&caller("agent-r1", Role::Agent)).unwrap_err(),
                "agent-r1 is an agent: agents may only attach".into(),
            ),
            (
                may_manage_lease(&bob, &l, "release").unwrap_err(),
                format!("bob may not release lease {} held by alice", l.id),
            ),
            (
                operators_only(&bob, "change maintenance").unwrap_err(),
                "bob may not change maintenance (operators only)".into(),
            ),
            (
                may_drive_host(&bob, &host(Some(l.clone()), true), "switch the power of")
                    .unwrap_err(),
                "bob may not switch the power of host h1: it does not hold the host's active lease"
                    .into(),
            ),
            (
                may_forward(&bob, &host(Some(l.clone()), true)).unwrap_err(),
                "bob may not forward to host h1: it does not hold the host's active lease".into(),
            ),
            (
                may_read_console_log(&bob, &l).unwrap_err(),
                format!("bob may not read the console log of lease {} (held by alice)", l.id),
            ),
            (
                may_use_priority(&bob, 2_147_483_647, 10).unwrap_err(),
                "bob (developer) may not ask for priority 2147483647: at most 10 for roles ci and developer"
                    .into(),
            ),
            (
                may_link(&bob, AuthMode::Tokens).unwrap_err(),
                "bob (developer) is not an agent".into(),
            ),
            (
                may_link(&caller("root", Role::Operator), AuthMode::Tokens).unwrap_err(),
                "root (operator) is not an agent".into(),
            ),
            (
                may_attach(
                    &caller("agent-r2", Role::Agent),
                    &RackName::new("r1").unwrap(),
                    "agent-r1",
                    AuthMode::Tokens,
                )
                .unwrap_err(),
                "agent-r2 may not attach for rack r1 (its agent is agent-r1)".into(),
            ),
        ];
        for (denied, want) in cases {
            assert_eq!(denied.to_string(), want);
        }
    }
}
