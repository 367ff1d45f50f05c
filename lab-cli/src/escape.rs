//! The console escape sequences, conserver style: `Ctrl-E c` then a command
//! key. A pure function of the keystrokes, so it is tested without a
//! terminal.
//!
//! | keys         | does |
//! |--------------|------|
//! | `Ctrl-E c .` | detach (exit 0) |
//! | `Ctrl-E c b` | send a serial break |
//! | `Ctrl-E c ?` | print the escape help |
//!
//! `Ctrl-E` followed by anything but `c` is sent as typed (both bytes), so a
//! lone `Ctrl-E` still reaches the host. An unknown command key after
//! `Ctrl-E c` is swallowed and answered with the help.

/// Ctrl-E, the first key of every escape.
pub const ESCAPE: u8 = 0x05;

/// The help printed for `Ctrl-E c ?` (lines without line ends: the caller
/// knows whether the terminal is raw).
pub const HELP: [&str; 3] = [
    "Ctrl-E c .  detach from the console",
    "Ctrl-E c b  send a serial break",
    "Ctrl-E c ?  this help",
];

/// What the keystrokes ask for, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Bytes for the host.
    Send(Vec<u8>),
    Break,
    Detach,
    Help,
    /// `Ctrl-E c` and a key that is no command.
    Unknown(u8),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum State {
    #[default]
    Normal,
    /// Saw Ctrl-E.
    Escape,
    /// Saw Ctrl-E c: the next key is a command.
    Command,
}

/// The escape state between reads: a sequence may be split across reads.
#[derive(Debug, Default)]
pub struct Escapes {
    state: State,
}

impl Escapes {
    /// Splits keystrokes into bytes to send and escape commands. Bytes of a
    /// sequence not finished yet are held until the next call.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut send = Vec::new();
        for &b in input {
            match self.state {
                State::Normal if b == ESCAPE => self.state = State::Escape,
                State::Normal => send.push(b),
                State::Escape if b == b'c' => self.state = State::Command,
                State::Escape => {
                    // Not an escape after all: the Ctrl-E goes out as typed,
                    // and `b` is looked at afresh (it may be a Ctrl-E).
                    send.push(ESCAPE);
                    if b == ESCAPE {
                        continue;
                    }
                    send.push(b);
                    self.state = State::Normal;
                }
                State::Command => {
                    if !send.is_empty() {
                        actions.push(Action::Send(std::mem::take(&mut send)));
                    }
                    actions.push(match b {
                        b'.' => Action::Detach,
                        b'b' => Action::Break,
                        b'?' => Action::Help,
                        other => Action::Unknown(other),
                    });
                    self.state = State::Normal;
                }
            }
        }
        if !send.is_empty() {
            actions.push(Action::Send(send));
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> Vec<Action> {
        let mut e = Escapes::default();
        chunks.iter().flat_map(|c| e.feed(c)).collect()
    }

    #[test]
    fn plain_bytes_pass_through() {
        assert_eq!(feed(&[b"ls -l\r"]), [Action::Send(b"ls -l\r".to_vec())]);
        assert_eq!(feed(&[b"\x03"]), [Action::Send(vec![3])], "Ctrl-C too");
    }

    #[test]
    fn commands() {
        assert_eq!(
            feed(&[b"ab\x05c.cd"]),
            [
                Action::Send(b"ab".to_vec()),
                Action::Detach,
                Action::Send(b"cd".to_vec())
            ]
        );
        assert_eq!(feed(&[b"\x05cb"]), [Action::Break]);
        assert_eq!(feed(&[b"\x05c?"]), [Action::Help]);
        assert_eq!(feed(&[b"\x05cz"]), [Action::Unknown(b'z')]);
    }

    #[test]
    fn sequences_split_across_reads() {
        assert_eq!(feed(&[b"x\x05", b"c", b".y"]), {
            [
                Action::Send(b"x".to_vec()),
                Action::Detach,
                Action::Send(b"y".to_vec()),
            ]
        });
    }

    #[test]
    fn ctrl_e_without_c_is_sent() {
        assert_eq!(feed(&[b"\x05x"]), [Action::Send(b"\x05x".to_vec())]);
        assert_eq!(
            feed(&[b"\x05\x05c."]),
            [Action::Send(b"\x05".to_vec()), Action::Detach],
            "the second Ctrl-E starts the escape"
        );
    }
}
