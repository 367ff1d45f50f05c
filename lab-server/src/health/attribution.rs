//! Failure attribution: when a host's provisioning fails, whose fault was
//! it? Signature rules match the agent's stage text (its own words: "switching
//! the power on: …", "the console capture stopped") or a line of the
//! console tail it sent, and each rule names a class:
//!
//! - [`FailureClass::Host`]: the machine (no PXE offer taken, "No bootable
//!   device", a machine check, disk I/O errors, its BMC failing);
//! - [`FailureClass::Job`]: what the lease booted (a panic in the Xen or
//!   the kernel under test, a disk image whose services did not come up);
//! - [`FailureClass::Infra`]: the lab's side (the agent's capture stopped,
//!   the installer could not fetch or check what the agent served);
//! - [`FailureClass::Unknown`]: no rule matched (a plain timeout).
//!
//! Rules are tried in order, the operator's (from `--failure-rules FILE`)
//! before the shipped [`DEFAULT_RULES`]; the first rule that matches wins,
//! and for a console rule the matching line is the last one in the tail
//! (the latest sign). Only `host` failures are the machine's fault: they
//! are the ones that call for a health check.
//!
//! The rules file (TOML; errors as `path:line:column: reason`):
//!
//! ```toml
//! [[rule]]
//! name = "e1000e hang"            # shown with the failure
//! class = "host"                  # host | job | infra
//! console = 'e1000e .* Detected Hardware Unit Hang'   # a regex on one console line
//!
//! [[rule]]
//! name = "our NFS server"
//! class = "infra"
//! stage = '^no "LAB-DOM0-OK"'     # or a regex on the agent's stage text
//! ```

use lab_types::FileError;
use regex::Regex;
use std::fmt;
use std::path::Path;

/// Whose fault a failed provisioning was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    Host,
    Job,
    Infra,
    Unknown,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Host => "host",
            FailureClass::Job => "job",
            FailureClass::Infra => "infra",
            FailureClass::Unknown => "unknown",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FailureClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(FailureClass::Host),
            "job" => Ok(FailureClass::Job),
            "infra" => Ok(FailureClass::Infra),
            other => Err(format!(
                "unknown class {other:?} (expected host, job or infra)"
            )),
        }
    }
}

/// What a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The agent's stage text of the failure.
    Stage,
    /// Each line of the console tail.
    Console,
}

/// One signature.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub class: FailureClass,
    pub target: Target,
    pub pattern: Regex,
}

/// The verdict on one failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub class: FailureClass,
    /// The rule that matched (empty for `Unknown`).
    pub rule: String,
    /// The matching text: the stage, or the console line (trimmed, at most
    /// [`MAX_LINE`] characters).
    pub line: String,
}

/// The longest matching line kept with a verdict.
pub const MAX_LINE: usize = 240;

/// The shipped rules, in order: (name, class, target, regex). The host
/// rules come first: a disk error or a machine check often ends in a panic,
/// which is then not the job's fault.
pub const DEFAULT_RULES: &[(&str, FailureClass, Target, &str)] = &[
    (
        "BMC failure",
        FailureClass::Host,
        Target::Stage,
        r"^(setting the boot device|reading the power state|switching the power (on|off))\b",
    ),
    (
        "console capture stopped",
        FailureClass::Infra,
        Target::Stage,
        r"^the console capture stopped",
    ),
    (
        "machine check",
        FailureClass::Host,
        Target::Console,
        r"(?i)machine check|\bMCE\b|Hardware Error",
    ),
    (
        "disk I/O error",
        FailureClass::Host,
        Target::Console,
        r"Buffer I/O error|I/O error, dev |blk_update_request: I/O error|ata\d+(\.\d+)?: (failed command|hard resetting link)",
    ),
    (
        "no bootable device",
        FailureClass::Host,
        Target::Console,
        r"No bootable device|Boot failed: not a bootable disk|PXE-E\d\d",
    ),
    (
        "no DHCP offer taken",
        FailureClass::Host,
        Target::Console,
        r"No configuration methods succeeded|LAB-INSTALL stage=failed reason=(dhcp|no-nic)\b",
    ),
    (
        "no disk",
        FailureClass::Host,
        Target::Console,
        r"LAB-INSTALL stage=failed reason=no-disk\b|LAB-DISK-FAILED .*reason=no-address\b",
    ),
    (
        "installer could not use what the agent served",
        FailureClass::Infra,
        Target::Console,
        r"LAB-INSTALL stage=failed reason=(http|not-zstd|sha256|metadata|bad-parameter)\b",
    ),
    (
        "boot file missing",
        FailureClass::Infra,
        Target::Console,
        r"Could not (boot|start) image|error: file '[^']*' not found",
    ),
    (
        "Xen panic",
        FailureClass::Job,
        Target::Console,
        r"\(XEN\) .*Panic on CPU",
    ),
    (
        "kernel panic",
        FailureClass::Job,
        Target::Console,
        r"Kernel panic|\bBUG: |\bOops\b",
    ),
    (
        "services of the booted system",
        FailureClass::Job,
        Target::Console,
        r"LAB-DISK-FAILED .*reason=(sshd-\S+|xl-info)",
    ),
];

/// The rules in force: the operator's, then the shipped ones.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    /// How many of `rules` came from the operator's file.
    configured: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            rules: default_rules(),
            configured: 0,
        }
    }
}

fn default_rules() -> Vec<Rule> {
    DEFAULT_RULES
        .iter()
        .map(|(name, class, target, re)| Rule {
            name: (*name).to_owned(),
            class: *class,
            target: *target,
            pattern: Regex::new(re).expect("shipped rules compile"),
        })
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    class: toml::Spanned<String>,
    stage: Option<toml::Spanned<String>>,
    console: Option<toml::Spanned<String>>,
}

impl Rules {
    /// Reads a rules file: its rules, then the shipped ones.
    pub fn load(path: &Path) -> Result<Rules, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            what: "failure rules",
            path: path.to_owned(),
            source,
        })?;
        Rules::parse(&text, path)
    }

    /// Parses a rules file's text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Rules, FileError> {
        let invalid = |at: usize, reason: String| FileError::at(path, text, at, reason);
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| invalid(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
        let mut rules = Vec::with_capacity(raw.rule.len() + DEFAULT_RULES.len());
        for r in raw.rule {
            let at = r.span().start;
            let r = r.into_inner();
            if r.name.trim().is_empty() || r.name.chars().any(char::is_control) {
                return Err(invalid(
                    at,
                    "a rule's name must be printable and not empty".into(),
                ));
            }
            let class = r
                .class
                .get_ref()
                .parse()
                .map_err(|e| invalid(r.class.span().start, e))?;
            let (target, pattern) = match (r.stage, r.console) {
                (Some(p), None) => (Target::Stage, p),
                (None, Some(p)) => (Target::Console, p),
                _ => {
                    return Err(invalid(
                        at,
                        format!(
                            "rule {:?} needs exactly one of `stage` or `console`",
                            r.name
                        ),
                    ));
                }
            };
            let compiled = regex::RegexBuilder::new(pattern.get_ref())
                .size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    invalid(
                        pattern.span().start,
                        format!("rule {:?}: invalid regex: {e}", r.name),
                    )
                })?;
            rules.push(Rule {
                name: r.name,
                class,
                target,
                pattern: compiled,
            });
        }
        let configured = rules.len();
        rules.extend(default_rules());
        Ok(Rules { rules, configured })
    }

    /// How many rules came from the operator's file.
    pub fn configured(&self) -> usize {
        self.configured
    }

    /// Whose fault a failure with this stage text and console tail was.
    pub fn classify(&self, stage: &str, console_tail: &str) -> Attribution {
        for r in &self.rules {
            let hit = match r.target {
                Target::Stage => r.pattern.is_match(stage).then_some(stage),
                Target::Console => console_tail.lines().rev().find(|l| r.pattern.is_match(l)),
            };
            if let Some(line) = hit {
                return Attribution {
                    class: r.class,
                    rule: r.name.clone(),
                    line: clip(line),
                };
            }
        }
        Attribution {
            class: FailureClass::Unknown,
            rule: String::new(),
            line: String::new(),
        }
    }
}

/// A line as kept: trimmed, control characters dropped, at most
/// [`MAX_LINE`] characters.
fn clip(line: &str) -> String {
    line.trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_LINE)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureClass::*;

    /// Stage texts and console tails as the agent sends them (from the
    /// lab in a box and the agent's provisioning machine).
    #[test]
    fn shipped_rules_attribute_real_failures() {
        let r = Rules::default();
        let cases: &[(&str, &str, &str, FailureClass, &str, &str)] = &[
            // (what, stage, console tail, class, rule, line)
            (
                "BMC silent on power on",
                "switching the power on: the BMC did not answer within 5s",
                "",
                Host,
                "BMC failure",
                "switching the power on: the BMC did not answer within 5s",
            ),
            (
                "BMC refuses the boot device",
                "setting the boot device to PXE: completion code 0xd4",
                "",
                Host,
                "BMC failure",
                "setting the boot device to PXE: completion code 0xd4",
            ),
            (
                "no PXE: SeaBIOS falls through",
                "no \"LAB-DOM0-OK\" on the console within 180s",
                "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\nBooting from Hard Disk...\r\nBoot failed: not a bootable disk\r\n\r\nNo bootable device.\r\n",
                Host,
                "no bootable device",
                "No bootable device.",
            ),
            (
                "iPXE got no DHCP answer",
                "no \"LAB-DOM0-OK\" on the console within 180s",
                "net0: 52:54:00:12:34:56 using 82540em on 0000:00:03.0 (open)\r\nConfiguring (net0 52:54:00:12:34:56)...... No configuration methods succeeded (http://ipxe.org/040ee186)\r\n",
                Host,
                "no DHCP offer taken",
                "Configuring (net0 52:54:00:12:34:56)...... No configuration methods succeeded (http://ipxe.org/040ee186)",
            ),
            (
                "a disk error then a panic: the disk's fault",
                "failure text \"Kernel panic\" on the console",
                "[   12.1] blk_update_request: I/O error, dev sda, sector 2048 op 0x0:(READ)\n[   12.2] Kernel panic - not syncing: VFS: Unable to mount root fs\n",
                Host,
                "disk I/O error",
                "[   12.1] blk_update_request: I/O error, dev sda, sector 2048 op 0x0:(READ)",
            ),
            (
                "Xen under test panics",
                "failure text \"Panic on CPU\" on the console",
                "(XEN) ****************************************\n(XEN) Panic on CPU 0:\n(XEN) Assertion 'x' failed at arch/x86/mm.c:42\n",
                Job,
                "Xen panic",
                "(XEN) Panic on CPU 0:",
            ),
            (
                "dom0 kernel panics",
                "failure text \"Kernel panic\" on the console",
                "[    3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
                Job,
                "kernel panic",
                "[    3.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            ),
            (
                "installer: wrong checksum from the agent",
                "failure text \"LAB-INSTALL stage=failed\" on the console",
                "LAB-INSTALL stage=writing percent=40\nLAB-INSTALL stage=failed reason=sha256 detail=got 00ab, want 11cd\n",
                Infra,
                "installer could not use what the agent served",
                "LAB-INSTALL stage=failed reason=sha256 detail=got 00ab, want 11cd",
            ),
            (
                "installer: the host has no disk",
                "failure text \"LAB-INSTALL stage=failed\" on the console",
                "LAB-INSTALL stage=failed reason=no-disk detail=no disk found (have: loop0 )\n",
                Host,
                "no disk",
                "LAB-INSTALL stage=failed reason=no-disk detail=no disk found (have: loop0 )",
            ),
            (
                "disk boot: sshd did not start",
                "failure text \"LAB-DISK-FAILED\" on the console",
                "LAB-DISK-FAILED host=h1 lease=L-1 reason=sshd-failed\n",
                Job,
                "services of the booted system",
                "LAB-DISK-FAILED host=h1 lease=L-1 reason=sshd-failed",
            ),
            (
                "the agent's capture stopped",
                "the console capture stopped",
                "",
                Infra,
                "console capture stopped",
                "the console capture stopped",
            ),
            (
                "a plain timeout: nobody knows",
                "no \"LAB-DOM0-OK\" on the console within 180s",
                "(XEN) Xen version 4.17.3\n[    1.0] Linux version 6.1.0\n",
                Unknown,
                "",
                "",
            ),
        ];
        for (what, stage, tail, class, rule, line) in cases {
            let got = r.classify(stage, tail);
            assert_eq!(
                (got.class, got.rule.as_str(), got.line.as_str()),
                (*class, *rule, *line),
                "{what}"
            );
        }
    }

    #[test]
    fn the_latest_matching_line_is_shown_and_clipped() {
        let r = Rules::default();
        let long = format!("No bootable device \x1b[0m{}", "x".repeat(1000));
        let tail = format!("No bootable device (first)\n{long}\n");
        let got = r.classify("", &tail);
        assert_eq!(got.rule, "no bootable device");
        assert!(
            got.line.starts_with("No bootable device [0m"),
            "{:?}",
            got.line
        );
        assert_eq!(got.line.chars().count(), MAX_LINE);
    }

    #[test]
    fn operator_rules_come_first() {
        let text = r#"
[[rule]]
name = "flaky NIC"
class = "host"
console = 'e1000e .* Detected Hardware Unit Hang'

[[rule]]
name = "our test harness"
class = "job"
stage = '^no "LAB-DOM0-OK"'
"#;
        let r = Rules::parse(text, Path::new("rules.toml")).unwrap();
        assert_eq!(r.configured(), 2);
        let got = r.classify(
            "no \"LAB-DOM0-OK\" on the console within 180s",
            "e1000e 0000:00:19.0 eth0: Detected Hardware Unit Hang\nNo bootable device\n",
        );
        assert_eq!((got.class, got.rule.as_str()), (Host, "flaky NIC"));
        let got = r.classify("no \"LAB-DOM0-OK\" on the console within 180s", "");
        assert_eq!((got.class, got.rule.as_str()), (Job, "our test harness"));
        // The shipped rules still apply after them.
        let got = r.classify("reading the power state: timeout", "");
        assert_eq!(got.class, Host);
    }

    #[test]
    fn bad_rules_files_name_the_spot() {
        let cases: &[(&str, &str)] = &[
            (
                "[[rule]]\nname = \"x\"\nclass = \"hardware\"\nconsole = 'a'\n",
                "rules.toml:3:9: unknown class \"hardware\" (expected host, job or infra)",
            ),
            (
                "[[rule]]\nname = \"x\"\nclass = \"host\"\nconsole = 'a('\n",
                "rules.toml:4:11: rule \"x\": invalid regex: ",
            ),
            (
                "[[rule]]\nname = \"x\"\nclass = \"host\"\n",
                "rules.toml:1:1: rule \"x\" needs exactly one of `stage` or `console`",
            ),
            (
                "[[rule]]\nname = \"x\"\nclass = \"host\"\nstage = 'a'\nconsole = 'b'\n",
                "rules.toml:1:1: rule \"x\" needs exactly one of `stage` or `console`",
            ),
            (
                "[[rule]]\nname = \"\"\nclass = \"host\"\nstage = 'a'\n",
                "rules.toml:1:1: a rule's name must be printable and not empty",
            ),
            (
                "[[rule]]\nname = \"x\"\nclass = \"host\"\nstage = 'a'\nweight = 3\n",
                "rules.toml:5:1: unknown field `weight`",
            ),
        ];
        for (text, want) in cases {
            let e = Rules::parse(text, Path::new("rules.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text:?}:\n got {e}\nwant {want}…");
        }
    }
}
