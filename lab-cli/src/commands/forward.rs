//! `lab forward HOST PORT`: stdin/stdout joined to a TCP port of a leased
//! host through lab-server and the rack's agent (`HostService.Forward`);
//! with `--listen [ADDR:]LOCALPORT`, each connection accepted on a local
//! port is one forward. `lab ssh` runs this as ssh's ProxyCommand.
//!
//! Bytes go both ways as they come, at most [`CHUNK`] per message. The end
//! of stdin (or of the local connection's input) half-closes the
//! connection to the host; the host closing its side ends the forward
//! (exit 0). A forward cut by the server (the lease ended, idle, the
//! connection broke) exits with the status's code ([`crate::exit`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Args;
use lab_proto::v1::forward_request::Msg as In;
use lab_proto::v1::forward_response::Msg as Out;
use lab_proto::v1::{ForwardOpen, ForwardRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Ctx;
use super::lease::ctrl_c;
use crate::exit::Interrupted;
use crate::sanitize;

/// The largest message sent to the server (the server cuts bigger ones
/// to this size for the agent anyway).
pub const CHUNK: usize = 32 * 1024;

/// When set, `lab forward` writes its exit code to this file as it exits
/// (`lab ssh` reads it to tell a refused forward from ssh's own failure).
pub const STATUS_FILE_ENV: &str = "LAB_FORWARD_STATUS_FILE";

#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    /// Host name (of your lease)
    host: String,
    /// TCP port on the host
    #[arg(value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// Listen on LOCALPORT (of 127.0.0.1) or ADDR:LOCALPORT instead (port 0
    /// picks one): each connection accepted there is one forward
    #[arg(long, value_name = "[ADDR:]LOCALPORT", value_parser = parse_listen)]
    listen: Option<SocketAddr>,
}

/// clap value parser for `--listen`: `PORT`, `ADDR:PORT` or `[V6]:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not PORT or ADDR:PORT"))
}

pub async fn run(ctx: &Ctx, args: ForwardArgs) -> anyhow::Result<()> {
    match args.listen {
        None => stdio(ctx, &args.host, args.port).await,
        Some(addr) => listen(ctx, &args.host, args.port, addr).await,
    }
}

/// stdin/stdout as the connection ([`crate::stdin::reader`]: the thread
/// dies with the process once the host closed the connection).
async fn stdio(ctx: &Ctx, host: &str, port: u16) -> anyhow::Result<()> {
    let rx = crate::stdin::reader(2, CHUNK);
    let carry = carry(ctx, host, port, rx, tokio::io::stdout());
    tokio::select! {
        r = carry => r,
        () = ctrl_c() => Err(Interrupted(None).into()),
    }
}

/// A local listener: one forward per accepted connection, until Ctrl-C.
async fn listen(ctx: &Ctx, host: &str, port: u16, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    // On stdout, for scripts that asked for port 0.
    println!("lab forward listening on {local}");
    eprintln!("[forwarding {local} to {host} port {port}; Ctrl-C to stop]");
    let serve = async {
        loop {
            let (conn, peer) = listener.accept().await?;
            let _ = conn.set_nodelay(true);
            let lab = Ctx {
                lab: ctx.lab.clone(),
                json: ctx.json,
                reach: ctx.reach.clone(),
            };
            let host = host.to_owned();
            tokio::spawn(async move {
                let (rd, wr) = conn.into_split();
                let input = reader_channel(rd);
                if let Err(e) = carry(&lab, &host, port, input, wr).await {
                    let msg = match e.downcast_ref::<tonic::Status>() {
                        Some(s) => s.message().to_owned(),
                        None => format!("{e:#}"),
                    };
                    eprintln!("lab: {peer} → {host}:{port}: {}", sanitize::line(&msg));
                }
            });
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    tokio::select! {
        r = serve => r,
        () = ctrl_c() => Err(Interrupted(None).into()),
    }
}

/// A task reading `rd` into a channel; the channel ends at end of input.
fn reader_channel<R: AsyncRead + Unpin + Send + 'static>(mut rd: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// One forward: `input` to the host until it ends (then half-close), the
/// host's bytes to `out` until the host closes.
async fn carry<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    host: &str,
    port: u16,
    mut input: mpsc::Receiver<Vec<u8>>,
    mut out: W,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<ForwardRequest>(2);
    let open = ForwardRequest {
        msg: Some(In::Open(ForwardOpen {
            host: host.to_owned(),
            port: u32::from(port),
        })),
    };
    tx.send(open).await.expect("the receiver is still here");
    // Input flows only once the forward is open (the call answered).
    let mut responses = ctx
        .lab
        .hosts()
        .forward(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let pump_input = async move {
        while let Some(bytes) = input.recv().await {
            let msg = ForwardRequest {
                msg: Some(In::Data(bytes)),
            };
            // Fails only when the call is over; the responses say why.
            if tx.send(msg).await.is_err() {
                break;
            }
        }
        // Dropping `tx` ends the request stream: the half-close.
        drop(tx);
        std::future::pending::<()>().await;
    };
    let pump_output = async {
        while let Some(m) = responses.message().await? {
            match m.msg {
                Some(Out::Data(bytes)) => {
                    out.write_all(&bytes).await?;
                    out.flush().await?;
                }
                Some(Out::Notice(text)) => eprintln!("[lab: {}]", sanitize::line(&text)),
                None => {}
            }
        }
        let _ = out.shutdown().await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = pump_output => r,
        () = pump_input => unreachable!("the input pump never ends by itself"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("8022").unwrap(),
            "127.0.0.1:8022".parse().unwrap()
        );
        assert_eq!(parse_listen("0").unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            parse_listen("0.0.0.0:8022").unwrap(),
            "0.0.0.0:8022".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:22").unwrap(),
            "[::1]:22".parse().unwrap()
        );
        for bad in ["", "x", "70000", "host:22", "1.2.3.4"] {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }
}
