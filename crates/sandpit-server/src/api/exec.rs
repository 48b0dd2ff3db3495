//! StreamExec and Exec: commands in a running sandbox, through its agent.
//!
//! The agent connection is driven by the runtime itself (a tokio
//! `UnixStream`): no blocking-pool thread sits between the agent and the
//! gRPC streams, so an exec costs no thread hand-offs. One task reads the
//! command's events and forwards them to the response stream through a
//! bounded channel ([`CHANNEL`] messages) and, concurrently, forwards the
//! client's stdin and control frames to the agent. A client that reads slowly fills
//! the channel, the event task then stops reading the agent's socket, and
//! the agent's blocking writes stop the command: memory stays bounded
//! whatever the command prints. A command that does not read its stdin stops
//! the stdin forwarding's socket writes, and HTTP/2 flow control stops the
//! client.
//! The call's deadline, its cancellation, or the daemon's shutdown close the
//! agent connection, and the agent kills the command's process group.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime};

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_request::Message as In;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use sandpit_wire::client::{AgentClient, ClientError, ExecEvent};
use sandpit_wire::{ErrorKind, ExecRequest, Frame, WinSize, CHUNK_LEN};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use super::errors::{self, invalid_request, reason, Violation};
use super::{convert, principal};
use crate::engine::Engine;
use crate::local::read_frame;
use crate::manager::Manager;

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

/// The exit code a shell would give for a command that did not start.
fn spawn_failure_code(message: &str) -> i32 {
    if message.ends_with("command not found") || message.contains("No such file") {
        127
    } else {
        126
    }
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

/// An exec connection to the agent, after its `Started`.
struct Session {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Session {
    /// Connects to the agent, sends the request and waits for the command
    /// to run.
    async fn open(agent: &AgentClient, req: ExecRequest) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(agent.socket())
            .await
            .map_err(ClientError::Connect)?;
        let (reader, mut writer) = stream.into_split();
        send(&mut writer, &Frame::Exec(req)).await?;
        let mut reader = BufReader::with_capacity(CHUNK_LEN + 64, reader);
        match read_frame(&mut reader).await? {
            Some(Frame::Started { .. }) => Ok(Self { reader, writer }),
            Some(Frame::Error { kind, message }) => Err(ClientError::Agent { kind, message }),
            Some(_) => Err(ClientError::Protocol(
                "unexpected frame while starting exec".into(),
            )),
            None => Err(ClientError::Closed),
        }
    }
}

/// Sends one frame (a single write: nothing else writes to this half).
async fn send(w: &mut OwnedWriteHalf, frame: &Frame) -> Result<(), ClientError> {
    let mut buf = Vec::with_capacity(16);
    sandpit_wire::encode(frame, &mut buf);
    w.write_all(&buf).await?;
    Ok(())
}

/// The command's next event from the agent (hostile input: bounded frames,
/// and only the frames an exec may carry).
async fn next_event(r: &mut BufReader<OwnedReadHalf>) -> Result<ExecEvent, ClientError> {
    match read_frame(r).await? {
        Some(Frame::Stdout(d)) => Ok(ExecEvent::Stdout(d)),
        Some(Frame::Stderr(d)) => Ok(ExecEvent::Stderr(d)),
        Some(Frame::Exited(s)) => Ok(ExecEvent::Exited(s)),
        Some(Frame::Error { kind, message }) => Err(ClientError::Agent { kind, message }),
        Some(_) => Err(ClientError::Protocol("unexpected frame during exec".into())),
        None => Err(ClientError::Closed),
    }
}

/// Closes the agent connection in both directions, whoever holds a half of
/// it: the agent sees the hang-up and kills the command's process group,
/// and a write blocked on a command that does not read its stdin fails.
fn abort(conn: &UnixStream) {
    // SAFETY: shutdown takes the descriptor by value and touches no memory;
    // `conn` keeps the descriptor open across the call.
    unsafe {
        libc::shutdown(conn.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// How starting a command went.
enum Started {
    Running(Session),
    /// It did not start, as a shell reports it: a message and a code.
    Failed {
        message: String,
        code: i32,
    },
}

/// Starts `req` in the caller's sandbox `id` (waiting while it is created).
async fn start<E: Engine>(
    manager: &Manager<E>,
    principal: &crate::model::Principal,
    id: &str,
    req: ExecRequest,
) -> Result<Started, Status> {
    let agent = manager
        .agent_for(principal, &super::known_id(id)?)
        .await
        .map_err(errors::from_manager)?;
    match Session::open(&agent, req).await {
        Ok(session) => Ok(Started::Running(session)),
        Err(ClientError::Agent {
            kind: ErrorKind::SpawnFailed | ErrorKind::NotFound | ErrorKind::PermissionDenied,
            message,
        }) => Ok(Started::Failed {
            code: spawn_failure_code(&message),
            message,
        }),
        Err(ClientError::Agent {
            kind: ErrorKind::InvalidArgument,
            message,
        }) => Err(invalid_request(&[Violation::new("command", message)])),
        Err(e) => Err(agent_failure(manager, principal, id, &e)),
    }
}

/// The status for an agent that failed us: the sandbox stopped meanwhile,
/// or something broke.
fn agent_failure<E: Engine>(
    manager: &Manager<E>,
    principal: &crate::model::Principal,
    id: &str,
    e: &ClientError,
) -> Status {
    let Ok(id) = super::known_id(id) else {
        return errors::status(
            Code::Internal,
            format!("sandbox agent: {e}"),
            reason::INTERNAL,
            &[],
        );
    };
    match manager.get(principal, &id) {
        Ok(r) if r.state != crate::model::State::Running => {
            errors::from_manager(crate::manager::ManagerError::NotRunning {
                id: id.clone(),
                state: r.state,
                reason: r.state_reason,
            })
        }
        Err(e) => errors::from_manager(e),
        Ok(_) => {
            tracing::warn!(sandbox_id = %id, error = %e, "agent failed during exec");
            errors::status(
                Code::Internal,
                format!("sandbox agent: {e}"),
                reason::INTERNAL,
                &[],
            )
        }
    }
}

fn win_size(width: u32, height: u32) -> WinSize {
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
    let env: BTreeMap<String, String> = init.env.into_iter().collect();
    let req = ExecRequest {
        argv: init.command,
        env: env.into_iter().collect(),
        cwd: None,
        tty: init.tty.then(|| win_size(init.tty_width, init.tty_height)),
    };
    let (tx, rx) = mpsc::channel(CHANNEL);
    let session = match start(manager, &principal, &init.sandbox_id, req).await? {
        Started::Running(s) => s,
        Started::Failed { message, code } => {
            // Reported like a shell would; the channel holds both frames.
            let _ = tx.try_send(Ok(output(PbStream::Stderr, format!("{message}\n").into())));
            let _ = tx.try_send(Ok(exit(code)));
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
    };
    let Session { reader, writer } = session;
    let ready = pb::ExecStreamResponse {
        message: Some(Out::Ready(pb::ExecStreamReady {
            ready_time: Some(convert::timestamp(SystemTime::now())),
        })),
    };
    let _ = tx.try_send(Ok(ready));
    let sandbox_id = init.sandbox_id;
    tokio::spawn(async move {
        let mut reader = reader;
        // Polled by the same task as the output, not spawned: one task per
        // exec, so no wake-up crosses tasks (or worker threads) on its way.
        let inbound = forward_stdin(inbound, writer);
        let outcome = pump(&mut reader, &tx, inbound, deadline, shutdown).await;
        match outcome {
            Pumped::Exited => {}
            Pumped::Stopped(status) => {
                abort(reader.get_ref().as_ref());
                if let Some(status) = status {
                    let _ = tx.send(Err(status)).await;
                }
            }
        }
        tracing::debug!(%sandbox_id, "exec stream ended");
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// Stdin, close and resize from the client to the agent. Returns true when
/// the client's stream failed (it went away), false at its half-close
/// (stdin EOF, never a cancellation).
async fn forward_stdin(
    mut inbound: Streaming<pb::ExecStreamRequest>,
    writer: OwnedWriteHalf,
) -> bool {
    // `None` once a write failed: the command exited or the session ended,
    // nothing reads stdin any more; the client's stream is still drained.
    let mut writer = Some(writer);
    let mut closed = false;
    loop {
        let frames = match inbound.message().await {
            Ok(Some(m)) => match m.message {
                Some(In::Stdin(d)) if !closed && !d.is_empty() => d
                    .chunks(CHUNK_LEN)
                    .map(|c| Frame::Stdin(c.to_vec()))
                    .collect(),
                Some(In::Close(_)) if !closed => {
                    closed = true;
                    vec![Frame::StdinEof]
                }
                Some(In::Resize(r)) => vec![Frame::Resize(win_size(r.width, r.height))],
                // Stdin after close, an empty chunk, a second init.
                _ => continue,
            },
            Ok(None) => {
                if !closed {
                    if let Some(w) = &mut writer {
                        let _ = send(w, &Frame::StdinEof).await;
                    }
                }
                return false;
            }
            Err(_) => return true,
        };
        if let Some(w) = &mut writer {
            for frame in &frames {
                if send(w, frame).await.is_err() {
                    writer = None;
                    break;
                }
            }
        }
    }
}

enum Pumped {
    /// The command exited and its exit frame was sent (or the client left
    /// after it).
    Exited,
    /// The session must be killed; the status (if any) goes to the client.
    Stopped(Option<Status>),
}

async fn pump(
    events: &mut BufReader<OwnedReadHalf>,
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
                () = &mut deadline => return Pumped::Stopped(Some(command_timeout())),
                () = &mut shutdown => return Pumped::Stopped(Some(shutting_down())),
                gone = &mut inbound, if forwarding => {
                    if gone {
                        return Pumped::Stopped(None);
                    }
                    forwarding = false;
                }
            }
        }
    };
    tokio::pin!(stop);
    loop {
        // Not cancel-safe (a frame may be cut in half), which does not
        // matter: the other branches end the session.
        let ev = tokio::select! {
            s = &mut stop => return s,
            () = tx.closed() => return Pumped::Stopped(None),
            ev = next_event(events) => ev,
        };
        let (frame, last) = match ev {
            Ok(ev) => {
                let last = matches!(ev, ExecEvent::Exited(_));
                (event_frame(ev), last)
            }
            Err(e) => (stream_error(format!("exec interrupted: {e}")), true),
        };
        tokio::select! {
            s = &mut stop => return s,
            sent = tx.send(Ok(frame)) => {
                if sent.is_err() {
                    return Pumped::Stopped(None);
                }
            }
        }
        if last {
            return Pumped::Exited;
        }
    }
}

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
    let deadline = grpc_timeout(request.metadata()).map(|d| Instant::now() + d);
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
    let session = match start(manager, &principal, &req.sandbox_id, exec_req).await? {
        Started::Running(s) => s,
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
    // A call that is cancelled or times out drops this future, and with it
    // the connection: the agent then kills the command.
    let collect = async move {
        let Session {
            mut reader,
            mut writer,
        } = session;
        // A command that already exited may have closed the connection.
        let _ = send(&mut writer, &Frame::StdinEof).await;
        let mut out = Capped::default();
        let mut err = Capped::default();
        loop {
            match next_event(&mut reader).await? {
                ExecEvent::Stdout(d) => out.push(&d, cap),
                ExecEvent::Stderr(d) => err.push(&d, cap),
                ExecEvent::Exited(s) => return Ok::<_, ClientError>((out, err, s.shell_code())),
            }
        }
    };
    let result = tokio::select! {
        r = collect => r,
        () = deadline_passed(deadline) => return Err(command_timeout()),
        () = shutdown_signal(shutdown) => return Err(shutting_down()),
    };
    let (out, err, code) =
        result.map_err(|e| agent_failure(manager, &principal, &req.sandbox_id, &e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_wire::ExitStatus;

    #[tokio::test]
    async fn the_deadline_counts_after_the_half_close() {
        let (agent, _peer) = UnixStream::pair().unwrap();
        let (reader, _writer) = agent.into_split();
        let mut reader = BufReader::new(reader);
        let (tx, _rx) = mpsc::channel(CHANNEL);
        let (_stop_tx, stop_rx) = watch::channel(false);
        // The client half-closed at once; the command never ends.
        let deadline = Some(Instant::now() + Duration::from_millis(50));
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            pump(&mut reader, &tx, async { false }, deadline, stop_rx),
        )
        .await
        .expect("the deadline was ignored");
        match outcome {
            Pumped::Stopped(Some(s)) => assert_eq!(s.code(), Code::DeadlineExceeded),
            _ => panic!("not stopped by the deadline"),
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        for (text, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            m.insert("grpc-timeout", text.parse().unwrap());
            assert_eq!(grpc_timeout(&m), Some(d), "{text}");
        }
        for bad in ["S", "5", "5x", "123456789S", "-1S"] {
            m.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&m), None, "{bad}");
        }
    }

    #[test]
    fn events_map_to_frames() {
        let f = event_frame(ExecEvent::Stdout(b"hi\n".to_vec()));
        assert_eq!(
            f.message,
            Some(Out::Output(pb::ExecStreamOutput {
                stream: PbStream::Stdout as i32,
                data: b"hi\n".to_vec()
            }))
        );
        let f = event_frame(ExecEvent::Stderr(b"e".to_vec()));
        assert!(matches!(f.message, Some(Out::Output(o)) if o.stream == PbStream::Stderr as i32));
        let code = |s| match event_frame(ExecEvent::Exited(s)).message {
            Some(Out::Exit(e)) => e.exit_code,
            other => panic!("{other:?}"),
        };
        assert_eq!(code(ExitStatus::Code(3)), 3);
        assert_eq!(code(ExitStatus::Signal(9)), 137);
    }

    #[test]
    fn output_is_capped_and_counted() {
        let mut c = Capped::default();
        c.push(b"hello", 8);
        assert!(!c.truncated);
        c.push(b"world", 8);
        assert_eq!(c.data, b"hellowor");
        assert_eq!(c.produced, 10);
        assert!(c.truncated);
        c.push(b"!", 8);
        assert_eq!((c.data.len(), c.produced), (8, 11));
    }

    #[test]
    fn spawn_failures_get_shell_codes() {
        assert_eq!(spawn_failure_code("nope: command not found"), 127);
        assert_eq!(spawn_failure_code("/x: Permission denied"), 126);
    }

    #[test]
    fn tty_sizes_default_and_clamp() {
        assert_eq!(win_size(0, 0), WinSize { cols: 80, rows: 24 });
        assert_eq!(
            win_size(1 << 20, 50),
            WinSize {
                cols: u16::MAX,
                rows: 50
            }
        );
    }
}
