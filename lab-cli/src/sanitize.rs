//! Escaping what the server sends before it reaches a terminal.
//!
//! Names, comments, reasons, event details, provisioning stages and console
//! tails come from the server, and through it from other users and from the
//! hosts themselves. Printed raw, a comment holding `ESC ] 0 ; … BEL` would
//! retitle the operator's terminal and `ESC [ 2 J` would clear it; a
//! right-to-left override would make a line read differently than it is.
//! Every human-readable line `lab` prints passes through [`line()`] or
//! [`text`]; `--json` output escapes the same characters as `\uXXXX`
//! ([`json_escape`]). The one exception is the console byte stream of
//! `lab console`, which is a terminal session by design.
//!
//! Escaped: C0 controls, DEL, C1 controls (U+0080–U+009F, which some
//! terminals take as 8-bit `CSI`/`OSC`), and the bidirectional embeddings,
//! overrides and isolates (U+202A–U+202E, U+2066–U+2069). They are shown
//! as `\n`, `\r`, `\t`, `\x1b`, `\x7f`, `\u{9b}`, `\u{202e}`. A backslash
//! itself is left alone: the escapes only need to be visible, not
//! reversible.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters that must not reach a terminal as they are.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// One line of output (a table cell, a value, a message): every unsafe
/// character escaped, line breaks and tabs included.
pub fn line(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Several lines (a console tail, an error message): like [`line()`] but
/// `\n`, `\t` and a `\r` right before `\n` stay as they are.
pub fn text(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

fn escape(s: &str, keep_line_breaks: bool) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let kept = match c {
            '\n' | '\t' => keep_line_breaks,
            '\r' => keep_line_breaks && chars.peek().is_some_and(|&(_, next)| next == '\n'),
            c => !is_unsafe(c),
        };
        if kept {
            if let Some(out) = &mut out {
                out.push(c);
            }
            continue;
        }
        // From the first character to escape on, the text is copied.
        let out = out.get_or_insert_with(|| String::with_capacity(s.len() + 8) + &s[..i]);
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    out.map_or(Cow::Borrowed(s), Cow::Owned)
}

/// `json` (as serde_json writes it) with the unsafe characters that
/// serde_json leaves raw (DEL, C1, bidi controls) written as `\uXXXX`: the
/// same JSON value, nothing for a terminal to act on. serde_json already
/// escapes C0; outside strings JSON text is ASCII without controls, so
/// every character replaced here sits inside a string.
pub fn json_escape(json: String) -> String {
    if !json.chars().any(is_unsafe) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_unsafe(c) && c != '\n' {
            // All of them are in the Basic Multilingual Plane: one \uXXXX.
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile strings and what each entry point makes of them.
    #[test]
    fn hostile_strings() {
        let cases: &[(&str, &str, &str)] = &[
            // (input, line, text)
            (
                "plain ascii, été, 日本",
                "plain ascii, été, 日本",
                "plain ascii, été, 日本",
            ),
            (
                "\x1b]0;pwned\x07",
                "\\x1b]0;pwned\\x07",
                "\\x1b]0;pwned\\x07",
            ),
            ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H", "\\x1b[2J\\x1b[H"),
            ("a\nb\tc", "a\\nb\\tc", "a\nb\tc"),
            ("crlf\r\nok", "crlf\\r\\nok", "crlf\r\nok"),
            ("over\rwrite", "over\\rwrite", "over\\rwrite"),
            ("end\r", "end\\r", "end\\r"),
            (
                "nul\0 bs\x08 del\x7f",
                "nul\\x00 bs\\x08 del\\x7f",
                "nul\\x00 bs\\x08 del\\x7f",
            ),
            // 8-bit CSI and OSC (C1), as UTF-8.
            (
                "\u{9b}2J\u{9d}0;x\u{9c}",
                "\\u{9b}2J\\u{9d}0;x\\u{9c}",
                "\\u{9b}2J\\u{9d}0;x\\u{9c}",
            ),
            // Trojan Source: RLO ... PDF, and the isolates.
            (
                "ok\u{202e}gnp.exe\u{202c}",
                "ok\\u{202e}gnp.exe\\u{202c}",
                "ok\\u{202e}gnp.exe\\u{202c}",
            ),
            (
                "\u{2066}x\u{2069}\u{202a}",
                "\\u{2066}x\\u{2069}\\u{202a}",
                "\\u{2066}x\\u{2069}\\u{202a}",
            ),
            // Just outside the ranges: kept.
            (
                "\u{a0}\u{2029}\u{202f}\u{2065}\u{206a}",
                "\u{a0}\u{2029}\u{202f}\u{2065}\u{206a}",
                "\u{a0}\u{2029}\u{202f}\u{2065}\u{206a}",
            ),
            ("back\\slash", "back\\slash", "back\\slash"),
        ];
        for (input, want_line, want_text) in cases {
            assert_eq!(line(input), *want_line, "line({input:?})");
            assert_eq!(text(input), *want_text, "text({input:?})");
        }
    }

    #[test]
    fn output_has_no_unsafe_character_left_and_is_stable() {
        // Every character up to U+2100 (C0, DEL, C1, the bidi block), alone
        // and in pairs with \r and \n.
        for c in (0u32..0x2100).filter_map(char::from_u32) {
            for s in [
                c.to_string(),
                format!("{c}\n"),
                format!("\r{c}"),
                format!("{c}\r\n"),
            ] {
                let l = line(&s);
                assert!(!l.chars().any(is_unsafe), "line({s:?}) = {l:?}");
                let t = text(&s);
                assert!(
                    !t.chars()
                        .any(|c| is_unsafe(c) && !matches!(c, '\n' | '\t' | '\r')),
                    "text({s:?}) = {t:?}"
                );
                // Escaping twice changes nothing more.
                assert_eq!(line(&l), l);
                assert_eq!(text(&t), t);
            }
        }
    }

    #[test]
    fn clean_strings_are_not_copied() {
        assert!(matches!(line("x1: ready — marker seen"), Cow::Borrowed(_)));
        assert!(matches!(text("a\nb\r\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_keeps_the_value_and_escapes_the_rest() {
        let v = serde_json::json!({
            "comment": "\x1b]0;pwned\x07 \u{9b}2J \u{7f} \u{202e}txt.exe",
            "plain": "été\nnext",
        });
        for json in [
            serde_json::to_string(&v).unwrap(),
            serde_json::to_string_pretty(&v).unwrap(),
        ] {
            let escaped = json_escape(json);
            assert!(
                !escaped.chars().any(|c| is_unsafe(c) && c != '\n'),
                "{escaped}"
            );
            assert!(
                escaped.contains(r"\u001b]0;pwned\u0007 \u009b2J \u007f \u202etxt.exe"),
                "{escaped}"
            );
            let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
            assert_eq!(back, v);
        }
    }
}
