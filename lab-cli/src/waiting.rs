//! The "waiting: position 3 of 7, ETA 14:05:10 (in 4m)" report on stderr
//! while a lease request waits in the queue (or "…, held back: project ci
//! holds 8 of its 8 hosts (max_hosts)" while a quota keeps it waiting; the
//! booking in its way appended when one of the hosts it named is booked:
//! "…, ETA 14:30:00 (in 26m), h1 is booked until 2026-12-05T14:30:00Z
//! (booking 12)").
//!
//! On a terminal it is one live line, rewritten in place (`\r`, the text,
//! then clear-to-end-of-line) on every queue update and once a second so the
//! relative ETA stays true; [`WaitLine::clear`] wipes it before anything else
//! is printed. Elsewhere (CI logs) it is a plain line each time the position
//! changes, and nothing else.

use std::io::{self, Write};
use std::time::SystemTime;

use crate::clock;

/// Clear from the cursor to the end of the line (ANSI EL).
const CLEAR_EOL: &str = "\x1b[K";

/// A queue update, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub position: u32,
    pub queue_length: u32,
    pub eta: Option<SystemTime>,
    /// The quota that keeps it waiting (the server's words), if one does.
    pub held_back: Option<String>,
    /// The booking in its way (the server's words), if one is.
    pub waiting_for: Option<String>,
}

/// The text of the report.
pub fn text(q: &Queued, now: SystemTime) -> String {
    let eta = match q.eta {
        _ if q.held_back.is_some() => {
            format!("held back: {}", q.held_back.as_deref().unwrap_or_default())
        }
        Some(eta) => format!(
            "ETA {} ({})",
            clock::local(eta, now),
            clock::relative(eta, now)
        ),
        None => "no ETA yet".to_owned(),
    };
    let why = match &q.waiting_for {
        Some(w) if q.held_back.is_none() => format!(", {w}"),
        _ => String::new(),
    };
    format!(
        "waiting: position {} of {}, {eta}{why}",
        q.position, q.queue_length
    )
}

pub struct WaitLine<W: Write> {
    out: W,
    live: bool,
    last: Option<Queued>,
    /// The text on screen (live mode), to skip rewrites that change nothing.
    shown: Option<String>,
}

impl<W: Write> WaitLine<W> {
    /// `live`: the output is a terminal.
    pub fn new(out: W, live: bool) -> Self {
        WaitLine {
            out,
            live,
            last: None,
            shown: None,
        }
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    /// A queue update arrived.
    pub fn update(&mut self, q: Queued, now: SystemTime) -> io::Result<()> {
        let moved = self.last.as_ref().is_none_or(|last| {
            last.position != q.position
                || last.held_back != q.held_back
                || last.waiting_for != q.waiting_for
        });
        let line = text(&q, now);
        self.last = Some(q);
        if self.live {
            self.redraw(now)
        } else if moved {
            writeln!(self.out, "{line}")?;
            self.out.flush()
        } else {
            Ok(())
        }
    }

    /// Re-renders the live line (the relative ETA moves with the clock).
    pub fn redraw(&mut self, now: SystemTime) -> io::Result<()> {
        let Some(q) = self.last.as_ref().filter(|_| self.live) else {
            return Ok(());
        };
        let line = text(q, now);
        if self.shown.as_ref() == Some(&line) {
            return Ok(());
        }
        write!(self.out, "\r{line}{CLEAR_EOL}")?;
        self.out.flush()?;
        self.shown = Some(line);
        Ok(())
    }

    /// Prints a line of its own; the position is shown again (below it) at
    /// the next update, moved or not.
    pub fn notice(&mut self, text: &str) -> io::Result<()> {
        self.clear()?;
        self.last = None;
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }

    /// Removes the live line, leaving the cursor at the start of an empty
    /// line. Does nothing in plain mode or when nothing is shown.
    pub fn clear(&mut self) -> io::Result<()> {
        if self.shown.take().is_some() {
            write!(self.out, "\r{CLEAR_EOL}")?;
            self.out.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn q(position: u32, queue_length: u32) -> Queued {
        Queued {
            position,
            queue_length,
            eta: None,
            held_back: None,
            waiting_for: None,
        }
    }

    #[test]
    fn a_quota_is_said_instead_of_the_eta() {
        let held = Queued {
            held_back: Some("project ci holds 8 of its 8 hosts (max_hosts)".into()),
            ..q(2, 5)
        };
        assert_eq!(
            text(&held, now()),
            "waiting: position 2 of 5, held back: project ci holds 8 of its 8 hosts (max_hosts)"
        );
        // Plain mode: a line when the reason comes or goes, even in place.
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, false);
        w.update(q(2, 5), now()).unwrap();
        w.update(held.clone(), now()).unwrap();
        w.update(held, now()).unwrap();
        w.update(q(2, 5), now()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3);
    }

    #[test]
    fn a_booking_in_the_way_is_said_after_the_eta() {
        let booked = Queued {
            eta: Some(now() + Duration::from_secs(30 * 60)),
            waiting_for: Some("h1 is booked until 2023-11-14T23:03:20Z (booking 12)".into()),
            ..q(1, 2)
        };
        let t = text(&booked, now());
        assert!(t.starts_with("waiting: position 1 of 2, ETA "), "{t}");
        assert!(
            t.ends_with(" (in 30m), h1 is booked until 2023-11-14T23:03:20Z (booking 12)"),
            "{t}"
        );
        // A quota said instead of the ETA wins.
        let held = Queued {
            held_back: Some("project ci holds 8 of its 8 hosts (max_hosts)".into()),
            ..booked.clone()
        };
        assert!(text(&held, now()).ends_with("(max_hosts)"));
        // Plain mode: a line when the booking comes or goes.
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, false);
        w.update(q(1, 2), now()).unwrap();
        w.update(booked.clone(), now()).unwrap();
        w.update(booked, now()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 2);
    }

    #[test]
    fn text_with_and_without_eta() {
        let mut queued = q(3, 7);
        assert_eq!(text(&queued, now()), "waiting: position 3 of 7, no ETA yet");
        queued.eta = Some(now() + Duration::from_secs(4 * 60 + 10));
        let t = text(&queued, now());
        assert!(t.starts_with("waiting: position 3 of 7, ETA "), "{t}");
        assert!(t.ends_with(" (in 4m)"), "{t}");
    }

    #[test]
    fn plain_mode_prints_a_line_per_position_change() {
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, false);
        w.update(q(3, 7), now()).unwrap();
        w.update(q(3, 8), now()).unwrap();
        w.redraw(now()).unwrap();
        w.update(q(2, 8), now()).unwrap();
        w.clear().unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "waiting: position 3 of 7, no ETA yet\nwaiting: position 2 of 8, no ETA yet\n"
        );
    }

    #[test]
    fn after_a_notice_the_position_is_shown_again() {
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, false);
        w.update(q(1, 1), now()).unwrap();
        w.notice("lab: the request is back with the server")
            .unwrap();
        w.update(q(1, 1), now()).unwrap();
        w.update(q(1, 1), now()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "waiting: position 1 of 1, no ETA yet\n\
             lab: the request is back with the server\n\
             waiting: position 1 of 1, no ETA yet\n"
        );
    }

    #[test]
    fn notices_get_a_line_of_their_own() {
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, true);
        w.update(q(3, 7), now()).unwrap();
        w.notice("lab: lost the server; retrying").unwrap();
        w.update(q(3, 7), now()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\rwaiting: position 3 of 7, no ETA yet\x1b[K\r\x1b[K\
             lab: lost the server; retrying\n\
             \rwaiting: position 3 of 7, no ETA yet\x1b[K"
        );
    }

    #[test]
    fn live_mode_rewrites_one_line_and_clears_it() {
        let mut out = Vec::new();
        let mut w = WaitLine::new(&mut out, true);
        w.redraw(now()).unwrap(); // nothing to show yet
        w.update(q(3, 7), now()).unwrap();
        w.redraw(now()).unwrap(); // unchanged: not rewritten
        w.update(q(3, 8), now()).unwrap();
        w.clear().unwrap();
        w.clear().unwrap(); // idempotent
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\rwaiting: position 3 of 7, no ETA yet\x1b[K\
             \rwaiting: position 3 of 8, no ETA yet\x1b[K\
             \r\x1b[K"
        );
    }
}
