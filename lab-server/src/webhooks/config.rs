//! The webhooks file (`--webhooks`) in two layers: serde types mirroring
//! the TOML (unknown fields refused, spans kept), converted into
//! [`Webhooks`] (unique names, parseable URLs, known event names, a secret
//! read from its file, valid principals). Every error is reported as
//! `path:line:column: reason`, pointing at the offending value; an inline
//! `secret` never reaches an error, a log line or `Debug`.

use super::{Hook, Webhooks};
use crate::events::EventKind;
use crate::types::Principal;
use lab_types::{FileError, Secret};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Why the webhooks file could not be loaded (positioned like the
/// inventory's errors).
pub type WebhooksError = FileError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    webhook: Vec<RawHook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    name: Spanned<String>,
    url: Spanned<String>,
    events: Spanned<Vec<Spanned<String>>>,
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    #[serde(default)]
    holders: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Webhooks {
    /// Reads and validates the webhooks file (and the secret files it
    /// names) at `path`.
    pub fn load(path: &Path) -> Result<Webhooks, WebhooksError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            what: "webhooks file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates a webhooks file's text; `path` is used in error messages
    /// and to resolve relative `secret_file`s (relative to its directory).
    pub fn parse(text: &str, path: &Path) -> Result<Webhooks, WebhooksError> {
        let at = |span: std::ops::Range<usize>, reason: String| {
            FileError::at(path, text, span.start, reason)
        };
        // Only `message()`: the full `Display` quotes the source line, which
        // may hold a secret.
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), e.message().trim_end().to_owned()))?;
        let mut hooks = Vec::with_capacity(raw.webhook.len());
        let mut names = lab_types::EntryNames::default();
        for h in raw.webhook {
            let name = h.name.get_ref();
            names
                .add("webhook", name, text, h.name.span().start)
                .map_err(|reason| at(h.name.span(), reason))?;
            let url = super::client::Target::parse(h.url.get_ref())
                .map_err(|reason| at(h.url.span(), reason))?;
            let mut events = BTreeSet::new();
            if h.events.get_ref().is_empty() {
                return Err(at(
                    h.events.span(),
                    "events must name at least one event kind (or \"*\")".into(),
                ));
            }
            for e in h.events.get_ref() {
                let kinds: Vec<EventKind> = match e.get_ref().as_str() {
                    "*" => EventKind::ALL
                        .into_iter()
                        .filter(|k| *k != EventKind::WebhookUndelivered)
                        .collect(),
                    n => match EventKind::from_name(n) {
                        Some(EventKind::WebhookUndelivered) => {
                            return Err(at(
                                e.span(),
                                "WEBHOOK_UNDELIVERED is not delivered by webhooks (it reports their failures; see the event log and lab_webhook_deliveries_total)".into(),
                            ));
                        }
                        Some(k) => vec![k],
                        None => {
                            return Err(at(
                                e.span(),
                                format!(
                                    "unknown event kind {n:?}; one of \"*\", {}",
                                    EventKind::ALL
                                        .iter()
                                        .filter(|k| **k != EventKind::WebhookUndelivered)
                                        .map(|k| k.name())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ));
                        }
                    },
                };
                events.extend(kinds);
            }
            let secret = match (&h.secret, &h.secret_file) {
                (Some(_), Some(file)) => {
                    return Err(at(
                        file.span(),
                        "give either secret or secret_file, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(at(
                        h.name.span(),
                        format!("webhook {name} needs secret_file (or secret)"),
                    ));
                }
                (Some(s), None) => Secret::from_bytes(s.get_ref().as_bytes()),
                (None, Some(file)) => {
                    let p = PathBuf::from(file.get_ref());
                    let p = if p.is_relative() {
                        path.parent().unwrap_or(Path::new(".")).join(p)
                    } else {
                        p
                    };
                    let bytes = std::fs::read(&p).map_err(|e| {
                        at(
                            file.span(),
                            format!("cannot read secret file {}: {e}", p.display()),
                        )
                    })?;
                    let mut s = Secret::new(bytes);
                    s.trim_trailing_newlines();
                    s
                }
            };
            if secret.is_empty() {
                let span = h
                    .secret_file
                    .as_ref()
                    .or(h.secret.as_ref())
                    .map_or(0..0, Spanned::span);
                return Err(at(span, "the secret is empty".into()));
            }
            let holders = match &h.holders {
                None => None,
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for p in list.get_ref() {
                        let principal = Principal::new(p.get_ref().clone())
                            .map_err(|e| at(p.span(), e.to_string()))?;
                        set.insert(principal);
                    }
                    if set.is_empty() {
                        return Err(at(
                            list.span(),
                            "holders is empty: leave it out for every holder".into(),
                        ));
                    }
                    Some(set)
                }
            };
            hooks.push(Hook {
                name: name.clone(),
                url,
                events,
                secret,
                holders,
            });
        }
        Ok(Webhooks { hooks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Webhooks, String> {
        Webhooks::parse(text, Path::new("/etc/lab/webhooks.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_file() {
        let w = parse(
            r#"
[[webhook]]
name = "ci"
url = "https://ci.example.org:8443/hooks/lab?x=1"
events = ["LEASE_GRANTED", "LEASE_EXPIRING"]
secret = "s3cret"
holders = ["ci-xen"]

[[webhook]]
name = "ops"
url = "http://127.0.0.1:9000/"
events = ["*"]
secret = "other"
"#,
        )
        .unwrap();
        assert_eq!(w.hooks.len(), 2);
        let ci = &w.hooks[0];
        assert_eq!(
            ci.events,
            [EventKind::LeaseGranted, EventKind::LeaseExpiring].into()
        );
        assert_eq!(ci.secret.expose(), b"s3cret");
        assert_eq!(
            ci.url.to_string(),
            "https://ci.example.org:8443/hooks/lab?x=1"
        );
        let ops = &w.hooks[1];
        assert!(ops.events.contains(&EventKind::HostHealth));
        assert!(!ops.events.contains(&EventKind::WebhookUndelivered));
        assert!(ops.holders.is_none());
        let debug = format!("{w:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("other"),
            "{debug}"
        );
    }

    #[test]
    fn errors_point_at_the_value_and_never_show_the_secret() {
        let cases = [
            (
                "[[webhook]]\nname = \"a\"\nurl = \"ftp://x/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\n",
                "/etc/lab/webhooks.toml:3:7: ",
                "http:// or https://",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"LEASE_GRANTED\", \"LEASE_EXPLODED\"]\nsecret = \"hunter2\"\n",
                "/etc/lab/webhooks.toml:4:28: ",
                "unknown event kind \"LEASE_EXPLODED\"",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"WEBHOOK_UNDELIVERED\"]\nsecret = \"hunter2\"\n",
                "/etc/lab/webhooks.toml:4:11: ",
                "not delivered by webhooks",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\n[[webhook]]\nname = \"a\"\nurl = \"http://y/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\n",
                "/etc/lab/webhooks.toml:7:8: ",
                "duplicate webhook name a (first defined at line 2)",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\n",
                "/etc/lab/webhooks.toml:2:8: ",
                "needs secret_file",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\nsecret_file = \"/nope\"\n",
                "/etc/lab/webhooks.toml:6:15: ",
                "either secret or secret_file",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret_file = \"/surely/not/here\"\n",
                "/etc/lab/webhooks.toml:5:15: ",
                "cannot read secret file /surely/not/here",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\nholders = [\"server\"]\n",
                "/etc/lab/webhooks.toml:6:12: ",
                "invalid principal \"server\"",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret = \"hunter2\"\ncolour = \"red\"\n",
                "/etc/lab/webhooks.toml:6:1: ",
                "unknown field `colour`",
            ),
            (
                "[[webhook]]\nname = \"a\"\nurl = \"http://x/\"\nevents = [\"*\"]\nsecret = 12\n",
                "/etc/lab/webhooks.toml:5:10: ",
                "invalid type",
            ),
        ];
        for (text, prefix, reason) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(prefix), "{e:?} should start with {prefix:?}");
            assert!(e.contains(reason), "{e:?} should contain {reason:?}");
            assert!(!e.contains("hunter2"), "{e:?} shows the secret");
        }
    }

    #[test]
    fn secret_files_are_read_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ci.secret"), "from-file\n").unwrap();
        let path = dir.path().join("webhooks.toml");
        std::fs::write(
            &path,
            "[[webhook]]\nname = \"ci\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\nsecret_file = \"ci.secret\"\n",
        )
        .unwrap();
        let w = Webhooks::load(&path).unwrap();
        assert_eq!(w.hooks[0].secret.expose(), b"from-file");
    }

    /// The example shipped in packaging/ parses (with its secret file
    /// replaced by an inline secret, as the file is not installed here).
    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../../packaging/etc/webhooks.toml");
        let text = text.replace(
            "secret_file = \"/etc/lab/webhook-ci.secret\"",
            "secret = \"x\"",
        );
        let w = parse(&text).unwrap();
        assert!(!w.hooks.is_empty());
    }
}
