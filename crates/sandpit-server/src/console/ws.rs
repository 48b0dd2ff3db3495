//! The console's websockets: a sandbox's logs, followed (StreamLogs), and a
//! terminal (StreamExec's start with a PTY).
//!
//! The page's first message is JSON with the key and what it wants
//! ([`Hello`]); nothing happens before it authenticates. Then binary frames
//! carry bytes (output to the page, keystrokes to the command) and text
//! frames JSON: from the page `{"resize": [cols, rows]}`, to it
//! `{"type": "ready"}`, `{"type": "exit", "code": N}`, `{"type": "end"}` and
//! `{"type": "error", "status": HTTP-STATUS, "message": ...}`. Closing the
//! socket ends the command (the agent kills its process group), exactly as
//! a StreamExec client going away does.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use sandpit_proto::sandbox::v1 as pb;
use sandpit_wire::async_client::ExecEvent;
use sandpit_wire::ExecRequest;
use serde::Deserialize;
use tonic::{Code, Request, Status};

use super::{key_caller, refusal, Console, Shared};
use crate::accounting::Ending;
use crate::api::exec::{start, usage_after_exit, win_size, Started};
use crate::engine::Engine;
use crate::model::{Principal, SandboxId};

/// How long the page has to send its first message.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// Largest message taken from the page (keystrokes and pastes).
const MAX_MESSAGE: usize = 64 << 10;
/// The last lines a freshly opened logs pane shows.
const LOG_TAIL_LINES: i32 = 1000;

/// The page's first message.
#[derive(Debug, Deserialize)]
struct Hello {
    key: String,
    sandbox_id: String,
    /// The terminal's command; `sh` when absent.
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    cols: u32,
    #[serde(default)]
    rows: u32,
}

/// A terminal's control message.
#[derive(Debug, Deserialize)]
struct Control {
    resize: Option<(u32, u32)>,
}

fn http_status(code: Code) -> u16 {
    match code {
        Code::NotFound => 404,
        Code::InvalidArgument => 400,
        Code::FailedPrecondition => 409,
        Code::Unauthenticated => 401,
        Code::Unavailable => 503,
        _ => 500,
    }
}

fn error_message(status: u16, message: &str) -> Message {
    Message::Text(
        serde_json::json!({ "type": "error", "status": status, "message": message })
            .to_string()
            .into(),
    )
}

fn event(kind: &str) -> Message {
    Message::Text(serde_json::json!({ "type": kind }).to_string().into())
}

/// Sends a refusal and closes (4000 + the HTTP status, so scripts can tell).
async fn refuse(socket: &mut WebSocket, status: u16, message: &str) {
    let _ = socket.send(error_message(status, message)).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 4000 + status,
            reason: "".into(),
        })))
        .await;
}

/// Checks the origin, then hands the socket to `session`.
fn upgrade<E, F, Fut>(
    c: Shared<E>,
    headers: &HeaderMap,
    ws: WebSocketUpgrade,
    session: F,
) -> Response
where
    E: Engine,
    F: FnOnce(Shared<E>, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if !c
        .origins
        .allow(headers.get(header::ORIGIN), headers.get(header::HOST))
    {
        return refusal(StatusCode::FORBIDDEN, "websocket from another origin");
    }
    ws.max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(c, socket))
}

/// The first message, authenticated: the caller and its sandbox.
async fn hello<E: Engine>(
    c: &Console<E>,
    socket: &mut WebSocket,
) -> Option<(Principal, SandboxId, Hello)> {
    let first = match tokio::time::timeout(HELLO_WAIT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) => {
            refuse(socket, 400, "the first message must be JSON text").await;
            return None;
        }
        Ok(_) => return None,
        Err(_) => {
            refuse(socket, 401, "no key sent").await;
            return None;
        }
    };
    let hello: Hello = match serde_json::from_str(first.as_str()) {
        Ok(h) => h,
        Err(e) => {
            refuse(socket, 400, &format!("first message: {e}")).await;
            return None;
        }
    };
    let Some(principal) = key_caller(&c.auth, &hello.key) else {
        refuse(socket, 401, "unknown API key").await;
        return None;
    };
    // A malformed id names no sandbox, as in the gRPC API.
    let Ok(id) = SandboxId::parse(&hello.sandbox_id) else {
        refuse(
            socket,
            404,
            &format!("sandbox {:?} not found", hello.sandbox_id),
        )
        .await;
        return None;
    };
    Some((principal, id, hello))
}

async fn refuse_status(socket: &mut WebSocket, status: &Status) {
    refuse(socket, http_status(status.code()), status.message()).await;
}

/// `GET /api/ws/logs`.
pub(super) async fn logs<E: Engine>(
    State(c): State<Shared<E>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(c, &headers, ws, logs_session)
}

async fn logs_session<E: Engine>(c: Shared<E>, mut socket: WebSocket) {
    let Some((principal, id, _)) = hello(&c, &mut socket).await else {
        return;
    };
    let mut request = Request::new(pb::StreamLogsRequest {
        sandbox_id: id.to_string(),
        follow: true,
        tail_lines: LOG_TAIL_LINES,
        ..Default::default()
    });
    request.extensions_mut().insert(principal);
    let stream =
        crate::api::logs::stream_logs(&c.manager, c.logs.clone(), c.shutdown.clone(), request)
            .await;
    let mut stream = match stream {
        Ok(r) => r.into_inner(),
        Err(s) => return refuse_status(&mut socket, &s).await,
    };
    if socket.send(event("ready")).await.is_err() {
        return;
    }
    let shutdown = crate::api::exec::shutdown_signal(c.shutdown.clone());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(entry)) => {
                    if let Some(e) = entry.error {
                        return refuse(&mut socket, 410, &format!("{}: {}", e.code, e.message)).await;
                    }
                    if socket.send(Message::Binary(entry.data.into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(s)) => return refuse_status(&mut socket, &s).await,
                None => {
                    let _ = socket.send(event("end")).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            () = &mut shutdown => return refuse(&mut socket, 503, "sandpitd is shutting down").await,
        }
    }
}

/// `GET /api/ws/terminal`.
pub(super) async fn terminal<E: Engine>(
    State(c): State<Shared<E>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(c, &headers, ws, terminal_session)
}

async fn terminal_session<E: Engine>(c: Shared<E>, mut socket: WebSocket) {
    let Some((principal, id, hello)) = hello(&c, &mut socket).await else {
        return;
    };
    let argv = if hello.command.is_empty() {
        vec!["sh".to_owned()]
    } else {
        hello.command
    };
    let req = ExecRequest {
        argv,
        // What xterm.js emulates.
        env: vec![("TERM".into(), "xterm-256color".into())],
        cwd: None,
        tty: Some(win_size(hello.cols, hello.rows)),
    };
    // The terminal's shell is a command like any exec: it gets its record.
    let (session, mut account) = match start(&c.manager, &principal, &id, req).await {
        Ok(Started::Running(s, account)) => (s, account),
        Ok(Started::Failed { message, code }) => {
            let _ = socket
                .send(Message::Binary(
                    format!("{message}\r\n").into_bytes().into(),
                ))
                .await;
            let exit = serde_json::json!({ "type": "exit", "code": code });
            let _ = socket.send(Message::Text(exit.to_string().into())).await;
            return;
        }
        Err(s) => return refuse_status(&mut socket, &s).await,
    };
    tracing::info!(sandbox_id = %id, principal = %principal, "console terminal opened");
    if socket.send(event("ready")).await.is_err() {
        return;
    }
    let (mut events, mut control) = session.into_split();
    let (mut to_page, mut from_page) = socket.split();
    // Keystrokes and resizes go on while the output waits for the page,
    // and the other way round (a command that does not read its input
    // must not stop its output).
    let input = async move {
        while let Some(Ok(msg)) = from_page.next().await {
            let sent = match msg {
                Message::Binary(b) => control.send_stdin(&b).await,
                Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
                    Ok(Control {
                        resize: Some((cols, rows)),
                    }) => control.resize(win_size(cols, rows)).await,
                    _ => Ok(()),
                },
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if sent.is_err() {
                // The command ended: its exit comes through the output.
                std::future::pending::<()>().await;
            }
        }
    };
    let output = async move {
        loop {
            let msg = match events.next_event().await {
                Ok(Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d))) => Message::Binary(d.into()),
                Ok(Some(ExecEvent::Exited(status))) => {
                    let exit = serde_json::json!({ "type": "exit", "code": status.shell_code() });
                    let _ = to_page.send(Message::Text(exit.to_string().into())).await;
                    let _ = to_page.send(Message::Close(None)).await;
                    let usage = usage_after_exit(&mut events).await;
                    return (Ending::Exited(status), usage);
                }
                Ok(None) => return (Ending::AgentLost, None),
                Err(e) => {
                    let text = format!("terminal interrupted: {}", crate::chain(&e));
                    let _ = to_page.send(error_message(500, &text)).await;
                    return (Ending::AgentLost, None);
                }
            };
            if to_page.send(msg).await.is_err() {
                return (Ending::CallerGone, None);
            }
        }
    };
    let shutdown = crate::api::exec::shutdown_signal(c.shutdown.clone());
    // Whichever ends first ends the session; dropping the agent connection
    // kills the command.
    let (ending, usage) = tokio::select! {
        () = input => (Ending::CallerGone, None),
        ended = output => ended,
        () = shutdown => (Ending::DaemonShutdown, None),
    };
    c.manager
        .exec_end(&mut account, ending, usage, None, String::new());
    tracing::info!(sandbox_id = %id, "console terminal closed");
}
