//! Exec: a command run to completion with its stdin closed, its output
//! capped per stream.

use std::collections::BTreeMap;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_wire::async_client::{ClientError, ExecEvent};
use sandpit_wire::ExecRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::super::errors::{invalid_request, Violation};
use super::super::{known_id, principal};
use super::{
    agent_failure, check_container, command_timeout, deadline_passed, grpc_timeout,
    shutdown_signal, shutting_down, start, usage_after_exit, Started, MAX_UNARY_OUTPUT,
};
use crate::accounting::Ending;
use crate::engine::Engine;
use crate::manager::Manager;

/// How much before the call's deadline a unary Exec gives up (see
/// [`exec`]), at most a quarter of it. The caller's clock started before
/// the request was sent and stops when the answer is back: under load 5 ms
/// was seen to be too little for DEADLINE_EXCEEDED to beat the caller's own
/// CANCELLED.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// Output kept up to a cap, with the total produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Capped {
    /// What was kept.
    pub data: Vec<u8>,
    /// Bytes produced in all.
    pub produced: u64,
    /// Whether some were dropped.
    pub truncated: bool,
}

impl Capped {
    /// Adds a chunk, keeping at most `cap` bytes in all.
    pub fn push(&mut self, chunk: &[u8], cap: usize) {
        self.produced += chunk.len() as u64;
        let room = cap.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// Unary Exec: runs to completion with stdin closed, keeping at most
/// `max_output_bytes` of each stream.
pub async fn exec<E: Engine>(
    manager: &Manager<E>,
    shutdown: watch::Receiver<bool>,
    request: Request<pb::ExecRequest>,
) -> Result<Response<pb::ExecResponse>, Status> {
    let principal = principal(&request)?;
    // tonic cancels a unary call at its deadline itself (CANCELLED, which
    // the client reads as "sandbox not running"), and so does the caller's
    // side: ours fires a little earlier, so the caller learns that the
    // command timed out.
    let arrived = request
        .extensions()
        .get::<crate::auth::Arrived>()
        .map_or_else(Instant::now, |a| Instant::from_std(a.0));
    let deadline = grpc_timeout(request.metadata())
        .map(|d| arrived + d.saturating_sub(DEADLINE_MARGIN.min(d / 4)));
    let req = request.into_inner();
    let mut violations = vec![];
    if req.sandbox_id.is_empty() {
        violations.push(Violation::new("sandbox_id", "required"));
    }
    if req.command.is_empty() {
        violations.push(Violation::new("command", "required"));
    }
    if req.max_output_bytes < 0 {
        violations.push(Violation::new("max_output_bytes", "must not be negative"));
    }
    if !violations.is_empty() {
        return Err(invalid_request(&violations));
    }
    check_container(&req.container)?;
    let sandbox_id = known_id(&req.sandbox_id)?;
    let cap = match req.max_output_bytes {
        0 => MAX_UNARY_OUTPUT,
        n => (n as usize).min(MAX_UNARY_OUTPUT),
    };
    let env: BTreeMap<String, String> = req.env.into_iter().collect();
    let exec_req = ExecRequest {
        argv: req.command,
        env: env.into_iter().collect(),
        cwd: None,
        tty: None,
    };
    let mut timer = crate::metrics::ExecTimer::begin();
    let (session, account) = match start(manager, &principal, &sandbox_id, exec_req).await? {
        Started::Running(s, account) => (s, account),
        Started::Failed { message, code } => {
            let mut stderr = Capped::default();
            stderr.push(format!("{message}\n").as_bytes(), cap);
            return Ok(Response::new(pb::ExecResponse {
                stderr_bytes_produced: stderr.produced as i64,
                stderr_truncated: stderr.truncated,
                stderr: stderr.data,
                exit_code: code,
                ..Default::default()
            }));
        }
    };
    timer.started();
    // A call that is cancelled or times out drops this future, and with it
    // the connection: the agent then kills the command.
    let collect = async move {
        let (mut events, mut control) = session.into_split();
        // A command that already exited may have closed the connection.
        let _ = control.close_stdin().await;
        let mut out = Capped::default();
        let mut err = Capped::default();
        loop {
            match events.next_event().await? {
                Some(ExecEvent::Stdout(d)) => out.push(&d, cap),
                Some(ExecEvent::Stderr(d)) => err.push(&d, cap),
                Some(ExecEvent::Exited(s)) => {
                    // Sent with the exit: no wait worth speaking of.
                    let usage = usage_after_exit(&mut events).await;
                    return Ok::<_, ClientError>((out, err, s, usage));
                }
                None => return Err(ClientError::Closed),
            }
        }
    };
    // Dropped with this future (the call cancelled), it records that.
    let mut account = account;
    account.set_deadline(deadline.map(Instant::into_std));
    let stopped = |account: &mut _, ending| {
        manager.exec_end(account, ending, None, None, String::new());
    };
    let result = tokio::select! {
        r = collect => r,
        () = deadline_passed(deadline) => {
            stopped(&mut account, Ending::DeadlinePassed);
            return Err(command_timeout());
        }
        () = shutdown_signal(shutdown) => {
            stopped(&mut account, Ending::DaemonShutdown);
            return Err(shutting_down());
        }
    };
    let (out, err, status, usage) = match result {
        Ok(r) => r,
        Err(e) => {
            let why = crate::chain(&e);
            manager.exec_end(&mut account, Ending::AgentLost, None, None, why);
            return Err(agent_failure(manager, &principal, &sandbox_id, &e));
        }
    };
    manager.exec_end(
        &mut account,
        Ending::Exited(status),
        usage,
        None,
        String::new(),
    );
    let code = status.shell_code();
    Ok(Response::new(pb::ExecResponse {
        stdout: out.data,
        stderr: err.data,
        exit_code: code,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        stdout_bytes_produced: out.produced as i64,
        stderr_bytes_produced: err.produced as i64,
    }))
}
