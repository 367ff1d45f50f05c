//! Time for humans and machines: TTL parsing, relative times ("in 29m"),
//! local wall-clock times and RFC 3339.
//!
//! Every function that needs the current time takes `now`; none reads the
//! clock itself, so all of them are plain functions to test.

use std::time::{Duration, SystemTime};

/// Parses a TTL such as `30m`, `2h`, `1h 30m` (humantime syntax). Zero is
/// refused: a lease that ends when it starts is a typo.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (try 30m, 2h or 1h30m)"))?;
    if d.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(d)
}

/// When something starts, as given on the command line: `now`, a delay
/// (`+2h`, `in 2h`), or a time (RFC 3339 such as `2026-12-05T02:00:00Z`,
/// or local `2026-12-05 02:00[:00]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    In(Duration),
    At(SystemTime),
}

impl Start {
    pub fn resolve(self, now: SystemTime) -> SystemTime {
        match self {
            Start::In(d) => now + d,
            Start::At(t) => t,
        }
    }
}

/// Parses a [`Start`].
pub fn parse_start(s: &str) -> Result<Start, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(Start::In(Duration::ZERO));
    }
    if let Some(d) = s.strip_prefix('+').or_else(|| s.strip_prefix("in ")) {
        return humantime::parse_duration(d.trim())
            .map(Start::In)
            .map_err(|e| format!("{e} (try +2h, in 30m)"));
    }
    let at = |ts: jiff::Timestamp| {
        let ms = ts.as_millisecond();
        if ms <= 0 {
            return Err(format!("{s:?} is before 1970"));
        }
        Ok(Start::At(
            std::time::UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs()),
        ))
    };
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return at(ts);
    }
    let civil = s.parse::<jiff::civil::DateTime>().map_err(|_| {
        format!("{s:?} is not a time (try now, +2h, 2026-12-05T02:00:00Z or \"2026-12-05 02:00\")")
    })?;
    let ts = jiff::tz::TimeZone::system()
        .to_timestamp(civil)
        .map_err(|e| e.to_string())?;
    at(ts)
}

/// A duration in at most two units, rounded down: `42s`, `29m`, `2h 5m`, `3d 4h`.
pub fn compact(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match () {
        _ if days > 0 && hours > 0 => format!("{days}d {hours}h"),
        _ if days > 0 => format!("{days}d"),
        _ if hours > 0 && mins > 0 => format!("{hours}h {mins}m"),
        _ if hours > 0 => format!("{hours}h"),
        _ if mins > 0 => format!("{mins}m"),
        _ => format!("{secs}s"),
    }
}

/// `at` relative to `now`: `in 29m`, `3m ago`, or `now` within a second.
pub fn relative(at: SystemTime, now: SystemTime) -> String {
    match at.duration_since(now) {
        Ok(ahead) if ahead >= Duration::from_secs(1) => format!("in {}", compact(ahead)),
        Ok(_) => "now".to_owned(),
        Err(e) if e.duration() < Duration::from_secs(1) => "now".to_owned(),
        Err(e) => format!("{} ago", compact(e.duration())),
    }
}

/// Local wall-clock time: `14:05:10` on the same local day as `now`,
/// `2025-11-26 14:05:10` otherwise.
pub fn local(at: SystemTime, now: SystemTime) -> String {
    local_in(at, now, &jiff::tz::TimeZone::system())
}

fn local_in(at: SystemTime, now: SystemTime, tz: &jiff::tz::TimeZone) -> String {
    let (Ok(at), Ok(now)) = (
        jiff::Timestamp::try_from(at),
        jiff::Timestamp::try_from(now),
    ) else {
        return humantime::format_rfc3339_seconds(at).to_string();
    };
    let (at, now) = (
        at.to_zoned_datetime(tz.clone()),
        now.to_zoned_datetime(tz.clone()),
    );
    if at.date() == now.date() {
        at.strftime("%H:%M:%S").to_string()
    } else {
        at.strftime("%Y-%m-%d %H:%M:%S").to_string()
    }
}

/// Local date and time, always with the date: `2025-11-26 14:05:10`.
pub fn local_full(at: SystemTime) -> String {
    match jiff::Timestamp::try_from(at) {
        Ok(ts) => ts
            .to_zoned_datetime(jiff::tz::TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Err(_) => humantime::format_rfc3339_seconds(at).to_string(),
    }
}

/// `in 29m (14:35:10)`: the form used in detail views.
pub fn when(at: SystemTime, now: SystemTime) -> String {
    format!("{} ({})", relative(at, now), local(at, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn start_forms() {
        assert_eq!(parse_start("now"), Ok(Start::In(Duration::ZERO)));
        assert_eq!(parse_start("+2h"), Ok(Start::In(Duration::from_secs(7200))));
        assert_eq!(
            parse_start("in 30m"),
            Ok(Start::In(Duration::from_secs(1800)))
        );
        assert_eq!(
            parse_start("2026-12-05T02:00:00Z"),
            Ok(Start::At(UNIX_EPOCH + Duration::from_secs(1_796_436_000)))
        );
        assert_eq!(
            parse_start("2026-12-05T03:00:00+01:00"),
            Ok(Start::At(UNIX_EPOCH + Duration::from_secs(1_796_436_000)))
        );
        assert!(matches!(parse_start("2026-12-05 02:00"), Ok(Start::At(_))));
        assert!(
            parse_start("tomorrow")
                .unwrap_err()
                .contains("is not a time")
        );
        assert!(parse_start("+soon").is_err());
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(
            Start::In(Duration::from_secs(5)).resolve(now),
            UNIX_EPOCH + Duration::from_secs(105)
        );
    }

    #[test]
    fn ttl_accepts_humantime_forms() {
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2days"), Ok(Duration::from_secs(2 * 86_400)));
    }

    #[test]
    fn ttl_refuses_garbage_and_zero() {
        assert!(parse_ttl("").is_err());
        assert!(parse_ttl("30").is_err(), "a bare number has no unit");
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("-5m").is_err());
        assert_eq!(parse_ttl("0s"), Err("must be longer than zero".to_owned()));
    }

    #[test]
    fn compact_keeps_two_units_rounding_down() {
        let cases = [
            (0, "0s"),
            (42, "42s"),
            (60, "1m"),
            (29 * 60 + 59, "29m"),
            (3600, "1h"),
            (2 * 3600 + 5 * 60 + 9, "2h 5m"),
            (86_400, "1d"),
            (3 * 86_400 + 4 * 3600 + 59, "3d 4h"),
        ];
        for (secs, want) in cases {
            assert_eq!(compact(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn relative_future_past_and_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            relative(now + Duration::from_secs(29 * 60 + 30), now),
            "in 29m"
        );
        assert_eq!(relative(now - Duration::from_secs(180), now), "3m ago");
        assert_eq!(relative(now + Duration::from_millis(400), now), "now");
        assert_eq!(relative(now - Duration::from_millis(400), now), "now");
    }

    #[test]
    fn local_shows_the_date_only_on_another_day() {
        let utc = jiff::tz::TimeZone::UTC;
        // 2023-11-14T22:13:20Z
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            local_in(now + Duration::from_secs(250), now, &utc),
            "22:17:30"
        );
        assert_eq!(
            local_in(now + Duration::from_secs(7200), now, &utc),
            "2023-11-15 00:13:20"
        );
    }
}
