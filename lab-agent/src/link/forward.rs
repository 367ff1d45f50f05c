//! Forwards on the agent's side: a TCP connection to a port of a host's
//! inventory IPv4 (never an address from the server's user), carried as
//! the session input and data of the forward command's id.
//!
//! Flow control is a credit window per direction (the server's side is
//! `lab-server/src/racks/forward.rs`): the agent sends at most [`WINDOW`]
//! data messages of at most [`CHUNK`] bytes that the server has not
//! credited back, and credits the server's input messages back as it has
//! written them to the host. The server keeps to the same window, so the
//! input queue here never holds more than [`WINDOW`] messages; a server
//! that sends more has broken the protocol and loses the forward. A slow
//! host thus holds back the user, a slow user holds back the host (the
//! agent stops reading), and the rack's other traffic on the link goes on.
//!
//! The server's end of input half-closes the connection (`shutdown` of the
//! write side); the host closing its side ends the forward (`end`, no
//! notice) once every byte before it was sent; an error ends it with a
//! notice saying what broke.

use crate::rack::{CommandError, ErrorKind};
use lab_proto::v1 as pb;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span};

/// How long a connection to a host's port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Data messages a side may have outstanding (the server's
/// `FORWARD_WINDOW`).
pub const WINDOW: u32 = 16;
/// The largest data message the agent sends.
pub const CHUNK: usize = 32 * 1024;

/// What the server sent for the host.
#[derive(Debug)]
enum Input {
    Data(Vec<u8>),
    Eof,
}

/// The server's side of an open forward: where its input and credit go.
#[derive(Clone, Debug)]
pub struct ForwardInput {
    input: mpsc::Sender<Input>,
    /// Data messages the agent may still send to the server.
    credit: Arc<Semaphore>,
}

/// The server broke the window (more input than it had credit for).
#[derive(Debug, thiserror::Error)]
#[error("the server sent more input than its window allows")]
pub struct WindowBroken;

impl ForwardInput {
    /// Takes one `SessionInput` of the forward.
    pub fn take(&self, i: pb::SessionInput) -> Result<(), WindowBroken> {
        if i.credit > 0 {
            // Never more than a window, whatever the server says.
            let room = (WINDOW as usize).saturating_sub(self.credit.available_permits());
            self.credit.add_permits((i.credit as usize).min(room));
        }
        if !i.input.is_empty() {
            self.input
                .try_send(Input::Data(i.input))
                .map_err(|_| WindowBroken)?;
        }
        if i.eof {
            self.input.try_send(Input::Eof).map_err(|_| WindowBroken)?;
        }
        Ok(())
    }
}

fn data(id: u64, output: Vec<u8>, notice: String, end: bool, credit: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Data(pb::SessionData {
            id,
            output,
            notice,
            end,
            credit,
        })),
    }
}

/// Connects to `target` (the port of `host`'s inventory IPv4) and starts
/// carrying bytes for forward `id`; output goes to `tx`.
pub async fn open(
    host: &str,
    target: SocketAddrV4,
    id: u64,
    tx: mpsc::Sender<pb::AgentMessage>,
) -> Result<(ForwardInput, JoinHandle<()>), CommandError> {
    let unavailable = |m: String| CommandError::new(ErrorKind::Unavailable, m);
    let port = target.port();
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Err(_) => {
            return Err(unavailable(format!(
                "nothing answered on port {port} of {host} ({target}) within {}s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
        Ok(Err(e)) => {
            return Err(unavailable(format!(
                "cannot connect to port {port} of {host} ({target}): {e}"
            )));
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    // One more than the window, for the end of input.
    let (input, rx) = mpsc::channel(WINDOW as usize + 1);
    let credit = Arc::new(Semaphore::new(WINDOW as usize));
    let span = info_span!("forward", host = %host, port, id);
    let task = tokio::spawn(carry(stream, id, rx, credit.clone(), tx).instrument(span));
    Ok((ForwardInput { input, credit }, task))
}

/// Both directions until the host closes or the connection breaks.
async fn carry(
    stream: TcpStream,
    id: u64,
    mut input: mpsc::Receiver<Input>,
    credit: Arc<Semaphore>,
    tx: mpsc::Sender<pb::AgentMessage>,
) {
    let (mut rd, mut wr) = stream.into_split();
    // Host → server: `None` when the host closed its side.
    let from_host = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match credit.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return Some("closed".to_owned()),
            }
            match rd.read(&mut buf).await {
                Ok(0) => return None,
                Ok(n) => {
                    if tx
                        .send(data(id, buf[..n].to_vec(), String::new(), false, 0))
                        .await
                        .is_err()
                    {
                        return Some("the link to the server went away".to_owned());
                    }
                }
                Err(e) => return Some(format!("reading from the host: {e}")),
            }
        }
    };
    // Server → host: returns only on a failure (after the end of input it
    // waits for the other direction).
    let to_host = async {
        let mut written = 0;
        loop {
            match input.recv().await {
                Some(Input::Data(bytes)) => {
                    if let Err(e) = wr.write_all(&bytes).await {
                        return format!("writing to the host: {e}");
                    }
                    written += 1;
                    if written >= WINDOW / 2 || input.is_empty() {
                        if tx
                            .send(data(id, Vec::new(), String::new(), false, written))
                            .await
                            .is_err()
                        {
                            return "the link to the server went away".to_owned();
                        }
                        written = 0;
                    }
                }
                Some(Input::Eof) => {
                    debug!("end of input: half-closing");
                    if let Err(e) = wr.shutdown().await {
                        return format!("half-closing the connection: {e}");
                    }
                    std::future::pending::<()>().await;
                }
                // The session was dropped.
                None => std::future::pending::<()>().await,
            }
        }
    };
    let notice = tokio::select! {
        r = from_host => r,
        why = to_host => Some(why),
    };
    debug!(why = ?notice, "forward ended");
    let _ = tx
        .send(data(id, Vec::new(), notice.unwrap_or_default(), true, 0))
        .await;
}
