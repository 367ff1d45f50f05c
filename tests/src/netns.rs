//! Network namespaces for process tests, and the clients the tests run in
//! them (busybox `udhcpc`, a router solicitation). Root only; nothing here
//! touches the root namespace's network.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A network namespace with `lo` up and IPv6 duplicate address detection
/// off (link-local addresses usable at once), deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// `lab-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "lab-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self(name);
        for key in ["default", "all"] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ]);
        }
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `ip netns exec <ns> <args>`, which must succeed.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `ip netns exec <ns> <argv>`, to be run by the caller.
    pub fn command(&self, argv: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(argv);
        c
    }

    /// Run `argv` in the namespace: (success, stdout, stderr).
    pub fn output(&self, argv: &[&str]) -> (bool, String, String) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let out = self.command(&argv).output().expect("ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// busybox `udhcpc` on `iface` (5 tries, 1 s apart): `ip=… serverid=…`
    /// of the lease it got, or its output when it got none. `dir` holds its
    /// script.
    pub fn udhcpc(&self, iface: &str, dir: &Path) -> Result<String, String> {
        let lease = dir.join("udhcpc-lease.env");
        let script = dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] && echo \"ip=$ip serverid=$serverid\" > '{}'\nexit 0\n",
                lease.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (ok, out, err) = self.output(&[
            "busybox",
            "udhcpc",
            "-f",
            "-i",
            iface,
            "-n",
            "-q",
            "-t",
            "5",
            "-T",
            "1",
            "-s",
            &script.display().to_string(),
        ]);
        match std::fs::read_to_string(&lease) {
            Ok(l) if ok => Ok(l.trim().to_owned()),
            _ => Err(format!("{out}{err}")),
        }
    }

    /// Send a router solicitation on `iface` and wait (5 s at most) for a
    /// router advertisement (python3, a raw ICMPv6 socket): its bytes in
    /// hex and its source address, or why there was none.
    pub fn solicit_router(&self, iface: &str) -> Result<(String, String), String> {
        let (ok, out, err) = self.output(&["python3", "-c", SOLICIT, iface]);
        match out.trim().split_once(' ') {
            Some((ra, src)) if ok => Ok((ra.to_owned(), src.to_owned())),
            _ => Err(format!("{out}{err}")),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

const SOLICIT: &str = r#"
import socket, sys, select
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
ifindex = socket.if_nametoindex(sys.argv[1])
s.sendto(bytes([133, 0, 0, 0, 0, 0, 0, 0]), ("ff02::2", 0, 0, ifindex))
while True:
    r, _, _ = select.select([s], [], [], 5)
    if not r:
        sys.exit("no router advertisement within 5 s")
    msg, src = s.recvfrom(1500)
    if msg[0] == 134:
        print(msg.hex(), src[0])
        break
"#;

/// Run a command that must succeed.
pub fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `f` on a thread of its own inside the network namespace `ns` (its
/// sockets are that namespace's): the way a test talks to an address that
/// exists only there without a process per request.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
