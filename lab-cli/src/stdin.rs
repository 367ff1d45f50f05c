//! Reading stdin from async code: a blocking read cannot be cancelled, and a
//! runtime would wait for a blocking task at shutdown, so stdin is read on
//! a plain thread of its own, which dies with the process.

use std::io::{self, Read};
use tokio::sync::mpsc;

/// Starts the thread: chunks of at most `chunk` bytes, at most `capacity`
/// of them in flight (the reader waits for room: flow control). The channel
/// closes at the end of input, a read error, or when the receiver is gone
/// (noticed at the next chunk).
pub fn reader(capacity: usize, chunk: usize) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(capacity);
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; chunk];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}
