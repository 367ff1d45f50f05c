//! `lab`: the command line of the hardware lab lease manager, for CI
//! systems, developers and operators. It talks gRPC (`lab.v1`) to
//! lab-server.
//!
//! # Layout
//! - `main.rs`: the clap command tree, dispatch, and exit.
//! - `client`: server URL and token parsing, the service clients over one
//!   lazily connected channel (endpoint, TLS and the bearer-token
//!   interceptor from the `lab-client` crate).
//! - `commands/`: one module per command group (`hosts`, `lease`, `events`,
//!   `power`, `console`, `forward`, `ssh`, `run`, `admin`), each with its
//!   arguments.
//! - `sshkey`: `--ssh-key`, the default key files and key fingerprints.
//! - `view`: the `--json` output schema; `output`: tables, key/value blocks,
//!   stdout; `clock`: TTLs and time formatting; `waiting`: the live queue line
//!   of `lease acquire`; `ready`: boot progress for `--wait-ready`; `escape`:
//!   the console's `Ctrl-E c` keys; `rawterm`: raw terminal mode with restore
//!   on every exit path; `exit`: exit codes and error messages; `sanitize`:
//!   escaping control characters in what the server sends before printing.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success |
//! | 1    | any other error |
//! | 2    | usage error (clap) |
//! | 3    | unauthenticated or permission denied |
//! | 4    | not found (no such host or lease) |
//! | 5    | no hosts free now (`RESOURCE_EXHAUSTED`, `lease acquire --no-wait`) |
//! | 6    | the request can never be met, or the lease is no longer active (`FAILED_PRECONDITION`) |
//! | 7    | server unavailable, or cannot connect to it |
//! | 8    | provisioning failed on a host of the lease (`--wait-ready`) |
//! | 9    | the lease was not ready in time (`--wait-ready`) |
//! | 130  | interrupted (Ctrl-C, or SIGTERM/SIGHUP during `lab console`) |
//!
//! `lab run` and `lab ssh` exit with their command's status instead (128 +
//! the signal for one killed by a signal); their own failures keep the
//! codes above.
//!
//! Errors are printed on stderr as `lab: <message>`, with the gRPC status
//! message as the server wrote it.

#![forbid(unsafe_code)]

mod again;
mod client;
mod clock;
mod commands;
mod escape;
mod exit;
mod output;
mod rawterm;
mod ready;
mod sanitize;
mod sshkey;
mod stdin;
mod view;
mod waiting;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::again::Again;

use crate::commands::admin::InventoryCommand;
use crate::commands::booking::BookingCommand;
use crate::commands::console::ConsoleArgs;
use crate::commands::events::EventsArgs;
use crate::commands::forward::ForwardArgs;
use crate::commands::grab::GrabArgs;
use crate::commands::hosts::{HostCommand, HostsArgs};
use crate::commands::lease::LeaseCommand;
use crate::commands::power::PowerArgs;
use crate::commands::run::RunArgs;
use crate::commands::ssh::SshArgs;
use crate::commands::{
    Ctx, Reach, admin, booking, console, events, forward, grab, hosts, lease, power, run, ssh,
};

/// Lease lab hardware: list hosts, acquire and release leases, follow events
#[derive(Debug, Clone, Parser)]
#[command(
    name = "lab",
    version,
    after_help = "Times are local in human output and RFC 3339 UTC in --json output.",
    after_long_help = concat!(
        "Times are local in human output and RFC 3339 UTC in --json output.\n\n",
        exit::exit_codes_help!(),
    ),
)]
struct Cli {
    /// lab-server gRPC address (http://HOST:PORT, https://HOST:PORT or HOST:PORT); several replicas comma-separated
    #[arg(
        long,
        global = true,
        env = "LAB_SERVER",
        hide_env_values = true,
        value_name = "URL",
        help_heading = "Global options",
        default_value = client::DEFAULT_SERVER,
        value_parser = client::parse_server,
    )]
    server: client::Server,

    /// CA certificate (PEM) to trust for an https:// server [default: the system's roots]
    #[arg(
        long,
        global = true,
        env = "LAB_CA",
        hide_env_values = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    ca: Option<std::path::PathBuf>,

    /// Bearer token sent with every call [default: none]
    ///
    /// On the command line other local users can read it in the process
    /// list: prefer LAB_TOKEN or --token-file.
    #[arg(
        long,
        global = true,
        env = "LAB_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Global options",
        value_parser = client::parse_token,
    )]
    token: Option<client::Token>,

    /// File holding the bearer token (used when --token and LAB_TOKEN are not set)
    #[arg(
        long,
        global = true,
        env = "LAB_TOKEN_FILE",
        hide_env_values = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    token_file: Option<std::path::PathBuf>,

    /// Print JSON instead of tables (one object per line for events)
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// List hosts with their state, holder and lease expiry
    Hosts(HostsArgs),
    /// Show one host and its history; maintenance, quarantine, health checks
    #[command(subcommand)]
    Host(HostCommand),
    /// Acquire, renew, release, show and list leases; wait for boot
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Book hosts for a window ahead; list and cancel bookings
    #[command(subcommand)]
    Booking(BookingCommand),
    /// Power a host on, off, cycle or reset it, or read its power state
    ///
    /// Prints the power state read back after the action ("x1: on"). Changing
    /// power needs the host's active lease (or an operator); anyone may read
    /// it. Exit 3 when the host is not yours, 7 when its agent or BMC does
    /// not answer, 6 when the host has no BMC.
    #[command(verbatim_doc_comment)]
    Power(PowerArgs),
    /// Attach to a host's live console, or print a lease's console log
    ///
    /// lab console HOST: output goes to stdout as it comes; on a terminal,
    /// keys go to the host in raw mode (Ctrl-C included) and these escapes
    /// are read:
    ///   Ctrl-E c .   detach (exit 0)
    ///   Ctrl-E c b   send a serial break
    ///   Ctrl-E c ?   print this list
    /// Taking the console detaches any other writer. When stdin is not a
    /// terminal, its bytes are sent as they are (escapes only with
    /// --escape); at its end, output is printed for one more second, then
    /// lab exits 0.
    ///
    /// lab console HOST --follow: read-only; output until Ctrl-C (exit 130)
    /// or the server ends the session (exit 0).
    ///
    /// lab console --lease ID: the console captured during the lease, all
    /// its hosts in time order, on stdout; a "==> HOST <==" line goes to
    /// stderr each time the log switches hosts.
    ///
    /// The banner, "[lab: ...]" notices and headers go to stderr, so stdout
    /// holds the console bytes only. --json does not apply.
    #[command(verbatim_doc_comment)]
    Console(ConsoleArgs),
    /// Print the event log, or follow it live
    ///
    /// One line per event: seq, local time, actor, kind (e.g. lease-granted),
    /// then hosts=, lease= and waiter= when set, then the detail. With --json,
    /// one JSON object per line. With --follow, the log after --after and then
    /// live events until interrupted (Ctrl-C: exit 130).
    #[command(verbatim_doc_comment)]
    Events(EventsArgs),
    /// Join stdin/stdout (or a local port) to a TCP port of your leased host
    ///
    /// The bytes go through lab-server and the rack's agent, which connects
    /// to the host's own address (its inventory IPv4): it works wherever
    /// lab-server is reachable. Only the holder of the host's active lease
    /// (or an operator) may; the forward ends when the lease does.
    ///
    /// lab forward HOST PORT: stdin goes to the host, the host's bytes to
    /// stdout. The end of stdin half-closes the connection; when the host
    /// closes it, lab exits 0. Exit 3 when the host is not yours, 6 when
    /// the lease ended (or the host has no address), 7 when nothing answers
    /// on the port or the agent is away.
    ///
    /// lab forward HOST PORT --listen LOCALPORT (or ADDR:LOCALPORT): listen
    /// on LOCALPORT (of 127.0.0.1 unless ADDR is given; 0 picks a port,
    /// printed on stdout) and forward each connection accepted there, until
    /// Ctrl-C.
    #[command(verbatim_doc_comment)]
    Forward(ForwardArgs),
    /// ssh to root on your leased host, through lab forward
    ///
    /// Runs the system ssh with ProxyCommand "lab forward HOST 22" (with
    /// this lab's --server, --ca and token), user root, the private key of
    /// --ssh-key (the file without .pub; default ~/.ssh/id_ed25519, else
    /// ~/.ssh/id_rsa), and no host key checking: a lab host is reinstalled
    /// for every lease, so its host key changes every time.
    ///
    /// lab ssh HOST: a login shell. lab ssh HOST -- CMD ARGS...: runs CMD.
    /// The exit status is ssh's (the remote command's, 255 when ssh
    /// failed), except that a forward refused or cut by the server exits
    /// with lab's code for it (3 not your host, 6 lease ended, 7
    /// unavailable).
    #[command(verbatim_doc_comment)]
    Ssh(SshArgs),
    /// Acquire hosts, run a command with them, always give them back
    ///
    /// For CI jobs: acquires a lease (waiting in the queue; the acquire
    /// options are lease acquire's), waits until every host is ready
    /// (--wait-ready=TIMEOUT, default 10m; --no-wait-ready skips it), then
    /// runs CMD with LAB_SERVER, LAB_LEASE, LAB_HOSTS (host names separated
    /// by spaces), LAB_CA and LAB_TOKEN (when given) in its environment, so
    /// lab ssh and lab forward work inside it. The lease is renewed every
    /// TTL/3 meanwhile: give a short --ttl, and a dead CI runner frees the
    /// hosts soon.
    ///
    /// When CMD ends, or on SIGINT/SIGTERM (passed on to CMD, which gets
    /// 10 s to exit before SIGKILL), the lease is released, and with
    /// --artifacts DIR each host's console captured during the lease is
    /// saved to DIR/HOST.console. With --hold-on-failure DURATION a failed
    /// CMD keeps the lease instead: it expires DURATION later (or at its
    /// current expiry, if that is later), and lab prints how to reach the
    /// hosts.
    ///
    /// Exit status: CMD's (128 + the signal if a signal killed it); lab's
    /// own failures keep their codes (5 no hosts with --no-wait, 8 a host
    /// failed to boot, 9 not ready in time, 130 interrupted before CMD ran).
    #[command(verbatim_doc_comment)]
    Run(RunArgs),
    /// For developers: acquires a lease (profile xen unless --profile
    /// names another; the acquire options are lease acquire's), waits until
    /// every host is ready (--wait-ready=TIMEOUT, default 10m;
    /// --no-wait-ready attaches at once), then attaches to the first host's
    /// console (Ctrl-E c . detaches) or, with --ssh, logs in with lab ssh.
    /// The lease is renewed every TTL/3 while you are attached.
    ///
    /// On detach lab asks whether to keep the lease (it then runs to its
    /// expiry, no longer renewed) or release it; --keep or --release
    /// answer for scripts. Without a terminal to ask on, or when a signal
    /// ends the session (SIGTERM, SIGHUP), the lease is released unless
    /// --keep.
    #[command(verbatim_doc_comment)]
    Grab(GrabArgs),
    /// Operator commands on the inventory
    #[command(subcommand)]
    Inventory(InventoryCommand),
    /// Show who the server thinks you are
    Whoami,
    /// Print the shell completion script for bash, zsh or fish
    ///
    /// The Debian package installs them. By hand:
    ///   lab completions bash > /etc/bash_completion.d/lab
    ///   lab completions zsh > /usr/local/share/zsh/site-functions/_lab
    ///   lab completions fish > ~/.config/fish/completions/lab.fish
    #[command(verbatim_doc_comment)]
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

/// The shells `lab completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `lab completions SHELL`: generated from the command tree.
fn completions(shell: CompletionShell) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lab", &mut out);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &out)
}

/// `lab manpage DIR` writes the man pages (lab.1, lab-lease-acquire.1, …)
/// into DIR: the packages' build step (packaging/build-debs.sh). It is not
/// part of the command tree, so that help and completions do not offer it
/// (clap_complete lists hidden subcommands too).
fn manpage_dir() -> Option<std::path::PathBuf> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match &args[..] {
        [_, cmd, dir] if cmd == "manpage" => Some(dir.into()),
        _ => None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some(dir) = manpage_dir() {
        use clap::CommandFactory;
        let written = std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir));
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab: cannot write man pages to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let mut cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        return match completions(shell) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lab: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !cli.token.as_ref().is_some_and(client::Token::is_set)
        && let Some(path) = &cli.token_file
    {
        match client::read_token_file(path) {
            Ok(t) => cli.token = Some(t),
            Err(e) => {
                eprintln!("lab: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let endpoints = match cli.server.endpoints(cli.ca.as_deref()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("lab: {e}");
            return ExitCode::from(2);
        }
    };
    let error_ctx = exit::Context {
        server: cli.server.url(),
        have_token: cli.token.as_ref().is_some_and(client::Token::is_set),
    };
    let ctx = Ctx {
        lab: client::Lab::connect_lazy(&endpoints, cli.token.clone()),
        json: cli.json,
        reach: Reach {
            server: cli.server.url().to_owned(),
            // Absolute: the lab processes started with it may run elsewhere.
            ca: cli
                .ca
                .as_deref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())),
            token: cli.token.clone(),
        },
    };
    // Several replicas: find the one that leads (nothing is asked with one).
    ctx.lab.find_leader().await;
    let is_forward = matches!(cli.command, Command::Forward(_));
    let again = again_when(&cli.command);
    let mut result = dispatch(&ctx, cli.command.clone()).await;
    // The leader found above was deposed or died before the call reached
    // it: once more on the next replica, when that is safe (`again.rs`).
    let asked = ctx.lab.current().to_owned();
    if let Err(err) = &result
        && again.allows(err)
        && ctx.lab.failover(err)
    {
        ctx.lab.find_leader().await;
        eprintln!(
            "lab: {asked} did not answer as the leader; asking {}",
            ctx.lab.current()
        );
        result = dispatch(&ctx, cli.command).await;
    }
    let code: u8 = match result {
        Ok(()) => 0,
        Err(err) => match err.downcast_ref::<exit::ChildExit>() {
            // The command's own status; it said what it had to say.
            Some(exit::ChildExit(code)) => *code,
            None => {
                let (code, message) = exit::classify(&err, &error_ctx);
                if let Some(message) = message {
                    // Status messages are the server's text.
                    eprintln!("lab: {}", sanitize::text(&message));
                }
                code as u8
            }
        },
    };
    if is_forward && let Some(path) = std::env::var_os(commands::forward::STATUS_FILE_ENV) {
        // For `lab ssh`, which ran this as ssh's ProxyCommand.
        let _ = std::fs::write(path, code.to_string());
    }
    ExitCode::from(code)
}

async fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Hosts(args) => hosts::list(ctx, args).await,
        Command::Host(cmd) => hosts::run(ctx, cmd).await,
        Command::Lease(cmd) => lease::run(ctx, cmd).await,
        Command::Booking(cmd) => booking::run(ctx, cmd).await,
        Command::Power(args) => power::run(ctx, args).await,
        Command::Console(args) => console::run(ctx, args).await,
        Command::Events(args) => events::run(ctx, args).await,
        Command::Forward(args) => forward::run(ctx, args).await,
        Command::Ssh(args) => ssh::run(ctx, args).await,
        Command::Run(args) => run::run(ctx, args).await,
        Command::Grab(args) => grab::run(ctx, args).await,
        Command::Inventory(cmd) => admin::inventory(ctx, cmd).await,
        Command::Whoami => admin::whoami(ctx).await,
        Command::Completions { .. } => unreachable!("handled above"),
    }
}

/// When `command` may be run again on another replica (`again.rs`).
fn again_when(command: &Command) -> Again {
    match command {
        Command::Hosts(_)
        | Command::Host(HostCommand::Show { .. })
        | Command::Lease(LeaseCommand::Show { .. } | LeaseCommand::List { .. })
        | Command::Booking(BookingCommand::List { .. })
        | Command::Whoami => Again::IfUnreached,
        Command::Events(args) if !args.follow => Again::IfUnreached,
        Command::Host(_)
        | Command::Lease(LeaseCommand::Renew { .. } | LeaseCommand::Release { .. })
        | Command::Booking(_)
        | Command::Power(_)
        | Command::Inventory(_) => Again::IfNotDone,
        _ => Again::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn long_help_carries_the_exit_code_table() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains(exit::HELP),
            "after_long_help and exit::HELP differ"
        );
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "lab", "lease", "list", "--json", "--server", "lab:1", "--token", "t",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.server.url(), "http://lab:1");
        assert!(cli.token.is_some());
    }

    #[test]
    fn usage_errors() {
        for argv in [
            &["lab"][..],
            &["lab", "hosts", "--arch", "mips"],
            &["lab", "host", "maintenance", "maybe", "x1"],
            &["lab", "events", "--follow", "--limit", "5"],
            &["lab", "--server", "ftp://lab:7621", "whoami"],
            &["lab", "--token", "two words", "whoami"],
        ] {
            let err = Cli::try_parse_from(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?}"));
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }
}
