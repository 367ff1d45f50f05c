//! `lab`: the command line of the hardware lab lease manager, for CI
//! systems, developers and operators. It talks gRPC (`lab.v1`) to
//! lab-server.
//!
//! # Layout
//! - `main.rs`: the clap command tree, dispatch, and exit.
//! - `client`: server URL and token parsing, the bearer-token interceptor,
//!   the service clients over one lazily connected channel.
//! - `commands/`: one module per command group (`hosts`, `lease`, `events`,
//!   `admin`), each with its arguments.
//! - `view`: the `--json` output schema; `output`: tables, key/value blocks,
//!   stdout; `clock`: TTLs and time formatting; `waiting`: the live queue line
//!   of `lease acquire`; `exit`: exit codes and error messages.
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
//! | 130  | interrupted (Ctrl-C) |
//!
//! Errors are printed on stderr as `lab: <message>`, with the gRPC status
//! message as the server wrote it.

#![forbid(unsafe_code)]

mod client;
mod clock;
mod commands;
mod exit;
mod output;
mod view;
mod waiting;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::admin::InventoryCommand;
use crate::commands::events::EventsArgs;
use crate::commands::hosts::{HostCommand, HostsArgs};
use crate::commands::lease::LeaseCommand;
use crate::commands::{Ctx, admin, events, hosts, lease};

/// Lease lab hardware: list hosts, acquire and release leases, follow events
#[derive(Debug, Parser)]
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
    /// lab-server gRPC address (http://HOST:PORT or HOST:PORT)
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

    /// Bearer token sent with every call [default: none]
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

    /// Print JSON instead of tables (one object per line for events)
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List hosts with their state, holder and lease expiry
    Hosts(HostsArgs),
    /// Show one host, or put it in or out of maintenance
    #[command(subcommand)]
    Host(HostCommand),
    /// Acquire, renew, release, show and list leases
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Print the event log, or follow it live
    ///
    /// One line per event: seq, local time, actor, kind (e.g. lease-granted),
    /// then hosts=, lease= and waiter= when set, then the detail. With --json,
    /// one JSON object per line. With --follow, the log after --after and then
    /// live events until interrupted (Ctrl-C: exit 130).
    #[command(verbatim_doc_comment)]
    Events(EventsArgs),
    /// Operator commands on the inventory
    #[command(subcommand)]
    Inventory(InventoryCommand),
    /// Show who the server thinks you are
    Whoami,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let error_ctx = exit::Context {
        server: cli.server.url(),
        have_token: cli.token.as_ref().is_some_and(client::Token::is_set),
    };
    let ctx = Ctx {
        lab: client::Lab::connect_lazy(&cli.server, cli.token.clone()),
        json: cli.json,
    };
    let result = match cli.command {
        Command::Hosts(args) => hosts::list(&ctx, args).await,
        Command::Host(cmd) => hosts::run(&ctx, cmd).await,
        Command::Lease(cmd) => lease::run(&ctx, cmd).await,
        Command::Events(args) => events::run(&ctx, args).await,
        Command::Inventory(cmd) => admin::inventory(&ctx, cmd).await,
        Command::Whoami => admin::whoami(&ctx).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let (code, message) = exit::classify(&err, &error_ctx);
            if let Some(message) = message {
                eprintln!("lab: {message}");
            }
            code.into()
        }
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
            &["lab", "--server", "https://lab:7621", "whoami"],
            &["lab", "--token", "two words", "whoami"],
        ] {
            let err = Cli::try_parse_from(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?}"));
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }
}
