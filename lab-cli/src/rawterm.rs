//! Raw mode for `lab console` on a terminal: every key goes to the host as
//! typed (Ctrl-C included), nothing is echoed locally, output is not
//! post-processed.
//!
//! The saved settings come back on every exit path: [`RawMode`]'s `Drop`
//! (normal returns, errors, unwinding), a panic hook that restores them
//! before the panic message is printed, and the console loop turns
//! SIGTERM/SIGHUP/SIGINT into an ordinary error return.

use std::io;
use std::sync::{Mutex, Once};

use nix::sys::termios::{self, SetArg, Termios};

/// The settings to restore, for the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

/// The terminal on stdin in raw mode until this is dropped.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on stdin in raw mode. Fails when stdin is not a
    /// terminal.
    pub fn enter() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        install_panic_hook();
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved.clone());
        termios::tcsetattr(&stdin, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing to do about a failure here; the shell's `reset` is the
        // user's fallback.
        let _ = termios::tcsetattr(io::stdin(), SetArg::TCSADRAIN, &self.saved);
        SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(saved) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = termios::tcsetattr(io::stdin(), SetArg::TCSADRAIN, &saved);
            }
            previous(info);
        }));
    });
}
