//! `policy.toml` in two layers: serde types mirroring the TOML (unknown
//! fields refused, spans kept), converted into a [`Policy`] (valid and
//! unique project names, shares > 0, durations humantime parses, principals
//! in at most one project, known roles). Every error is reported as
//! `path:line:column: reason`, pointing at the offending value.
//!
//! ```toml
//! [fair_share]
//! half_life = "1h"          # of the decayed host-seconds compared
//!
//! [role.developer]          # each developer: at most 2 hosts at once
//! max_hosts = 2
//! max_ttl = "8h"
//!
//! [[project]]
//! name = "xen-ci"
//! share = 3                 # 3 : 1 against a project of share 1
//! members = ["osstest", "gitlab"]
//! max_hosts = 8             # held by all its members together
//! max_ttl = "12h"
//! max_priority = 20
//! ```

use super::{DEFAULT_PROJECT, Limits, Policy, Project};
use crate::types::{Principal, Role};
use lab_types::FileError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// Why the policy file could not be loaded.
pub type PolicyError = FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    fair_share: Option<RawFairShare>,
    #[serde(default)]
    role: BTreeMap<String, Spanned<RawLimits>>,
    #[serde(default)]
    project: Vec<RawProject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFairShare {
    half_life: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_hosts: Option<Spanned<i64>>,
    max_ttl: Option<Spanned<String>>,
    max_priority: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(i64),
    Float(f64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    name: Spanned<String>,
    share: Option<Spanned<Number>>,
    #[serde(default)]
    members: Vec<Spanned<String>>,
    max_hosts: Option<Spanned<i64>>,
    max_ttl: Option<Spanned<String>>,
    max_priority: Option<Spanned<i64>>,
}

impl Policy {
    /// Reads and validates the policy file at `path`.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            what: "policy file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates a policy file's text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
        let at = |span: std::ops::Range<usize>, reason: String| {
            FileError::at(path, text, span.start, reason)
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), e.message().trim_end().to_owned()))?;
        let duration =
            |s: &Spanned<String>, what: &str| match humantime::parse_duration(s.get_ref()) {
                Ok(d) if !d.is_zero() => Ok(d),
                Ok(_) => Err(at(s.span(), format!("{what} must be more than 0"))),
                Err(e) => Err(at(
                    s.span(),
                    format!(
                        "invalid {what} {:?}: {e} (e.g. \"90m\", \"12h\")",
                        s.get_ref()
                    ),
                )),
            };
        let limits = |max_hosts: &Option<Spanned<i64>>,
                      max_ttl: &Option<Spanned<String>>,
                      max_priority: &Option<Spanned<i64>>| {
            let max_hosts = match max_hosts {
                None => None,
                Some(n) => Some(
                    u32::try_from(*n.get_ref())
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            at(n.span(), "max_hosts must be a whole number from 1".into())
                        })?,
                ),
            };
            let max_ttl = max_ttl
                .as_ref()
                .map(|s| duration(s, "max_ttl"))
                .transpose()?;
            let max_priority = match max_priority {
                None => None,
                Some(n) => Some(
                    i32::try_from(*n.get_ref())
                        .map_err(|_| at(n.span(), "max_priority is out of range".into()))?,
                ),
            };
            Ok::<_, FileError>(Limits {
                max_hosts,
                max_ttl,
                max_priority,
            })
        };

        let half_life = match raw.fair_share.as_ref().and_then(|f| f.half_life.as_ref()) {
            Some(s) => duration(s, "half_life")?,
            None => Duration::from_secs(3600),
        };
        let mut roles = HashMap::new();
        for (name, l) in &raw.role {
            let role = match name.as_str() {
                "ci" => Role::Ci,
                "developer" => Role::Developer,
                "operator" => Role::Operator,
                other => {
                    return Err(at(
                        l.span(),
                        format!("unknown role {other:?}: one of ci, developer, operator"),
                    ));
                }
            };
            let r = l.get_ref();
            roles.insert(role, limits(&r.max_hosts, &r.max_ttl, &r.max_priority)?);
        }
        let mut projects = Vec::with_capacity(raw.project.len());
        let mut names = lab_types::EntryNames::default();
        let mut member_lines: HashMap<Principal, (String, usize)> = HashMap::new();
        for p in &raw.project {
            let name = p.name.get_ref();
            names
                .add("project", name, text, p.name.span().start)
                .map_err(|reason| at(p.name.span(), reason))?;
            let share = match &p.share {
                None => 1.0,
                Some(s) => {
                    let v = match s.get_ref() {
                        Number::Int(i) => *i as f64,
                        Number::Float(f) => *f,
                    };
                    if !(v.is_finite() && v > 0.0 && v <= 1e6) {
                        return Err(at(
                            s.span(),
                            "share must be a number above 0 (and at most 1000000)".into(),
                        ));
                    }
                    v
                }
            };
            if name == DEFAULT_PROJECT
                && let Some(m) = p.members.first()
            {
                return Err(at(
                    m.span(),
                    "the default project has no members list: it holds every principal no other project lists".into(),
                ));
            }
            let mut members = Vec::with_capacity(p.members.len());
            for m in &p.members {
                let principal =
                    Principal::new(m.get_ref().clone()).map_err(|e| at(m.span(), e.to_string()))?;
                let line = lab_types::line_column(text, m.span().start).0;
                if let Some((other, first)) =
                    member_lines.insert(principal.clone(), (name.clone(), line))
                {
                    return Err(at(
                        m.span(),
                        format!(
                            "{principal} is already a member of {other} (line {first}); a principal belongs to one project"
                        ),
                    ));
                }
                members.push(principal);
            }
            projects.push(Project {
                name: name.clone(),
                share,
                limits: limits(&p.max_hosts, &p.max_ttl, &p.max_priority)?,
                members,
            });
        }
        Policy::new(half_life, projects, roles).map_err(|reason| at(0..0, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, String> {
        Policy::parse(text, Path::new("policy.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file() {
        let pol = parse(
            r#"
[fair_share]
half_life = "30m"

[role.developer]
max_hosts = 2
max_ttl = "8h"

[[project]]
name = "xen-ci"
share = 3
members = ["osstest", "gitlab"]
max_hosts = 8
max_priority = 20

[[project]]
name = "default"
share = 0.5
"#,
        )
        .unwrap();
        assert_eq!(pol.half_life, Duration::from_secs(1800));
        assert_eq!(pol.projects().len(), 2);
        let x = pol.project(pol.project_of(&Principal::new("gitlab").unwrap()));
        assert_eq!((x.name.as_str(), x.share), ("xen-ci", 3.0));
        assert_eq!(x.limits.max_hosts, Some(8));
        let d = pol.project(pol.project_of(&Principal::new("alice").unwrap()));
        assert_eq!((d.name.as_str(), d.share), ("default", 0.5));
        assert_eq!(pol.role_limits(Role::Developer).unwrap().max_hosts, Some(2));
    }

    #[test]
    fn errors_point_at_the_value() {
        let cases = [
            (
                "[[project]]\nname = \"a b\"\n",
                "policy.toml:2:8: invalid project name \"a b\"",
            ),
            (
                "[[project]]\nname = \"a\"\nshare = 0\n",
                "policy.toml:3:9: share must be a number above 0",
            ),
            (
                "[[project]]\nname = \"a\"\nmax_ttl = \"soon\"\n",
                "policy.toml:3:11: invalid max_ttl \"soon\"",
            ),
            (
                "[[project]]\nname = \"a\"\nmembers = [\"x\"]\n[[project]]\nname = \"b\"\nmembers = [\"y\", \"x\"]\n",
                "policy.toml:6:17: x is already a member of a (line 3)",
            ),
            (
                "[[project]]\nname = \"a\"\n[[project]]\nname = \"a\"\n",
                "policy.toml:4:8: duplicate project name a (first defined at line 2)",
            ),
            (
                "[role.agent]\nmax_hosts = 1\n",
                "policy.toml:1:1: unknown role \"agent\"",
            ),
            (
                "[role.ci]\nmax_hosts = 0\n",
                "policy.toml:2:13: max_hosts must be",
            ),
            (
                "[[project]]\nname = \"default\"\nmembers = [\"x\"]\n",
                "policy.toml:3:12: the default project has no members list",
            ),
            (
                "[[project]]\nname = \"a\"\nshares = 2\n",
                "policy.toml:3:1: unknown field `shares`",
            ),
            (
                "[[project]]\nname = \"a\"\nmembers = [\"server\"]\n",
                "policy.toml:3:12: ",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err();
            assert!(
                got.starts_with(want),
                "{text:?}\n got: {got}\nwant: {want}…"
            );
        }
    }

    /// The example shipped in packaging/ parses.
    #[test]
    fn the_shipped_example_parses() {
        let pol = parse(include_str!("../../../packaging/etc/policy.toml")).unwrap();
        assert_eq!(pol.projects().len(), 3, "xen-ci, people and default");
    }
}
