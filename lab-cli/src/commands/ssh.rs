//! `lab ssh HOST [-- CMD…]`: the system `ssh` to root on a leased host,
//! through `lab forward` as its ProxyCommand, so it works from wherever
//! lab-server is reachable (the host itself may be on a rack's private
//! boot network).
//!
//! The proxy is this very `lab` binary with the same `--server` and `--ca`;
//! the token reaches it as `LAB_TOKEN` in the environment (never on a
//! command line). The key is the private half of `--ssh-key` (the file
//! without `.pub`, same defaults as `lease acquire`).
//!
//! Host keys are not checked (`StrictHostKeyChecking=no`,
//! `UserKnownHostsFile=/dev/null`): a lab host is reinstalled for every
//! lease, so its host key changes every time, and a known_hosts entry
//! would only ever produce a "REMOTE HOST IDENTIFICATION HAS CHANGED"
//! refusal. What authenticates the path instead is lab-server (TLS) and
//! the lease: only the holder's forward reaches the host's port.
//!
//! Exit status: ssh's (the remote command's, or 255 when ssh failed);
//! when ssh failed because the forward was refused or cut, `lab`'s own
//! code for that instead (3 not yours, 6 lease ended, 7 unavailable…).

use std::path::PathBuf;
use std::process::ExitStatus;

use clap::Args;

use super::forward::STATUS_FILE_ENV;
use super::{Ctx, Reach};
use crate::exit::ChildExit;
use crate::sshkey::{self, SshKeyArg};

/// Options given to every `ssh` (see the module docs for why).
pub const SSH_OPTIONS: [&str; 3] = [
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "LogLevel=ERROR",
];

#[derive(Debug, Clone, Args)]
pub struct SshArgs {
    /// Host name (of your lease)
    host: String,
    /// The remote command and its arguments (after --)
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
    /// User on the host
    #[arg(long, short = 'l', default_value = "root")]
    user: String,
    /// sshd's port on the host
    #[arg(long, default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// The lease's public key (its private half is used), or none [default:
    /// ~/.ssh/id_ed25519.pub, else ~/.ssh/id_rsa.pub]
    #[arg(long, value_name = "FILE|none", value_parser = sshkey::parse_arg)]
    ssh_key: Option<SshKeyArg>,
    /// More ssh options, as for ssh -o (repeatable)
    #[arg(short = 'o', value_name = "OPTION")]
    options: Vec<String>,
}

impl SshArgs {
    /// `lab ssh HOST` as root with the default key and no command.
    pub fn to(host: &str, ssh_key: Option<SshKeyArg>) -> SshArgs {
        SshArgs {
            host: host.to_owned(),
            command: Vec::new(),
            user: "root".to_owned(),
            port: 22,
            ssh_key,
            options: Vec::new(),
        }
    }
}

/// `s` quoted for the shell that runs ssh's ProxyCommand, with `%`
/// doubled (ssh expands `%` tokens in it).
fn quote(s: &str) -> String {
    let q = format!("'{}'", s.replace('\'', r"'\''"));
    q.replace('%', "%%")
}

/// The ProxyCommand: this `lab` with the same server and CA, forwarding
/// to `host`'s `port` (ssh runs it with `exec` through the user's shell).
fn proxy_command(lab: &str, reach: &Reach, host: &str, port: u16) -> String {
    let mut cmd = format!("{} --server {}", quote(lab), quote(&reach.server));
    if let Some(ca) = &reach.ca {
        cmd.push_str(&format!(" --ca {}", quote(&ca.display().to_string())));
    }
    cmd.push_str(&format!(" forward {} {port}", quote(host)));
    cmd
}

/// ssh's arguments (everything after the program name).
fn ssh_args(a: &SshArgs, proxy: &str, key: Option<PathBuf>) -> Vec<String> {
    let mut v = vec!["-o".to_owned(), format!("ProxyCommand={proxy}")];
    for o in SSH_OPTIONS {
        v.extend(["-o".to_owned(), o.to_owned()]);
    }
    if let Some(key) = key {
        v.extend([
            "-o".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
            "-i".to_owned(),
            key.display().to_string(),
        ]);
    }
    for o in &a.options {
        v.extend(["-o".to_owned(), o.clone()]);
    }
    v.extend([
        "-l".to_owned(),
        a.user.clone(),
        "--".to_owned(),
        a.host.clone(),
    ]);
    v.extend(a.command.iter().cloned());
    v
}

/// 128 + the signal for a process killed by one, else its code.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
        (None, None) => 1,
    }
}

pub async fn run(ctx: &Ctx, args: SshArgs) -> anyhow::Result<()> {
    let lab =
        std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find this lab binary: {e}"))?;
    let proxy = proxy_command(&lab.to_string_lossy(), &ctx.reach, &args.host, args.port);
    let key = sshkey::public_path(args.ssh_key.as_ref(), sshkey::home().as_deref())
        .map(|p| sshkey::private_path(&p))
        .filter(|p| p.exists());
    let status_dir = std::env::temp_dir().join(format!(
        "lab-ssh-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir(&status_dir)?;
    let status_file = status_dir.join("forward-status");
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(ssh_args(&args, &proxy, key))
        .env(STATUS_FILE_ENV, &status_file);
    if let Some(t) = ctx.reach.token.as_ref().and_then(|t| t.expose()) {
        cmd.env("LAB_TOKEN", t);
    }
    let status = async {
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot run ssh (apt-get install openssh-client): {e}"))?;
        // Ctrl-C belongs to ssh (and the remote side) now: lab waits.
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        loop {
            tokio::select! {
                s = child.wait() => break anyhow::Ok(s?),
                _ = int.recv() => {}
            }
        }
    }
    .await;
    let forward_code = std::fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let _ = std::fs::remove_dir_all(&status_dir);
    let code = exit_code(status?);
    match (code, forward_code) {
        (0, _) => Ok(()),
        // ssh failed because the forward did: lab's code says why (the
        // proxy printed the message).
        (255, Some(f)) if f != 0 => Err(ChildExit(f).into()),
        (c, _) => Err(ChildExit(c).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SshArgs,
    }

    fn parse(argv: &[&str]) -> SshArgs {
        let argv = std::iter::once("ssh").chain(argv.iter().copied());
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn the_proxy_command_is_quoted_for_the_shell_and_for_ssh() {
        let reach = Reach {
            server: "https://lab:7621".into(),
            ca: Some("/etc/lab/it's 100%.pem".into()),
            token: None,
        };
        assert_eq!(
            proxy_command("/usr/bin/lab", &reach, "h1", 22),
            "'/usr/bin/lab' --server 'https://lab:7621' --ca '/etc/lab/it'\\''s 100%%.pem' forward 'h1' 22"
        );
    }

    #[test]
    fn ssh_gets_the_proxy_the_key_and_the_command() {
        let a = parse(&[
            "h1",
            "--port",
            "2222",
            "-o",
            "ConnectTimeout=5",
            "--",
            "echo",
            "hi there",
        ]);
        let v = ssh_args(&a, "PROXY", Some("/home/a/.ssh/id_ed25519".into()));
        assert_eq!(
            v,
            [
                "-o",
                "ProxyCommand=PROXY",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "IdentitiesOnly=yes",
                "-i",
                "/home/a/.ssh/id_ed25519",
                "-o",
                "ConnectTimeout=5",
                "-l",
                "root",
                "--",
                "h1",
                "echo",
                "hi there"
            ]
        );
        assert_eq!(a.port, 2222);
        let plain = ssh_args(&parse(&["h1", "-l", "xen"]), "P", None);
        assert_eq!(plain[plain.len() - 4..], ["-l", "xen", "--", "h1"]);
    }

    #[test]
    fn exit_codes_of_children() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143, "SIGTERM");
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137, "SIGKILL");
    }
}
