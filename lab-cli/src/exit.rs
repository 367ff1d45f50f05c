//! Exit codes, and the one place that turns an error into `lab: <message>`
//! and a code.

use std::error::Error as _;
use std::fmt;
use std::io;
use std::process::ExitCode;

use tonic::{Code, Status};

/// The exit codes of `lab`. Keep `exit_codes_help!` and the table in
/// `main.rs` in step (a test checks the former).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    Other = 1,
    /// clap exits with this itself on a bad command line.
    #[allow(dead_code)]
    Usage = 2,
    Denied = 3,
    NotFound = 4,
    NoHostsNow = 5,
    NeverMet = 6,
    Unavailable = 7,
    ProvisionFailed = 8,
    TimedOut = 9,
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// The exit code table, as a literal so `main.rs` can `concat!` it into
/// clap's `after_long_help`.
macro_rules! exit_codes_help {
    () => {
        "\
Exit codes:
  0    success
  1    any other error
  2    usage error (bad command line)
  3    unauthenticated or permission denied
  4    not found (no such host or lease)
  5    no hosts free now (lease acquire --no-wait)
  6    the request can never be met by the inventory, or the lease is no
       longer active (FAILED_PRECONDITION)
  7    server unavailable, or cannot connect to it
  8    provisioning failed on a host of the lease (--wait-ready)
  9    the lease was not ready in time (--wait-ready)
  130  interrupted (Ctrl-C, or a signal)"
    };
}
pub(crate) use exit_codes_help;

/// The exit code table shown by `lab --help`.
#[cfg(test)]
pub const HELP: &str = exit_codes_help!();

/// Ctrl-C: exit 130, printing `message` when there is one.
#[derive(Debug)]
pub struct Interrupted(pub Option<String>);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("interrupted"))
    }
}

impl std::error::Error for Interrupted {}

/// The server closed a stream it should have kept open (the acquire stream
/// before a grant, the event stream of `--follow`).
#[derive(Debug)]
pub struct StreamEnded(pub String);

impl fmt::Display for StreamEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StreamEnded {}

/// A host of the lease reached PROVISION_PHASE_FAILED (`--wait-ready`): exit 8.
#[derive(Debug)]
pub struct ProvisionFailed(pub String);

impl fmt::Display for ProvisionFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProvisionFailed {}

/// `--wait-ready` gave up before every host was ready: exit 9.
#[derive(Debug)]
pub struct TimedOut(pub String);

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

/// The lease ended (released, expired) while we waited on it: exit 6, like
/// the server's FAILED_PRECONDITION for a lease that is no longer active.
#[derive(Debug)]
pub struct LeaseEnded(pub String);

impl fmt::Display for LeaseEnded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeaseEnded {}

/// A command `lab` ran (`lab run`'s, `lab ssh`'s ssh) ended with this
/// status: `lab` exits with it, printing nothing (128 + the signal for a
/// command killed by one).
#[derive(Debug)]
pub struct ChildExit(pub u8);

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the command exited with status {}", self.0)
    }
}

impl std::error::Error for ChildExit {}

/// What the top level needs to explain an error.
pub struct Context<'a> {
    pub server: &'a str,
    pub have_token: bool,
}

/// The exit code and the message (without the `lab: ` prefix; `None` to
/// print nothing) for an error.
pub fn classify(err: &anyhow::Error, ctx: &Context<'_>) -> (Exit, Option<String>) {
    if let Some(i) = err.downcast_ref::<Interrupted>() {
        return (Exit::Interrupted, i.0.clone());
    }
    if let Some(status) = err.downcast_ref::<Status>() {
        return classify_status(status, ctx);
    }
    if let Some(e) = err.downcast_ref::<StreamEnded>() {
        return (Exit::Unavailable, Some(e.to_string()));
    }
    if let Some(e) = err.downcast_ref::<ProvisionFailed>() {
        return (Exit::ProvisionFailed, Some(e.to_string()));
    }
    if let Some(e) = err.downcast_ref::<TimedOut>() {
        return (Exit::TimedOut, Some(e.to_string()));
    }
    if let Some(e) = err.downcast_ref::<LeaseEnded>() {
        return (Exit::NeverMet, Some(e.to_string()));
    }
    if let Some(e) = err.downcast_ref::<io::Error>()
        && e.kind() == io::ErrorKind::BrokenPipe
    {
        // Whoever read our stdout has stopped (`| head`): not an error.
        return (Exit::Success, None);
    }
    (Exit::Other, Some(format!("{err:#}")))
}

fn classify_status(status: &Status, ctx: &Context<'_>) -> (Exit, Option<String>) {
    if let Some(cause) = connect_failure(status) {
        let msg = format!("cannot connect to {}: {cause}", ctx.server);
        return (Exit::Unavailable, Some(msg));
    }
    if status.code() == Code::Unknown && status.source().is_some() {
        // A transport failure mid-call (the server went away or restarted).
        let msg = format!(
            "lost the connection to {}: {}",
            ctx.server,
            status.message()
        );
        return (Exit::Unavailable, Some(msg));
    }
    let mut msg = status.message().to_owned();
    if msg.is_empty() {
        msg = status.code().description().to_owned();
    }
    let exit = match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Exit::Denied,
        Code::NotFound => Exit::NotFound,
        Code::ResourceExhausted => Exit::NoHostsNow,
        Code::FailedPrecondition => Exit::NeverMet,
        Code::Unavailable => Exit::Unavailable,
        _ => Exit::Other,
    };
    if status.code() == Code::Unauthenticated && !ctx.have_token {
        msg.push_str(" (no token given: use --token or LAB_TOKEN)");
    }
    (exit, Some(msg))
}

/// When the status stands for a failed connection attempt, the cause as
/// `tcp connect error: Connection refused (os error 111)`.
pub fn connect_failure(status: &Status) -> Option<String> {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            let mut parts: Vec<String> = Vec::new();
            let mut cur = err.source();
            while let Some(e) = cur {
                let text = e.to_string();
                // Wrappers often repeat their source's text.
                if parts.last() != Some(&text) {
                    parts.push(text);
                }
                cur = e.source();
            }
            if parts.is_empty() {
                parts.push(err.to_string());
            }
            return Some(parts.join(": "));
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context<'static> = Context {
        server: "http://lab:7621",
        have_token: true,
    };

    fn status(code: Code, msg: &str) -> anyhow::Error {
        Status::new(code, msg).into()
    }

    #[test]
    fn status_codes_map_to_exit_codes() {
        let cases = [
            (Code::Unauthenticated, Exit::Denied),
            (Code::PermissionDenied, Exit::Denied),
            (Code::NotFound, Exit::NotFound),
            (Code::ResourceExhausted, Exit::NoHostsNow),
            (Code::FailedPrecondition, Exit::NeverMet),
            (Code::Unavailable, Exit::Unavailable),
            (Code::InvalidArgument, Exit::Other),
            (Code::Internal, Exit::Other),
        ];
        for (code, exit) in cases {
            let (got, msg) = classify(&status(code, "why"), &CTX);
            assert_eq!(got, exit, "{code:?}");
            assert_eq!(
                msg.as_deref(),
                Some("why"),
                "the status message, not its Debug"
            );
        }
    }

    #[test]
    fn empty_status_message_falls_back_to_the_code() {
        let (_, msg) = classify(&status(Code::NotFound, ""), &CTX);
        assert_eq!(msg.unwrap(), "Some requested entity was not found");
    }

    #[test]
    fn unauthenticated_without_token_gives_a_hint() {
        let ctx = Context {
            have_token: false,
            ..CTX
        };
        let (_, msg) = classify(&status(Code::Unauthenticated, "no token"), &ctx);
        assert_eq!(
            msg.unwrap(),
            "no token (no token given: use --token or LAB_TOKEN)"
        );
    }

    #[test]
    fn connect_errors_name_the_server() {
        let io = io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused");
        let err = tonic::ConnectError(Box::new(io));
        let status = Status::from_error(Box::new(err));
        assert_eq!(status.code(), Code::Unavailable);
        let (exit, msg) = classify(&status.into(), &CTX);
        assert_eq!(exit, Exit::Unavailable);
        assert_eq!(
            msg.unwrap(),
            "cannot connect to http://lab:7621: Connection refused"
        );
    }

    #[test]
    fn local_errors() {
        let (exit, msg) = classify(&Interrupted(None).into(), &CTX);
        assert_eq!((exit, msg), (Exit::Interrupted, None));
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(classify(&pipe.into(), &CTX), (Exit::Success, None));
        let (exit, msg) = classify(&ProvisionFailed("x1 failed".into()).into(), &CTX);
        assert_eq!(
            (exit, msg.as_deref()),
            (Exit::ProvisionFailed, Some("x1 failed"))
        );
        let (exit, _) = classify(&TimedOut("slow".into()).into(), &CTX);
        assert_eq!(exit, Exit::TimedOut);
        let (exit, _) = classify(&LeaseEnded("gone".into()).into(), &CTX);
        assert_eq!(exit, Exit::NeverMet);
        let (exit, msg) = classify(&anyhow::anyhow!("boom").context("doing x"), &CTX);
        assert_eq!((exit, msg.as_deref()), (Exit::Other, Some("doing x: boom")));
    }

    #[test]
    fn help_lists_every_code() {
        for exit in [
            Exit::Success,
            Exit::Other,
            Exit::Usage,
            Exit::Denied,
            Exit::NotFound,
            Exit::NoHostsNow,
            Exit::NeverMet,
            Exit::Unavailable,
            Exit::ProvisionFailed,
            Exit::TimedOut,
            Exit::Interrupted,
        ] {
            let code = exit as u8;
            assert!(
                HELP.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{code} "))),
                "exit code {code} missing from --help"
            );
        }
    }
}
