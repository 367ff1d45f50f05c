//! Errors of configuration files (the inventory, the tokens file,
//! `agent.toml`) as `path:line:column: reason`, with 1-based lines and
//! columns counted in characters, so an editor jumps straight to the spot.

use std::fmt;
use std::path::PathBuf;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read. `what` names the file's kind
    /// (`inventory`, `agent config`, `tokens file`).
    #[error("cannot read {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not valid: a syntax error, a wrong or
    /// unknown field, or a failed check at `line:column`.
    #[error("{}", Positioned { path, line: *line, column: *column, reason })]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

struct Positioned<'a> {
    path: &'a PathBuf,
    line: usize,
    column: usize,
    reason: &'a str,
}

impl fmt::Display for Positioned<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.reason
        )
    }
}

impl FileError {
    /// An `Invalid` error at byte `offset` of `text`.
    pub fn at(
        path: impl Into<PathBuf>,
        text: &str,
        offset: usize,
        reason: impl Into<String>,
    ) -> Self {
        let (line, column) = line_column(text, offset);
        FileError::Invalid {
            path: path.into(),
            line,
            column,
            reason: reason.into(),
        }
    }
}

/// Converts a byte offset in `text` into a 1-based (line, column); columns
/// count characters. Offsets past the end, or inside a character, point
/// just after the last character that starts before them.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for (i, c) in text.char_indices() {
        if i >= offset {
            break;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_is_one_based_and_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        // 'é' is two bytes but one column: the space after it is column 3.
        assert_eq!(line_column(text, 9), (2, 3));
        // An offset inside the 'é' points after it, and never panics.
        assert_eq!(line_column(text, 8), (2, 3));
        assert_eq!(line_column(text, 1000), (3, 1));
    }

    #[test]
    fn display() {
        let e = FileError::at("inv.toml", "a\nbc", 3, "bad");
        assert_eq!(e.to_string(), "inv.toml:2:2: bad");
        let e = FileError::Read {
            what: "inventory",
            path: "x.toml".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(e.to_string(), "cannot read inventory x.toml");
    }
}

/// The names of a configuration file's entries (webhooks, projects): each
/// 1 to 64 letters, digits, '-', '_' or '.', and defined once. Remembers
/// the line of each for the error about a second definition.
#[derive(Debug, Default)]
pub struct EntryNames(std::collections::BTreeMap<String, usize>);

impl EntryNames {
    /// Accepts `name`, a `what` ("webhook", "project") found at byte
    /// `offset` of `text`, or says why not.
    pub fn add(&mut self, what: &str, name: &str, text: &str, offset: usize) -> Result<(), String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "invalid {what} name {name:?}: 1 to 64 letters, digits, '-', '_', '.'"
            ));
        }
        let line = line_column(text, offset).0;
        match self.0.insert(name.to_owned(), line) {
            Some(first) => Err(format!(
                "duplicate {what} name {name} (first defined at line {first})"
            )),
            None => Ok(()),
        }
    }
}
