//! The Debian packages as an operator gets them (docs/deploy.md):
//! `packaging/build-debs.sh` builds lab-server, lab-agent, lab and
//! lab-pxe-assets; they are installed with `dpkg -i` into a fresh Debian
//! bookworm root (mmdebstrap, minbase plus systemd; cached as a tarball in
//! `.cache/rootfs/`, rebuilt after 30 days) and checked: the files, the
//! user `lab`, modes and owners, the units (enabled or not,
//! `systemd-analyze verify` and `security` against that root), the
//! binaries running in the root, `lab-server token new --tokens-file` on
//! the installed tokens file, lab-server starting as `lab` with the shipped
//! configuration; then `dpkg -r` and `dpkg --purge` must leave the root as
//! it was before the install, path for path. `units_run_under_systemd`
//! then boots such a root with systemd-nspawn and runs both units for real,
//! every sandboxing option applied.
//!
//! The packages hold the release binaries when `target/release` has all
//! three and they are newer than the debug ones, else the debug binaries
//! the other tests use (no release build here: it costs minutes on two
//! cores); `LAB_DEB_PROFILE=release|dev` forces one.
//!
//! The install test needs root (chroot, dpkg) and is skipped otherwise, with
//! a message; the checks of the shipped configuration files, unit files and
//! man pages run everywhere. Packages: mmdebstrap, systemd
//! (systemd-analyze), systemd-container (systemd-nspawn), man-db; busybox,
//! curl and python3 for the boot clients; cargo-deb (scripts/deps.sh).

use lab_tests::bin_path;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Run a command; its stdout, or a panic with both outputs.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ------------------------------------------------------------ no root ----

#[test]
fn shipped_configuration_files_are_valid() {
    let etc = repo().join("packaging/etc");
    let inv = lab_server::inventory::Inventory::load(&etc.join("inventory.toml"))
        .unwrap_or_else(|e| panic!("{}", lab_server::core::error_chain(&e)));
    drop(inv);
    lab_server::auth::Authenticator::load(&etc.join("tokens.toml"))
        .unwrap_or_else(|e| panic!("{}", lab_server::core::error_chain(&e)));
    let agent = lab_agent::config::AgentConfig::load(&etc.join("agent.toml"))
        .unwrap_or_else(|e| panic!("{}", lab_server::core::error_chain(&e)));
    assert_eq!(agent.rack, "rack1");
    assert_eq!(
        agent.data_dir,
        Path::new("/var/lib/lab/agent"),
        "the agent's data must be under the unit's ReadWritePaths"
    );
    assert_eq!(agent.assets_root, Path::new("/usr/share/lab/pxe-assets"));
    // server.env: only comments and LAB_*/other variable assignments.
    let env = std::fs::read_to_string(etc.join("server.env")).unwrap();
    for line in env.lines() {
        let l = line.trim_start_matches('#');
        assert!(
            line.is_empty() || line.starts_with('#') || l.contains('='),
            "server.env: {line:?}"
        );
    }
}

#[test]
fn the_template_unit_is_the_single_unit_per_rack() {
    let dir = repo().join("packaging/lab-agent");
    let one = std::fs::read_to_string(dir.join("lab-agent.service")).unwrap();
    let many = std::fs::read_to_string(dir.join("lab-agent@.service")).unwrap();
    let body = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                !l.starts_with('#')
                    && !l.starts_with("Description=")
                    && !l.starts_with("Environment=LAB_AGENT_CONFIG=")
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(
        body(&one),
        body(&many),
        "lab-agent.service and lab-agent@.service must differ only in their description and config"
    );
    assert!(many.contains("Environment=LAB_AGENT_CONFIG=/etc/lab/agent-%i.toml"));
    assert!(one.contains("Environment=LAB_AGENT_CONFIG=/etc/lab/agent.toml"));
}

/// `systemd-analyze security --offline` exposure of each unit file, printed
/// and bounded so that a weakened sandbox shows up.
#[test]
fn units_are_hardened() {
    for (unit, max) in [
        ("lab-server/lab-server.service", 1.5),
        ("lab-agent/lab-agent.service", 2.0),
        ("lab-agent/lab-agent@.service", 2.0),
    ] {
        let path = repo().join("packaging").join(unit);
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path));
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{out}"));
        let score: f64 = line
            .split(": ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {line:?}"));
        eprintln!("{unit}: exposure {score}");
        assert!(score <= max, "{unit}: exposure {score} > {max}:\n{out}");
    }
}

/// Each binary's man pages (its hidden `manpage DIR`), rendered by
/// `man -l` with groff warnings on: no warning, and the NAME section.
#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, pages) in [
        (
            "lab",
            &["lab.1", "lab-lease-acquire.1", "lab-completions.1"][..],
        ),
        ("lab-server", &["lab-server.1", "lab-server-token-new.1"]),
        ("lab-agent", &["lab-agent.1"]),
    ] {
        let out = dir.path().join(bin);
        run(Command::new(bin_path(bin)).arg("manpage").arg(&out));
        let written: BTreeSet<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for p in pages {
            assert!(written.contains(*p), "{bin} wrote {written:?}, not {p}");
        }
        for page in &written {
            let o = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(out.join(page))
                .env("MANWIDTH", "80")
                .env("LC_ALL", "C.UTF-8")
                .output()
                .expect("man (package man-db)");
            let text = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() && err.trim().is_empty(),
                "man -l {page}: {}\n{err}",
                o.status
            );
            assert!(
                text.contains("NAME") && text.contains("SYNOPSIS"),
                "{page}:\n{text}"
            );
        }
    }
}

// -------------------------------------------------- install (root) ----

/// The debug or release binaries to package (see the module docs).
fn profile() -> &'static str {
    match std::env::var("LAB_DEB_PROFILE").as_deref() {
        Ok("release") => return "release",
        Ok("dev") => return "dev",
        Ok(other) => panic!("LAB_DEB_PROFILE={other}: release or dev"),
        Err(_) => {}
    }
    let target = bin_path("lab")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let newer = |b: &str| -> bool {
        let m = |p: PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        match (m(target.join("release").join(b)), m(bin_path(b))) {
            (Some(r), Some(d)) => r >= d,
            (Some(_), None) => true,
            _ => false,
        }
    };
    if ["lab", "lab-server", "lab-agent"].iter().all(|b| newer(b)) {
        "release"
    } else {
        "dev"
    }
}

/// The cached bookworm root tarball, made by mmdebstrap when missing or
/// older than 30 days.
fn rootfs_tarball() -> PathBuf {
    let dir = match std::env::var_os("XDG_CACHE_HOME") {
        Some(c) => PathBuf::from(c).join("lab/rootfs"),
        None => repo().join(".cache/rootfs"),
    };
    std::fs::create_dir_all(&dir).unwrap();
    if !dir.parent().unwrap().join(".gitignore").exists() && dir.starts_with(repo()) {
        std::fs::write(dir.parent().unwrap().join(".gitignore"), "*\n").unwrap();
    }
    let tar = dir.join("bookworm-minbase-systemd.tar");
    let fresh = std::fs::metadata(&tar)
        .and_then(|m| m.modified())
        .is_ok_and(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age < Duration::from_secs(30 * 86400))
        });
    if !fresh {
        eprintln!(
            "building the bookworm root with mmdebstrap (cached in {})",
            dir.display()
        );
        let tmp = dir.join("bookworm-minbase-systemd.tar.tmp");
        run(Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--variant=minbase",
                "--mode=root",
                "--include=systemd,procps",
                "--format=tar",
                "bookworm",
            ])
            .arg(&tmp));
        std::fs::rename(&tmp, &tar).unwrap();
    }
    tar
}

/// Every path under `root` (relative, with a trailing `/` for
/// directories), except dpkg's own database and the logs and caches that
/// any dpkg run changes.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if [
                "var/lib/dpkg",
                "var/log",
                "var/cache/ldconfig",
                "tmp",
                "etc/ld.so.cache",
            ]
            .iter()
            .any(|skip| rel == *skip || rel.starts_with(&format!("{skip}/")))
            {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// The bookworm root, extracted; deleted on drop.
struct Root(tempfile::TempDir);

impl Root {
    fn path(&self) -> &Path {
        self.0.path()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path().join(rel.trim_start_matches('/'))
    }

    /// `sh -c script` inside the root (as root); stdout.
    fn sh(&self, script: &str) -> String {
        run(Command::new("chroot")
            .arg(self.path())
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C.UTF-8"))
    }

    /// Like `sh`, but returns (success, stdout, stderr).
    fn try_sh(&self, script: &str) -> (bool, String, String) {
        let out = Command::new("chroot")
            .arg(self.path())
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn owner_mode(&self, rel: &str) -> (String, u32) {
        let m = std::fs::symlink_metadata(self.p(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let name = |db: &str, id: u32| -> String {
            self.sh(&format!("getent {db} {id} | cut -d: -f1"))
                .trim()
                .to_owned()
        };
        (
            format!("{}:{}", name("passwd", m.uid()), name("group", m.gid())),
            m.mode() & 0o7777,
        )
    }
}

fn require_tools(tools: &[(&str, &str)]) {
    for (tool, package) in tools {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(ok, "`{tool}` is missing: install {package}");
    }
}

/// The four packages, built once per test run into
/// `target/<profile>/lab-debs-test/`.
fn debs() -> &'static [PathBuf] {
    static DEBS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DEBS.get_or_init(|| {
        let profile = profile();
        eprintln!("packaging the {profile} binaries");
        let out = bin_path("lab").parent().unwrap().join("lab-debs-test");
        let _ = std::fs::remove_dir_all(&out);
        let built = run(Command::new(repo().join("packaging/build-debs.sh"))
            .args(["--no-build", "--fast", "--profile", profile, "--out"])
            .arg(&out));
        let files: Vec<PathBuf> = built.lines().map(PathBuf::from).collect();
        let names: BTreeSet<String> = files
            .iter()
            .map(|f| {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                name.split('_').next().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            names,
            ["lab", "lab-agent", "lab-pxe-assets", "lab-server"]
                .map(String::from)
                .into(),
            "{built}"
        );
        files
    })
}

/// A fresh bookworm root from the cached tarball.
fn extract_root() -> Root {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    let tar = TARBALL.get_or_init(rootfs_tarball);
    let root = Root(tempfile::tempdir().unwrap());
    run(Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-xf")
        .arg(tar));
    root
}

#[test]
fn debs_install_into_bookworm_and_purge_cleanly() {
    if !is_root() {
        eprintln!(
            "SKIPPED debs_install_into_bookworm_and_purge_cleanly: needs root (chroot, dpkg); CI runs as root"
        );
        return;
    }
    require_tools(&[
        (
            "cargo-deb",
            "cargo-deb (scripts/deps.sh: cargo install cargo-deb)",
        ),
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-analyze", "systemd"),
    ]);
    let files = debs();
    let root = extract_root();
    let before = tree(root.path());
    for f in files {
        std::fs::copy(f, root.p("tmp").join(f.file_name().unwrap())).unwrap();
    }

    // Install.
    root.sh("dpkg -i /tmp/*.deb");
    check_installed(&root);
    // Installing again (what an upgrade runs) changes nothing that matters.
    root.sh("dpkg -i /tmp/*.deb");
    assert_eq!(
        root.owner_mode("/etc/lab/tokens.toml"),
        ("root:lab".into(), 0o640)
    );
    check_tokens_and_start(&root);
    check_units(&root);

    // Remove: programs and units go; configuration, data and user stay.
    root.sh("dpkg -r lab lab-pxe-assets lab-agent lab-server");
    for gone in [
        "usr/bin/lab",
        "usr/bin/lab-server",
        "usr/lib/systemd/system/lab-server.service",
    ] {
        assert!(!root.p(gone).exists(), "{gone} left after dpkg -r");
    }
    assert!(
        root.p("etc/lab/tokens.toml").exists(),
        "conffiles stay after dpkg -r"
    );
    assert!(
        root.p("var/lib/lab/lab.redb").exists(),
        "data stays after dpkg -r"
    );
    root.sh("getent passwd lab >/dev/null");

    // Purge: nothing of ours is left, path for path.
    root.sh("dpkg --purge lab lab-pxe-assets lab-agent lab-server");
    let after = tree(root.path());
    let added: Vec<_> = after.difference(&before).collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "purge left {added:?} and took {removed:?}"
    );
    let (ok, _, _) = root.try_sh("getent passwd lab || getent group lab");
    assert!(!ok, "the user or group lab is left after the purge");
    let (_, overrides, _) = root.try_sh("dpkg-statoverride --list");
    assert_eq!(overrides, "", "a statoverride is left");
}

fn check_installed(root: &Root) {
    let executables = ["/usr/bin/lab", "/usr/bin/lab-server", "/usr/bin/lab-agent"];
    for f in executables {
        assert_eq!(root.owner_mode(f), ("root:root".into(), 0o755), "{f}");
    }
    for f in [
        "/usr/share/man/man1/lab.1.gz",
        "/usr/share/man/man1/lab-lease-acquire.1.gz",
        "/usr/share/man/man1/lab-server.1.gz",
        "/usr/share/man/man1/lab-server-token-new.1.gz",
        "/usr/share/man/man1/lab-agent.1.gz",
        "/usr/share/bash-completion/completions/lab",
        "/usr/share/zsh/vendor-completions/_lab",
        "/usr/share/fish/vendor_completions.d/lab.fish",
        "/usr/lib/systemd/system/lab-server.service",
        "/usr/lib/systemd/system/lab-agent.service",
        "/usr/lib/systemd/system/lab-agent@.service",
        "/usr/share/lab/pxe-assets/boot.ipxe",
        "/usr/share/lab/pxe-assets/grub/grub.cfg",
        "/usr/share/lab/pxe-assets/profiles/xen.ipxe.j2",
        "/usr/share/lab/pxe-assets/initramfs/init",
        "/usr/share/doc/lab-server/examples/inventory.toml",
        "/usr/share/doc/lab-server/deploy.md",
        "/usr/share/doc/lab-agent/examples/agent.example.toml",
    ] {
        assert!(root.p(f).is_file(), "{f} is not installed");
    }
    assert_eq!(
        root.owner_mode("/usr/share/lab/pxe-assets/fetch-artifacts.sh"),
        ("root:root".into(), 0o755)
    );
    // Configuration: secrets readable by lab-server's user only.
    for (f, owner, mode) in [
        ("/etc/lab/tokens.toml", "root:lab", 0o640),
        ("/etc/lab/server.env", "root:root", 0o600),
        ("/etc/lab/inventory.toml", "root:root", 0o644),
        ("/etc/lab/agent.toml", "root:root", 0o644),
        ("/etc/lab/webhooks.toml", "root:root", 0o644),
        ("/etc/lab/policy.toml", "root:root", 0o644),
        ("/var/lib/lab", "lab:lab", 0o750),
    ] {
        assert_eq!(root.owner_mode(f), (owner.into(), mode), "{f}");
    }
    let conffiles = root.sh("dpkg-query -W -f='${Conffiles}\\n' lab-server lab-agent");
    for f in [
        "/etc/lab/tokens.toml",
        "/etc/lab/inventory.toml",
        "/etc/lab/server.env",
        "/etc/lab/agent.toml",
        "/etc/lab/webhooks.toml",
        "/etc/lab/policy.toml",
    ] {
        assert!(conffiles.contains(f), "{f} is not a conffile:\n{conffiles}");
    }
    // The system user.
    let pw = root.sh("getent passwd lab");
    let f: Vec<&str> = pw.trim().split(':').collect();
    assert!(
        f[2].parse::<u32>().unwrap() < 1000,
        "lab is a system user: {pw}"
    );
    assert_eq!((f[5], f[6]), ("/var/lib/lab", "/usr/sbin/nologin"), "{pw}");
    // lab-server is enabled; the agents wait for their configuration.
    let wants = root.p("etc/systemd/system/multi-user.target.wants");
    // (absolute links, meant for inside the root)
    assert_eq!(
        std::fs::read_link(wants.join("lab-server.service")).ok(),
        Some(PathBuf::from("/lib/systemd/system/lab-server.service")),
        "lab-server is not enabled"
    );
    assert!(
        std::fs::symlink_metadata(wants.join("lab-agent.service")).is_err(),
        "lab-agent must not be enabled"
    );
    // The binaries run in a bare bookworm (their libraries are there).
    for b in ["lab", "lab-server", "lab-agent"] {
        assert!(root.sh(&format!("{b} --version")).starts_with(b));
    }
    // The installed completion completes subcommands.
    let got = root.sh(
        "bash -c '. /usr/share/bash-completion/completions/lab; COMP_WORDS=(lab lease acq); \
         COMP_CWORD=2; _lab lab acq lease; echo \"${COMPREPLY[@]}\"'",
    );
    assert_eq!(got.trim(), "acquire", "bash completion of `lab lease acq`");
}

fn check_tokens_and_start(root: &Root) {
    // token new --tokens-file: appended, mode and owner kept, token once.
    let out = root.sh(
        "lab-server token new --principal agent-rack1 --role agent --tokens-file /etc/lab/tokens.toml",
    );
    let token = out.trim();
    assert!(
        token.starts_with("lab_") && token.len() == 68 && !token.contains('\n'),
        "stdout is the token alone: {out:?}"
    );
    let text = std::fs::read_to_string(root.p("etc/lab/tokens.toml")).unwrap();
    assert!(text.contains("principal = \"agent-rack1\"\nrole = \"agent\"\nsha256 = \""));
    assert!(!text.contains(token), "the token itself is not stored");
    assert_eq!(
        root.owner_mode("/etc/lab/tokens.toml"),
        ("root:lab".into(), 0o640)
    );
    let (ok, _, err) = root.try_sh(
        "lab-server token new --principal agent-rack1 --role agent --tokens-file /etc/lab/tokens.toml",
    );
    assert!(
        !ok && err.contains("already has a token"),
        "duplicate: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(root.p("etc/lab/tokens.toml")).unwrap(),
        text
    );

    // lab-server as the user lab with the unit's environment and the
    // shipped files: it reads the tokens (group lab) and writes its store.
    let (ok, out, err) = root.try_sh(
        "cd /; LAB_INVENTORY=/etc/lab/inventory.toml LAB_TOKENS=/etc/lab/tokens.toml \
         LAB_DATA_DIR=/var/lib/lab LAB_LISTEN=127.0.0.1:0 \
         setpriv --reuid=lab --regid=lab --init-groups --inh-caps=-all --bounding-set=-all \
         timeout --preserve-status -s TERM 3 lab-server; echo exit=$?",
    );
    assert!(
        ok && out.contains("lab-server listening on 127.0.0.1:") && out.contains("exit=0"),
        "lab-server as lab: {out}\n{err}"
    );
    assert_eq!(root.owner_mode("/var/lib/lab/lab.redb").0, "lab:lab");
}

fn check_units(root: &Root) {
    let man = root.p("usr/share/man");
    for unit in [
        "lab-server.service",
        "lab-agent.service",
        "lab-agent@.service",
    ] {
        // verify: syntax, the ExecStart binaries, the man pages named by
        // Documentation= (looked up in the root).
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(root.p("usr/lib/systemd/system").join(unit))
            .env("MANPATH", &man)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify {unit}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", root.path().display()))
        .args(["lab-server.service", "lab-agent.service"]));
    for l in out.lines().filter(|l| l.contains("Overall exposure level")) {
        eprintln!("installed: {}", l.trim_start_matches("→ "));
    }
}

// ---------------------------------------- under systemd (root) ----

/// The root booted by systemd-nspawn with its own network namespace
/// (`--private-network`: only loopback until the test adds a link);
/// powered off (SIGTERM to nspawn), then killed, on drop.
struct Container {
    nspawn: std::process::Child,
    log: PathBuf,
}

impl Container {
    fn boot(root: &Root, log: PathBuf) -> Container {
        use std::os::unix::process::CommandExt;
        let nspawn = Command::new("systemd-nspawn")
            .args([
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--boot",
                "-D",
            ])
            .arg(root.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("systemd-nspawn (package systemd-container)");
        let c = Container { nspawn, log };
        // Readiness: systemd's own account of its boot.
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let (_, state, _) = c.try_sh("systemctl is-system-running --wait");
            if matches!(state.trim(), "running" | "degraded") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the container did not boot ({state:?}):\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The container's init, as the host sees it.
    fn init_pid(&self) -> Option<u32> {
        let pid = self.nspawn.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// `sh -c script` inside the container, in all its namespaces:
    /// (success, stdout, stderr).
    fn try_sh(&self, script: &str) -> (bool, String, String) {
        let Some(init) = self.init_pid() else {
            return (false, String::new(), "no init yet".into());
        };
        let out = Command::new("nsenter")
            .args(["-t", &init.to_string(), "-a", "/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn sh(&self, script: &str) -> String {
        let (ok, out, err) = self.try_sh(script);
        assert!(ok, "in the container: {script}\n{out}{err}");
        out
    }

    /// `ip ARGS` (the host's) in the container's network namespace.
    fn ip(&self, args: &[&str]) {
        let init = self.init_pid().unwrap().to_string();
        let mut all = vec!["-t", &init, "-n", "ip"];
        all.extend_from_slice(args);
        lab_tests::netns::run("nsenter", &all);
    }

    /// Wait (30 s at most) until `unit`'s journal has `text`.
    fn wait_journal(&self, unit: &str, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, log, _) = self.try_sh(&format!("journalctl -u {unit} -o cat --no-pager"));
            if log.contains(text) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{unit} never logged {text:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Uid, CapEff, CapBnd, CapAmb, NoNewPrivs and Seccomp of `unit`'s
    /// main process.
    fn sandbox_of(&self, unit: &str) -> BTreeSet<String> {
        let out = self.sh(&format!(
            "grep -E '^(Uid|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' \
             /proc/$(systemctl show -p MainPID --value {unit})/status"
        ));
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.nspawn.id() as i32));
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.nspawn.try_wait().ok().flatten().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.nspawn.wait();
        if std::thread::panicking() {
            eprintln!("--- container console ---\n{}", self.log_text());
        }
    }
}

/// The units as systemd runs them, with every sandboxing option applied:
/// the installed root boots under systemd-nspawn; lab-server (enabled by
/// the package) is up as `lab` with no capability, seccomp and
/// no-new-privs, answers `lab whoami`, and `systemctl reload` makes a token
/// added afterwards work; lab-agent, started with the shipped
/// `/etc/lab/agent.toml` (its interface name changed), attaches and, with
/// exactly CAP_NET_BIND_SERVICE and CAP_NET_RAW, answers udhcpc, TFTP, HTTP
/// and a router solicitation from a namespace on the other end of a veth
/// pair; both stop cleanly.
#[test]
fn units_run_under_systemd() {
    if !is_root() {
        eprintln!(
            "SKIPPED units_run_under_systemd: needs root (nspawn, namespaces); CI runs as root"
        );
        return;
    }
    require_tools(&[
        (
            "cargo-deb",
            "cargo-deb (scripts/deps.sh: cargo install cargo-deb)",
        ),
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("busybox", "busybox-static"),
        ("curl", "curl"),
        ("python3", "python3"),
    ]);
    let root = extract_root();
    for f in debs() {
        std::fs::copy(f, root.p("tmp").join(f.file_name().unwrap())).unwrap();
    }
    root.sh("dpkg -i /tmp/*.deb");
    // What an operator does (docs/deploy.md): tokens, the inventory, the
    // agent's token and configuration.
    let tokens = "--tokens-file /etc/lab/tokens.toml";
    root.sh(&format!(
        "lab-server token new --principal alice --role operator {tokens} > /root/alice.token && \
         install -m 0640 -o root -g lab /dev/null /etc/lab/agent.token && \
         lab-server token new --principal agent-rack1 --role agent {tokens} > /etc/lab/agent.token"
    ));
    let inventory = root.p("etc/lab/inventory.toml");
    let mut inv = std::fs::read_to_string(&inventory).unwrap();
    inv.push_str(
        "\n[[host]]\nname = \"h1\"\narch = \"x86_64\"\nfirmware = \"bios\"\nrack = \"rack1\"\n\
         mac = \"52:54:00:ca:fe:01\"\nipv4 = \"198.18.0.10\"\n",
    );
    std::fs::write(&inventory, inv).unwrap();
    let agent_toml = root.p("etc/lab/agent.toml");
    let shipped = std::fs::read_to_string(&agent_toml).unwrap();
    assert!(shipped.contains("interface = \"eth1\""));
    std::fs::write(
        &agent_toml,
        shipped.replace("interface = \"eth1\"", "interface = \"veth-lab\""),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let c = Container::boot(&root, dir.path().join("console.log"));

    // lab-server, as the package left it: enabled, running, sandboxed.
    assert_eq!(c.sh("systemctl is-active lab-server").trim(), "active");
    let lab_uid = c.sh("id -u lab").trim().to_owned();
    let sandbox = c.sandbox_of("lab-server");
    for want in [
        format!("Uid: {lab_uid} {lab_uid} {lab_uid} {lab_uid}"),
        "CapEff: 0000000000000000".to_owned(),
        "CapBnd: 0000000000000000".to_owned(),
        "NoNewPrivs: 1".to_owned(),
        "Seccomp: 2".to_owned(),
    ] {
        assert!(
            sandbox.contains(&want),
            "lab-server: {want:?} not in {sandbox:?}"
        );
    }
    let whoami = c.sh("LAB_TOKEN=$(cat /root/alice.token) lab whoami");
    assert!(
        whoami.contains("alice") && whoami.contains("operator"),
        "{whoami}"
    );
    // ExecReload: a token added now works after `systemctl reload`.
    c.sh(&format!(
        "lab-server token new --principal bob --role ci {tokens} > /root/bob.token"
    ));
    let (ok, _, _) = c.try_sh("LAB_TOKEN=$(cat /root/bob.token) lab whoami");
    assert!(!ok, "bob's token works before the reload");
    c.sh("systemctl reload lab-server");
    c.wait_journal("lab-server", "tokens reloaded on SIGHUP");
    assert!(
        c.sh("LAB_TOKEN=$(cat /root/bob.token) lab whoami")
            .contains("bob")
    );

    // The boot network: veth-lab in the container, veth-cli in a client
    // namespace with the host's MAC.
    let cli = lab_tests::netns::Netns::new("units-cli");
    // (made inside the two namespaces: nothing appears in the host's)
    let init = c.init_pid().unwrap().to_string();
    cli.ip(&[
        "link", "add", "veth-cli", "type", "veth", "peer", "name", "veth-lab", "netns", &init,
    ]);
    c.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth-lab"]);
    c.ip(&["link", "set", "veth-lab", "up"]);
    cli.ip(&["link", "set", "veth-cli", "address", "52:54:00:ca:fe:01"]);
    cli.ip(&["link", "set", "veth-cli", "up"]);

    // lab-agent: started by hand (not enabled by the package), sandboxed,
    // with exactly its two capabilities.
    c.sh("systemctl start lab-agent");
    c.wait_journal(
        "lab-agent",
        "lab-agent attached to http://127.0.0.1:7621 (1 hosts)",
    );
    let sandbox = c.sandbox_of("lab-agent");
    for want in [
        format!("Uid: {lab_uid} {lab_uid} {lab_uid} {lab_uid}"),
        "CapEff: 0000000000002400".to_owned(),
        "CapBnd: 0000000000002400".to_owned(),
        "CapAmb: 0000000000002400".to_owned(),
        "NoNewPrivs: 1".to_owned(),
        "Seccomp: 2".to_owned(),
    ] {
        assert!(
            sandbox.contains(&want),
            "lab-agent: {want:?} not in {sandbox:?}"
        );
    }
    let lease = cli.udhcpc("veth-cli", dir.path()).unwrap_or_else(|out| {
        panic!(
            "udhcpc got no lease:\n{out}\n{}",
            c.sh("journalctl -u lab-agent -o cat --no-pager")
        )
    });
    assert_eq!(lease, "ip=198.18.0.10 serverid=198.18.0.1");
    cli.ip(&["addr", "add", "198.18.0.10/24", "dev", "veth-cli"]);
    let file = "hosts/52-54-00-ca-fe-01.ipxe";
    for url in [
        format!("tftp://198.18.0.1/{file}"),
        format!("http://198.18.0.1/{file}"),
    ] {
        let (ok, body, err) = cli.output(&["curl", "-fsS", "--max-time", "10", &url]);
        assert!(ok && body.starts_with("#!ipxe"), "{url}: {err}{body}");
    }
    let (ra, _) = cli
        .solicit_router("veth-cli")
        .unwrap_or_else(|e| panic!("no router advertisement: {e}"));
    assert!(ra.starts_with("86"), "{ra}");

    // Both stop cleanly (SIGTERM), not as failed.
    c.sh("systemctl stop lab-agent lab-server");
    for unit in ["lab-agent", "lab-server"] {
        let (_, state, _) = c.try_sh(&format!("systemctl is-active {unit}"));
        assert_eq!(state.trim(), "inactive", "{unit} after stop");
    }
}
