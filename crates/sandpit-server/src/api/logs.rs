//! StreamLogs: the main process's output as the [`crate::logs::FileSink`]
//! kept it, readable while the sandbox runs and after it ended (until its
//! record is collected).
//!
//! Offsets are stream offsets over stdout and stderr together, the same the
//! sink and the agent use. A log session id names the sandbox and the
//! formatting options, so a resume (`resume_log_session_id` +
//! `resume_log_offset` only) needs no state on the server and survives a
//! restart.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status};

use super::errors::{self, invalid_request, reason, Violation};
use super::exec::{check_container, shutdown_signal, CHANNEL};
use super::{known_id, principal};
use crate::engine::Engine;
use crate::logs::{rfc3339_nanos, LogCursor, LogReader, LogRecord, Next};
use crate::manager::{Manager, ManagerError};
use crate::model::{Principal, SandboxId};

/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Most bytes read from disk per batch.
const BATCH_BYTES: usize = 256 << 10;

/// In-band error codes of `LogStreamError`.
pub mod code {
    /// The resume session id is not one of this server's (or names another
    /// sandbox).
    pub const SESSION_NOT_FOUND: &str = "SESSION_NOT_FOUND";
    /// The requested offset was dropped by the cap.
    pub const REPLAY_GAP: &str = "REPLAY_GAP";
    /// The requested offset lies beyond the output.
    pub const INVALID_RESUME_OFFSET: &str = "INVALID_RESUME_OFFSET";
    /// The stream stopped (the daemon shuts down); resume later.
    pub const STREAM_INTERRUPTED: &str = "STREAM_INTERRUPTED";
}

/// The log session id for a sandbox and formatting.
pub fn session_id(sandbox_id: &str, timestamps: bool) -> String {
    format!("ls1:{sandbox_id}:{}", if timestamps { "t" } else { "r" })
}

/// The timestamps option of a session id, if it names `sandbox_id`.
pub fn parse_session(session: &str, sandbox_id: &str) -> Option<bool> {
    let rest = session.strip_prefix("ls1:")?;
    let (id, opts) = rest.rsplit_once(':')?;
    if id != sandbox_id {
        return None;
    }
    match opts {
        "t" => Some(true),
        "r" => Some(false),
        _ => None,
    }
}

/// Prefixes each line with its chunk's time when asked to.
#[derive(Debug, Clone)]
pub struct LineFormatter {
    timestamps: bool,
    at_line_start: bool,
}

impl LineFormatter {
    /// A formatter at the start of a line.
    pub fn new(timestamps: bool) -> Self {
        Self::resuming(timestamps, true)
    }

    /// A formatter continuing a stream whose next byte does (or, mid-line,
    /// does not) start a line: a resume inside a line must not stamp it
    /// again.
    pub fn resuming(timestamps: bool, at_line_start: bool) -> Self {
        Self {
            timestamps,
            at_line_start,
        }
    }

    /// The bytes to send for a record.
    pub fn format(&mut self, r: &LogRecord) -> Vec<u8> {
        if !self.timestamps {
            return r.data.clone();
        }
        let stamp = rfc3339_nanos(r.time_ns);
        let mut out = Vec::with_capacity(r.data.len() + 32);
        for &b in &r.data {
            if self.at_line_start {
                out.extend_from_slice(stamp.as_bytes());
                out.push(b' ');
                self.at_line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.at_line_start = true;
            }
        }
        out
    }
}

fn log_error(code: &str, message: impl Into<String>) -> pb::LogEntry {
    pb::LogEntry {
        error: Some(pb::LogStreamError {
            message: message.into(),
            code: code.to_owned(),
        }),
        ..Default::default()
    }
}

fn proto_time(ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// Where a stream starts.
enum Start {
    /// From the oldest kept output (or the last `tail` lines), skipping
    /// chunks older than `since_ns`.
    Fresh { tail: Option<u64>, since_ns: u64 },
    /// At an offset of an earlier stream.
    Resume(u64),
}

/// StreamLogs.
pub async fn stream_logs<E: Engine>(
    manager: &Manager<E>,
    reader: Option<LogReader>,
    shutdown: watch::Receiver<bool>,
    request: Request<pb::StreamLogsRequest>,
) -> Result<Response<BoxStream<pb::LogEntry>>, Status> {
    let principal = principal(&request)?;
    let req = request.into_inner();
    if req.sandbox_id.is_empty() {
        return Err(invalid_request(&[Violation::new("sandbox_id", "required")]));
    }
    if req.tail_lines < 0 {
        return Err(invalid_request(&[Violation::new(
            "tail_lines",
            "must not be negative",
        )]));
    }
    check_container(&req.container)?;
    let sandbox_id = known_id(&req.sandbox_id)?;
    manager
        .get(&principal, &sandbox_id)
        .map_err(errors::from_manager)?;
    let (tx, rx) = mpsc::channel(CHANNEL);
    let response = Response::new(Box::pin(ReceiverStream::new(rx)) as BoxStream<pb::LogEntry>);
    let Some(reader) = reader else {
        return Ok(response);
    };
    let (timestamps, start) = if req.resume_log_session_id.is_empty() {
        let since_ns = req
            .since_time
            .and_then(|t| u64::try_from(t.seconds).ok().map(|s| (s, t.nanos)))
            .map_or(0, |(s, n)| {
                s.saturating_mul(1_000_000_000)
                    .saturating_add(n.max(0) as u64)
            });
        let tail = (req.tail_lines > 0).then_some(req.tail_lines as u64);
        (req.timestamps, Start::Fresh { tail, since_ns })
    } else {
        match parse_session(&req.resume_log_session_id, &req.sandbox_id) {
            Some(ts) => (ts, Start::Resume(req.resume_log_offset)),
            None => {
                let _ = tx.try_send(Ok(log_error(
                    code::SESSION_NOT_FOUND,
                    format!("no log session {:?}", req.resume_log_session_id),
                )));
                return Ok(response);
            }
        }
    };
    let session = session_id(&req.sandbox_id, timestamps);
    let stream = LogStream {
        manager: manager.clone(),
        principal,
        sandbox_id,
        reader,
        follow: req.follow,
        session,
        timestamps,
        tx,
    };
    tokio::spawn(stream.run(start, shutdown));
    Ok(response)
}

struct LogStream<E: Engine> {
    manager: Manager<E>,
    principal: Principal,
    sandbox_id: SandboxId,
    reader: LogReader,
    follow: bool,
    session: String,
    timestamps: bool,
    tx: mpsc::Sender<Result<pb::LogEntry, Status>>,
}

/// One batch of the cursor, read on a blocking thread.
struct Batch {
    cursor: LogCursor,
    records: Vec<LogRecord>,
    gap: Option<u64>,
}

fn read_batch(mut cursor: LogCursor) -> std::io::Result<Batch> {
    let mut records = vec![];
    let mut bytes = 0;
    let mut gap = None;
    while bytes < BATCH_BYTES {
        match cursor.next()? {
            Next::Record(r) => {
                bytes += r.data.len();
                records.push(r);
            }
            Next::Gap(first) => {
                gap = Some(first);
                break;
            }
            Next::Pending => break,
        }
    }
    Ok(Batch {
        cursor,
        records,
        gap,
    })
}

/// Whether `offset` starts a line: it is the first offset, or the byte
/// before it (when still kept) is a newline. Leaves the cursor anywhere.
fn at_line_start(cursor: &mut LogCursor, offset: u64) -> std::io::Result<bool> {
    if offset == 0 || cursor.seek(offset - 1)?.is_some() {
        return Ok(true);
    }
    Ok(match cursor.next()? {
        Next::Record(r) => r.data.first() == Some(&b'\n'),
        Next::Gap(_) | Next::Pending => true,
    })
}

fn io_status(e: std::io::Error) -> Status {
    tracing::warn!(error = %e, "read kept output");
    errors::status(
        Code::Internal,
        format!("read kept output: {e}"),
        reason::INTERNAL,
        &[],
    )
}

impl<E: Engine> LogStream<E> {
    async fn send(&self, item: Result<pb::LogEntry, Status>) -> bool {
        self.tx.send(item).await.is_ok()
    }

    /// Places a cursor; `Err` carries the in-band error (or status) to end
    /// with. Also says whether the first byte starts a line.
    async fn open(
        &self,
        start: &Start,
    ) -> Result<(LogCursor, u64, bool), Result<pb::LogEntry, Status>> {
        let reader = self.reader.clone();
        let id = self.sandbox_id.clone();
        let (offset, since_ns, resume) = match start {
            Start::Resume(o) => (Some(*o), 0, true),
            Start::Fresh { since_ns, .. } => (None, *since_ns, false),
        };
        let tail = match start {
            Start::Fresh { tail, .. } => *tail,
            Start::Resume(_) => None,
        };
        let placed = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut cursor = reader.cursor(&id);
            let from = match (offset, tail) {
                (Some(o), _) => {
                    let end = reader.end(&id);
                    if o > end {
                        return Ok(Err((code::INVALID_RESUME_OFFSET, o, end)));
                    }
                    o
                }
                (None, Some(n)) => reader.tail_start(&id, n)?,
                (None, None) => cursor.start()?.unwrap_or(0),
            };
            let line_start = at_line_start(&mut cursor, from)?;
            match cursor.seek(from)? {
                Some(first) if resume => Ok(Err((code::REPLAY_GAP, from, first))),
                // Dropped meanwhile: from what is kept.
                Some(first) => {
                    cursor.seek(first)?;
                    Ok(Ok((cursor, true)))
                }
                None => Ok(Ok((cursor, line_start))),
            }
        })
        .await
        .map_err(|_| {
            Err(errors::status(
                Code::Internal,
                "log task failed",
                reason::INTERNAL,
                &[],
            ))
        })?
        .map_err(|e| Err(io_status(e)))?;
        match placed {
            Ok((cursor, line_start)) => Ok((cursor, since_ns, line_start)),
            Err((c, asked, other)) if c == code::REPLAY_GAP => Err(Ok(log_error(
                c,
                format!("offset {asked} is no longer kept; output resumes at {other}"),
            ))),
            Err((c, asked, end)) => Err(Ok(log_error(
                c,
                format!("offset {asked} is beyond the output ({end} bytes)"),
            ))),
        }
    }

    /// Whether the sandbox's output can still grow.
    fn output_may_grow(&self) -> bool {
        match self.manager.get(&self.principal, &self.sandbox_id) {
            Ok(r) => !r.state.is_terminal(),
            Err(ManagerError::NotFound(_)) => false,
            Err(_) => false,
        }
    }

    async fn run(self, start: Start, shutdown: watch::Receiver<bool>) {
        let (mut cursor, since_ns, line_start) = match self.open(&start).await {
            Ok(c) => c,
            Err(end) => {
                self.send(end).await;
                return;
            }
        };
        let mut formatter = LineFormatter::resuming(self.timestamps, line_start);
        // After the sandbox ended, one more pass drains what it wrote last.
        let mut final_pass = false;
        loop {
            if !self.follow || !self.output_may_grow() {
                final_pass = true;
            }
            let batch = tokio::task::spawn_blocking(move || read_batch(cursor)).await;
            let batch = match batch {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    self.send(Err(io_status(e))).await;
                    return;
                }
                Err(_) => return,
            };
            cursor = batch.cursor;
            let got = !batch.records.is_empty();
            for r in &batch.records {
                if r.time_ns < since_ns {
                    continue;
                }
                let entry = pb::LogEntry {
                    data: formatter.format(r),
                    timestamp: Some(proto_time(r.time_ns)),
                    log_session_id: self.session.clone(),
                    next_log_offset: r.end(),
                    error: None,
                };
                if !self.send(Ok(entry)).await {
                    return;
                }
            }
            if let Some(first) = batch.gap {
                self.send(Ok(log_error(
                    code::REPLAY_GAP,
                    format!(
                        "output up to offset {first} was dropped before it was read (cap reached)"
                    ),
                )))
                .await;
                return;
            }
            if got {
                continue;
            }
            if final_pass {
                return;
            }
            let wait = tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => true,
                () = shutdown_signal(shutdown.clone()) => false,
                () = self.tx.closed() => return,
            };
            if !wait {
                self.send(Ok(log_error(
                    code::STREAM_INTERRUPTED,
                    "sandpitd is shutting down",
                )))
                .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Stream;

    fn rec(time_ns: u64, data: &[u8]) -> LogRecord {
        LogRecord {
            offset: 0,
            time_ns,
            stream: Stream::Stdout,
            data: data.to_vec(),
        }
    }

    #[test]
    fn sessions_round_trip_and_name_their_sandbox() {
        let s = session_id("abc123", true);
        assert_eq!(parse_session(&s, "abc123"), Some(true));
        assert_eq!(
            parse_session(&session_id("abc123", false), "abc123"),
            Some(false)
        );
        assert_eq!(parse_session(&s, "other"), None);
        assert_eq!(parse_session("garbage", "abc123"), None);
        assert_eq!(parse_session("ls1:abc123:x", "abc123"), None);
    }

    #[test]
    fn timestamps_prefix_every_line_across_chunks() {
        let mut f = LineFormatter::new(true);
        let a = f.format(&rec(0, b"one\ntw"));
        let b = f.format(&rec(1_000_000_000, b"o\nthree\n"));
        let t0 = "1970-01-01T00:00:00.000000000Z";
        let t1 = "1970-01-01T00:00:01.000000000Z";
        assert_eq!(String::from_utf8(a).unwrap(), format!("{t0} one\n{t0} tw"));
        assert_eq!(String::from_utf8(b).unwrap(), format!("o\n{t1} three\n"));
        let mut plain = LineFormatter::new(false);
        assert_eq!(plain.format(&rec(0, b"x\ny")), b"x\ny");
    }
}
