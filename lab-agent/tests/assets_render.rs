//! Renders every profile template in `pxe-assets/profiles/` for an x86_64
//! BIOS host, an x86_64 UEFI host and an aarch64 host, checks the lines that
//! matter, and compares the xen and local-disk scripts with golden files
//! (`tests/golden/`; regenerate with `UPDATE_GOLDEN=1`).

use lab_agent::assets::render::{
    GRUB_SUFFIX, InstallVars, PRESEED_SUFFIX, Profiles, RenderConfig, RenderError, SCRIPT_SUFFIX,
};
use lab_agent::hosts::{Arch, BootHost, Firmware};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const XEN_CMDLINE: &str = "console=com1 com1=115200,8n1 dom0_mem=512M,max:512M bootscrub=0";
const DOM0_CMDLINE: &str = "console=hvc0 earlyprintk=xen";

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pxe-assets")
}

fn profiles() -> Profiles {
    Profiles::load(&assets().join("profiles")).expect("profiles load")
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

fn hosts() -> [BootHost; 3] {
    [
        BootHost {
            name: "node1".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ipv4: Some("198.18.0.11".parse().unwrap()),
            arch: Arch::X86_64,
            firmware: Firmware::Bios,
            profile: String::new(),
            lease: Some("L-42".into()),
            holder: None,
            ssh_key: None,
        },
        BootHost {
            name: "node2".into(),
            mac: "52:54:00:00:00:02".parse().unwrap(),
            ipv4: Some("198.18.0.12".parse().unwrap()),
            arch: Arch::X86_64,
            firmware: Firmware::Uefi,
            profile: String::new(),
            lease: None,
            holder: None,
            ssh_key: None,
        },
        BootHost {
            name: "arm1".into(),
            mac: "52:54:00:00:00:03".parse().unwrap(),
            ipv4: None,
            arch: Arch::Aarch64,
            firmware: Firmware::Uefi,
            profile: String::new(),
            lease: None,
            holder: None,
            ssh_key: None,
        },
    ]
}

fn with_profile(h: &BootHost, p: &str) -> BootHost {
    BootHost {
        profile: p.into(),
        ..h.clone()
    }
}

fn line_with<'a>(text: &'a str, start: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(start))
}

#[test]
fn the_four_profiles_exist() {
    let p = profiles();
    for name in ["xen", "local-disk", "health-check", "xen-install"] {
        assert!(
            p.names().iter().any(|n| n == name),
            "{name}: {:?}",
            p.names()
        );
    }
}

#[test]
fn every_template_renders_for_every_kind_of_host() {
    let p = profiles();
    let templates = p.templates();
    assert!(templates.len() >= 5, "{templates:?}");
    for t in &templates {
        let profile = t
            .strip_suffix(SCRIPT_SUFFIX)
            .or_else(|| t.strip_suffix(PRESEED_SUFFIX))
            .or_else(|| t.strip_suffix(GRUB_SUFFIX))
            .unwrap_or_else(|| panic!("{t}: neither a script, a preseed nor a GRUB config"));
        for h in hosts() {
            let h = with_profile(&h, profile);
            let out = p
                .render(t, &h, &config())
                .unwrap_or_else(|e| panic!("{t} for {}: {}", h.name, chain(&e)));
            assert!(!out.contains("{{") && !out.contains("{%"), "{t}: {out}");
            if t.ends_with(SCRIPT_SUFFIX) {
                assert!(out.starts_with("#!ipxe\n"), "{t} for {}: {out}", h.name);
                assert!(out.ends_with('\n'));
                assert!(
                    out.contains(&format!("LAB-IPXE profile={profile} host={}", h.name)),
                    "{t}: {out}"
                );
            }
            if t.ends_with(GRUB_SUFFIX) {
                // What grub/grub.cfg's flag check relies on.
                assert!(out.lines().any(|l| l == "set lab_host=1"), "{t}: {out}");
                assert!(
                    out.contains(&format!("LAB-GRUB profile={profile} host={}", h.name)),
                    "{t}: {out}"
                );
            }
        }
    }
}

#[test]
fn xen_uses_the_recipe_command_lines_on_bios() {
    let p = profiles();
    let [bios, uefi, arm] = hosts();
    let out = p.script(&with_profile(&bios, "xen"), &config()).unwrap();
    let kernel = line_with(&out, "kernel ").expect(&out);
    assert!(
        kernel.starts_with("kernel http://198.18.0.1:8080/artifacts/xen-4.17-amd64 "),
        "{kernel}"
    );
    assert!(kernel.contains(XEN_CMDLINE), "{kernel}");
    let modules: Vec<&str> = out.lines().filter(|l| l.starts_with("module ")).collect();
    assert_eq!(modules.len(), 2, "{out}");
    assert!(modules[0].contains("/vmlinuz-amd64 "), "{}", modules[0]);
    assert!(modules[0].contains(DOM0_CMDLINE), "{}", modules[0]);
    assert!(
        modules[1].contains("/initrd-labbox-amd64.gz"),
        "{}",
        modules[1]
    );
    assert!(out.lines().any(|l| l.starts_with("boot")), "{out}");
    assert!(out.contains("lease=L-42"));

    // iPXE can only multiboot under BIOS: others get a clear failure.
    for h in [uefi, arm] {
        let out = p.script(&with_profile(&h, "xen"), &config()).unwrap();
        assert!(line_with(&out, "kernel ").is_none(), "{out}");
        assert!(
            out.contains("LAB-BOOT-FAILED profile=xen is not supported"),
            "{out}"
        );
        assert!(out.contains("lease=-"), "{out}");
    }

    // Over TFTP when the agent has no HTTP URL.
    let tftp = RenderConfig {
        http_url: None,
        ..config()
    };
    let out = p.script(&with_profile(&bios, "xen"), &tftp).unwrap();
    assert!(
        out.contains("kernel tftp://198.18.0.1/artifacts/xen-4.17-amd64 "),
        "{out}"
    );
}

#[test]
fn local_disk_exits_and_others_boot() {
    let p = profiles();
    for h in hosts() {
        let out = p
            .script(&with_profile(&h, "local-disk"), &config())
            .unwrap();
        assert!(out.lines().any(|l| l == "exit"), "{out}");

        let out = p
            .script(&with_profile(&h, "health-check"), &config())
            .unwrap();
        let arch = if h.arch == Arch::X86_64 {
            "amd64"
        } else {
            "arm64"
        };
        let kernel = line_with(&out, "kernel ").expect(&out);
        assert!(kernel.contains(&format!("/vmlinuz-{arch} ")), "{kernel}");
        assert!(
            kernel.contains(&format!("initrd=initrd-labbox-{arch}.gz")),
            "{kernel}"
        );
        assert!(line_with(&out, "initrd ").is_some(), "{out}");

        // No profile has a preseed any more.
        for profile in ["xen", "xen-install"] {
            assert!(
                p.preseed(&with_profile(&h, profile), &config())
                    .unwrap()
                    .is_none()
            );
        }
    }
}

/// xen-install boots the disk installer with the image, its checksum and
/// the host named on the kernel command line (pxe-assets/installer/init);
/// without the agent's `install` variables it falls back to the image's
/// `.sha256` file and passes no metadata. Hosts the x86_64 BIOS image cannot
/// boot get a clear failure.
#[test]
fn xen_install_boots_the_installer_on_x86_bios_only() {
    let p = profiles();
    let [bios, uefi, arm] = hosts();
    let out = p
        .script(&with_profile(&bios, "xen-install"), &config())
        .unwrap();
    let kernel = line_with(&out, "kernel ").expect(&out);
    let art = "http://198.18.0.1:8080/artifacts";
    assert!(
        kernel.starts_with(&format!(
            "kernel {art}/vmlinuz-amd64 initrd=initrd-install-amd64.gz console=ttyS0,115200 "
        )),
        "{kernel}"
    );
    for param in [
        format!("lab.image={art}/xenlab-amd64.img.zst"),
        format!("lab.sha256_url={art}/xenlab-amd64.img.zst.sha256"),
        "lab.host=node1".to_owned(),
        "lab.lease=L-42".to_owned(),
        "lab.mac=52:54:00:00:00:01".to_owned(),
        "lab.then=poweroff".to_owned(),
    ] {
        assert!(
            kernel.split_whitespace().any(|w| w == param),
            "{param} missing: {kernel}"
        );
    }
    assert!(!kernel.contains("lab.metadata="), "{kernel}");
    assert!(!kernel.contains("lab.disk="), "{kernel}");
    assert!(
        out.lines().any(|l| l
            == format!(
                "initrd --name initrd-install-amd64.gz {art}/initrd-install-amd64.gz || goto failed"
            )),
        "{out}"
    );
    // The agent's `install.*` variables replace the defaults.
    let vars = InstallVars {
        image_url: Some("http://198.18.0.1:8080/artifacts/other.img.zst".into()),
        image_sha256: Some("ab".repeat(32)),
        metadata_url: Some("http://198.18.0.1:8080/hosts/52-54-00-00-00-01.lease".into()),
        disk: Some("sda".into()),
        then: Some("reboot".into()),
    };
    let out = p
        .script_with(&with_profile(&bios, "xen-install"), &config(), &vars)
        .unwrap();
    let kernel = line_with(&out, "kernel ").expect(&out);
    for param in [
        "lab.image=http://198.18.0.1:8080/artifacts/other.img.zst".to_owned(),
        format!("lab.sha256={}", "ab".repeat(32)),
        "lab.metadata=http://198.18.0.1:8080/hosts/52-54-00-00-00-01.lease".to_owned(),
        "lab.disk=sda".to_owned(),
        "lab.then=reboot".to_owned(),
    ] {
        assert!(
            kernel.split_whitespace().any(|w| w == param),
            "{param} missing: {kernel}"
        );
    }
    assert!(!kernel.contains("lab.sha256_url="), "{kernel}");
    // Only some: the others keep their defaults.
    let out = p
        .script_with(
            &with_profile(&bios, "xen-install"),
            &config(),
            &InstallVars {
                image_sha256: Some("cd".repeat(32)),
                ..InstallVars::default()
            },
        )
        .unwrap();
    let kernel = line_with(&out, "kernel ").expect(&out);
    assert!(
        kernel.contains(&format!(
            "lab.image={art}/xenlab-amd64.img.zst lab.sha256={} ",
            "cd".repeat(32)
        )) && kernel.contains("lab.then=poweroff")
            && !kernel.contains("lab.metadata="),
        "{kernel}"
    );
    for h in [uefi, arm] {
        let out = p
            .script(&with_profile(&h, "xen-install"), &config())
            .unwrap();
        assert!(line_with(&out, "kernel ").is_none(), "{out}");
        assert!(
            out.contains("LAB-BOOT-FAILED profile=xen-install is not supported"),
            "{out}"
        );
    }
}

/// `extra.*` from the agent's config reaches scripts and preseeds (no
/// profile of the repository uses either now: templates of a temporary
/// directory).
#[test]
fn extra_variables_reach_templates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.ipxe.j2"),
        "#!ipxe\necho domain={{ extra.domain | default(\"lab\") }}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t.preseed.j2"),
        "d-i netcfg/get_domain string {{ extra.domain }}\n\
         {% if extra.ssh_authorized_key is defined %}key {{ extra.ssh_authorized_key }}{% endif %}\n",
    )
    .unwrap();
    let p = Profiles::load(dir.path()).unwrap();
    let h = with_profile(&hosts()[0], "t");
    let mut cfg = config();
    assert!(p.script(&h, &cfg).unwrap().contains("echo domain=lab\n"));
    cfg.extra.insert("domain".into(), "rack7.example".into());
    cfg.extra.insert(
        "ssh_authorized_key".into(),
        "ssh-ed25519 AAAA lab@ci".into(),
    );
    assert!(
        p.script(&h, &cfg)
            .unwrap()
            .contains("echo domain=rack7.example\n")
    );
    let preseed = p.preseed(&h, &cfg).unwrap().unwrap();
    assert!(
        preseed.contains("netcfg/get_domain string rack7.example"),
        "{preseed}"
    );
    assert!(preseed.contains("key ssh-ed25519 AAAA lab@ci"), "{preseed}");
}

#[test]
fn xen_install_without_http_says_why() {
    let p = profiles();
    let cfg = RenderConfig {
        http_url: None,
        ..config()
    };
    let out = p
        .script(&with_profile(&hosts()[0], "xen-install"), &cfg)
        .unwrap();
    assert!(out.contains("LAB-BOOT-FAILED profile=xen-install needs the agent's HTTP server"));
    assert!(line_with(&out, "kernel ").is_none(), "{out}");
}

#[test]
fn undefined_variable_and_unknown_profile_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.ipxe.j2"),
        "#!ipxe\necho {{ host.name }}\nkernel {{ host.serial_number }}\n",
    )
    .unwrap();
    let p = Profiles::load(dir.path()).unwrap();
    let h = with_profile(&hosts()[0], "bad");
    let err = p.script(&h, &config()).unwrap_err();
    match &err {
        RenderError::Undefined {
            template,
            variable,
            line,
        } => {
            assert_eq!(template, "bad.ipxe.j2");
            assert_eq!(variable, "host.serial_number");
            assert_eq!(*line, 3);
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("bad.ipxe.j2") && msg.contains("host.serial_number"),
        "{msg}"
    );

    let err = p
        .script(&with_profile(&hosts()[0], "nonesuch"), &config())
        .unwrap_err();
    assert!(matches!(err, RenderError::UnknownProfile { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unknown boot profile \"nonesuch\" (known: bad)"
    );

    // A top-level name that does not exist, too.
    std::fs::write(dir.path().join("top.ipxe.j2"), "#!ipxe\n{{ lease_id }}\n").unwrap();
    let p = Profiles::load(dir.path()).unwrap();
    let err = p
        .script(&with_profile(&hosts()[0], "top"), &config())
        .unwrap_err();
    assert!(
        matches!(&err, RenderError::Undefined { variable, .. } if variable == "lease_id"),
        "{err:?}"
    );
}

#[test]
fn golden_scripts() {
    let p = profiles();
    let [bios, uefi, _] = hosts();
    for (file, host, profile) in [
        ("xen-bios.ipxe", &bios, "xen"),
        ("xen-uefi.ipxe", &uefi, "xen"),
        ("local-disk.ipxe", &bios, "local-disk"),
        ("xen-install-bios.ipxe", &bios, "xen-install"),
    ] {
        let out = p.script(&with_profile(host, profile), &config()).unwrap();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
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

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}
