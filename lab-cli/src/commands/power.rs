//! `lab power on|off|cycle|reset|status HOST`.

use clap::{Args, ValueEnum};
use lab_proto::v1::{PowerAction, PowerRequest};

use super::Ctx;
use crate::output;
use crate::view::PowerView;

#[derive(Debug, Clone, Args)]
pub struct PowerArgs {
    /// What to do: status only reads the power state
    #[arg(value_enum, value_name = "ACTION")]
    action: PowerArg,
    /// Host name
    host: String,
}

/// The actions of `lab power`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PowerArg {
    /// Switch the host on
    On,
    /// Switch the host off (hard)
    Off,
    /// Off, then on again
    Cycle,
    /// Hard reset without removing power
    Reset,
    /// Read the power state
    Status,
}

impl From<PowerArg> for PowerAction {
    fn from(a: PowerArg) -> Self {
        match a {
            PowerArg::On => PowerAction::On,
            PowerArg::Off => PowerAction::Off,
            PowerArg::Cycle => PowerAction::Cycle,
            PowerArg::Reset => PowerAction::Reset,
            PowerArg::Status => PowerAction::Status,
        }
    }
}

impl PowerArgs {
    fn request(self) -> PowerRequest {
        PowerRequest {
            host: self.host,
            action: PowerAction::from(self.action) as i32,
        }
    }
}

pub async fn run(ctx: &Ctx, args: PowerArgs) -> anyhow::Result<()> {
    let resp = ctx.lab.hosts().power(args.request()).await?.into_inner();
    let v = PowerView::from(&resp);
    if ctx.json {
        return Ok(output::emit(&output::json(&v))?);
    }
    Ok(output::emit(&line(&v))?)
}

/// `x1: on`: the power state read back after the action.
fn line(v: &PowerView) -> String {
    output::line(&format!("{}: {}", v.host, v.power))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PowerArgs,
    }

    #[test]
    fn actions_map_to_the_request() {
        for (word, action) in [
            ("on", PowerAction::On),
            ("off", PowerAction::Off),
            ("cycle", PowerAction::Cycle),
            ("reset", PowerAction::Reset),
            ("status", PowerAction::Status),
        ] {
            let cli = Cli::try_parse_from(["power", word, "x1"]).unwrap();
            let req = cli.args.request();
            assert_eq!((req.host.as_str(), req.action), ("x1", action as i32));
        }
        let err = Cli::try_parse_from(["power", "toggle", "x1"])
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(Cli::try_parse_from(["power", "on"]).is_err(), "host needed");
    }

    #[test]
    fn power_line() {
        let v = PowerView {
            host: "x1".into(),
            on: false,
            power: "off",
        };
        assert_eq!(line(&v), "x1: off\n");
    }
}
