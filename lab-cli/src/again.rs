//! Running a one-shot command again on another lab-server replica (lab-server
//! on etcd, several servers in `--server`): when the leader found at start
//! is deposed or dies before the command's call reaches it.
//!
//! Whether that is safe depends on the command and on how the call failed:
//! a read may always be asked again; a change only when the call surely did
//! nothing — a standby refused it (UNAVAILABLE naming the leader, or saying
//! it stands by) or no connection was made. A call that broke mid-way may
//! have been carried out, so a change is then not sent again (exit 7, as
//! before). Commands that stream, wait or run something (acquire, console,
//! ssh, run, grab, forward, `events --follow`) are never run again here;
//! `lease acquire` follows the leader on its own, by request id.

use tonic::{Code, Status};

use crate::client::LEADER_HEADER;
use crate::exit::connect_failure;

/// When a failed command may be run again on the next replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Never (it streams, waits or runs something).
    Never,
    /// Only if the call surely did nothing (a change).
    IfNotDone,
    /// After any failure to reach the leader (a read).
    IfUnreached,
}

impl Again {
    /// Whether `err` lets the command run again.
    pub fn allows(self, err: &anyhow::Error) -> bool {
        let Some(status) = err.downcast_ref::<Status>() else {
            return false;
        };
        match self {
            Again::Never => false,
            Again::IfNotDone => not_done(status),
            Again::IfUnreached => {
                not_done(status)
                    || status.code() == Code::Unavailable
                    || (status.code() == Code::Unknown
                        && std::error::Error::source(status).is_some())
            }
        }
    }
}

/// A standby's refusal, or a connection that was never made.
fn not_done(status: &Status) -> bool {
    let standby = status.code() == Code::Unavailable
        && (status.metadata().get(LEADER_HEADER).is_some()
            || status.message().starts_with("this lab-server is a standby"));
    standby || connect_failure(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(leader: Option<&str>) -> anyhow::Error {
        let mut s = Status::unavailable(match leader {
            Some(l) => format!("this lab-server is a standby; the leader is {l}"),
            None => "this lab-server is a standby; no leader is elected yet".to_owned(),
        });
        if let Some(l) = leader {
            s.metadata_mut().insert(LEADER_HEADER, l.parse().unwrap());
        }
        s.into()
    }

    #[test]
    fn which_failures_let_which_commands_run_again() {
        let agent_away: anyhow::Error =
            Status::unavailable("the agent of rack r1 is not attached").into();
        let refused: anyhow::Error = Status::failed_precondition("lease already ended").into();
        let broken: anyhow::Error = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )))
        .into();
        let not_status = anyhow::anyhow!("bad file");
        let wrapped = standby(Some("http://b:1")).context("renewing lease x");
        // (failure, Never, IfNotDone, IfUnreached)
        let table: Vec<(&str, anyhow::Error, [bool; 3])> = vec![
            (
                "standby naming the leader",
                standby(Some("http://b:1")),
                [false, true, true],
            ),
            ("standby, no leader yet", standby(None), [false, true, true]),
            ("standby, under context", wrapped, [false, true, true]),
            (
                "UNAVAILABLE from the leader (agent away)",
                agent_away,
                [false, false, true],
            ),
            ("broken mid-call", broken, [false, false, true]),
            ("an answer", refused, [false, false, false]),
            ("not a call's failure", not_status, [false, false, false]),
        ];
        for (what, err, want) in &table {
            let got = [Again::Never, Again::IfNotDone, Again::IfUnreached].map(|a| a.allows(err));
            assert_eq!(&got, want, "{what}");
        }
    }
}
