//! StreamExec: a command with its stdin, output, resizes and exit streamed.

use std::collections::BTreeMap;
use std::time::SystemTime;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_request::Message as In;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use sandpit_wire::async_client::{ExecControl, ExecEvent, ExecEvents};
use sandpit_wire::ExecRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::super::errors::{invalid_request, Violation};
use super::super::{convert, known_id, principal};
use super::{
    check_container, command_timeout, deadline_passed, event_frame, exit, grpc_timeout, output,
    shutdown_signal, shutting_down, start, stream_error, usage_after_exit, win_size, Started,
    CHANNEL,
};
use crate::accounting::Ending;
use crate::engine::Engine;
use crate::manager::Manager;

/// StreamExec.
pub async fn stream_exec<E: Engine>(
    manager: &Manager<E>,
    shutdown: watch::Receiver<bool>,
    request: Request<Streaming<pb::ExecStreamRequest>>,
) -> Result<Response<BoxStream<pb::ExecStreamResponse>>, Status> {
    let principal = principal(&request)?;
    let deadline = grpc_timeout(request.metadata()).map(|d| Instant::now() + d);
    let mut inbound = request.into_inner();
    let init = match inbound.message().await? {
        Some(pb::ExecStreamRequest {
            message: Some(In::Init(init)),
        }) => init,
        _ => {
            return Err(invalid_request(&[Violation::new(
                "init",
                "the first message of StreamExec must be init",
            )]))
        }
    };
    stream_exec_from(manager, shutdown, &principal, deadline, init, inbound).await
}

/// StreamExec once its init is read (the direct data plane reads it
/// first, to check the credential against its sandbox).
pub(crate) async fn stream_exec_from<E: Engine>(
    manager: &Manager<E>,
    shutdown: watch::Receiver<bool>,
    principal: &crate::model::Principal,
    deadline: Option<Instant>,
    init: pb::ExecStreamInit,
    inbound: Streaming<pb::ExecStreamRequest>,
) -> Result<Response<BoxStream<pb::ExecStreamResponse>>, Status> {
    let mut violations = vec![];
    if init.sandbox_id.is_empty() {
        violations.push(Violation::new("init.sandbox_id", "required"));
    }
    if init.command.is_empty() {
        violations.push(Violation::new("init.command", "required"));
    }
    if !violations.is_empty() {
        return Err(invalid_request(&violations));
    }
    check_container(&init.container)?;
    let sandbox_id = known_id(&init.sandbox_id)?;
    let env: BTreeMap<String, String> = init.env.into_iter().collect();
    let req = ExecRequest {
        argv: init.command,
        env: env.into_iter().collect(),
        cwd: None,
        tty: init.tty.then(|| win_size(init.tty_width, init.tty_height)),
    };
    let (tx, rx) = mpsc::channel(CHANNEL);
    let mut timer = crate::metrics::ExecTimer::begin();
    let (session, account) = match start(manager, principal, &sandbox_id, req).await? {
        Started::Running(s, account) => (s, account),
        Started::Failed { message, code } => {
            // Reported like a shell would; the channel holds both frames.
            let _ = tx.try_send(Ok(output(PbStream::Stderr, format!("{message}\n").into())));
            let _ = tx.try_send(Ok(exit(code)));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
    };
    timer.started();
    let (events, control) = session.into_split();
    let ready = pb::ExecStreamResponse {
        message: Some(Out::Ready(pb::ExecStreamReady {
            ready_time: Some(convert::timestamp(SystemTime::now())),
        })),
    };
    let _ = tx.try_send(Ok(ready));
    let manager = manager.clone();
    tokio::spawn(async move {
        let mut events = events;
        let mut account = account;
        account.set_deadline(deadline.map(Instant::into_std));
        // Polled by the same task as the output, not spawned: one task per
        // exec, so no wake-up crosses tasks (or worker threads) on its way.
        let inbound = forward_stdin(inbound, control);
        let outcome = pump(&mut events, &tx, inbound, deadline, shutdown).await;
        match outcome {
            Pumped::Exited(ending, detail) => {
                // The client has its exit already; the usage follows it.
                let usage = match ending {
                    Ending::Exited(_) => usage_after_exit(&mut events).await,
                    _ => None,
                };
                manager.exec_end(&mut account, ending, usage, None, detail);
            }
            Pumped::Stopped(status, ending) => {
                // Both halves gone (the control went with `inbound`): the
                // agent sees the connection end and kills the command,
                // before a slow client takes the status.
                drop(events);
                manager.exec_end(&mut account, ending, None, None, String::new());
                if let Some(status) = status {
                    let _ = tx.send(Err(status)).await;
                }
            }
        }
        drop(timer);
        tracing::debug!(%sandbox_id, "exec stream ended");
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// Stdin, close and resize from the client to the agent. Returns true when
/// the client's stream failed (it went away), false at its half-close
/// (stdin EOF, never a cancellation).
async fn forward_stdin<W: AsyncWrite + Unpin>(
    mut inbound: Streaming<pb::ExecStreamRequest>,
    control: ExecControl<W>,
) -> bool {
    // `None` once a write failed: the command exited or the session ended,
    // nothing reads stdin any more; the client's stream is still drained.
    let mut control = Some(control);
    let mut closed = false;
    loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m.message,
            Ok(None) => {
                if !closed {
                    if let Some(c) = &mut control {
                        let _ = c.close_stdin().await;
                    }
                }
                return false;
            }
            Err(_) => return true,
        };
        let Some(c) = &mut control else { continue };
        let sent = match message {
            Some(In::Stdin(d)) if !closed && !d.is_empty() => c.send_stdin(&d).await,
            Some(In::Close(_)) if !closed => {
                closed = true;
                c.close_stdin().await
            }
            Some(In::Resize(r)) => c.resize(win_size(r.width, r.height)).await,
            // Stdin after close, an empty chunk, a second init.
            _ => Ok(()),
        };
        if sent.is_err() {
            control = None;
        }
    }
}

pub(super) enum Pumped {
    /// The command exited and its exit frame was sent (or the client left
    /// after it), or the agent's connection broke (and the client was told):
    /// how it ended, and why when it broke.
    Exited(Ending, String),
    /// The session must be killed; the status (if any) goes to the client.
    Stopped(Option<Status>, Ending),
}

pub(super) async fn pump<R: AsyncRead + Unpin>(
    events: &mut ExecEvents<R>,
    tx: &mpsc::Sender<Result<pb::ExecStreamResponse, Status>>,
    inbound: impl std::future::Future<Output = bool>,
    deadline: Option<Instant>,
    shutdown: watch::Receiver<bool>,
) -> Pumped {
    // Also drives the stdin forwarding, which must go on while the output
    // waits (for the agent, or for room in the channel). The deadline and
    // the shutdown still count after the client's half-close.
    let stop = async move {
        let deadline = deadline_passed(deadline);
        let shutdown = shutdown_signal(shutdown);
        tokio::pin!(inbound, deadline, shutdown);
        let mut forwarding = true;
        loop {
            tokio::select! {
                () = &mut deadline => {
                    return Pumped::Stopped(Some(command_timeout()), Ending::DeadlinePassed)
                }
                () = &mut shutdown => {
                    return Pumped::Stopped(Some(shutting_down()), Ending::DaemonShutdown)
                }
                gone = &mut inbound, if forwarding => {
                    if gone {
                        return Pumped::Stopped(None, Ending::CallerGone);
                    }
                    forwarding = false;
                }
            }
        }
    };
    tokio::pin!(stop);
    loop {
        let ev = tokio::select! {
            s = &mut stop => return s,
            () = tx.closed() => return Pumped::Stopped(None, Ending::CallerGone),
            ev = events.next_event() => ev,
        };
        let (frame, last) = match ev {
            Ok(Some(ev)) => {
                let last = match &ev {
                    ExecEvent::Exited(status) => Some((Ending::Exited(*status), String::new())),
                    _ => None,
                };
                (event_frame(ev), last)
            }
            // After the exit frame; not reached, since the loop ends there.
            Ok(None) => return Pumped::Exited(Ending::AgentLost, "no exit".into()),
            Err(e) => {
                let why = crate::chain(&e);
                (
                    stream_error(format!("exec interrupted: {why}")),
                    Some((Ending::AgentLost, why)),
                )
            }
        };
        tokio::select! {
            s = &mut stop => return s,
            sent = tx.send(Ok(frame)) => {
                if sent.is_err() {
                    // The exit was read: the client leaving after it
                    // changes nothing.
                    return match last {
                        Some((ending @ Ending::Exited(_), detail)) => {
                            Pumped::Exited(ending, detail)
                        }
                        _ => Pumped::Stopped(None, Ending::CallerGone),
                    };
                }
            }
        }
        if let Some((ending, detail)) = last {
            return Pumped::Exited(ending, detail);
        }
    }
}
