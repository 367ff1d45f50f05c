//! `data_dir/provisioning.toml`: the lease, phase and stage of every host's
//! provisioning, so that a restarted agent neither provisions a lease again
//! (no second power cycle) nor forgets it.
//!
//! One writer: [`Persister`] owns a task that writes the latest snapshot it
//! was given (older ones it had no time for are skipped: the latest state
//! wins) to a temporary file, `fsync`s it and renames it over the old one,
//! on a blocking thread. A host task that must not act before its state is
//! on disk (it claimed a lease and is about to power the host) waits for
//! its [`Ticket`].

use super::report::Phase;
use lab_types::{HostName, LeaseId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tracing::warn;

/// What is persisted per host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub lease: LeaseId,
    pub phase: Phase,
    pub stage: String,
}

/// Every host's record.
pub type Snapshot = BTreeMap<HostName, Record>;

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("provisioning.toml")
}

/// Reads the file (once, at start-up). A missing file is an empty state;
/// an unreadable one is logged and ignored.
pub fn load(dir: &Path) -> Snapshot {
    let path = state_path(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "ignoring an unreadable provisioning state");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Writes to a temporary file, syncs it and renames it: never half a file.
/// Blocking.
pub fn save(dir: &Path, state: &Snapshot) -> std::io::Result<()> {
    let path = state_path(dir);
    std::fs::create_dir_all(dir)?;
    let text = toml::to_string(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// A saved snapshot's number: on disk once the writer has written it (or a
/// later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "wait for it with Persister::durable"]
pub struct Ticket(u64);

/// The one writer of `provisioning.toml`.
pub struct Persister {
    wanted: watch::Sender<(u64, Arc<Snapshot>)>,
    written: watch::Receiver<u64>,
}

impl Persister {
    /// Starts the writer task (within a tokio runtime). It ends when the
    /// `Persister` is dropped, after writing what it was last given.
    pub fn spawn(dir: PathBuf) -> Persister {
        let (wanted, rx) = watch::channel((0, Arc::new(Snapshot::new())));
        let (done, written) = watch::channel(0);
        tokio::spawn(write_loop(dir, rx, done));
        Persister { wanted, written }
    }

    /// Hands the writer a new state (never blocks).
    pub fn save(&self, snapshot: Snapshot) -> Ticket {
        let mut n = 0;
        self.wanted.send_modify(|(number, s)| {
            *number += 1;
            n = *number;
            *s = Arc::new(snapshot);
        });
        Ticket(n)
    }

    /// Waits until the state of `ticket` (or a later one) is on disk, or
    /// its write failed (logged).
    pub async fn durable(&self, ticket: Ticket) {
        let mut written = self.written.clone();
        let _ = written.wait_for(|w| *w >= ticket.0).await;
    }

    /// Waits until the latest state is on disk.
    pub async fn flush(&self) {
        let latest = Ticket(self.wanted.borrow().0);
        self.durable(latest).await;
    }
}

async fn write_loop(
    dir: PathBuf,
    mut wanted: watch::Receiver<(u64, Arc<Snapshot>)>,
    written: watch::Sender<u64>,
) {
    while wanted.changed().await.is_ok() {
        let (number, snapshot) = wanted.borrow_and_update().clone();
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || save(&d, &snapshot)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(path = %state_path(&dir).display(), error = %e, "cannot save the provisioning state");
            }
            Err(e) => {
                warn!(path = %state_path(&dir).display(), error = %e, "cannot save the provisioning state");
            }
        }
        written.send_replace(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: &str) -> HostName {
        HostName::new(n).unwrap()
    }

    #[test]
    fn phases_are_saved_by_name_and_legacy_numbers_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let lease = LeaseId::random();
        let mut s = Snapshot::new();
        s.insert(
            host("h0"),
            Record {
                lease,
                phase: Phase::Booting,
                stage: "powered on".into(),
            },
        );
        save(dir.path(), &s).unwrap();
        let text = std::fs::read_to_string(state_path(dir.path())).unwrap();
        assert!(text.contains("phase = \"booting\""), "{text}");
        assert!(text.contains(&lease.to_string()), "{text}");
        assert_eq!(load(dir.path()), s);

        // What agents before the domain enum wrote: the protobuf number.
        let legacy = format!(
            "[h0]\nlease = \"{lease}\"\nphase = 2\nstage = \"powered on\"\n\n\
             [h1]\nlease = \"{lease}\"\nphase = 4\nstage = \"x\"\n\n\
             [h2]\nlease = \"{lease}\"\nphase = \"installing\"\nstage = \"x\"\n"
        );
        std::fs::write(state_path(dir.path()), legacy).unwrap();
        let got = load(dir.path());
        assert_eq!(got[&host("h0")].phase, Phase::Booting);
        assert_eq!(got[&host("h1")].phase, Phase::Failed);
        assert_eq!(got[&host("h2")].phase, Phase::Installing);

        // Unknown phases make the file unreadable: ignored, not half-read.
        std::fs::write(
            state_path(dir.path()),
            format!("[h0]\nlease = \"{lease}\"\nphase = 9\nstage = \"\"\n"),
        )
        .unwrap();
        assert!(load(dir.path()).is_empty());
        assert!(load(&dir.path().join("missing")).is_empty());
    }

    #[tokio::test]
    async fn the_writer_skips_to_the_latest_state() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persister::spawn(dir.path().to_owned());
        let lease = LeaseId::random();
        let mut last = Ticket(0);
        for i in 0..50 {
            let mut s = Snapshot::new();
            s.insert(
                host("h0"),
                Record {
                    lease,
                    phase: Phase::Pending,
                    stage: format!("step {i}"),
                },
            );
            last = p.save(s);
        }
        p.durable(last).await;
        assert_eq!(load(dir.path())[&host("h0")].stage, "step 49");
        p.flush().await;
    }
}
