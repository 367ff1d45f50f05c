//! Pure request decisions for the HTTP boot server: the request path as the
//! [`FileSource`](crate::assets::FileSource) sees it, and the byte range to
//! send. No I/O here.

use percent_encoding::percent_decode_str;

/// The URL path percent-decoded; `None` if it is not UTF-8 once decoded.
/// A query string must already be stripped (take `Uri::path()`).
pub fn decode_path(raw: &str) -> Option<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// What a `Range` header asks of a file of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeDecision {
    /// Send the whole file with 200 (no header, or one we ignore).
    Full,
    /// Send `start..=end` with 206.
    Partial { start: u64, end: u64 },
    /// 416: a well-formed single range that lies wholly outside the file.
    Unsatisfiable,
}

/// Interpret a `Range` header value for a file of `len` bytes. Only one
/// `bytes=` range is honoured (`a-b`, `a-`, `-suffix`); anything else is
/// ignored (whole file), which RFC 9110 §14.2 permits.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeDecision {
    let Some(h) = header else {
        return RangeDecision::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeDecision::Full;
    };
    if spec.contains(',') {
        return RangeDecision::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeDecision::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeDecision::Unsatisfiable
            } else {
                RangeDecision::Partial {
                    start: len.saturating_sub(n),
                    end: len - 1,
                }
            }
        }
        (false, Some(start), end) if b.trim().is_empty() || end.is_some() => {
            if let Some(end) = end
                && end < start
            {
                return RangeDecision::Full;
            }
            if start >= len {
                return RangeDecision::Unsatisfiable;
            }
            let end = end.map_or(len - 1, |e| e.min(len - 1));
            RangeDecision::Partial { start, end }
        }
        _ => RangeDecision::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeDecision::*;

    #[test]
    fn ranges() {
        let p = |s, e| Partial { start: s, end: e };
        for (h, want) in [
            (None, Full),
            (Some("bytes=0-9"), p(0, 9)),
            (Some("bytes=5-"), p(5, 99)),
            (Some("bytes=-10"), p(90, 99)),
            (Some("bytes=-1000"), p(0, 99)),
            (Some("bytes=90-1000"), p(90, 99)),
            (Some("bytes=100-"), Unsatisfiable),
            (Some("bytes=-0"), Unsatisfiable),
            (Some("bytes=0-1,5-6"), Full),
            (Some("bytes=9-3"), Full),
            (Some("bytes=x-3"), Full),
            (Some("bytes=+1-3"), Full),
            (Some("items=0-3"), Full),
            (Some("bytes=-"), Full),
        ] {
            assert_eq!(parse_range(h, 100), want, "{h:?}");
        }
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn paths_are_decoded_before_confinement() {
        assert_eq!(decode_path("/%2e%2e/etc").unwrap(), "/../etc");
        assert_eq!(decode_path("/a%20b").unwrap(), "/a b");
        assert_eq!(decode_path("/%00").unwrap(), "/\0");
        assert!(decode_path("/%ff").is_none());
    }
}
