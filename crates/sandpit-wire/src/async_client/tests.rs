//! Tests of the async client against fake agents, each scenario over a real
//! Unix socket and over an in-memory `tokio::io::duplex` pipe: the blocking
//! client's tests, plus frames, cancellation and timeouts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::testing::DuplexConnector;
use super::*;
use crate::{encode, ErrorKind, ExitStatus, WinSize};

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The fake agent's end of one connection.
struct Peer {
    r: BufReader<BoxRead>,
    w: BoxWrite,
}

impl Peer {
    fn new(
        r: impl AsyncRead + Send + Unpin + 'static,
        w: impl AsyncWrite + Send + Unpin + 'static,
    ) -> Self {
        Self {
            r: BufReader::new(Box::new(r)),
            w: Box::new(w),
        }
    }

    async fn get(&mut self) -> Option<Frame> {
        read_frame(&mut self.r).await.unwrap()
    }

    async fn try_put(&mut self, f: Frame) -> Result<(), WireError> {
        write_frame(&mut self.w, &f).await
    }

    async fn put(&mut self, f: Frame) {
        self.try_put(f).await.unwrap()
    }
}

type Handler = Arc<dyn Fn(Peer, Frame) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Serves each connection: called with the peer and the operation's first
/// frame.
fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Peer, Frame) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |peer, first| Box::pin(f(peer, first)))
}

/// A fake agent serving `conns` connections one after the other, and a
/// client for it (10 s timeout).
struct Fake<C: Connector> {
    client: AsyncAgentClient<C>,
    agent: JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl<C: Connector> Fake<C> {
    /// Waits for the agent to have served every connection (its panics
    /// fail the test here).
    async fn done(self) {
        self.agent.await.expect("the fake agent failed");
    }
}

async fn serve_one(mut peer: Peer, h: &Handler) {
    let first = peer.get().await.expect("no first frame");
    h(peer, first).await;
}

fn unix_agent(conns: usize, h: Handler) -> Fake<UnixConnector> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let agent = tokio::spawn(async move {
        for _ in 0..conns {
            let (s, _) = listener.accept().await.unwrap();
            let (r, w) = s.into_split();
            serve_one(Peer::new(r, w), &h).await;
        }
    });
    Fake {
        client: AsyncAgentClient::unix(path).with_timeout(Duration::from_secs(10)),
        agent,
        _dir: Some(dir),
    }
}

fn duplex_agent_with(buffer: usize, conns: usize, h: Handler) -> Fake<DuplexConnector> {
    let (connector, mut listener) = DuplexConnector::new(buffer);
    let agent = tokio::spawn(async move {
        for _ in 0..conns {
            let s = listener.accept().await.unwrap();
            let (r, w) = tokio::io::split(s);
            serve_one(Peer::new(r, w), &h).await;
        }
    });
    Fake {
        client: AsyncAgentClient::new(connector).with_timeout(Duration::from_secs(10)),
        agent,
        _dir: None,
    }
}

fn duplex_agent(conns: usize, h: Handler) -> Fake<DuplexConnector> {
    duplex_agent_with(64 * 1024, conns, h)
}

/// Makes a fake agent of one transport.
type Make<C> = fn(usize, Handler) -> Fake<C>;

/// Runs each named scenario (`async fn name<C: Connector>(make: Make<C>)`)
/// as two tests, `name::unix` and `name::duplex`.
macro_rules! on_both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn unix() {
                super::$name(super::unix_agent).await
            }
            #[tokio::test]
            async fn duplex() {
                super::$name(super::duplex_agent).await
            }
        }
    )*};
}

// After the macro: they use it.
mod files;
mod frames;
mod usage;

on_both_transports!(
    ping_and_signal_main,
    agent_closing_early_is_closed,
    wrong_answer_is_a_protocol_error,
    large_stdin_does_not_deadlock_with_concurrent_halves,
    run_collects_output_and_feeds_stdin,
    exec_error_maps_to_agent_error,
    session_events_control_frames_and_end,
    close_before_exit_is_an_error,
    frames_other_than_output_are_refused_during_exec,
    dropping_both_halves_closes_the_connection,
);

#[tokio::test]
async fn missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let client = AsyncAgentClient::unix(dir.path().join("nope.sock"));
    assert!(matches!(client.ping().await, Err(ClientError::Connect(_))));
    assert!(matches!(
        client.exec(cmd(&["x"])).await,
        Err(ClientError::Connect(_))
    ));
    // No listener on the other end of the pipes either.
    let (connector, listener) = DuplexConnector::new(1024);
    drop(listener);
    let client = AsyncAgentClient::new(connector);
    match client.ping().await {
        Err(ClientError::Connect(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_blocking_clients_agent_and_timeout_carry_over() {
    let blocking = AgentClient::new("/run/x/agent.sock").with_timeout(Duration::from_secs(3));
    let client = AsyncAgentClient::from(&blocking);
    assert_eq!(client.connector().path(), Path::new("/run/x/agent.sock"));
    assert_eq!(client.timeout(), Some(Duration::from_secs(3)));
    assert_eq!(AsyncAgentClient::unix("/s").timeout(), None);
}

async fn ping_and_signal_main<C: Connector>(make: Make<C>) {
    let f = make(
        3,
        handler(|mut s, first| async move {
            match first {
                Frame::Ping => s.put(Frame::Pong(MainStatus::Running { pid: 9 })).await,
                Frame::SignalMain(Signal::TERM) => s.put(Frame::Ok).await,
                Frame::SignalMain(_) => {
                    s.put(Frame::Error {
                        kind: ErrorKind::NotRunning,
                        message: "main process is not running".into(),
                    })
                    .await
                }
                other => panic!("{other:?}"),
            }
        }),
    );
    assert_eq!(
        f.client.ping().await.unwrap(),
        MainStatus::Running { pid: 9 }
    );
    f.client.signal_main(Signal::TERM).await.unwrap();
    let err = f.client.signal_main(Signal::INT).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent: not running: main process is not running"
    );
    f.done().await;
}

async fn agent_closing_early_is_closed<C: Connector>(make: Make<C>) {
    let f = make(1, handler(|s, _| async move { drop(s) }));
    assert!(matches!(f.client.ping().await, Err(ClientError::Closed)));
    f.done().await;
}

async fn wrong_answer_is_a_protocol_error<C: Connector>(make: Make<C>) {
    let f = make(1, handler(|mut s, _| async move { s.put(Frame::Ok).await }));
    let err = f.client.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert_eq!(err.to_string(), "protocol: unexpected ok during ping");
    f.done().await;
}

/// Echoes stdin to stdout (and its length to stderr at the end), like
/// `cat`; answers a resize with "ROWS COLS" and a signal with its exit.
async fn echo_exec(mut s: Peer, first: Frame) {
    let Frame::Exec(req) = first else { panic!() };
    if req.argv.is_empty() {
        return s
            .put(Frame::Error {
                kind: ErrorKind::InvalidArgument,
                message: "empty command".into(),
            })
            .await;
    }
    s.put(Frame::Started { pid: 42 }).await;
    let mut total = 0usize;
    loop {
        match s.get().await {
            Some(Frame::Stdin(d)) => {
                assert!(d.len() <= CHUNK_LEN, "a stdin frame of {} bytes", d.len());
                total += d.len();
                s.put(Frame::Stdout(d)).await;
            }
            Some(Frame::StdinEof) => break,
            Some(Frame::Signal(sig)) => {
                return s.put(Frame::Exited(ExitStatus::Signal(sig))).await;
            }
            Some(Frame::Resize(ws)) => {
                s.put(Frame::Stdout(format!("{} {}", ws.rows, ws.cols).into()))
                    .await
            }
            other => panic!("{other:?}"),
        }
    }
    s.put(Frame::Stderr(total.to_string().into_bytes())).await;
    s.put(Frame::Exited(ExitStatus::Code(0))).await;
}

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn large_stdin_does_not_deadlock_with_concurrent_halves<C: Connector>(make: Make<C>) {
    let f = make(1, handler(echo_exec));
    // Far more than the transport buffers in either direction.
    let input: Vec<u8> = (0..=255u8).cycle().take(8 << 20).collect();
    let exec = f.client.exec(cmd(&["cat"])).await.unwrap();
    assert_eq!(exec.pid(), 42);
    let (mut events, mut control) = exec.into_split();
    let feed = async {
        control.send_stdin(&input).await.unwrap();
        control.close_stdin().await.unwrap();
    };
    let read = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match events.next_event().await.unwrap() {
                Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
                Some(ExecEvent::Stderr(d)) => err.extend_from_slice(&d),
                Some(ExecEvent::Exited(s)) => return (out, err, s),
                None => panic!("no exit"),
            }
        }
    };
    let ((), (out, err, status)) = tokio::join!(feed, read);
    assert_eq!(out.len(), input.len());
    assert!(out == input);
    assert_eq!(err, (8usize << 20).to_string().into_bytes());
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(events.next_event().await.unwrap(), None);
    f.done().await;
}

async fn run_collects_output_and_feeds_stdin<C: Connector>(make: Make<C>) {
    let f = make(2, handler(echo_exec));
    let input = vec![b'x'; 1 << 20];
    let out = f.client.run(cmd(&["cat"]), Some(&input)).await.unwrap();
    assert!(out.stdout == input);
    assert_eq!(out.stderr, b"1048576");
    assert_eq!(out.status, ExitStatus::Code(0));
    let out = f.client.run(cmd(&["cat"]), None).await.unwrap();
    assert!(out.stdout.is_empty());
    assert_eq!(out.stderr, b"0");
    f.done().await;
}

async fn exec_error_maps_to_agent_error<C: Connector>(make: Make<C>) {
    let f = make(1, handler(echo_exec));
    let err = f.client.exec(cmd(&[])).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Agent {
                kind: ErrorKind::InvalidArgument,
                message,
            } if message == "empty command"
        ),
        "{err}"
    );
    f.done().await;
}

async fn session_events_control_frames_and_end<C: Connector>(make: Make<C>) {
    let f = make(1, handler(echo_exec));
    let (mut events, mut control) = f.client.exec(cmd(&["sh"])).await.unwrap().into_split();
    control
        .resize(WinSize { cols: 80, rows: 24 })
        .await
        .unwrap();
    assert_eq!(
        events.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(b"24 80".to_vec()))
    );
    control.send_stdin(b"hi").await.unwrap();
    assert_eq!(
        events.next_event().await.unwrap(),
        Some(ExecEvent::Stdout(b"hi".to_vec()))
    );
    // Nothing at all is no frame at all.
    control.send_stdin(b"").await.unwrap();
    control.signal(Signal::KILL).await.unwrap();
    assert_eq!(
        events.next_event().await.unwrap(),
        Some(ExecEvent::Exited(ExitStatus::Signal(Signal::KILL)))
    );
    assert_eq!(events.next_event().await.unwrap(), None);
    f.done().await;
}

async fn close_before_exit_is_an_error<C: Connector>(make: Make<C>) {
    let f = make(
        1,
        handler(|mut s, _| async move { s.put(Frame::Started { pid: 1 }).await }),
    );
    let (mut events, _control) = f.client.exec(cmd(&["x"])).await.unwrap().into_split();
    assert!(matches!(
        events.next_event().await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(events.next_event().await, Ok(None)));
    f.done().await;
}

async fn frames_other_than_output_are_refused_during_exec<C: Connector>(make: Make<C>) {
    let f = make(
        2,
        handler(|mut s, first| async move {
            let Frame::Exec(req) = first else { panic!() };
            s.put(Frame::Started { pid: 1 }).await;
            s.put(Frame::Stdout(b"before".to_vec())).await;
            if req.argv[0] == "error" {
                s.put(Frame::Error {
                    kind: ErrorKind::Io,
                    message: "pipe broke".into(),
                })
                .await;
            } else {
                s.put(Frame::Pong(MainStatus::Idle)).await;
            }
        }),
    );
    for (argv, want) in [
        ("error", "agent: i/o error: pipe broke"),
        ("pong", "protocol: unexpected pong during exec"),
    ] {
        let (mut events, _c) = f.client.exec(cmd(&[argv])).await.unwrap().into_split();
        assert_eq!(
            events.next_event().await.unwrap(),
            Some(ExecEvent::Stdout(b"before".to_vec()))
        );
        let err = events.next_event().await.unwrap_err();
        assert_eq!(err.to_string(), want);
        assert!(matches!(events.next_event().await, Ok(None)));
    }
    f.done().await;
}

async fn dropping_both_halves_closes_the_connection<C: Connector>(make: Make<C>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let f = make(
        1,
        handler(move |mut s, _| {
            let tx = tx.clone();
            async move {
                s.put(Frame::Started { pid: 1 }).await;
                // EOF, and then no one to write to: what makes the real
                // agent kill the command.
                let eof = s.get().await.is_none();
                let gone = s.try_put(Frame::Stdout(b"late".to_vec())).await.is_err();
                tx.send((eof, gone)).unwrap();
            }
        }),
    );
    let (events, control) = f.client.exec(cmd(&["sleep"])).await.unwrap().into_split();
    drop(events);
    drop(control);
    let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the agent never saw the connection go");
    assert_eq!(seen, Some((true, true)));
    f.done().await;
}

#[tokio::test]
async fn over_a_unix_socket_dropping_the_control_alone_ends_stdin() {
    let f = unix_agent(
        1,
        handler(|mut s, _| async move {
            s.put(Frame::Started { pid: 1 }).await;
            // The half-close is stdin's end: the command finishes normally.
            assert!(s.get().await.is_none());
            s.put(Frame::Exited(ExitStatus::Code(0))).await;
        }),
    );
    let (mut events, control) = f.client.exec(cmd(&["cat"])).await.unwrap().into_split();
    drop(control);
    assert_eq!(
        events.next_event().await.unwrap(),
        Some(ExecEvent::Exited(ExitStatus::Code(0)))
    );
    f.done().await;
}

/// Fails a test whose exchange got stuck instead of letting it hang (a
/// torn frame leaves the peer waiting for bytes that never come).
async fn stuck_after<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the exchange got stuck")
}

/// Where a fake agent waits for the test's go (a handler may run once).
type Gate = Arc<Mutex<Option<oneshot::Receiver<()>>>>;

/// Releases a fake agent waiting in a handler.
fn gate() -> (oneshot::Sender<()>, Gate) {
    let (tx, rx) = oneshot::channel();
    (tx, Arc::new(Mutex::new(Some(rx))))
}

async fn wait(gate: &Mutex<Option<oneshot::Receiver<()>>>) {
    let rx = gate.lock().unwrap().take().expect("gate used twice");
    rx.await.unwrap();
}

#[tokio::test]
async fn a_cancelled_next_event_loses_nothing() {
    let (go, gate_rx) = gate();
    let f = duplex_agent(
        1,
        handler(move |mut s, _| {
            let gate_rx = Arc::clone(&gate_rx);
            async move {
                s.put(Frame::Started { pid: 1 }).await;
                let mut raw = Vec::new();
                encode(&Frame::Stdout(b"hello".to_vec()), &mut raw);
                // Half a header, then the rest once the reader gave up.
                s.w.write_all(&raw[..3]).await.unwrap();
                wait(&gate_rx).await;
                s.w.write_all(&raw[3..]).await.unwrap();
                s.put(Frame::Exited(ExitStatus::Code(0))).await;
            }
        }),
    );
    let (mut events, _c) = f.client.exec(cmd(&["x"])).await.unwrap().into_split();
    let cancelled = tokio::time::timeout(Duration::from_millis(50), events.next_event()).await;
    assert!(cancelled.is_err(), "{cancelled:?}");
    go.send(()).unwrap();
    stuck_after(10, async {
        assert_eq!(
            events.next_event().await.unwrap(),
            Some(ExecEvent::Stdout(b"hello".to_vec()))
        );
        assert_eq!(
            events.next_event().await.unwrap(),
            Some(ExecEvent::Exited(ExitStatus::Code(0)))
        );
    })
    .await;
    f.done().await;
}

#[tokio::test]
async fn a_cancelled_send_never_tears_a_frame() {
    let (go, gate_rx) = gate();
    // A pipe of 1 KiB: a stdin frame of 64 KiB cannot go out at once.
    let f = duplex_agent_with(
        1024,
        1,
        handler(move |mut s, _| {
            let gate_rx = Arc::clone(&gate_rx);
            async move {
                s.put(Frame::Started { pid: 1 }).await;
                wait(&gate_rx).await;
                // Every frame must decode (the unwrap in `get`).
                let mut stdin = Vec::new();
                loop {
                    match s.get().await {
                        Some(Frame::Stdin(d)) => stdin.extend_from_slice(&d),
                        Some(Frame::StdinEof) => break,
                        other => panic!("{other:?}"),
                    }
                }
                s.put(Frame::Stdout(stdin)).await;
                s.put(Frame::Exited(ExitStatus::Code(0))).await;
            }
        }),
    );
    let (mut events, mut control) = f.client.exec(cmd(&["x"])).await.unwrap().into_split();
    let big = vec![7u8; 200_000];
    let cancelled = tokio::time::timeout(Duration::from_millis(50), control.send_stdin(&big)).await;
    assert!(cancelled.is_err(), "the pipe should have been full");
    go.send(()).unwrap();
    let feed = async {
        control.send_stdin(b"tail").await.unwrap();
        control.close_stdin().await.unwrap();
    };
    let read = async {
        let Some(ExecEvent::Stdout(d)) = events.next_event().await.unwrap() else {
            panic!("no echo")
        };
        d
    };
    let ((), got) = stuck_after(10, async { tokio::join!(feed, read) }).await;
    let (sevens, tail) = got.split_at(got.len() - 4);
    assert_eq!(tail, b"tail");
    assert!(sevens.iter().all(|&b| b == 7));
    // The frame in flight was finished, whole: a multiple of full frames.
    assert!(
        sevens.len() % CHUNK_LEN == 0 && !sevens.is_empty(),
        "{} bytes of the cancelled stdin arrived",
        sevens.len()
    );
    f.done().await;
}
