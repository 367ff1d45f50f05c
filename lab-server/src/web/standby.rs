//! A standby's web port (`--store etcd`, not the leader): every request,
//! `/metrics` and the dashboard alike, is answered `503 Service
//! Unavailable` at once, naming the leader in the body and in the header
//! `lab-leader`, so that neither a browser nor Prometheus hangs on it.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// The standby's whole web face.
pub fn standby_router(leader: watch::Receiver<Option<String>>) -> Router {
    Router::new().fallback(move || {
        let leader = leader.borrow().clone();
        async move { answer(leader.as_deref()) }
    })
}

fn answer(leader: Option<&str>) -> Response {
    let text = match leader {
        Some(l) => format!("this lab-server is a standby; the leader is {l}\n"),
        None => "this lab-server is a standby; no leader is elected yet\n".to_owned(),
    };
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(v) = leader.and_then(|l| HeaderValue::from_str(l).ok()) {
        r.headers_mut().insert("lab-leader", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_leader() {
        let r = answer(Some("https://lab-a:7621"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["lab-leader"], "https://lab-a:7621");
        let r = answer(None);
        assert!(r.headers().get("lab-leader").is_none());
    }
}
