//! StreamExec and Exec: commands in a running sandbox, through its agent.
//!
//! The one path of an exec: gRPC handler -> [`Manager::agent_for`] (the
//! caller's sandbox, once it runs) -> the engine's agent client
//! ([`AsyncAgentClient`] over the engine's transport) -> the agent. No frame
//! is read or written here: the client owns the protocol.
//!
//! The agent connection is driven by the runtime itself: no blocking-pool
//! thread sits between the agent and the gRPC streams, so an exec costs no
//! thread hand-offs. One task reads the command's events and forwards them
//! to the response stream through a bounded channel ([`CHANNEL`] messages)
//! and, concurrently, forwards the client's stdin and control frames to the
//! agent. A client that reads slowly fills the channel, the event task then
//! stops reading the agent's connection, and the agent's blocking writes
//! stop the command: memory stays bounded whatever the command prints. A
//! command that does not read its stdin stops the stdin forwarding's writes,
//! and HTTP/2 flow control stops the client. The call's deadline, its
//! cancellation, or the daemon's shutdown drop the agent connection, and the
//! agent kills the command's process group.

use std::time::{Duration, SystemTime};

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use sandpit_wire::async_client::{AsyncAgentClient, AsyncExec, ClientError, Connector, ExecEvent};
use sandpit_wire::{ErrorKind, ExecRequest, WinSize};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::convert;
use super::errors::{self, invalid_request, reason, Violation};
use crate::accounting::Ending;
use crate::engine::Engine;
use crate::manager::{ExecAccount, Manager, ManagerError};
use crate::model::{Principal, SandboxId, State};

mod stream;
mod unary;

pub use stream::stream_exec;
pub(crate) use stream::stream_exec_from;
pub use unary::{exec, Capped};

/// Messages buffered between the gRPC streams and the agent, each way.
pub const CHANNEL: usize = 16;

/// Default and largest `max_output_bytes` of unary Exec, per stream.
pub const MAX_UNARY_OUTPUT: usize = 16 << 20;

/// The deadline a caller gave in `grpc-timeout` (`None`: none or unreadable).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (value, unit) = text.split_at(text.len() - 1);
    let value: u64 = value.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The container named in a data-plane request: empty or the only one.
pub fn check_container(container: &str) -> Result<(), Status> {
    if container.is_empty() || container == "main" {
        return Ok(());
    }
    Err(invalid_request(&[Violation::new(
        "container",
        format!("no container {container:?}: sandboxes have one container, \"main\""),
    )]))
}

fn output(stream: PbStream, data: Vec<u8>) -> pb::ExecStreamResponse {
    pb::ExecStreamResponse {
        message: Some(Out::Output(pb::ExecStreamOutput {
            stream: stream as i32,
            data,
        })),
    }
}

fn exit(code: i32) -> pb::ExecStreamResponse {
    pb::ExecStreamResponse {
        message: Some(Out::Exit(pb::ExecStreamExit {
            exit_code: code,
            completed_time: Some(convert::timestamp(SystemTime::now())),
        })),
    }
}

fn stream_error(message: String) -> pb::ExecStreamResponse {
    pb::ExecStreamResponse {
        message: Some(Out::Error(pb::ExecStreamError {
            message,
            code: String::new(),
        })),
    }
}

/// The response frame for one event of the command.
pub fn event_frame(ev: ExecEvent) -> pb::ExecStreamResponse {
    match ev {
        ExecEvent::Stdout(d) => output(PbStream::Stdout, d),
        ExecEvent::Stderr(d) => output(PbStream::Stderr, d),
        ExecEvent::Exited(status) => exit(status.shell_code()),
    }
}

fn command_timeout() -> Status {
    errors::status(
        Code::DeadlineExceeded,
        "command timed out (the call's deadline passed); it was killed",
        reason::COMMAND_TIMEOUT,
        &[],
    )
}

fn shutting_down() -> Status {
    errors::status(
        Code::Unavailable,
        "sandpitd is shutting down",
        reason::INTERNAL,
        &[],
    )
}

/// Resolves once the daemon shuts down (never when nobody can tell it to).
pub async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn deadline_passed(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// How starting a command went (the console's terminal starts its
/// commands here too).
// Returned once per exec and matched at once, never stored.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Started<C: Connector> {
    /// It runs; its account records how it ends.
    Running(AsyncExec<C>, ExecAccount),
    /// It did not start, as a shell reports it: a message and a code.
    Failed { message: String, code: i32 },
}

/// Starts `req` in the caller's sandbox `id` (waiting while it is created),
/// with its account (see [`crate::accounting`]; a command that never
/// reached the sandbox, not the caller's, not running or refused, has
/// none).
pub(crate) async fn start<E: Engine>(
    manager: &Manager<E>,
    principal: &Principal,
    id: &SandboxId,
    req: ExecRequest,
) -> Result<Started<E::Connector>, Status> {
    let agent: AsyncAgentClient<E::Connector> = manager
        .agent_for(principal, id)
        .await
        .map_err(errors::from_manager)?;
    let mut account = manager.exec_begin(id, &req.argv);
    match agent.exec(req).await {
        Ok(session) => Ok(Started::Running(session, account)),
        // The agent says why, by kind: the shell's 127 for a command not
        // found, 126 for one that cannot run.
        Err(ClientError::Agent {
            kind:
                kind @ (ErrorKind::SpawnFailed | ErrorKind::NotFound | ErrorKind::PermissionDenied),
            message,
        }) => {
            let code = kind.spawn_exit_code();
            manager.exec_end(
                &mut account,
                Ending::SpawnFailed,
                None,
                Some(code),
                message.clone(),
            );
            Ok(Started::Failed { code, message })
        }
        Err(ClientError::Agent {
            kind: ErrorKind::InvalidArgument,
            message,
        }) => {
            // Refused, never run: no record.
            account.discard();
            Err(invalid_request(&[Violation::new("command", message)]))
        }
        Err(e) => {
            manager.exec_end(
                &mut account,
                Ending::AgentLost,
                None,
                None,
                crate::chain(&e),
            );
            Err(agent_failure(manager, principal, id, &e))
        }
    }
}

/// The status for an agent that failed us: the sandbox stopped meanwhile,
/// or something broke.
fn agent_failure<E: Engine>(
    manager: &Manager<E>,
    principal: &Principal,
    id: &SandboxId,
    e: &ClientError,
) -> Status {
    match manager.get(principal, id) {
        Ok(r) if r.state != State::Running => errors::from_manager(ManagerError::NotRunning {
            id: id.clone(),
            state: r.state,
            reason: r.state_reason,
        }),
        Err(e) => errors::from_manager(e),
        Ok(_) => {
            let message = crate::chain(e);
            tracing::warn!(sandbox_id = %id, error = %message, "agent failed during exec");
            errors::status(
                Code::Internal,
                format!("sandbox agent: {message}"),
                reason::INTERNAL,
                &[],
            )
        }
    }
}

/// How long the usage may take after the exit (the agent sends both at
/// once; a silent one costs no more than this).
const USAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// The command's usage, read after its exit.
pub(crate) async fn usage_after_exit<R: tokio::io::AsyncRead + Unpin>(
    events: &mut sandpit_wire::async_client::ExecEvents<R>,
) -> Option<sandpit_wire::Usage> {
    tokio::time::timeout(USAGE_TIMEOUT, events.usage())
        .await
        .ok()
        .flatten()
}

pub(crate) fn win_size(width: u32, height: u32) -> WinSize {
    let clamp = |v: u32, default: u16| {
        if v == 0 {
            default
        } else {
            v.min(u32::from(u16::MAX)) as u16
        }
    };
    WinSize {
        cols: clamp(width, 80),
        rows: clamp(height, 24),
    }
}

#[cfg(test)]
mod tests;
