//! The dashboard: HTML pages (one shell each; `assets/app.js` renders them
//! from the JSON under `/api/` and refreshes them on every event of the
//! `/api/events` server-sent event stream — no polling), the live console
//! of a host (server-sent events; the input box is shown, and input taken,
//! only for a caller the policy lets drive the host), a lease's console log
//! as a download, and the few actions: renew and release (the lease's
//! holder or an operator), maintenance and quarantine (operators).
//!
//! Every request re-authenticates the session's token with the API's
//! authenticator, and every rule is the API's: the core and the rack
//! registry decide through `core::policy`, and the buttons shown are those
//! the same policy functions allow. Errors become HTTP statuses through the
//! API's one mapping to gRPC statuses (`grpc::status`).

use super::WebState;
use super::session::{COOKIE, Session};
use crate::core::policy;
use crate::core::{CoreError, HostView};
use crate::events::EventRecord;
use crate::lease::machine::Health;
use crate::lease::{HostState, Lease};
use crate::racks::{ConsoleOpen, RackError};
use crate::store::EventQuery;
use crate::types::{Caller, HostName, LeaseId};
use axum::Json;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use lab_types::secret::Secret;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Events replayed to a new event stream before the live ones.
const EVENT_BACKLOG: u64 = 50;
/// Recently granted leases on the leases page.
const RECENT_LEASES: usize = 50;
/// Largest console input one POST may send.
const MAX_CONSOLE_INPUT: usize = 4096;

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// A request refused before it reached the core: a status and why.
#[derive(Debug)]
struct Refusal(StatusCode, String);

/// The value of a `Result<_, Refusal>`, or return the refusal as the
/// handler's response (the handlers' early answers: not signed in, a bad
/// CSRF token, a malformed name or id).
macro_rules! refused {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r.into_response(),
        }
    };
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// A signed-in request: the caller the token names now, and its session.
struct Signed {
    caller: Caller,
    session: Arc<Session>,
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// An error answer: the status the API would give, as HTTP, with its
/// message as text.
fn error(status: tonic::Status) -> Response {
    use tonic::Code;
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, status.message().to_owned()).into_response()
}

fn core_err(e: CoreError) -> Response {
    error(e.into())
}

fn rack_err(e: RackError) -> Response {
    error(e.into())
}

impl WebState {
    /// The signed-in caller of a request, or `None` (no session, an
    /// expired one, or a token no longer valid).
    fn signed(&self, headers: &HeaderMap) -> Option<Signed> {
        let id = cookie_value(headers, COOKIE)?;
        let session = self.sessions.get(&id)?;
        let token = std::str::from_utf8(session.token.expose()).ok()?;
        let caller = self.api.authenticate(token).ok()?;
        policy::may_call(&caller).ok()?;
        Some(Signed { caller, session })
    }

    fn api_signed(&self, headers: &HeaderMap) -> Result<Signed, Refusal> {
        self.signed(headers)
            .ok_or_else(|| Refusal(StatusCode::UNAUTHORIZED, "sign in first".into()))
    }

    /// A POST's session, with its CSRF token checked.
    fn post_signed(&self, headers: &HeaderMap) -> Result<Signed, Refusal> {
        let s = self.api_signed(headers)?;
        let sent = headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !s.session.csrf_ok(sent) {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "missing or wrong CSRF token".into(),
            ));
        }
        Ok(s)
    }

    fn cookie(&self, value: &str, max_age: Option<u64>) -> HeaderValue {
        let secure = if self.tls { "; Secure" } else { "" };
        let age = max_age
            .map(|a| format!("; Max-Age={a}"))
            .unwrap_or_default();
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}"
        ))
        .expect("ascii")
    }
}

// ------------------------------------------------------------------ pages

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn shell(title: &str, page: &str, name: &str) -> Response {
    let nav = [("hosts", "Hosts"), ("queue", "Queue"), ("leases", "Leases")]
        .iter()
        .map(|(p, label)| {
            let cur = if *p == page {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<a href=\"/{p}\"{cur}>{label}</a>")
        })
        .collect::<String>();
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title} · lab</title><link rel=\"stylesheet\" href=\"/assets/style.css\"></head>\
         <body><header><strong>lab</strong><nav>{nav}</nav><span id=\"me\"></span>\
         <span id=\"live\" title=\"live event feed\">○</span></header>\
         <main id=\"app\" data-page=\"{page}\" data-name=\"{name}\"><p>Loading…</p></main>\
         <aside><h2>Events</h2><ol id=\"events\"></ol></aside>\
         <script src=\"/assets/app.js\"></script></body></html>",
        title = escape(title),
        name = escape(name),
    );
    let mut r = Html(html).into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) async fn index() -> Redirect {
    Redirect::to("/hosts")
}

pub(super) async fn login_page() -> Response {
    let html = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign in · lab</title>\
        <link rel=\"stylesheet\" href=\"/assets/style.css\"></head><body class=\"login\">\
        <form method=\"post\" action=\"/login\"><h1>lab</h1>\
        <label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" required></label>\
        <button type=\"submit\" id=\"signin\">Sign in</button>\
        <p class=\"hint\">The bearer token you give the <code>lab</code> CLI (<code>LAB_TOKEN</code>).</p>\
        </form></body></html>";
    let mut r = Html(html).into_response();
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    r
}

#[derive(serde::Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

pub(super) async fn login(State(st): State<WebState>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim();
    let caller = match st.api.authenticate(token) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "dashboard sign-in refused");
            return (StatusCode::UNAUTHORIZED, Html(
                "<!doctype html><p>That token was not accepted. <a href=\"/login\">Try again</a>.</p>",
            ))
                .into_response();
        }
    };
    if let Err(e) = policy::may_call(&caller) {
        return error(e.into());
    }
    tracing::info!(principal = %caller.principal, role = %caller.role, "dashboard sign-in");
    let id = st.sessions.create(
        Secret::from_bytes(token.as_bytes()),
        caller.principal.clone(),
    );
    let mut r = Redirect::to("/hosts").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, st.cookie(&id, None));
    r
}

pub(super) async fn logout(State(st): State<WebState>, headers: HeaderMap) -> Response {
    if let Err(r) = st.post_signed(&headers) {
        return r.into_response();
    }
    if let Some(id) = cookie_value(&headers, COOKIE) {
        st.sessions.remove(&id);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, st.cookie("", Some(0)));
    r
}

/// A page for a signed-in caller; the sign-in page otherwise.
fn page(st: &WebState, headers: &HeaderMap, title: &str, page: &str, name: &str) -> Response {
    if st.signed(headers).is_none() {
        return Redirect::to("/login").into_response();
    }
    shell(title, page, name)
}

pub(super) async fn hosts_page(State(st): State<WebState>, h: HeaderMap) -> Response {
    page(&st, &h, "Hosts", "hosts", "")
}

pub(super) async fn queue_page(State(st): State<WebState>, h: HeaderMap) -> Response {
    page(&st, &h, "Queue", "queue", "")
}

pub(super) async fn leases_page(State(st): State<WebState>, h: HeaderMap) -> Response {
    page(&st, &h, "Leases", "leases", "")
}

pub(super) async fn host_page(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
) -> Response {
    page(&st, &h, &format!("Host {name}"), "host", &name)
}

pub(super) async fn lease_page(
    State(st): State<WebState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    page(&st, &h, &format!("Lease {id}"), "lease", &id)
}

pub(super) async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

pub(super) async fn style_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
        .into_response()
}

// ------------------------------------------------------------------ JSON

fn host_json(v: &HostView) -> Value {
    let r = &v.record;
    let state = match r.state {
        _ if r.retired => "retired",
        HostState::Leased(_) => "leased",
        HostState::Reclaiming(_) => "reclaiming",
        HostState::Available if r.maintenance => "maintenance",
        HostState::Available => "available",
    };
    let lease = v.lease.as_ref();
    let (health_reason, health_since) = match &r.health {
        Health::Healthy => (None, None),
        Health::Suspect { reason, since } => (Some(reason.clone()), Some(since.0)),
        Health::Quarantined {
            reason, since, by, ..
        } => (Some(format!("{reason} (by {by})")), Some(since.0)),
    };
    json!({
        "name": r.name.to_string(),
        "state": state,
        "maintenance": r.maintenance,
        "health": r.health.name(),
        "health_reason": health_reason,
        "health_since": health_since,
        "holder": lease.map(|l| l.holder.to_string()),
        "lease": r.lease().map(|l| l.to_string()),
        "expires_at": lease.filter(|l| l.is_active()).map(|l| l.expires_at.0),
        "reachable": v.unreachable.is_none(),
        "unreachable_reason": v.unreachable,
        "arch": v.spec.as_ref().map(|s| s.arch.to_string()),
        "rack": v.spec.as_ref().map(|s| s.rack.to_string()),
        "flags": v.spec.as_ref().map(|s| s.flags.iter().map(|f| f.to_string()).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

fn lease_json(st: &WebState, l: &Lease) -> Value {
    let provisioning: Vec<Value> = st
        .api
        .racks()
        .provisioning(l)
        .iter()
        .map(|p| {
            json!({
                "host": p.host.to_string(),
                "phase": format!("{:?}", p.phase).to_uppercase(),
                "stage": p.stage,
                "updated_at": p.updated_at.map(|t| t.0),
            })
        })
        .collect();
    json!({
        "id": l.id.to_string(),
        "holder": l.holder.to_string(),
        "hosts": l.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "state": l.state.to_string(),
        "profile": l.profile.as_ref().map(|p| p.to_string()),
        "priority": l.priority,
        "comment": l.comment,
        "granted_at": l.granted_at.0,
        "expires_at": l.expires_at.0,
        "ended_at": l.ended_at.map(|t| t.0),
        "active": l.is_active(),
        "provisioning": provisioning,
    })
}

pub(super) async fn me(State(st): State<WebState>, h: HeaderMap) -> Response {
    match st.api_signed(&h) {
        Ok(s) => Json(json!({
            "principal": s.caller.principal.to_string(),
            "role": s.caller.role.to_string(),
            "csrf": s.session.csrf,
        }))
        .into_response(),
        Err(r) => r.into_response(),
    }
}

pub(super) async fn hosts(State(st): State<WebState>, h: HeaderMap) -> Response {
    if let Err(r) = st.api_signed(&h) {
        return r.into_response();
    }
    match st.api.core().list_hosts().await {
        Ok(v) => Json(v.iter().map(host_json).collect::<Vec<_>>()).into_response(),
        Err(e) => core_err(e),
    }
}

fn host_name(name: String) -> Result<HostName, Refusal> {
    HostName::new(name).map_err(|e| Refusal(StatusCode::BAD_REQUEST, e.to_string()))
}

fn lease_id(id: &str) -> Result<LeaseId, Refusal> {
    id.parse()
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "not a lease id".into()))
}

pub(super) async fn host(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.api_signed(&h));
    let name = refused!(host_name(name));
    let view = match st.api.core().get_host(name).await {
        Ok(v) => v,
        Err(e) => return core_err(e),
    };
    let mut j = host_json(&view);
    let has_console = view
        .spec
        .as_ref()
        .is_some_and(|s| !matches!(s.console, crate::inventory::ConsoleSource::None));
    let may_drive = policy::may_drive_host(&s.caller, &view, "open the console of").is_ok();
    j["has_console"] = json!(has_console);
    j["may_view_console"] = json!(has_console && may_drive);
    j["may_type"] = json!(has_console && may_drive);
    j["may_maintain"] = json!(policy::operators_only(&s.caller, "set maintenance").is_ok());
    Json(j).into_response()
}

/// Bookings and maintenance windows not yet ended, by start.
pub(super) async fn bookings(State(st): State<WebState>, h: HeaderMap) -> Response {
    if let Err(r) = st.api_signed(&h) {
        return r.into_response();
    }
    match st.api.core().list_bookings(None).await {
        Ok(v) => Json(
            v.iter()
                .map(|b| {
                    json!({
                        "id": b.id,
                        "kind": b.kind.to_string(),
                        "holder": b.holder.to_string(),
                        "hosts": b.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                        "start": b.start.0,
                        "end": b.end.0,
                        "started": b.state == crate::lease::booking::BookingState::Started,
                        "lease": b.lease.map(|l| l.to_string()),
                        "comment": b.comment,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => core_err(e),
    }
}

pub(super) async fn queue(State(st): State<WebState>, h: HeaderMap) -> Response {
    if let Err(r) = st.api_signed(&h) {
        return r.into_response();
    }
    match st.api.core().list_queue().await {
        Ok(mut q) => {
            q.sort_by_key(|e| e.position);
            Json(
                q.iter()
                    .map(|e| {
                        json!({
                            "waiter": e.waiter,
                            "principal": e.principal.to_string(),
                            "position": e.position,
                            "eta": e.eta.map(|t| t.0),
                            "queued_at": e.queued_at.0,
                            "count": e.spec.count,
                            "hosts": e.spec.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                            "arch": e.spec.arch.map(|a| a.to_string()),
                            "flags": e.spec.flags.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
                            "priority": e.spec.priority,
                            "detached": e.detached,
                            "project": e.project,
                            "held_back": e.held_back,
                            "waiting_for": e.waiting_for,
                        })
                    })
                    .collect::<Vec<_>>(),
            )
            .into_response()
        }
        Err(e) => core_err(e),
    }
}

pub(super) async fn leases(State(st): State<WebState>, h: HeaderMap) -> Response {
    if let Err(r) = st.api_signed(&h) {
        return r.into_response();
    }
    let core = st.api.core();
    let active = match core
        .list_leases(crate::core::LeaseQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
    {
        Ok(p) => p.leases,
        Err(e) => return core_err(e),
    };
    let recent = match core.recent_leases(RECENT_LEASES).await {
        Ok(r) => r,
        Err(e) => return core_err(e),
    };
    Json(json!({
        "active": active.iter().map(|l| lease_json(&st, l)).collect::<Vec<_>>(),
        "recent": recent.iter().filter(|l| !l.is_active()).map(|l| lease_json(&st, l)).collect::<Vec<_>>(),
    }))
    .into_response()
}

pub(super) async fn lease(
    State(st): State<WebState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.api_signed(&h));
    let id = refused!(lease_id(&id));
    match st.api.core().get_lease(id).await {
        Ok(l) => {
            let mut j = lease_json(&st, &l);
            j["may_manage"] =
                json!(l.is_active() && policy::may_manage_lease(&s.caller, &l, "renew").is_ok());
            j["may_read_log"] = json!(policy::may_read_console_log(&s.caller, &l).is_ok());
            Json(j).into_response()
        }
        Err(e) => core_err(e),
    }
}

// ------------------------------------------------------------------ actions

pub(super) async fn renew(
    State(st): State<WebState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.post_signed(&h));
    let id = refused!(lease_id(&id));
    match st.api.core().renew(s.caller, id, None).await {
        Ok(l) => Json(lease_json(&st, &l)).into_response(),
        Err(e) => core_err(e),
    }
}

pub(super) async fn release(
    State(st): State<WebState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.post_signed(&h));
    let id = refused!(lease_id(&id));
    match st.api.core().release(s.caller, id).await {
        Ok(l) => Json(lease_json(&st, &l)).into_response(),
        Err(e) => core_err(e),
    }
}

/// The body of an operator's switch on a host: on or off, and why.
#[derive(serde::Deserialize)]
pub(super) struct Switch {
    on: bool,
    #[serde(default)]
    reason: String,
}

/// Which of a host's operator switches a POST sets.
#[derive(Clone, Copy)]
enum HostSwitch {
    Maintenance,
    Quarantine,
}

async fn set_switch(
    st: WebState,
    name: String,
    h: HeaderMap,
    m: Switch,
    which: HostSwitch,
) -> Response {
    let s = refused!(st.post_signed(&h));
    let name = refused!(host_name(name));
    let reason = match crate::grpc::convert::text("reason", m.reason) {
        Ok(r) => r,
        Err(e) => return error(e),
    };
    let core = st.api.core();
    let done = match which {
        HostSwitch::Maintenance => core.set_maintenance(s.caller, name, m.on, reason).await,
        HostSwitch::Quarantine => core.set_quarantine(s.caller, name, m.on, reason).await,
    };
    match done {
        Ok(v) => Json(host_json(&v)).into_response(),
        Err(e) => core_err(e),
    }
}

pub(super) async fn maintenance(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
    Json(m): Json<Switch>,
) -> Response {
    set_switch(st, name, h, m, HostSwitch::Maintenance).await
}

pub(super) async fn quarantine(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
    Json(m): Json<Switch>,
) -> Response {
    set_switch(st, name, h, m, HostSwitch::Quarantine).await
}

#[derive(serde::Deserialize)]
pub(super) struct ConsoleInput {
    text: String,
}

/// Console input: a write session is opened for it (taking the console's
/// input over, like `lab console`), the bytes sent, and the session closed.
pub(super) async fn console_input(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
    Json(input): Json<ConsoleInput>,
) -> Response {
    let s = refused!(st.post_signed(&h));
    let host = refused!(host_name(name));
    if input.text.len() > MAX_CONSOLE_INPUT {
        return (StatusCode::PAYLOAD_TOO_LARGE, "console input too long").into_response();
    }
    let open = ConsoleOpen {
        host,
        write: true,
        replay_bytes: 1,
        // Set by the rack registry from the caller's lease.
        not_before: None,
    };
    let session = match st.api.racks().console(&s.caller, open).await {
        Ok(c) => c,
        Err(e) => return rack_err(e),
    };
    match session.input(input.text.into_bytes(), false).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => rack_err(e),
    }
}

/// A lease's console log as a text download (one section per host).
pub(super) async fn console_log(
    State(st): State<WebState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.api_signed(&h));
    let id = refused!(lease_id(&id));
    let lease = match st.api.core().get_lease(id).await {
        Ok(l) => l,
        Err(e) => return core_err(e),
    };
    let mut parts = match st.api.racks().console_log(&s.caller, &lease).await {
        Ok(p) => p,
        Err(e) => return rack_err(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Infallible>>(16);
    tokio::spawn(async move {
        while let Some((host, part)) = parts.next_part().await {
            if tx
                .send(Ok(format!("=== {host} ===\n").into_bytes()))
                .await
                .is_err()
            {
                return;
            }
            let mut data = match part {
                Ok(d) => d,
                Err(e) => {
                    let msg = format!("(no console log: {})\n", tonic::Status::from(e).message());
                    let _ = tx.send(Ok(msg.into_bytes())).await;
                    continue;
                }
            };
            while let Some(d) = data.next().await {
                if !d.output.is_empty() && tx.send(Ok(d.output)).await.is_err() {
                    return;
                }
                if d.end {
                    break;
                }
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"lease-{id}-console.log\""),
            ),
        ],
        body,
    )
        .into_response()
}

// ------------------------------------------------------------------ streams

/// How often an idle server-sent event stream gets a comment: keeps proxies
/// from closing it, and finds a client that went away (the write fails), so
/// that its place in [`STREAMS_PER_SESSION`](super::session::STREAMS_PER_SESSION)
/// is freed within about this long.
const SSE_KEEPALIVE: Duration = Duration::from_secs(5);

/// A server-sent event response from a channel of events.
fn sse(rx: tokio::sync::mpsc::Receiver<Event>) -> Response {
    let stream = futures::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, Infallible>,
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE))
        .into_response()
}

fn event_json(e: &EventRecord) -> String {
    json!({
        "seq": e.seq,
        "time": e.time.0,
        "actor": e.actor.to_string(),
        "kind": e.kind,
        "hosts": e.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        "lease": e.lease.map(|l| l.to_string()),
        "detail": e.detail,
    })
    .to_string()
}

/// The live event feed: the last [`EVENT_BACKLOG`] events, then each
/// committed one as it comes. After falling behind, it tells the page to
/// reload its data (`event: lagged`).
pub(super) async fn events(State(st): State<WebState>, h: HeaderMap) -> Response {
    let s = refused!(st.api_signed(&h));
    let Some(slot) = s.session.stream() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many live streams open in this session",
        )
            .into_response();
    };
    let core = st.api.core().clone();
    let mut live = core.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let mut stop = st.stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let last = core.last_event_seq().await.unwrap_or(0);
        let backlog = core
            .list_events(EventQuery {
                after_seq: last.saturating_sub(EVENT_BACKLOG),
                limit: EVENT_BACKLOG as usize,
                host: None,
                lease: None,
            })
            .await
            .map(|p| p.events)
            .unwrap_or_default();
        let mut seen = 0;
        for e in &backlog {
            seen = e.seq;
            if tx
                .send(Event::default().event("backlog").data(event_json(e)))
                .await
                .is_err()
            {
                return;
            }
        }
        loop {
            let e = tokio::select! {
                e = live.recv() => e,
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            };
            let ev = match e {
                Ok(e) if e.seq <= seen => continue,
                Ok(e) => Event::default().event("event").data(event_json(&e)),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    Event::default().event("lagged").data("{}")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    sse(rx)
}

/// A host's live console, read-only (input goes through
/// [`console_input`]): the recent output, then the live stream, as text.
pub(super) async fn console(
    State(st): State<WebState>,
    Path(name): Path<String>,
    h: HeaderMap,
) -> Response {
    let s = refused!(st.api_signed(&h));
    let host = refused!(host_name(name));
    let Some(slot) = s.session.stream() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many live streams open in this session",
        )
            .into_response();
    };
    let open = ConsoleOpen {
        host,
        write: false,
        replay_bytes: 16 * 1024,
        // Set by the rack registry: a holder sees nothing from before its
        // lease.
        not_before: None,
    };
    let mut session = match st.api.racks().console(&s.caller, open).await {
        Ok(c) => c,
        Err(e) => return rack_err(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let mut stop = st.stop.clone();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            let d = tokio::select! {
                d = session.output.recv() => d,
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Some(d) = d else {
                let _ = tx
                    .send(Event::default().event("notice").data("the console closed"))
                    .await;
                return;
            };
            if !d.notice.is_empty()
                && tx
                    .send(
                        Event::default()
                            .event("notice")
                            .data(d.notice.replace('\n', " ")),
                    )
                    .await
                    .is_err()
            {
                return;
            }
            if !d.output.is_empty() {
                let text = json!(String::from_utf8_lossy(&d.output)).to_string();
                if tx
                    .send(Event::default().event("output").data(text))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if d.end {
                let _ = tx
                    .send(Event::default().event("notice").data("the console closed"))
                    .await;
                return;
            }
        }
    });
    sse(rx)
}
