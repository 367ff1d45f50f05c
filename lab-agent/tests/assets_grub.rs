//! The GRUB path for aarch64 UEFI hosts: `pxe-assets/grub/grub.cfg` (the
//! fixed first stage GRUB reads from its prefix) sources
//! `hosts/${net_default_mac}.grub`, which [`BootFiles`] renders from the
//! host's current profile (`profiles/NAME.grub.j2`), loading Xen, the
//! kernel and the initrd from GRUB's TFTP server, or with `[http] grub =
//! true` from the agent's HTTP server through GRUB's `http` module. Golden
//! files for the xen and local-disk configs are in `tests/fixtures/grub/`
//! (regenerate with `UPDATE_GOLDEN=1`).

use lab_agent::assets::boot::BootFiles;
use lab_agent::assets::render::{Profiles, RenderConfig};
use lab_agent::assets::{Content, FileSource, OpenError};
use lab_agent::hosts::{Arch, BootHost, Firmware, HostTable};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

const ARM_MAC: &str = "52:54:00:aa:00:01";
const X86_MAC: &str = "52:54:00:12:34:56";

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets")
}

fn config() -> RenderConfig {
    RenderConfig {
        http_url: Some("http://198.18.0.1:8080".into()),
        tftp_server: Some("198.18.0.1".parse().unwrap()),
        artifacts_url: None,
        grub_http: false,
        extra: BTreeMap::new(),
    }
}

/// As [`config`], with `[http] grub = true`: GRUB loads over HTTP.
fn http_config() -> RenderConfig {
    RenderConfig {
        grub_http: true,
        ..config()
    }
}

fn arm(profile: &str, lease: Option<&str>) -> BootHost {
    BootHost {
        name: "arm1".into(),
        mac: ARM_MAC.parse().unwrap(),
        ipv4: Some("198.18.0.11".parse().unwrap()),
        arch: Arch::Aarch64,
        firmware: Firmware::Uefi,
        profile: profile.into(),
        lease: lease.map(Into::into),
        holder: None,
        ssh_key: None,
    }
}

fn x86(profile: &str, lease: Option<&str>) -> BootHost {
    BootHost {
        name: "x1".into(),
        mac: X86_MAC.parse().unwrap(),
        ipv4: Some("198.18.0.10".parse().unwrap()),
        arch: Arch::X86_64,
        firmware: Firmware::Bios,
        profile: profile.into(),
        lease: lease.map(Into::into),
        holder: None,
        ssh_key: None,
    }
}

fn files(hosts: impl IntoIterator<Item = BootHost>) -> BootFiles {
    files_with(hosts, config())
}

fn files_with(hosts: impl IntoIterator<Item = BootHost>, config: RenderConfig) -> BootFiles {
    BootFiles::new(&assets(), None, HostTable::new(hosts), config).expect("boot files")
}

fn text(c: Result<Content, OpenError>) -> String {
    match c {
        Ok(Content::Bytes(b)) => String::from_utf8(b).unwrap(),
        Ok(Content::File { mut file, .. }) => {
            let mut s = String::new();
            file.read_to_string(&mut s).unwrap();
            s
        }
        Err(e) => panic!("not served: {e}"),
    }
}

#[test]
fn grub_cfg_sources_the_per_host_config_by_mac() {
    let f = files([arm("xen", None)]);
    // GRUB's prefix is (tftp,<server>)/grub: it asks for /grub/grub.cfg.
    let cfg = text(f.open("/grub/grub.cfg", None));
    assert!(
        cfg.lines()
            .any(|l| l.trim() == "source /hosts/${net_default_mac}.grub"),
        "{cfg}"
    );
    // The flag the per-host configs set, tested after the source.
    assert!(cfg.contains("set lab_host=0"), "{cfg}");
    assert!(cfg.contains("if [ \"$lab_host\" != 1 ]; then"), "{cfg}");
    assert!(cfg.contains("LAB-BOOT-FAILED"), "{cfg}");
    assert!(cfg.lines().any(|l| l.trim() == "exit 1"), "{cfg}");
}

#[test]
fn per_host_grub_config_is_served_by_mac_with_colons_or_hyphens() {
    let f = files([arm("xen", Some("L-7"))]);
    // As GRUB asks for it ($net_default_mac: lower-case, colons) ...
    let a = text(f.open("/hosts/52:54:00:aa:00:01.grub", None));
    // ... and hyphenated, like the iPXE scripts.
    let b = text(f.open("hosts/52-54-00-aa-00-01.grub", None));
    assert_eq!(a, b);
    assert!(
        a.contains("LAB-GRUB profile=xen host=arm1 lease=L-7"),
        "{a}"
    );
    // An unknown MAC is not found (grub.cfg then reports it).
    assert!(matches!(
        f.open("hosts/52:54:00:aa:00:99.grub", None),
        Err(OpenError::NotFound)
    ));
    // Colons stay a GRUB thing: iPXE scripts are hyphenated only.
    assert!(matches!(
        f.open("hosts/52:54:00:aa:00:01.ipxe", None),
        Err(OpenError::NotFound)
    ));
    assert!(f.open("hosts/52-54-00-aa-00-01.ipxe", None).is_ok());
}

/// The `xen_hypervisor` line and the two `xen_module` lines of a rendered
/// xen GRUB config (trimmed).
fn xen_lines(out: &str) -> (String, Vec<String>) {
    let xen = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("if xen_hypervisor "))
        .unwrap_or_else(|| panic!("no xen_hypervisor line in:\n{out}"))
        .to_owned();
    let modules: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("if xen_module "))
        .map(str::to_owned)
        .collect();
    assert_eq!(modules.len(), 2, "{out}");
    (xen, modules)
}

#[test]
fn xen_on_arm64_loads_xen_the_kernel_and_the_initrd_over_the_agents_http() {
    let f = files_with([arm("xen", None)], http_config());
    let out = text(f.open("hosts/52:54:00:aa:00:01.grub", None));
    // With `[http] grub = true`, the agent's HTTP root (http_url,
    // http://198.18.0.1:8080) as GRUB's http device: GRUB fetches with its
    // http module over TCP, not with its 1024-byte lockstep TFTP.
    let root = "(http,198.18.0.1:8080)/artifacts";
    let (xen, modules) = xen_lines(&out);
    assert!(
        xen.starts_with(&format!("if xen_hypervisor {root}/xen-4.17-arm64 ")),
        "{xen}"
    );
    assert!(xen.contains("dom0_mem=256M") && xen.contains("bootscrub=0"));
    // Both gzipped and passed as they are: Xen unpacks the kernel, the
    // kernel its initramfs.
    assert!(
        modules[0].starts_with(&format!("if xen_module --nounzip {root}/vmlinuz-arm64.gz ")),
        "{}",
        modules[0]
    );
    assert!(
        modules[0].contains("console=hvc0") && modules[0].contains("lab.expect=dom0"),
        "{}",
        modules[0]
    );
    assert!(
        modules[1].starts_with(&format!(
            "if xen_module --nounzip {root}/initrd-labbox-arm64.gz"
        )),
        "{}",
        modules[1]
    );
    // Nothing of the boot is left on TFTP (a path without a device).
    assert!(!out.contains(" /artifacts/"), "{out}");
    assert!(out.lines().any(|l| l.trim() == "boot"), "{out}");
    // GRUB wraps long echo lines: markers stay short.
    for l in out.lines().filter(|l| l.trim_start().starts_with("echo ")) {
        assert!(l.len() <= 80, "echo line longer than 80 columns: {l}");
    }
}

#[test]
fn xen_on_arm64_follows_the_http_url_and_stays_on_tftp_by_default() {
    let host = arm("xen", Some("L-5"));
    let p = Profiles::load(&assets().join("profiles")).unwrap();
    // Another address, port and base path: the device and path follow it.
    let elsewhere = RenderConfig {
        http_url: Some("http://10.1.2.3:81/lab/".into()),
        ..http_config()
    };
    let (xen, modules) = xen_lines(&p.grub(&host, &elsewhere).unwrap());
    assert!(
        xen.starts_with("if xen_hypervisor (http,10.1.2.3:81)/lab/artifacts/xen-4.17-arm64 "),
        "{xen}"
    );
    for m in &modules {
        assert!(
            m.starts_with("if xen_module --nounzip (http,10.1.2.3:81)/lab/artifacts/"),
            "{m}"
        );
    }
    // The default (HTTP served, `grub` not set), no HTTP, or an https URL
    // (which GRUB 2.06 cannot fetch): every file from the TFTP server GRUB
    // came from.
    let https = RenderConfig {
        http_url: Some("https://198.18.0.1:8443".to_owned()),
        ..http_config()
    };
    let no_http = RenderConfig {
        http_url: None,
        ..http_config()
    };
    for tftp in [config(), no_http, https] {
        let out = p.grub(&host, &tftp).unwrap();
        let (xen, modules) = xen_lines(&out);
        assert!(
            xen.starts_with("if xen_hypervisor /artifacts/xen-4.17-arm64 "),
            "{xen}"
        );
        assert!(
            modules[0].starts_with("if xen_module --nounzip /artifacts/vmlinuz-arm64.gz "),
            "{}",
            modules[0]
        );
        assert!(
            modules[1].starts_with("if xen_module --nounzip /artifacts/initrd-labbox-arm64.gz"),
            "{}",
            modules[1]
        );
        assert!(!out.contains("(http,"), "{out}");
    }
}

#[test]
fn default_and_unsupported_profiles() {
    let p = Profiles::load(&assets().join("profiles")).unwrap();
    // local-disk: back to the firmware, which tries its next boot device.
    let out = p.grub(&arm("local-disk", None), &config()).unwrap();
    assert!(out.lines().any(|l| l == "exit"), "{out}");
    assert!(!out.contains("xen_hypervisor"), "{out}");
    // health-check: Linux without Xen.
    let out = p.grub(&arm("health-check", None), &config()).unwrap();
    assert!(
        out.contains("if linux /artifacts/vmlinuz-arm64.gz console=ttyAMA0,115200 "),
        "{out}"
    );
    assert!(out.contains("if initrd /artifacts/initrd-labbox-arm64.gz"));
    let out = p.grub(&arm("health-check", None), &http_config()).unwrap();
    assert!(
        out.contains(
            "if linux (http,198.18.0.1:8080)/artifacts/vmlinuz-arm64.gz console=ttyAMA0,115200 "
        ),
        "{out}"
    );
    assert!(out.contains("if initrd (http,198.18.0.1:8080)/artifacts/initrd-labbox-arm64.gz"));
    // A profile without a GRUB template: the host is known, the reason shown.
    let out = p.grub(&arm("xen-install", Some("L-1")), &config()).unwrap();
    assert!(out.lines().any(|l| l == "set lab_host=1"), "{out}");
    assert!(
        out.contains("LAB-BOOT-FAILED profile=xen-install has no GRUB template"),
        "{out}"
    );
    assert!(out.contains("lease=L-1"), "{out}");
    // xen through GRUB is for aarch64; x86 hosts get a clear failure.
    let out = p.grub(&x86("xen", None), &config()).unwrap();
    assert!(!out.contains("xen_hypervisor"), "{out}");
    assert!(out.contains("LAB-BOOT-FAILED"), "{out}");
    // Unknown profiles are errors, as for iPXE scripts.
    assert!(p.grub(&arm("nonesuch", None), &config()).is_err());
}

#[test]
fn one_lease_two_architectures() {
    // A lease holding an x86_64 BIOS and an aarch64 host with profile xen:
    // the x86 host's iPXE script multiboots Xen, the arm host's GRUB config
    // loads Xen with xen_boot, both naming the same lease.
    let f = files([x86("xen", Some("L-9")), arm("xen", Some("L-9"))]);
    let ipxe = text(f.open("hosts/52-54-00-12-34-56.ipxe", None));
    assert!(ipxe.contains("kernel http://198.18.0.1:8080/artifacts/xen-4.17-amd64 "));
    assert!(ipxe.contains("lease=L-9"));
    let grub = text(f.open("hosts/52:54:00:aa:00:01.grub", None));
    assert!(grub.contains("xen_hypervisor /artifacts/xen-4.17-arm64 "));
    assert!(grub.contains("lease=L-9"));
}

#[test]
fn golden_grub_configs() {
    let p = Profiles::load(&assets().join("profiles")).unwrap();
    for (file, host) in [
        ("xen-arm64.grub", arm("xen", Some("L-42"))),
        ("local-disk-arm64.grub", arm("local-disk", None)),
    ] {
        let out = p.grub(&host, &config()).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/grub")
            .join(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &out).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            out, want,
            "{file} differs from golden (UPDATE_GOLDEN=1 to accept)"
        );
    }
}
