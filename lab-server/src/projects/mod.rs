//! Projects and their scheduling policy: who belongs to which project, each
//! project's `share` of the lab (fair share among waiting requests of equal
//! priority) and its limits (`max_hosts` held at once, `max_ttl`,
//! `max_priority`), and limits by role for everyone.
//!
//! Loaded from `policy.toml` (`lab-server --policy FILE`, re-read on
//! SIGHUP like the inventory; [`mod@file`] parses it with `path:line:column`
//! errors). Without a file every principal is in the project `default`
//! with share 1 and no limits but the server's own (`--max-ttl`, the
//! priority cap of `ci` and `developer`): the queue is then priority, then
//! arrival, as before projects existed.
//!
//! A principal listed in no project belongs to `default`, which a file may
//! also describe (without `members`) to set its share and limits. The
//! server's own health checks belong to no project: they are neither
//! counted nor limited.

pub mod file;

use crate::types::{Principal, Role};
use std::collections::HashMap;
use std::time::Duration;

pub use file::PolicyError;

/// The project of principals that no project lists.
pub const DEFAULT_PROJECT: &str = "default";

/// Limits that a project, or a role, puts on requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most hosts held at once: by the whole project (a project's limit)
    /// or by each principal (a role's).
    pub max_hosts: Option<u32>,
    /// Longest TTL a request or renewal may ask for.
    pub max_ttl: Option<Duration>,
    /// Highest priority a request may ask for.
    pub max_priority: Option<i32>,
}

/// One project.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub name: String,
    /// Weight in fair share (> 0).
    pub share: f64,
    pub limits: Limits,
    pub members: Vec<Principal>,
}

/// Projects, members and limits in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Half-life of the decayed host-seconds that fair share compares.
    pub half_life: Duration,
    /// Every project, `default` included (last when the file does not
    /// describe it).
    projects: Vec<Project>,
    by_member: HashMap<Principal, usize>,
    default: usize,
    roles: HashMap<Role, Limits>,
}

/// Index of a project in its [`Policy`] (valid for that policy only).
pub type ProjectIdx = usize;

impl Default for Policy {
    fn default() -> Self {
        Self::new(Duration::from_secs(3600), Vec::new(), HashMap::new())
            .expect("an empty policy is valid")
    }
}

impl Policy {
    /// Builds a policy; adds `default` (share 1, no limits) when
    /// `projects` does not name it. A principal in two projects is
    /// refused (the file's parser reports where).
    pub fn new(
        half_life: Duration,
        mut projects: Vec<Project>,
        roles: HashMap<Role, Limits>,
    ) -> Result<Self, String> {
        if !projects.iter().any(|p| p.name == DEFAULT_PROJECT) {
            projects.push(Project {
                name: DEFAULT_PROJECT.to_owned(),
                share: 1.0,
                limits: Limits::default(),
                members: Vec::new(),
            });
        }
        let mut by_member = HashMap::new();
        for (i, p) in projects.iter().enumerate() {
            for m in &p.members {
                if let Some(j) = by_member.insert(m.clone(), i) {
                    return Err(format!(
                        "{m} is a member of both {} and {}",
                        projects[j].name, p.name
                    ));
                }
            }
        }
        let default = projects
            .iter()
            .position(|p| p.name == DEFAULT_PROJECT)
            .expect("added above");
        Ok(Self {
            half_life,
            projects,
            by_member,
            default,
            roles,
        })
    }

    /// The project `principal` belongs to.
    pub fn project_of(&self, principal: &Principal) -> ProjectIdx {
        self.by_member
            .get(principal)
            .copied()
            .unwrap_or(self.default)
    }

    pub fn project(&self, i: ProjectIdx) -> &Project {
        &self.projects[i]
    }

    pub fn projects(&self) -> &[Project] {
        &self.projects
    }

    /// Whether more than one project exists (otherwise fair share has
    /// nothing to choose between).
    pub fn has_projects(&self) -> bool {
        self.projects.len() > 1
    }

    /// The limits of `role` (each principal of it), if the file sets any.
    pub fn role_limits(&self, role: Role) -> Option<&Limits> {
        self.roles.get(&role)
    }

    /// Longest TTL `caller` may ask for (`None`: the server's limit): the
    /// project's limit, else the role's.
    pub fn max_ttl(&self, principal: &Principal, role: Role) -> Option<Duration> {
        let p = self.project(self.project_of(principal));
        p.limits
            .max_ttl
            .or_else(|| self.role_limits(role).and_then(|l| l.max_ttl))
    }

    /// Most hosts `caller` may hold at once (`None`: no limit): the
    /// smaller of its project's and its role's.
    pub fn max_hosts(&self, principal: &Principal, role: Role) -> Option<u32> {
        let p = self.project(self.project_of(principal));
        let role = self.role_limits(role).and_then(|l| l.max_hosts);
        match (p.limits.max_hosts, role) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Highest priority `caller` may ask for (`None`: the server's rule):
    /// the project's limit, else the role's.
    pub fn max_priority(&self, principal: &Principal, role: Role) -> Option<i32> {
        let p = self.project(self.project_of(principal));
        p.limits
            .max_priority
            .or_else(|| self.role_limits(role).and_then(|l| l.max_priority))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Principal {
        Principal::new(s).unwrap()
    }

    #[test]
    fn members_defaults_and_limits() {
        let projects = vec![Project {
            name: "xen-ci".into(),
            share: 3.0,
            limits: Limits {
                max_hosts: Some(8),
                max_ttl: Some(Duration::from_secs(7200)),
                max_priority: None,
            },
            members: vec![p("osstest")],
        }];
        let roles = HashMap::from([(
            Role::Ci,
            Limits {
                max_priority: Some(5),
                max_ttl: Some(Duration::from_secs(60)),
                ..Limits::default()
            },
        )]);
        let pol = Policy::new(Duration::from_secs(3600), projects, roles).unwrap();
        let ci = pol.project_of(&p("osstest"));
        assert_eq!(pol.project(ci).name, "xen-ci");
        let other = pol.project_of(&p("alice"));
        assert_eq!(pol.project(other).name, DEFAULT_PROJECT);
        assert!(pol.has_projects());
        // The project's own limit wins; the role's fills what it leaves.
        assert_eq!(
            pol.max_ttl(&p("osstest"), Role::Ci),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(pol.max_priority(&p("osstest"), Role::Ci), Some(5));
        assert_eq!(
            pol.max_ttl(&p("alice"), Role::Ci),
            Some(Duration::from_secs(60))
        );
        assert_eq!(pol.max_ttl(&p("alice"), Role::Developer), None);
        assert!(!Policy::default().has_projects());
    }

    #[test]
    fn a_principal_in_two_projects_is_refused() {
        let mk = |name: &str| Project {
            name: name.into(),
            share: 1.0,
            limits: Limits::default(),
            members: vec![p("bob")],
        };
        let err = Policy::new(
            Duration::from_secs(1),
            vec![mk("a"), mk("b")],
            HashMap::new(),
        )
        .unwrap_err();
        assert_eq!(err, "bob is a member of both a and b");
    }
}
