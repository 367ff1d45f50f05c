//! `lab inventory reload` and `lab whoami`.

use clap::Subcommand;
use lab_proto::v1::{ReloadInventoryRequest, WhoAmIRequest};

use super::Ctx;
use crate::output;
use crate::view::{ReloadView, WhoAmIView};

#[derive(Debug, Clone, Subcommand)]
pub enum InventoryCommand {
    /// Re-read inventory.toml on the server (operators only)
    ///
    /// On error the last good inventory stays in force and the error
    /// (file:line:column: reason) is printed.
    Reload,
}

pub async fn inventory(ctx: &Ctx, cmd: InventoryCommand) -> anyhow::Result<()> {
    match cmd {
        InventoryCommand::Reload => {
            let resp = ctx
                .lab
                .admin()
                .reload_inventory(ReloadInventoryRequest {})
                .await?;
            let v = ReloadView::from(&resp.into_inner());
            if ctx.json {
                return Ok(output::emit(&output::json(&v))?);
            }
            Ok(output::emit(&format!(
                "inventory reloaded: {} hosts ({} added, {} removed)\n",
                v.hosts, v.added, v.removed
            ))?)
        }
    }
}

pub async fn whoami(ctx: &Ctx) -> anyhow::Result<()> {
    let resp = ctx.lab.admin().who_am_i(WhoAmIRequest {}).await?;
    let v = WhoAmIView::from(&resp.into_inner());
    if ctx.json {
        return Ok(output::emit(&output::json(&v))?);
    }
    let project = if v.project.is_empty() {
        String::new()
    } else {
        format!(", project {}", v.project)
    };
    Ok(output::emit(&output::line(&format!(
        "{} ({}{project})",
        v.principal, v.role
    )))?)
}
