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
//! it was before the install, path for path.
//!
//! The packages hold the release binaries when `target/release` has all
//! three and they are newer than the debug ones, else the debug binaries
//! the other tests use (no release build here: it costs minutes on two
//! cores); `LAB_DEB_PROFILE=release|dev` forces one.
//!
//! The install test needs root (chroot, dpkg) and is skipped otherwise, with
//! a message; the checks of the shipped configuration files, unit files and
//! man pages run everywhere. Packages: mmdebstrap, systemd
//! (systemd-analyze), man-db; cargo-deb (scripts/deps.sh).

use lab_tests::bin_path;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

#[test]
fn debs_install_into_bookworm_and_purge_cleanly() {
    if !is_root() {
        eprintln!(
            "SKIPPED debs_install_into_bookworm_and_purge_cleanly: needs root (chroot, dpkg); CI runs as root"
        );
        return;
    }
    for (tool, package) in [
        (
            "cargo-deb",
            "cargo-deb (scripts/deps.sh: cargo install cargo-deb)",
        ),
        ("mmdebstrap", "mmdebstrap"),
        ("systemd-analyze", "systemd"),
    ] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(ok, "`{tool}` is missing: install {package}");
    }

    // Build the packages.
    let profile = profile();
    eprintln!("packaging the {profile} binaries");
    let debs = tempfile::tempdir().unwrap();
    let built = run(Command::new(repo().join("packaging/build-debs.sh"))
        .args(["--no-build", "--fast", "--profile", profile, "--out"])
        .arg(debs.path()));
    let files: Vec<PathBuf> = built.lines().map(PathBuf::from).collect();
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .split('_')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        ["lab", "lab-agent", "lab-pxe-assets", "lab-server"]
            .map(String::from)
            .into(),
        "{built}"
    );

    // A fresh root.
    let tar = rootfs_tarball();
    let root = Root(tempfile::tempdir().unwrap());
    run(Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-xf")
        .arg(&tar));
    let before = tree(root.path());
    for f in &files {
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
