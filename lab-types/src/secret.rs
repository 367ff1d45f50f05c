//! [`Secret`]: a password's (or token's) bytes, zeroed when dropped, never
//! printed: `Debug` shows `Secret(***)` and there is no `Display`.

use std::fmt;
use zeroize::Zeroizing;

/// Secret bytes. Read them only with [`Secret::expose`], at the one place
/// that sends them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(Zeroizing::new(bytes.into()))
    }

    /// Copies `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes trailing `\n` and `\r` (a password file's last line end),
    /// zeroing them first so that nothing is left in the spare capacity.
    pub fn trim_trailing_newlines(&mut self) {
        let keep = self
            .0
            .iter()
            .rposition(|b| !matches!(b, b'\n' | b'\r'))
            .map_or(0, |i| i + 1);
        self.0[keep..].fill(0);
        self.0.truncate(keep);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(***))");
        assert_eq!(s.expose(), b"hunter2");
    }

    #[test]
    fn trims_only_trailing_line_ends() {
        let mut s = Secret::new("s3cret pass\r\n\n");
        s.trim_trailing_newlines();
        assert_eq!(s.expose(), b"s3cret pass");
        let mut s = Secret::new("\n\n");
        s.trim_trailing_newlines();
        assert!(s.is_empty());
    }
}
