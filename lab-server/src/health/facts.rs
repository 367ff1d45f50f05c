//! A health check's facts: the one console line the `health-check`
//! profile's initramfs prints once it has looked at the machine, parsed and
//! compared with what the inventory says of the host. Pure: no I/O, tested
//! with captured lines.
//!
//! The line (the agent sends the console line that matched the profile's
//! `ready` text as `HostReport.ready_line`):
//!
//! ```text
//! LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=1012345 model=QEMU_Virtual_CPU macs=52:54:00:12:34:01,52:54:00:12:34:02 disks=vda:8589934592,vdb:1073741824 virt=vmx iommu=no kernel=6.1.0-27-amd64
//! ```
//!
//! `key=value` tokens after the marker, separated by spaces; values never
//! hold spaces (the CPU model's become `_`); lists are comma-separated,
//! disks `name:bytes`; `virt` is `vmx`, `svm`, `el2` (aarch64) or `none`;
//! `iommu` is `yes` or `no`. Unknown keys are ignored; a missing key means
//! the initramfs could not see that fact. Anything before the marker on the
//! same line (a timestamp, a stray carriage return) is ignored.
//!
//! [`compare`] checks the facts against the host's description:
//!
//! | what | when | passes when |
//! |------|------|-------------|
//! | arch | the facts show it | it is the inventory's `arch` |
//! | MAC | the facts show `macs` | the inventory's `mac` is among them |
//! | `iommu` flag | the host has it and the facts show `iommu` | `iommu=yes` |
//! | `virt` flag | the host has it and the facts show `virt` | `virt` is not `none` |
//! | `expect.memory_mb` | set | `mem_kb` is at least 90 % of it (the kernel keeps some back) |
//! | `expect.cpus` | set | `cpus` equals it |
//! | `expect.disks` | set | that many disks |
//! | `expect.min_disk_gb` | set | every disk has at least that many GB (10⁹ bytes) |
//!
//! An expectation the facts cannot show (the key is missing) fails: the
//! inventory asked for it to be checked.

use crate::inventory::HostSpec;
use crate::inventory::MacAddr;
use crate::types::{Arch, Flag};
use std::fmt;
use std::str::FromStr;

/// What the health-check initramfs prints first on its facts line.
pub const FACTS_MARKER: &str = "LAB-HEALTH-OK";

/// Memory passes at this share of the inventory's `memory_mb` (percent).
pub const MEMORY_SHARE_PERCENT: u64 = 90;

/// One disk the initramfs saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub bytes: u64,
}

/// Virtualisation support the initramfs saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virt {
    Vmx,
    Svm,
    /// aarch64: the kernel was entered at EL2.
    El2,
    None,
}

impl Virt {
    pub fn as_str(self) -> &'static str {
        match self {
            Virt::Vmx => "vmx",
            Virt::Svm => "svm",
            Virt::El2 => "el2",
            Virt::None => "none",
        }
    }
}

/// A host's facts; `None`: not visible to the initramfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub arch: Option<Arch>,
    pub cpus: Option<u32>,
    pub mem_kb: Option<u64>,
    /// The CPU model, `_` for spaces.
    pub model: Option<String>,
    pub macs: Option<Vec<MacAddr>>,
    pub disks: Option<Vec<Disk>>,
    pub virt: Option<Virt>,
    pub iommu: Option<bool>,
    pub kernel: Option<String>,
}

/// Why a facts line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    #[error("no {FACTS_MARKER} in the line")]
    NoMarker,
    #[error("token {token:?} is not key=value")]
    NotKeyValue { token: String },
    #[error("{key} given twice")]
    Duplicate { key: String },
    #[error("bad {key}={value:?}: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl Facts {
    /// Reads a facts line (see the module docs).
    pub fn parse(line: &str) -> Result<Facts, FactsError> {
        let at = line.find(FACTS_MARKER).ok_or(FactsError::NoMarker)?;
        let rest = &line[at + FACTS_MARKER.len()..];
        // The marker must be a word of its own (not LAB-HEALTH-OKAY).
        if rest.chars().next().is_some_and(|c| !c.is_whitespace()) {
            return Err(FactsError::NoMarker);
        }
        let mut facts = Facts::default();
        let mut seen: Vec<&str> = Vec::new();
        for token in rest.split_whitespace() {
            let Some((key, value)) = token.split_once('=') else {
                return Err(FactsError::NotKeyValue {
                    token: token.into(),
                });
            };
            if key.is_empty() {
                return Err(FactsError::NotKeyValue {
                    token: token.into(),
                });
            }
            if seen.contains(&key) {
                return Err(FactsError::Duplicate { key: key.into() });
            }
            seen.push(key);
            match key {
                "arch" => facts.arch = Some(parse_value("arch", value, Arch::from_str)?),
                "cpus" => facts.cpus = Some(parse_value("cpus", value, u32::from_str)?),
                "mem_kb" => facts.mem_kb = Some(parse_value("mem_kb", value, u64::from_str)?),
                "model" => facts.model = Some(value.into()),
                "macs" => facts.macs = Some(list("macs", value, MacAddr::from_str)?),
                "disks" => facts.disks = Some(list("disks", value, disk)?),
                "virt" => facts.virt = Some(parse_value("virt", value, virt)?),
                "iommu" => facts.iommu = Some(parse_value("iommu", value, yes_no)?),
                "kernel" => facts.kernel = Some(value.into()),
                // A newer initramfs may say more.
                _ => {}
            }
        }
        Ok(facts)
    }
}

fn parse_value<T, E: fmt::Display>(
    key: &'static str,
    value: &str,
    f: impl Fn(&str) -> Result<T, E>,
) -> Result<T, FactsError> {
    f(value).map_err(|e| FactsError::BadValue {
        key,
        value: value.into(),
        reason: e.to_string(),
    })
}

/// A comma-separated list; empty means none.
fn list<T, E: fmt::Display>(
    key: &'static str,
    value: &str,
    f: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, FactsError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| parse_value(key, item, &f))
        .collect()
}

fn disk(s: &str) -> Result<Disk, String> {
    let (name, bytes) = s
        .split_once(':')
        .ok_or_else(|| "expected name:bytes".to_string())?;
    if name.is_empty() {
        return Err("empty disk name".into());
    }
    let bytes = bytes.parse().map_err(|e| format!("size {bytes:?}: {e}"))?;
    Ok(Disk {
        name: name.into(),
        bytes,
    })
}

fn virt(s: &str) -> Result<Virt, String> {
    match s {
        "vmx" => Ok(Virt::Vmx),
        "svm" => Ok(Virt::Svm),
        "el2" => Ok(Virt::El2),
        "none" => Ok(Virt::None),
        _ => Err("expected vmx, svm, el2 or none".into()),
    }
}

fn yes_no(s: &str) -> Result<bool, String> {
    match s {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => Err("expected yes or no".into()),
    }
}

/// What a health check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckVerdict {
    Pass,
    /// Every mismatch, `; `-separated.
    Fail {
        reason: String,
    },
}

/// Compares `facts` with the host's inventory description (see the module
/// docs for the rules); a failure names every mismatch.
pub fn compare(facts: &Facts, host: &HostSpec) -> CheckVerdict {
    let mut wrong: Vec<String> = Vec::new();
    if let Some(arch) = facts.arch
        && arch != host.arch
    {
        wrong.push(format!("arch {arch}, inventory says {}", host.arch));
    }
    if let Some(macs) = &facts.macs
        && !macs.contains(&host.mac)
    {
        let seen: Vec<String> = macs.iter().map(MacAddr::to_string).collect();
        let seen = if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(",")
        };
        wrong.push(format!(
            "inventory MAC {} not among the NICs seen ({seen})",
            host.mac
        ));
    }
    let has = |f: &str| Flag::new(f).is_ok_and(|f| host.flags.contains(&f));
    if has("iommu") && facts.iommu == Some(false) {
        wrong.push("no IOMMU seen, the host has flag iommu".into());
    }
    if has("virt") && facts.virt == Some(Virt::None) {
        wrong.push("no virtualisation support seen, the host has flag virt".into());
    }
    let expect = &host.expect;
    if let Some(mb) = expect.memory_mb {
        match facts.mem_kb {
            None => wrong.push(format!("memory not visible, inventory expects {mb} MiB")),
            // mem_kb >= 90 % of mb * 1024 kB, in integers.
            Some(kb) if kb.saturating_mul(100) < mb.saturating_mul(1024 * MEMORY_SHARE_PERCENT) => {
                wrong.push(format!(
                    "memory {} MiB, inventory expects {mb} MiB",
                    kb / 1024
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(n) = expect.cpus {
        match facts.cpus {
            None => wrong.push(format!("CPU count not visible, inventory expects {n}")),
            Some(c) if c != n => wrong.push(format!("{c} CPUs, inventory expects {n}")),
            Some(_) => {}
        }
    }
    if let Some(n) = expect.disks {
        match &facts.disks {
            None => wrong.push(format!("disks not visible, inventory expects {n}")),
            Some(d) if d.len() != n as usize => {
                let names: Vec<&str> = d.iter().map(|d| d.name.as_str()).collect();
                wrong.push(format!(
                    "{} disk(s) ({}), inventory expects {n}",
                    d.len(),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(",")
                    }
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(gb) = expect.min_disk_gb {
        match &facts.disks {
            None => wrong.push(format!(
                "disks not visible, inventory expects at least {gb} GB each"
            )),
            Some(d) => {
                for disk in d {
                    if disk.bytes < gb.saturating_mul(1_000_000_000) {
                        wrong.push(format!(
                            "disk {} {:.1} GB, inventory expects at least {gb} GB",
                            disk.name,
                            disk.bytes as f64 / 1e9
                        ));
                    }
                }
            }
        }
    }
    if wrong.is_empty() {
        CheckVerdict::Pass
    } else {
        CheckVerdict::Fail {
            reason: wrong.join("; "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;
    use std::path::Path;

    /// Captured from the health-check initramfs on a lab-in-a-box VM (1 GiB,
    /// two NICs, two disks).
    const QEMU_X86: &str = "LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=1012345 model=QEMU_Virtual_CPU macs=52:54:00:12:34:01,52:54:00:12:34:02 disks=vda:8589934592,vdb:1073741824 virt=vmx iommu=no kernel=6.1.0-27-amd64";

    /// The same VM started with half its memory, as the console shows it
    /// (kernel timestamp and carriage return included).
    const QEMU_X86_HALF: &str = "[    4.512] LAB-HEALTH-OK arch=x86_64 cpus=2 mem_kb=506880 model=QEMU_Virtual_CPU macs=52:54:00:12:34:01 disks=vda:8589934592 virt=vmx iommu=no kernel=6.1.0-27-amd64\r";

    /// An aarch64 VM: EL2, no disks visible key at all.
    const QEMU_ARM: &str = "LAB-HEALTH-OK arch=aarch64 cpus=4 mem_kb=2031616 model=Cortex-A57 macs=52:54:00:12:35:01 virt=el2 iommu=yes kernel=6.1.0-27-arm64 firmware=uefi";

    fn inventory(host_extra: &str) -> HostSpec {
        let text = format!(
            "[[rack]]\nname = \"r\"\n[[host]]\nname = \"h1\"\narch = \"x86_64\"\nfirmware = \"bios\"\n\
             rack = \"r\"\nmac = \"52:54:00:12:34:01\"\n{host_extra}"
        );
        Inventory::parse(&text, Path::new("inventory.toml"))
            .unwrap()
            .hosts
            .remove(0)
    }

    #[test]
    fn captured_lines_parse() {
        let f = Facts::parse(QEMU_X86).unwrap();
        assert_eq!(f.arch, Some(Arch::X86_64));
        assert_eq!(f.cpus, Some(2));
        assert_eq!(f.mem_kb, Some(1012345));
        assert_eq!(f.model.as_deref(), Some("QEMU_Virtual_CPU"));
        assert_eq!(
            f.macs
                .as_ref()
                .map(|m| m.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
            Some(vec!["52:54:00:12:34:01".into(), "52:54:00:12:34:02".into()])
        );
        assert_eq!(
            f.disks,
            Some(vec![
                Disk {
                    name: "vda".into(),
                    bytes: 8589934592
                },
                Disk {
                    name: "vdb".into(),
                    bytes: 1073741824
                }
            ])
        );
        assert_eq!((f.virt, f.iommu), (Some(Virt::Vmx), Some(false)));
        assert_eq!(f.kernel.as_deref(), Some("6.1.0-27-amd64"));

        let half = Facts::parse(QEMU_X86_HALF).unwrap();
        assert_eq!(half.mem_kb, Some(506880));
        assert_eq!(half.kernel.as_deref(), Some("6.1.0-27-amd64"));

        // Unknown keys ignored, missing keys not visible.
        let arm = Facts::parse(QEMU_ARM).unwrap();
        assert_eq!(arm.arch, Some(Arch::Aarch64));
        assert_eq!((arm.virt, arm.iommu), (Some(Virt::El2), Some(true)));
        assert_eq!(arm.disks, None);

        let bare = Facts::parse("LAB-HEALTH-OK").unwrap();
        assert_eq!(bare, Facts::default());
        assert_eq!(
            Facts::parse("LAB-HEALTH-OK disks= macs=").unwrap().disks,
            Some(vec![])
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let cases: &[(&str, &str)] = &[
            ("login: ", "no LAB-HEALTH-OK in the line"),
            ("LAB-HEALTH-OKAY cpus=2", "no LAB-HEALTH-OK in the line"),
            ("LAB-HEALTH-OK cpus", "token \"cpus\" is not key=value"),
            ("LAB-HEALTH-OK =2", "token \"=2\" is not key=value"),
            ("LAB-HEALTH-OK cpus=2 cpus=3", "cpus given twice"),
            (
                "LAB-HEALTH-OK cpus=two",
                "bad cpus=\"two\": invalid digit found in string",
            ),
            (
                "LAB-HEALTH-OK mem_kb=-1",
                "bad mem_kb=\"-1\": invalid digit found in string",
            ),
            (
                "LAB-HEALTH-OK iommu=maybe",
                "bad iommu=\"maybe\": expected yes or no",
            ),
            (
                "LAB-HEALTH-OK virt=hvm",
                "bad virt=\"hvm\": expected vmx, svm, el2 or none",
            ),
            (
                "LAB-HEALTH-OK disks=vda",
                "bad disks=\"vda\": expected name:bytes",
            ),
            (
                "LAB-HEALTH-OK disks=:5",
                "bad disks=\":5\": empty disk name",
            ),
            (
                "LAB-HEALTH-OK disks=vda:8G",
                "bad disks=\"vda:8G\": size \"8G\": invalid digit found in string",
            ),
        ];
        for (line, want) in cases {
            let got = Facts::parse(line).expect_err(line).to_string();
            assert_eq!(&got, want, "{line}");
        }
        let mac = Facts::parse("LAB-HEALTH-OK macs=52:54:00:12:34").unwrap_err();
        assert!(
            matches!(&mac, FactsError::BadValue { key: "macs", .. }),
            "{mac}"
        );
        let arch = Facts::parse("LAB-HEALTH-OK arch=riscv64").unwrap_err();
        assert!(
            matches!(&arch, FactsError::BadValue { key: "arch", .. }),
            "{arch}"
        );
    }

    #[test]
    fn comparison_table() {
        // (inventory lines of the host, facts line, expected failure or None)
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("", QEMU_X86, None),
            // Memory: at least 90 % of memory_mb.
            ("expect = { memory_mb = 1024 }\n", QEMU_X86, None),
            (
                "expect = { memory_mb = 1024 }\n",
                QEMU_X86_HALF,
                Some("memory 495 MiB, inventory expects 1024 MiB"),
            ),
            (
                "expect = { memory_mb = 1024 }\n",
                "LAB-HEALTH-OK mem_kb=943719",
                None,
            ),
            (
                "expect = { memory_mb = 1024 }\n",
                "LAB-HEALTH-OK mem_kb=943718",
                Some("memory 921 MiB, inventory expects 1024 MiB"),
            ),
            (
                "expect = { memory_mb = 1024 }\n",
                "LAB-HEALTH-OK cpus=2",
                Some("memory not visible, inventory expects 1024 MiB"),
            ),
            // CPUs: exact.
            ("[host.expect]\ncpus = 2\n", QEMU_X86, None),
            (
                "[host.expect]\ncpus = 4\n",
                QEMU_X86,
                Some("2 CPUs, inventory expects 4"),
            ),
            // Disks: count, and each at least min_disk_gb.
            (
                "[host.expect]\ndisks = 2\nmin_disk_gb = 1\n",
                QEMU_X86,
                None,
            ),
            (
                "[host.expect]\ndisks = 2\n",
                QEMU_X86_HALF,
                Some("1 disk(s) (vda), inventory expects 2"),
            ),
            (
                "[host.expect]\ndisks = 1\n",
                "LAB-HEALTH-OK disks=",
                Some("0 disk(s) (none), inventory expects 1"),
            ),
            (
                "[host.expect]\nmin_disk_gb = 8\n",
                QEMU_X86,
                Some("disk vdb 1.1 GB, inventory expects at least 8 GB"),
            ),
            (
                "[host.expect]\ndisks = 1\n",
                QEMU_ARM.replace("arch=aarch64", "arch=x86_64").leak(),
                Some(
                    "inventory MAC 52:54:00:12:34:01 not among the NICs seen (52:54:00:12:35:01); disks not visible, inventory expects 1",
                ),
            ),
            // Always: arch and MAC, when shown.
            (
                "",
                QEMU_ARM,
                Some(
                    "arch aarch64, inventory says x86_64; inventory MAC 52:54:00:12:34:01 not among the NICs seen (52:54:00:12:35:01)",
                ),
            ),
            (
                "",
                "LAB-HEALTH-OK macs=",
                Some("inventory MAC 52:54:00:12:34:01 not among the NICs seen (none)"),
            ),
            ("", "LAB-HEALTH-OK", None),
            // Flags iommu and virt, when shown.
            (
                "flags = [\"iommu\", \"virt\"]\n",
                QEMU_X86,
                Some("no IOMMU seen, the host has flag iommu"),
            ),
            (
                "flags = [\"virt\"]\n",
                "LAB-HEALTH-OK virt=none",
                Some("no virtualisation support seen, the host has flag virt"),
            ),
            ("flags = [\"iommu\", \"virt\"]\n", "LAB-HEALTH-OK", None),
            ("", "LAB-HEALTH-OK virt=none iommu=no", None),
        ];
        for (extra, line, want) in cases {
            let host = inventory(extra);
            let facts = Facts::parse(line).unwrap();
            let got = compare(&facts, &host);
            let want = match want {
                None => CheckVerdict::Pass,
                Some(r) => CheckVerdict::Fail {
                    reason: r.to_string(),
                },
            };
            assert_eq!(got, want, "inventory {extra:?}, facts {line:?}");
        }
    }
}
