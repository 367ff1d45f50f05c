//! The install-to-disk flow's console protocol (docs/netboot.md, "Console
//! lines" and "Booting the disk, and the ready line") as pure functions,
//! for the [`provision`](super::provision) machine: console bytes cut into
//! clean lines ([`Lines`]), the installer's `LAB-INSTALL stage=… key=value
//! … detail=…` lines ([`InstallLine`]) and what each means for the lease's
//! progress ([`Meaning`]), and the `key=value` words of the installed
//! system's ready line ([`ReadyLine`]).

/// What starts every installer line.
pub const INSTALL_MARKER: &str = "LAB-INSTALL ";

/// The longest line kept; a longer one is cut there (and its rest is the
/// next line).
pub const MAX_LINE: usize = 1024;

/// Console output cut into lines. Bytes of a line not finished yet are
/// kept (at most [`MAX_LINE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// The lines that `data` completes, cleaned ([`clean`]); empty ones
    /// are left out.
    pub fn feed(&mut self, data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                self.take(&mut out);
            } else {
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    self.take(&mut out);
                }
            }
        }
        out
    }

    fn take(&mut self, out: &mut Vec<String>) {
        let line = clean(&self.partial);
        self.partial.clear();
        if !line.is_empty() {
            out.push(line);
        }
    }

    /// Forgets a line begun before (a new boot starts).
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

/// A console line as text: lossy UTF-8 without terminal escape sequences
/// (SeaBIOS and iPXE paint the screen with them) or other control
/// characters, trimmed.
pub fn clean(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters… final byte (@ to ~); else ESC + one.
            if chars.next_if_eq(&'[').is_some() {
                for p in chars.by_ref() {
                    if ('@'..='~').contains(&p) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

/// The words after a marker: `key=value`, where `detail=` takes the rest of
/// the line.
fn words(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(detail) = rest.strip_prefix("detail=") {
            out.push(("detail".to_owned(), detail.trim().to_owned()));
            break;
        }
        let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some((k, v)) = word.split_once('=') {
            out.push((k.to_owned(), v.to_owned()));
        }
        rest = tail.trim_start();
    }
    out
}

fn get<'a>(words: &'a [(String, String)], key: &str) -> Option<&'a str> {
    words
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// One `LAB-INSTALL` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallLine {
    /// The line from the marker on (for messages).
    pub text: String,
    pub stage: String,
    words: Vec<(String, String)>,
}

/// What an installer line means for the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meaning {
    /// The install goes on: a stage to report, and the percentage if the
    /// line gives one.
    Progress { stage: String, percent: Option<u32> },
    /// The image is written and checked; the installer powers off next.
    Done { stage: String },
    /// The installer gave up (and powers off).
    Failed { stage: String },
}

impl InstallLine {
    /// The installer line in `line`, if there is one (the marker may come
    /// after other output on the same line).
    pub fn parse(line: &str) -> Option<InstallLine> {
        let at = line.find(INSTALL_MARKER)?;
        let text = &line[at..];
        let words = words(&text[INSTALL_MARKER.len()..]);
        let stage = get(&words, "stage")?.to_owned();
        Some(InstallLine {
            text: text.to_owned(),
            stage,
            words,
        })
    }

    /// A `key=value` word of the line (`detail`: the rest of the line).
    pub fn get(&self, key: &str) -> Option<&str> {
        get(&self.words, key)
    }

    /// What the line means, in the words of a lease's progress.
    pub fn meaning(&self) -> Meaning {
        let with = |what: &str, key: &str| match self.get(key) {
            Some(v) => format!("{what} {v}"),
            None => what.to_owned(),
        };
        let progress = |stage: String| Meaning::Progress {
            stage,
            percent: None,
        };
        match self.stage.as_str() {
            "start" => Meaning::Progress {
                stage: "installer started".into(),
                percent: Some(0),
            },
            "network" => progress(with("installer on the network at", "ip")),
            "metadata" => progress(match self.get("keys") {
                Some("1") => "lease metadata checked (1 SSH key)".into(),
                Some(n) => format!("lease metadata checked ({n} SSH keys)"),
                None => "lease metadata checked".into(),
            }),
            "disk" => progress(with("installing to", "dev")),
            "writing" => Meaning::Progress {
                stage: "writing the image".into(),
                percent: self
                    .get("percent")
                    .and_then(|p| p.parse::<u32>().ok())
                    .map(|p| p.min(100)),
            },
            "done" => Meaning::Done {
                stage: match (self.get("seconds"), self.get("mbps")) {
                    (Some(s), Some(m)) => {
                        format!("image written and checked in {s} s ({m} MB/s)")
                    }
                    _ => "image written and checked".into(),
                },
            },
            "failed" => {
                let reason = self.get("reason").unwrap_or("unknown");
                Meaning::Failed {
                    stage: match self.get("detail") {
                        Some(d) => format!("install failed: {reason}: {d}"),
                        None => format!("install failed: {reason}"),
                    },
                }
            }
            other => progress(format!("installer stage {other}")),
        }
    }
}

/// The installed system's ready line: the ready text and the `key=value`
/// words after it (`host=… lease=… xen=… sshd=… ip=… hostkey=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    words: Vec<(String, String)>,
}

impl ReadyLine {
    /// The words after `ready` in `line` (`None` if `ready` is not there).
    pub fn parse(line: &str, ready: &str) -> Option<ReadyLine> {
        let at = line.find(ready)?;
        Some(ReadyLine {
            words: words(&line[at + ready.len()..]),
        })
    }

    /// The lease the installed system was installed for (`None`: it does
    /// not say, or `-`).
    pub fn lease(&self) -> Option<&str> {
        get(&self.words, "lease").filter(|l| *l != "-")
    }

    /// What a holder wants to know: `xen 4.17.7, ssh root@198.18.0.11, host
    /// key SHA256:…` (the parts the line has).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(x) = get(&self.words, "xen") {
            parts.push(format!("xen {x}"));
        }
        if let Some(ip) = get(&self.words, "ip") {
            parts.push(format!("ssh root@{ip}"));
        }
        if let Some(k) = get(&self.words, "hostkey") {
            parts.push(format!("host key {k}"));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_cleaned_and_bounded() {
        let mut l = Lines::default();
        assert_eq!(l.feed(b"\x1b[2J\x1b[1;1HSeaBIOS (version 1.16)\r"), [""; 0]);
        assert_eq!(
            l.feed(b"\n\r\nLAB-INSTALL stage=wri"),
            ["SeaBIOS (version 1.16)"]
        );
        assert_eq!(
            l.feed(b"ting percent=5\r\n\x07bell\x1bc\n"),
            ["LAB-INSTALL stage=writing percent=5", "bell"]
        );
        let long = vec![b'x'; MAX_LINE + 10];
        let got = l.feed(&long);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(l.feed(b"\n"), ["x".repeat(10)]);
        l.feed(b"half a line");
        l.clear();
        assert_eq!(l.feed(b"new\n"), ["new"]);
        assert_eq!(
            clean("caf\u{e9} \u{1b}[0m ok \u{fffd}".as_bytes()),
            "caf\u{e9}  ok \u{fffd}"
        );
    }

    /// Each installer line of docs/netboot.md × what the lease shows.
    #[test]
    fn installer_lines_and_their_meaning() {
        let progress = |stage: &str, percent: Option<u32>| Meaning::Progress {
            stage: stage.into(),
            percent,
        };
        let table = [
            (
                "LAB-INSTALL stage=start version=1 kernel=6.1.0-28-amd64 image=http://a/x.zst",
                progress("installer started", Some(0)),
            ),
            (
                "[ 7.1] LAB-INSTALL stage=network iface=eth0 ip=198.18.0.11",
                progress("installer on the network at 198.18.0.11", None),
            ),
            (
                "LAB-INSTALL stage=metadata host=h1 lease=L-1 keys=1",
                progress("lease metadata checked (1 SSH key)", None),
            ),
            (
                "LAB-INSTALL stage=metadata host=- lease=- keys=0",
                progress("lease metadata checked (0 SSH keys)", None),
            ),
            (
                "LAB-INSTALL stage=disk dev=/dev/vda bytes=4294967296 model=-",
                progress("installing to /dev/vda", None),
            ),
            (
                "LAB-INSTALL stage=writing percent=42 bytes=1 total=2",
                progress("writing the image", Some(42)),
            ),
            (
                "LAB-INSTALL stage=writing percent=420",
                progress("writing the image", Some(100)),
            ),
            (
                "LAB-INSTALL stage=writing percent=x",
                progress("writing the image", None),
            ),
            (
                "LAB-INSTALL stage=done sha256=ok bytes=738197504 seconds=24 mbps=29.3 then=poweroff",
                Meaning::Done {
                    stage: "image written and checked in 24 s (29.3 MB/s)".into(),
                },
            ),
            (
                "LAB-INSTALL stage=failed reason=http detail=http://a/x.zst: server returned error: HTTP/1.1 404 Not Found",
                Meaning::Failed {
                    stage: "install failed: http: http://a/x.zst: server returned error: HTTP/1.1 404 Not Found".into(),
                },
            ),
            (
                "LAB-INSTALL stage=failed",
                Meaning::Failed {
                    stage: "install failed: unknown".into(),
                },
            ),
            (
                "LAB-INSTALL stage=resize",
                progress("installer stage resize", None),
            ),
        ];
        for (line, want) in table {
            let got = InstallLine::parse(line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(got.meaning(), want, "{line}");
            assert!(got.text.starts_with(INSTALL_MARKER), "{line}");
        }
        for not in [
            "LAB-INSTALL",
            "LAB-INSTALL percent=5",
            "echo LAB-INSTALLER stage=x",
        ] {
            assert_eq!(InstallLine::parse(not), None, "{not}");
        }
        let l =
            InstallLine::parse("LAB-INSTALL stage=failed reason=no-disk detail=  none  ").unwrap();
        assert_eq!(
            (l.get("reason"), l.get("detail")),
            (Some("no-disk"), Some("none"))
        );
    }

    #[test]
    fn the_ready_line_names_its_lease_and_how_to_reach_the_host() {
        let r = ReadyLine::parse(
            "LAB-DISK-READY host=h1 lease=L-1 xen=4.17.7 sshd=active ip=198.18.0.11 hostkey=SHA256:abc",
            "LAB-DISK-READY",
        )
        .unwrap();
        assert_eq!(r.lease(), Some("L-1"));
        assert_eq!(
            r.describe(),
            "xen 4.17.7, ssh root@198.18.0.11, host key SHA256:abc"
        );
        let r = ReadyLine::parse("x LAB-DISK-READY host=h1 lease=-", "LAB-DISK-READY").unwrap();
        assert_eq!((r.lease(), r.describe().as_str()), (None, ""));
        assert_eq!(ReadyLine::parse("LAB-DISK-FAILED", "LAB-DISK-READY"), None);
    }
}
