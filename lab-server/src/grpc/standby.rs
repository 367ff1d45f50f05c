//! A standby's gRPC face (`--store etcd`, not the leader): every call is
//! answered UNAVAILABLE at once, naming the leader in the message and in
//! the response metadata key [`LEADER_HEADER`] (`lab-leader`), so that a
//! client moves to it. gRPC health answers (NOT_SERVING for the lab
//! services), so a load balancer sees which replica leads.

use std::future::Future;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;
use tonic::codegen::http;

/// The response metadata key that names the leader's address.
pub const LEADER_HEADER: &str = "lab-leader";

/// The status a standby answers with.
pub fn not_the_leader(leader: Option<&str>) -> Status {
    let mut status = Status::unavailable(match leader {
        Some(l) => format!("this lab-server is a standby; the leader is {l}"),
        None => "this lab-server is a standby; no leader is elected yet".to_owned(),
    });
    if let Some(v) = leader.and_then(|l| l.parse().ok()) {
        status.metadata_mut().insert(LEADER_HEADER, v);
    }
    status
}

/// Answers everything but gRPC health with [`not_the_leader`].
#[derive(Clone)]
struct StandbyLayer {
    leader: watch::Receiver<Option<String>>,
}

impl<S> tower_layer::Layer<S> for StandbyLayer {
    type Service = Standby<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Standby {
            inner,
            leader: self.leader.clone(),
        }
    }
}

#[derive(Clone)]
struct Standby<S> {
    inner: S,
    leader: watch::Receiver<Option<String>>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Standby<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path().starts_with("/grpc.health.") {
            return Box::pin(self.inner.call(req));
        }
        let leader = self.leader.borrow().clone();
        let response = not_the_leader(leader.as_deref()).into_http();
        Box::pin(async move { Ok(response) })
    }
}

/// Serve the standby's answers on `listener` until `shutdown`.
pub async fn serve_standby(
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    leader: watch::Receiver<Option<String>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for service in [
        "lab.v1.HostService",
        "lab.v1.LeaseService",
        "lab.v1.EventService",
        "lab.v1.AdminService",
        "lab.v1.AgentService",
    ] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let (builder, incoming) = super::transport(listener, tls)?;
    builder
        .layer(StandbyLayer { leader })
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
