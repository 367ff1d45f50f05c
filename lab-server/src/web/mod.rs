//! The web port (`--web-listen`, default `127.0.0.1:7622`): `/metrics` in
//! OpenMetrics text, and the dashboard. Served by
//! `lab_client::web::serve` (HTTP/1.1 over hyper, the stack tonic runs on;
//! TLS with the API's certificate when it has one; a cap on connections;
//! idle peers timed out).
//!
//! `/metrics` needs no login: it holds counts and timings only (no host
//! names, principals or tokens).

use crate::grpc::Api;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// What every handler of the web port shares.
#[derive(Clone)]
pub struct WebState {
    pub api: Api,
    pub registry: Arc<Registry>,
}

impl WebState {
    /// The web port's state over the API's core and rack registry.
    pub fn new(api: Api) -> Self {
        let registry = crate::metrics::registry(
            api.core().stats(),
            api.stats(),
            api.racks().registry().clone(),
        );
        Self {
            api,
            registry: Arc::new(registry),
        }
    }
}

/// The web port's routes.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(State(st): State<WebState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    lab_client::web::metrics_response(&st.registry, accept)
}
