//! [`SerialSource`]: a console on a local serial device (a USB serial
//! adapter, a null-modem cable, a pty) through `tokio-serial`, 8N1 with no
//! flow control.

use std::path::PathBuf;
use std::time::Duration;

use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

use super::source::{ConsoleSource, SourceError};

/// A local serial device at a fixed baud rate.
#[derive(Debug, Clone)]
pub struct SerialSource {
    /// The device, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Line speed.
    pub baud: u32,
    /// How long the line is held in the break condition.
    pub break_duration: Duration,
}

impl SerialSource {
    /// `path` at `baud`, 8N1, no flow control; breaks last 250 ms.
    pub fn new(path: impl Into<PathBuf>, baud: u32) -> Self {
        SerialSource {
            path: path.into(),
            baud,
            break_duration: Duration::from_millis(250),
        }
    }
}

impl ConsoleSource for SerialSource {
    type Conn = SerialStream;

    async fn connect(&self) -> Result<SerialStream, SourceError> {
        let target = self.describe();
        let path = self.path.to_string_lossy().into_owned();
        tokio_serial::new(path, self.baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(|e| SourceError::Connect {
                target,
                source: e.into(),
            })
    }

    fn describe(&self) -> String {
        format!("serial:{}@{}", self.path.display(), self.baud)
    }

    async fn send_break(&self, conn: &mut SerialStream) -> Result<(), SourceError> {
        let err = |e: tokio_serial::Error| SourceError::Write {
            target: self.describe(),
            source: e.into(),
        };
        conn.set_break().map_err(err)?;
        tokio::time::sleep(self.break_duration).await;
        conn.clear_break().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A pty pair stands in for the cable: the test holds the master, the
    /// source opens the slave's path.
    #[tokio::test]
    async fn a_pty_carries_bytes_both_ways_and_takes_a_break() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
            .expect("slave path");
        let source = SerialSource {
            break_duration: Duration::from_millis(20),
            ..SerialSource::new(&path, 115_200)
        };
        assert_eq!(
            source.describe(),
            format!("serial:{}@115200", path.display())
        );
        let mut conn = source.connect().await.expect("open the pty slave");
        let mut master = std::fs::File::from(pty.master);

        master.write_all(b"login: ").expect("host writes");
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 7 {
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                AsyncReadExt::read(&mut conn, &mut buf),
            )
            .await
            .expect("read in time")
            .expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"login: ");

        AsyncWriteExt::write_all(&mut conn, b"root\r")
            .await
            .expect("write");
        AsyncWriteExt::flush(&mut conn).await.expect("flush");
        let from_console = tokio::task::spawn_blocking(move || {
            let mut got = vec![0u8; 5];
            master.read_exact(&mut got).expect("host reads");
            (got, master)
        })
        .await
        .expect("join");
        let (from_console, master) = from_console;
        assert_eq!(from_console, b"root\r");

        // TIOCSBRK/TIOCCBRK succeed on a pty but have no effect the master
        // can see, so only the call path is checked here.
        source.send_break(&mut conn).await.expect("break");
        drop((master, pty.slave));
    }
}
