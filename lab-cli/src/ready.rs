//! `--wait-ready`: what is new in a lease's boot progress, and whether the
//! wait is over. Pure functions of the lease views; the polling lives in
//! `commands/lease.rs`.

use std::collections::HashMap;

use crate::sanitize;
use crate::view::{LeaseView, ProvisioningView};

/// Where the wait stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Every host of the lease is ready.
    Ready,
    /// These hosts failed (the wait is over).
    Failed(Vec<&'a ProvisioningView>),
    /// Still booting, or not reported yet.
    Waiting,
}

/// The provisioning entry of `host`, if the server reported one.
fn entry<'a>(lease: &'a LeaseView, host: &str) -> Option<&'a ProvisioningView> {
    lease.provisioning.iter().find(|p| p.host == host)
}

pub fn verdict(lease: &LeaseView) -> Verdict<'_> {
    let failed: Vec<&ProvisioningView> = lease
        .provisioning
        .iter()
        .filter(|p| p.phase == "failed")
        .collect();
    if !failed.is_empty() {
        return Verdict::Failed(failed);
    }
    let ready = lease
        .hosts
        .iter()
        .all(|h| entry(lease, h).is_some_and(|p| p.phase == "ready"));
    if ready {
        Verdict::Ready
    } else {
        Verdict::Waiting
    }
}

/// The progress lines already printed, per host.
#[derive(Debug, Default)]
pub struct Progress {
    shown: HashMap<String, String>,
}

impl Progress {
    /// `x1: booting — powered on` for every host whose phase or stage
    /// changed since the last call, in the lease's host order.
    pub fn news(&mut self, lease: &LeaseView) -> Vec<String> {
        let mut lines = Vec::new();
        for p in &lease.provisioning {
            let progress = p.progress();
            if self.shown.get(&p.host) != Some(&progress) {
                lines.push(format!("{}: {progress}", p.host));
                self.shown.insert(p.host.clone(), progress);
            }
        }
        lines
    }
}

/// `x1: booting — powered on, x2: pending`: where every host stands (for
/// the timeout message).
pub fn summary(lease: &LeaseView) -> String {
    lease
        .hosts
        .iter()
        .map(|h| match entry(lease, h) {
            Some(p) => format!("{h}: {}", p.progress()),
            None => format!("{h}: not reported"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The console tail of a failed host: a header, then the lines as the
/// server sent them but with control characters other than line ends
/// escaped ([`sanitize::text`]), ending in a newline.
pub fn tail(p: &ProvisioningView) -> Option<String> {
    let tail = p.console_tail.as_deref()?;
    let mut s = format!(
        "==> console of {} (last lines) <==\n{}",
        sanitize::line(&p.host),
        sanitize::text(tail)
    );
    if !s.ends_with('\n') {
        s.push('\n');
    }
    Some(s)
}

/// `x2 failed: the host's fault (rule "no bootable device"): No bootable
/// device.`: the server's attribution of a failed host, escaped, ending in
/// a newline.
pub fn attribution(p: &ProvisioningView) -> Option<String> {
    let f = p.failure.as_ref()?;
    let whose = match f.class {
        "host" => "the host's fault",
        "job" => "the job's fault",
        "infra" => "the lab's fault",
        _ => "cause unknown",
    };
    let mut s = format!("{} failed: {whose}", sanitize::line(&p.host));
    if let Some(rule) = &f.rule {
        s.push_str(&format!(" (rule \"{}\")", sanitize::line(rule)));
    }
    if let Some(line) = &f.line {
        s.push_str(": ");
        s.push_str(&sanitize::line(line));
    }
    s.push('\n');
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_proto::v1::{HostProvisioning, Lease, ProvisionPhase};

    fn lease(entries: &[(&str, ProvisionPhase, &str)]) -> LeaseView {
        LeaseView::from(&Lease {
            id: "L-1".into(),
            hosts: vec!["x1".into(), "x2".into()],
            provisioning: entries
                .iter()
                .map(|(host, phase, stage)| HostProvisioning {
                    host: (*host).into(),
                    phase: *phase as i32,
                    stage: (*stage).into(),
                    console_tail: if *phase == ProvisionPhase::Failed {
                        "panic: no root\r\n".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    use ProvisionPhase::{Booting, Failed, Pending, Ready};

    #[test]
    fn ready_needs_every_host() {
        assert_eq!(verdict(&lease(&[])), Verdict::Waiting);
        assert_eq!(verdict(&lease(&[("x1", Ready, "")])), Verdict::Waiting);
        assert_eq!(
            verdict(&lease(&[("x1", Ready, ""), ("x2", Booting, "")])),
            Verdict::Waiting
        );
        assert_eq!(
            verdict(&lease(&[("x1", Ready, ""), ("x2", Ready, "")])),
            Verdict::Ready
        );
    }

    #[test]
    fn any_failure_ends_the_wait() {
        let l = lease(&[("x1", Booting, ""), ("x2", Failed, "no ready marker")]);
        let Verdict::Failed(failed) = verdict(&l) else {
            panic!("not failed");
        };
        assert_eq!(failed.len(), 1);
        assert_eq!(
            tail(failed[0]).unwrap(),
            "==> console of x2 (last lines) <==\npanic: no root\r\n"
        );
    }

    #[test]
    fn tails_keep_line_ends_and_escape_the_rest() {
        let mut l = lease(&[("x1", Failed, "")]);
        l.provisioning[0].host = "x1\x1b[2J".into();
        l.provisioning[0].console_tail =
            Some("\x1b[1;31mpanic\x1b[0m\r\n\x1b]0;pwned\x07\u{202e}\r".into());
        assert_eq!(
            tail(&l.provisioning[0]).unwrap(),
            "==> console of x1\\x1b[2J (last lines) <==\n\
             \\x1b[1;31mpanic\\x1b[0m\r\n\\x1b]0;pwned\\x07\\u{202e}\\r\n"
        );
    }

    #[test]
    fn progress_prints_only_changes() {
        let mut p = Progress::default();
        assert_eq!(
            p.news(&lease(&[("x1", Pending, ""), ("x2", Pending, "")])),
            ["x1: pending", "x2: pending"]
        );
        assert!(
            p.news(&lease(&[("x1", Pending, ""), ("x2", Pending, "")]))
                .is_empty()
        );
        assert_eq!(
            p.news(&lease(&[
                ("x1", Booting, "powered on"),
                ("x2", Pending, "")
            ])),
            ["x1: booting \u{2014} powered on"]
        );
        assert_eq!(
            summary(&lease(&[("x1", Booting, "powered on")])),
            "x1: booting \u{2014} powered on, x2: not reported"
        );
    }
}
