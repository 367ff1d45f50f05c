//! The web port (`--web-listen`, default `127.0.0.1:7622`): `/metrics` in
//! OpenMetrics text, and the dashboard (`dashboard.rs`, sessions in
//! `session.rs`, the page script and style vendored in `assets/` and
//! compiled in). Served by `lab_client::web::serve` (HTTP/1.1 over hyper,
//! the stack tonic runs on; TLS with the API's certificate when it has one;
//! a cap on connections; idle peers timed out); request bodies are capped
//! at [`MAX_BODY_BYTES`].
//!
//! `/metrics` needs no login: it holds counts and timings only (no host
//! names, principals or tokens). Everything else needs a session.

pub mod dashboard;
pub mod session;
pub mod standby;

use crate::grpc::Api;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use session::Sessions;
use std::sync::Arc;
use tokio::sync::watch;

/// Largest request body (sign-in form, console input, maintenance reason).
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// What every handler of the web port shares.
#[derive(Clone)]
pub struct WebState {
    pub api: Api,
    pub registry: Arc<Registry>,
    sessions: Arc<Sessions>,
    /// Served over TLS: session cookies are `Secure`.
    tls: bool,
    /// Set at shutdown: live streams end.
    stop: watch::Receiver<bool>,
}

impl WebState {
    /// The web port's state over the API's core and rack registry; `stop`
    /// turning true ends the live streams.
    pub fn new(api: Api, tls: bool, stop: watch::Receiver<bool>) -> Self {
        let registry = crate::metrics::registry(
            api.core().stats(),
            api.stats(),
            api.racks().registry().clone(),
        );
        Self {
            api,
            registry: Arc::new(registry),
            sessions: Arc::default(),
            tls,
            stop,
        }
    }
}

/// The web port's routes.
pub fn router(state: WebState) -> Router {
    use dashboard as d;
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(d::index))
        .route("/login", get(d::login_page).post(d::login))
        .route("/logout", post(d::logout))
        .route("/hosts", get(d::hosts_page))
        .route("/hosts/{name}", get(d::host_page))
        .route("/queue", get(d::queue_page))
        .route("/leases", get(d::leases_page))
        .route("/leases/{id}", get(d::lease_page))
        .route("/assets/app.js", get(d::app_js))
        .route("/assets/style.css", get(d::style_css))
        .route("/api/me", get(d::me))
        .route("/api/hosts", get(d::hosts))
        .route("/api/hosts/{name}", get(d::host))
        .route(
            "/api/hosts/{name}/console",
            get(d::console).post(d::console_input),
        )
        .route("/api/hosts/{name}/maintenance", post(d::maintenance))
        .route("/api/hosts/{name}/quarantine", post(d::quarantine))
        .route("/api/queue", get(d::queue))
        .route("/api/bookings", get(d::bookings))
        .route("/api/leases", get(d::leases))
        .route("/api/leases/{id}", get(d::lease))
        .route("/api/leases/{id}/renew", post(d::renew))
        .route("/api/leases/{id}/release", post(d::release))
        .route("/api/leases/{id}/console.log", get(d::console_log))
        .route("/api/events", get(d::events))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn metrics(State(st): State<WebState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    lab_client::web::metrics_response(&st.registry, accept)
}
