//! The console's HTTP routes: the page's files, who the key is, the
//! caller's sandboxes, stop; the websockets are in `ws`.

use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tonic::Code;

use super::{caller, refusal, unauthorized, ws, Shared};
use crate::engine::Engine;
use crate::manager::{ListQuery, ManagerError, StateFilter};
use crate::model::{Resources, SandboxId, SandboxRecord, State as SandboxState};

/// The files of the page, embedded in the binary.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    (
        "/xterm.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/xterm.js"),
    ),
    (
        "/xterm.css",
        "text/css; charset=utf-8",
        include_str!("assets/xterm.css"),
    ),
    (
        "/xterm-addon-fit.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/xterm-addon-fit.js"),
    ),
    (
        "/xterm-addon-fit-LICENSE.txt",
        "text/plain; charset=utf-8",
        include_str!("assets/xterm-addon-fit-LICENSE"),
    ),
    (
        "/xterm-LICENSE.txt",
        "text/plain; charset=utf-8",
        include_str!("assets/xterm-LICENSE"),
    ),
];

/// The grace a stop from the console gives the main process.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub(super) fn routes<E: Engine>(console: Shared<E>) -> Router {
    let mut router = Router::new();
    for &(path, content_type, body) in ASSETS {
        router = router.route(
            path,
            get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) }),
        );
    }
    router
        .route("/api/whoami", get(whoami::<E>))
        .route("/api/sandboxes", get(list::<E>))
        .route("/api/sandboxes/{id}/stop", post(stop::<E>))
        .route("/api/ws/logs", get(ws::logs::<E>))
        .route("/api/ws/terminal", get(ws::terminal::<E>))
        .fallback(|| async { refusal(StatusCode::NOT_FOUND, "no such page") })
        .with_state(console)
}

async fn whoami<E: Engine>(State(c): State<Shared<E>>, headers: HeaderMap) -> Response {
    match caller(&c.auth, &headers) {
        Ok(p) => Json(serde_json::json!({ "principal": p.as_str() })).into_response(),
        Err(e) => unauthorized(&e),
    }
}

/// The table's filters.
#[derive(Debug, Deserialize)]
pub(super) struct Filters {
    /// `active` (the default: not terminal), `all`, or one state's name.
    state: Option<String>,
    /// A tag the sandbox must carry.
    tag: Option<String>,
}

impl Filters {
    fn query(&self) -> Result<ListQuery, String> {
        let (state, show_terminated) = match self.state.as_deref().unwrap_or("") {
            "" | "active" => (StateFilter::Any, false),
            "all" => (StateFilter::Any, true),
            name => match SandboxState::parse(name) {
                Some(s) => (StateFilter::Only(s), false),
                None => return Err(format!("state: {name:?} is not active, all or a state")),
            },
        };
        Ok(ListQuery {
            tags: self.tag.iter().filter(|t| !t.is_empty()).cloned().collect(),
            state,
            show_terminated,
            page_size: ListQuery::MAX_PAGE_SIZE,
            page_token: None,
            descending: true,
        })
    }
}

/// One row of the table.
#[derive(Debug, Serialize)]
pub(super) struct Row {
    id: String,
    state: &'static str,
    reason: String,
    image: String,
    tags: Vec<String>,
    display_name: String,
    requests: Quantities,
    limits: Quantities,
    created_ms: Option<u64>,
    started_ms: Option<u64>,
    ended_ms: Option<u64>,
    exit_code: Option<i32>,
}

#[derive(Debug, Serialize)]
struct Quantities {
    cpu_millis: Option<u64>,
    memory_bytes: Option<u64>,
}

impl From<Resources> for Quantities {
    fn from(r: Resources) -> Self {
        Self {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
        }
    }
}

fn millis(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

impl From<SandboxRecord> for Row {
    fn from(r: SandboxRecord) -> Self {
        Self {
            id: r.id.to_string(),
            state: r.state.as_str(),
            reason: r.state_reason,
            image: r.image,
            tags: r.tags,
            display_name: r.display_name,
            requests: r.resources.requests.into(),
            limits: r.resources.limits.into(),
            created_ms: millis(r.create_time),
            started_ms: r.start_time.and_then(millis),
            ended_ms: r.end_time.and_then(millis),
            exit_code: r.exit_code,
        }
    }
}

/// A manager's refusal as the gRPC API would word it, with the nearest
/// HTTP status.
pub(super) fn manager_refusal(e: ManagerError) -> Response {
    let status = crate::api::errors::from_manager(e);
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refusal(code, status.message())
}

async fn list<E: Engine>(
    State(c): State<Shared<E>>,
    headers: HeaderMap,
    Query(filters): Query<Filters>,
) -> Response {
    let principal = match caller(&c.auth, &headers) {
        Ok(p) => p,
        Err(e) => return unauthorized(&e),
    };
    let query = match filters.query() {
        Ok(q) => q,
        Err(m) => return refusal(StatusCode::BAD_REQUEST, m),
    };
    match c.manager.list(&principal, &query) {
        Ok(page) => {
            let truncated = page.next_page_token.is_some();
            let rows: Vec<Row> = page.sandboxes.into_iter().map(Row::from).collect();
            Json(serde_json::json!({ "sandboxes": rows, "truncated": truncated })).into_response()
        }
        Err(e) => manager_refusal(e),
    }
}

async fn stop<E: Engine>(
    State(c): State<Shared<E>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let principal = match caller(&c.auth, &headers) {
        Ok(p) => p,
        Err(e) => return unauthorized(&e),
    };
    // A malformed id names no sandbox, as in the gRPC API.
    let Ok(id) = SandboxId::parse(&id) else {
        return manager_refusal(ManagerError::NotFound(id));
    };
    match c.manager.delete(&principal, &id, STOP_GRACE, false).await {
        Ok(r) => Json(serde_json::json!({
            "state": r.map_or("terminated", |r| r.state.as_str())
        }))
        .into_response(),
        Err(e) => manager_refusal(e),
    }
}
