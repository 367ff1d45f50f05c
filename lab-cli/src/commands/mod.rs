//! One module per command group: its clap arguments and what it does.
//! Each command makes its calls, then renders a table, a key/value block or
//! JSON through `output`.

pub mod admin;
pub mod booking;
pub mod console;
pub mod events;
pub mod forward;
pub mod grab;
pub mod hosts;
pub mod lease;
pub mod power;
pub mod run;
pub mod ssh;

use clap::ValueEnum;
use lab_proto::v1::Arch;

use crate::client::Lab;

/// What every command gets.
pub struct Ctx {
    pub lab: Lab,
    /// `--json`: print JSON instead of human output.
    pub json: bool,
    /// How this `lab` reached the server, for the `lab` processes it starts
    /// (`lab ssh`'s proxy command, `lab run`'s environment).
    pub reach: Reach,
}

/// `--server`, `--ca` and the token, as given.
#[derive(Clone, Debug)]
pub struct Reach {
    pub server: String,
    pub ca: Option<std::path::PathBuf>,
    pub token: Option<crate::client::Token>,
}

/// `--arch` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::X86_64 => Arch::X8664,
            ArchArg::Aarch64 => Arch::Aarch64,
        }
    }
}

/// The proto value for an optional `--arch` (unspecified: any).
pub fn arch(a: Option<ArchArg>) -> i32 {
    a.map_or(Arch::Unspecified, Arch::from) as i32
}
