//! Rendering: column-aligned tables and key/value blocks for humans, JSON for
//! machines, and the one place that writes to stdout.
//!
//! Renderers build `String`s (pure, tested); [`emit`] writes them. Writes go
//! through `io::Write` rather than `println!` so a closed pipe
//! (`lab events --follow | head`) is an error to handle, not a panic.
//!
//! Text from the server is escaped here (see `sanitize`): every table cell,
//! every key/value value and every [`line()`]; JSON has the same characters
//! as `\uXXXX`; and [`emit`] escapes whatever else would still reach the
//! terminal.

use std::borrow::Cow;
use std::io::{self, Write};

use serde::Serialize;

use crate::sanitize;

/// Shown in a cell that has no value.
pub const NONE: &str = "-";

/// A table with a header row; columns are separated by two spaces and padded
/// to their widest cell. The last column is not padded, so lines carry no
/// trailing blanks.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; empty cells are shown as [`NONE`], control characters
    /// escaped ([`sanitize::line`]). Panics when the row does not have one
    /// cell per column (a bug in the caller).
    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "table row width");
        let cells = cells
            .into_iter()
            .map(|c| match sanitize::line(&c) {
                _ if c.is_empty() => NONE.to_owned(),
                Cow::Borrowed(_) => c,
                Cow::Owned(escaped) => escaped,
            })
            .collect();
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        let header = self
            .headers
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>();
        for row in std::iter::once(&header).chain(&self.rows) {
            let last = row.len() - 1;
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                out.push_str(cell);
                if i < last {
                    out.extend(std::iter::repeat_n(' ', w - width(cell) + 2));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// Display width of a cell. Names, ids and states are ASCII; counting chars
/// keeps the occasional non-ASCII comment from skewing the layout much
/// without pulling in a Unicode width table.
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `key  value` lines with the values aligned; empty values shown as
/// [`NONE`], control characters escaped ([`sanitize::line`]).
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let v = if v.is_empty() {
            NONE.into()
        } else {
            sanitize::line(v)
        };
        out.push_str(&format!("{k:<w$}  {v}\n"));
    }
    out
}

/// One line of text with its newline, control characters escaped
/// ([`sanitize::line`]).
pub fn line(text: &str) -> String {
    let mut s = sanitize::line(text).into_owned();
    s.push('\n');
    s
}

/// A list as `a,b,c`, or empty (so a table shows [`NONE`]).
pub fn list(items: &[String]) -> String {
    items.join(",")
}

/// Pretty JSON with a trailing newline ([`sanitize::json_escape`]d).
pub fn json<T: Serialize + ?Sized>(value: &T) -> String {
    let s = serde_json::to_string_pretty(value).expect("view structs always serialize");
    let mut s = sanitize::json_escape(s);
    s.push('\n');
    s
}

/// One compact JSON object on one line (JSON Lines), escaped like [`json`].
pub fn json_line<T: Serialize + ?Sized>(value: &T) -> String {
    let s = serde_json::to_string(value).expect("view structs always serialize");
    let mut s = sanitize::json_escape(s);
    s.push('\n');
    s
}

/// Writes to stdout and flushes (a following stream must show each line as
/// it arrives). The renderers have escaped what came from the server
/// already; a control character that still got here (other than line
/// breaks and tabs) is escaped all the same ([`sanitize::text`]).
pub fn emit(text: &str) -> io::Result<()> {
    let text = sanitize::text(text);
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_blanks() {
        let mut t = Table::new(&["NAME", "ARCH", "FLAGS"]);
        t.row(vec!["h1".into(), "x86_64".into(), "gpu,nvme".into()]);
        t.row(vec!["arm-host-02".into(), "aarch64".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME         ARCH     FLAGS\n\
             h1           x86_64   gpu,nvme\n\
             arm-host-02  aarch64  -\n"
        );
    }

    #[test]
    fn table_with_no_rows_prints_the_header() {
        let t = Table::new(&["ID", "HOLDER"]);
        assert_eq!(t.render(), "ID  HOLDER\n");
    }

    #[test]
    fn table_counts_chars_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["été".into(), "x".into()]);
        t.row(vec!["abcd".into(), "y".into()]);
        assert_eq!(t.render(), "A     B\nété   x\nabcd  y\n");
    }

    #[test]
    #[should_panic(expected = "table row width")]
    fn table_rejects_ragged_rows() {
        Table::new(&["A", "B"]).row(vec!["only one".into()]);
    }

    #[test]
    fn key_values_align_and_fill_empties() {
        let kv = key_values(&[("id", "L1".into()), ("expires", String::new())]);
        assert_eq!(kv, "id       L1\nexpires  -\n");
    }

    #[test]
    fn server_text_is_escaped_in_cells_values_and_lines() {
        let mut t = Table::new(&["HOST", "COMMENT"]);
        t.row(vec!["x1".into(), "\x1b]0;pwned\x07\x1b[2J".into()]);
        t.row(vec!["a\nb".into(), "\u{202e}fdp.exe".into()]);
        assert_eq!(
            t.render(),
            "HOST  COMMENT\n\
             x1    \\x1b]0;pwned\\x07\\x1b[2J\n\
             a\\nb  \\u{202e}fdp.exe\n"
        );
        let kv = key_values(&[("comment", "\x1b[2Jhi\r\n".into())]);
        assert_eq!(kv, "comment  \\x1b[2Jhi\\r\\n\n");
        assert_eq!(line("lease \u{9b}31m"), "lease \\u{9b}31m\n");
    }

    #[test]
    fn json_line_is_one_line() {
        let v = serde_json::json!({"a": [1, 2], "b": "c"});
        assert_eq!(json_line(&v), "{\"a\":[1,2],\"b\":\"c\"}\n");
        assert!(json(&v).ends_with("}\n"));
    }
}
