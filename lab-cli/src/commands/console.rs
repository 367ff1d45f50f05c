//! `lab console HOST` (live, interactive or `--follow`) and
//! `lab console --lease ID` (the log captured during a lease).
//!
//! Console output goes to stdout byte for byte (it is a terminal session);
//! everything `lab` says itself (banner, notices, `==> host <==` headers,
//! help) goes to stderr, with the server's text in it escaped, so
//! `lab console --lease L > log` captures the console and nothing else.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use clap::{ArgGroup, Args};
use lab_proto::v1::console_request::Msg as In;
use lab_proto::v1::console_response::Msg as Out;
use lab_proto::v1::{ConsoleLogRequest, ConsoleOpen, ConsoleRequest, ConsoleResponse};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Ctx;
use super::lease::ctrl_c;
use crate::escape::{self, Action, Escapes};
use crate::exit::Interrupted;
use crate::rawterm::RawMode;
use crate::sanitize;

/// After stdin ends (not a terminal), how long to keep printing output so
/// the answer to the last input arrives.
pub const LINGER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["host", "lease"])))]
pub struct ConsoleArgs {
    /// Host name
    host: Option<String>,
    /// Print the console captured during this lease (all its hosts), then exit
    #[arg(
        long,
        value_name = "ID",
        conflicts_with_all = ["host", "follow", "replay", "escape"]
    )]
    lease: Option<String>,
    /// Read-only: print the output until Ctrl-C or the server ends it
    #[arg(long, short)]
    follow: bool,
    /// Replay at most BYTES of recent output first [default: the server's, 16 KiB]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..))]
    replay: Option<u32>,
    /// Act on the Ctrl-E c escapes even when stdin is not a terminal
    #[arg(long, conflicts_with = "follow")]
    escape: bool,
}

pub async fn run(ctx: &Ctx, args: ConsoleArgs) -> anyhow::Result<()> {
    if let Some(lease_id) = args.lease {
        return log(ctx, lease_id).await;
    }
    let host = args.host.expect("clap requires HOST or --lease");
    let tty = !args.follow && io::stdin().is_terminal();
    let session = Session {
        host,
        write: !args.follow,
        replay: args.replay.unwrap_or(0),
        escapes: tty || args.escape,
        raw: tty,
    };
    live(ctx, session).await
}

/// An interactive session on `host`'s console, as `lab console HOST`
/// gives (raw terminal and `Ctrl-E c .` when stdin is a terminal); returns
/// when it is detached, stdin ends or the server ends it.
pub async fn attach(ctx: &Ctx, host: &str) -> anyhow::Result<()> {
    let tty = io::stdin().is_terminal();
    let session = Session {
        host: host.to_owned(),
        write: true,
        replay: 0,
        escapes: tty,
        raw: tty,
    };
    live(ctx, session).await
}

/// How a live session runs.
#[derive(Debug)]
struct Session {
    host: String,
    /// Take the console's input (not `--follow`).
    write: bool,
    replay: u32,
    /// Act on `Ctrl-E c` escapes.
    escapes: bool,
    /// stdin is a terminal: put it in raw mode.
    raw: bool,
}

/// The one-line banner on stderr once the session is open.
fn banner(s: &Session) -> String {
    let access = if s.write { "write access" } else { "read-only" };
    let how = match (s.write, s.escapes) {
        (false, _) => "; Ctrl-C to quit",
        (true, true) => "; Ctrl-E c . to detach",
        (true, false) => "",
    };
    format!("[connected to {} console, {access}{how}]", s.host)
}

/// Our own messages on stderr; a raw terminal needs `\r\n`. Notices and
/// host names in them come from the server: control characters are
/// escaped ([`sanitize::line`]).
struct Say {
    raw: bool,
}

impl Say {
    fn line(&self, text: &str) -> io::Result<()> {
        let end = if self.raw { "\r\n" } else { "\n" };
        let mut err = io::stderr().lock();
        write!(err, "{}{end}", sanitize::line(text))?;
        err.flush()
    }
}

fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

async fn live(ctx: &Ctx, s: Session) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<ConsoleRequest>(16);
    let open = ConsoleRequest {
        msg: Some(In::Open(ConsoleOpen {
            host: s.host.clone(),
            write: s.write,
            replay_bytes: s.replay,
            not_before: None,
        })),
    };
    tx.send(open).await.expect("the receiver is still here");
    let mut output = ctx
        .lab
        .hosts()
        .console(ReceiverStream::new(rx))
        .await?
        .into_inner();

    // Still cooked: a plain newline.
    Say { raw: false }.line(&banner(&s))?;
    let say = Say { raw: s.raw };
    let mut signals = Signals::new()?;
    // Raw mode only now: an error opening the session prints as usual. The
    // guard restores the terminal however this function is left.
    let _raw = if s.raw { Some(RawMode::enter()?) } else { None };
    let mut stdin = match s.write {
        true => Some(stdin_reader().lock().await),
        false => None,
    };
    let mut escapes = Escapes::default();
    let mut linger: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;

    loop {
        tokio::select! {
            msg = output.message() => match msg? {
                Some(ConsoleResponse { msg: Some(Out::Output(bytes)) }) => write_stdout(&bytes)?,
                Some(ConsoleResponse { msg: Some(Out::Notice(text)) }) => {
                    say.line(&format!("[lab: {text}]"))?;
                }
                // Only ConsoleLog names hosts; a live session has one.
                Some(_) => {}
                None => {
                    say.line("[console closed by the server]")?;
                    return Ok(());
                }
            },
            chunk = recv(&mut stdin) => {
                let Some(bytes) = chunk else {
                    // stdin ended (a script's input): give the host a moment
                    // to answer, then leave.
                    stdin = None;
                    linger = Some(Box::pin(tokio::time::sleep(LINGER)));
                    continue;
                };
                let actions = if s.escapes {
                    escapes.feed(&bytes)
                } else {
                    vec![Action::Send(bytes)]
                };
                for action in actions {
                    let msg = match action {
                        Action::Send(bytes) => In::Input(bytes),
                        Action::Break => {
                            say.line("[lab: sending a break]")?;
                            In::SendBreak(true)
                        }
                        Action::Detach => {
                            say.line(&format!("[detached from {}]", s.host))?;
                            return Ok(());
                        }
                        Action::Help | Action::Unknown(_) => {
                            if let Action::Unknown(key) = action {
                                say.line(&format!("[lab: unknown escape Ctrl-E c {}]", key.escape_ascii()))?;
                            }
                            for line in escape::HELP {
                                say.line(&format!("[lab: {line}]"))?;
                            }
                            continue;
                        }
                    };
                    // A send fails only when the call is over; the output
                    // stream then says why.
                    let _ = tx.send(ConsoleRequest { msg: Some(msg) }).await;
                }
            },
            () = wait(&mut linger) => return Ok(()),
            () = signals.any() => return Err(Interrupted(None).into()),
        }
    }
}

/// stdin's chunks ([`crate::stdin::reader`]). One reader per process,
/// shared: after a console session, whatever reads stdin next (`lab grab`'s
/// question) gets the bytes the thread reads, not a second thread racing
/// the first for the terminal.
fn stdin_reader() -> &'static tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>> {
    static STDIN: std::sync::OnceLock<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>> =
        std::sync::OnceLock::new();
    STDIN.get_or_init(|| tokio::sync::Mutex::new(crate::stdin::reader(16, 4096)))
}

/// The next line of stdin (without its end), through the shared reader;
/// `None` at end of input.
pub async fn read_line() -> Option<String> {
    let mut rx = stdin_reader().lock().await;
    let mut line = Vec::new();
    loop {
        let chunk = rx.recv().await;
        let Some(chunk) = chunk else {
            return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
        };
        for b in chunk {
            if b == b'\n' || b == b'\r' {
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            line.push(b);
        }
    }
}

/// The next chunk; never resolves when there is no receiver.
async fn recv(
    rx: &mut Option<tokio::sync::MutexGuard<'static, mpsc::Receiver<Vec<u8>>>>,
) -> Option<Vec<u8>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the linger is over; never when none is running.
async fn wait(linger: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match linger {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// SIGINT, SIGTERM and SIGHUP: in raw mode Ctrl-C is a key for the host, so
/// these come only from outside (or a closed terminal); either way the
/// terminal is restored on the way out.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn any(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
    }
}

/// `lab console --lease ID`: the captured log, in time order. A header
/// `==> HOST <==` goes to stderr each time the log switches hosts.
async fn log(ctx: &Ctx, lease_id: String) -> anyhow::Result<()> {
    let print = async {
        let mut stream = ctx
            .lab
            .hosts()
            .console_log(ConsoleLogRequest { lease_id })
            .await?
            .into_inner();
        let say = Say { raw: false };
        let mut current: Option<String> = None;
        while let Some(resp) = stream.message().await? {
            match resp.msg {
                Some(Out::Output(bytes)) => write_stdout(&bytes)?,
                Some(Out::Notice(text)) => say.line(&format!("[lab: {text}]"))?,
                Some(Out::Host(host)) if current.as_ref() != Some(&host) => {
                    say.line(&format!("==> {host} <=="))?;
                    current = Some(host);
                }
                Some(Out::Host(_)) | None => {}
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = print => r,
        () = ctrl_c() => Err(Interrupted(None).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsoleArgs,
    }

    fn parse(argv: &[&str]) -> Result<ConsoleArgs, clap::Error> {
        let argv = std::iter::once("console").chain(argv.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn arguments() {
        let a = parse(&["x1", "--follow", "--replay", "1024"]).unwrap();
        assert_eq!(a.host.as_deref(), Some("x1"));
        assert!(a.follow);
        assert_eq!(a.replay, Some(1024));
        let a = parse(&["--lease", "L-1"]).unwrap();
        assert_eq!(a.lease.as_deref(), Some("L-1"));
        for bad in [
            &[][..],
            &["x1", "--lease", "L-1"],
            &["--lease", "L-1", "--follow"],
            &["x1", "--follow", "--escape"],
            &["x1", "--replay", "0"],
        ] {
            let err = parse(bad).err().unwrap_or_else(|| panic!("{bad:?}"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn banners() {
        let mut s = Session {
            host: "h1".into(),
            write: true,
            replay: 0,
            escapes: true,
            raw: true,
        };
        assert_eq!(
            banner(&s),
            "[connected to h1 console, write access; Ctrl-E c . to detach]"
        );
        s.escapes = false;
        assert_eq!(banner(&s), "[connected to h1 console, write access]");
        s.write = false;
        assert_eq!(
            banner(&s),
            "[connected to h1 console, read-only; Ctrl-C to quit]"
        );
    }
}
