//! The daemons' log set-up: `tracing` events to stderr, filtered by the
//! `LAB_LOG` environment variable (`EnvFilter` syntax, e.g.
//! `info,lab_agent=debug`), `info` when it is unset or does not parse;
//! colours only when stderr is a terminal.

use std::io::IsTerminal;

/// The environment variable that holds the filter.
pub const FILTER_VAR: &str = "LAB_LOG";

/// The filter when [`FILTER_VAR`] is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global subscriber. Call once, first thing in `main`.
/// Panics if a global subscriber is already set.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(FILTER_VAR)
                .unwrap_or_else(|_| DEFAULT_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
