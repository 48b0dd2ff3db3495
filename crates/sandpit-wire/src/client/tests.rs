//! Tests of the blocking client against fake agents over Unix sockets.

use super::*;
use crate::{chain, ErrorKind};
use std::error::Error as _;
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

/// A fake agent: serves `conns` connections, each with `handler`.
fn fake_agent<F>(conns: usize, handler: F) -> (tempfile::TempDir, AgentClient, JoinHandle<()>)
where
    F: Fn(UnixStream, Frame) + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        for _ in 0..conns {
            let (mut s, _) = listener.accept().unwrap();
            let first = read_frame(&mut s).unwrap().unwrap();
            handler(s, first);
        }
    });
    (
        dir,
        AgentClient::new(path).with_timeout(Duration::from_secs(10)),
        handle,
    )
}

fn put(s: &UnixStream, f: Frame) {
    send(s, &f).unwrap();
}

#[test]
fn missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let client = AgentClient::new(dir.path().join("nope.sock"));
    assert!(matches!(client.ping(), Err(ClientError::Connect(_))));
}

#[test]
fn ping_and_signal_main() {
    let (_d, client, h) = fake_agent(3, |s, first| match first {
        Frame::Ping => put(&s, Frame::Pong(MainStatus::Running { pid: 9 })),
        Frame::SignalMain(Signal::TERM) => put(&s, Frame::Ok),
        Frame::SignalMain(_) => put(
            &s,
            Frame::Error {
                kind: ErrorKind::NotRunning,
                message: "main process is not running".into(),
            },
        ),
        other => panic!("{other:?}"),
    });
    assert_eq!(client.ping().unwrap(), MainStatus::Running { pid: 9 });
    client.signal_main(Signal::TERM).unwrap();
    let err = client.signal_main(Signal::INT).unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent: not running: main process is not running"
    );
    h.join().unwrap();
}

#[test]
fn agent_closing_early_is_closed() {
    let (_d, client, h) = fake_agent(1, |s, _| drop(s));
    assert!(matches!(client.ping(), Err(ClientError::Closed)));
    h.join().unwrap();
}

#[test]
fn wrong_answer_is_a_protocol_error() {
    let (_d, client, h) = fake_agent(1, |s, _| put(&s, Frame::Ok));
    assert!(matches!(client.ping(), Err(ClientError::Protocol(_))));
    h.join().unwrap();
}

/// Echoes stdin to stdout (and its length to stderr at the end), like `cat`.
fn echo_exec(mut s: UnixStream, first: Frame) {
    let Frame::Exec(req) = first else { panic!() };
    if req.argv.is_empty() {
        return put(
            &s,
            Frame::Error {
                kind: ErrorKind::InvalidArgument,
                message: "empty command".into(),
            },
        );
    }
    put(&s, Frame::Started { pid: 42 });
    let mut total = 0usize;
    loop {
        match read_frame(&mut s).unwrap() {
            Some(Frame::Stdin(d)) => {
                total += d.len();
                put(&s, Frame::Stdout(d));
            }
            Some(Frame::StdinEof) => break,
            Some(Frame::Signal(sig)) => {
                put(&s, Frame::Exited(ExitStatus::Signal(sig)));
                return;
            }
            Some(Frame::Resize(ws)) => {
                put(&s, Frame::Stdout(format!("{} {}", ws.rows, ws.cols).into()))
            }
            other => panic!("{other:?}"),
        }
    }
    put(&s, Frame::Stderr(total.to_string().into_bytes()));
    put(&s, Frame::Exited(ExitStatus::Code(0)));
}

fn cmd(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn run_with_large_stdin_does_not_deadlock() {
    let (_d, client, h) = fake_agent(2, echo_exec);
    // Far more than socket buffers hold in either direction.
    let input: Vec<u8> = (0..=255u8).cycle().take(8 << 20).collect();
    let out = client.run(cmd(&["cat"]), Some(&input)).unwrap();
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input);
    assert_eq!(out.stderr, (8usize << 20).to_string().into_bytes());
    assert_eq!(out.status, ExitStatus::Code(0));
    let out = client.run(cmd(&["cat"]), None).unwrap();
    assert!(out.stdout.is_empty());
    h.join().unwrap();
}

#[test]
fn exec_error_maps_to_agent_error() {
    let (_d, client, h) = fake_agent(1, echo_exec);
    let err = client.run(cmd(&[]), None).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::InvalidArgument,
                ..
            }
        ),
        "{err}"
    );
    h.join().unwrap();
}

#[test]
fn session_events_control_frames_and_end() {
    let (_d, client, h) = fake_agent(1, echo_exec);
    let mut s = client.exec(cmd(&["sh"])).unwrap();
    assert_eq!(s.pid(), 42);
    s.resize(WinSize { cols: 80, rows: 24 }).unwrap();
    assert_eq!(
        s.next_event().unwrap(),
        Some(ExecEvent::Stdout(b"24 80".to_vec()))
    );
    let mut w = s.stdin_writer().unwrap();
    w.write_all(b"hi").unwrap();
    assert_eq!(
        s.next_event().unwrap(),
        Some(ExecEvent::Stdout(b"hi".to_vec()))
    );
    w.signal(Signal::KILL).unwrap();
    assert_eq!(
        s.next_event().unwrap(),
        Some(ExecEvent::Exited(ExitStatus::Signal(Signal::KILL)))
    );
    assert_eq!(s.next_event().unwrap(), None);
    h.join().unwrap();
}

#[test]
fn close_before_exit_is_an_error() {
    let (_d, client, h) = fake_agent(1, |s, _| put(&s, Frame::Started { pid: 1 }));
    let mut s = client.exec(cmd(&["x"])).unwrap();
    assert!(matches!(s.next_event(), Err(ClientError::Closed)));
    assert!(matches!(s.next_event(), Ok(None)));
    h.join().unwrap();
}

#[test]
fn dropping_a_session_closes_the_connection_despite_writers() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (_d, client, h) = fake_agent(1, move |mut s, _| {
        put(&s, Frame::Started { pid: 1 });
        // EOF here is what makes the real agent cancel the command.
        tx.send(read_frame(&mut s).unwrap().is_none()).unwrap();
    });
    let s = client.exec(cmd(&["sleep"])).unwrap();
    let w = s.stdin_writer().unwrap();
    drop(s);
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    drop(w);
    h.join().unwrap();
}

#[test]
fn abort_unblocks_a_reader_and_closes_the_connection() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (_d, client, h) = fake_agent(1, move |mut s, _| {
        put(&s, Frame::Started { pid: 1 });
        tx.send(read_frame(&mut s).unwrap().is_none()).unwrap();
    });
    let mut s = client.exec(cmd(&["sleep"])).unwrap();
    let w = s.stdin_writer().unwrap();
    let t = std::thread::spawn(move || s.next_event());
    std::thread::sleep(Duration::from_millis(50));
    w.abort();
    assert!(t.join().unwrap().is_err());
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    h.join().unwrap();
}

fn file_agent(content: Vec<u8>, announced: u64) -> impl Fn(UnixStream, Frame) {
    move |s, first| {
        let Frame::ReadFile { path } = first else {
            panic!()
        };
        if path == "/missing" {
            return put(
                &s,
                Frame::Error {
                    kind: ErrorKind::NotFound,
                    message: "/missing: no such file or directory".into(),
                },
            );
        }
        put(
            &s,
            Frame::FileInfo {
                size: announced,
                mode: 0o644,
            },
        );
        for c in content.chunks(CHUNK_LEN) {
            if send(&s, &Frame::Data(c.to_vec())).is_err() {
                return;
            }
        }
        let _ = send(&s, &Frame::End);
    }
}

#[test]
fn read_file_checks_sizes() {
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let (_d, client, h) = fake_agent(3, file_agent(data.clone(), data.len() as u64));
    assert_eq!(client.read_file("/f").unwrap(), data);
    let mut sink = Vec::new();
    assert!(matches!(
        client.read_file_to("/f", &mut sink, 1000),
        Err(ClientError::TooLarge {
            size: 200_000,
            max: 1000
        })
    ));
    assert!(sink.is_empty());
    let err = client.read_file("/missing").unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent: not found: /missing: no such file or directory"
    );
    h.join().unwrap();
}

#[test]
fn agent_sending_more_than_announced_is_cut_off() {
    let (_d, client, h) = fake_agent(1, file_agent(vec![1; 300_000], 10));
    let mut sink = Vec::new();
    let err = client.read_file_to("/f", &mut sink, 100).unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert!(sink.len() <= 10);
    h.join().unwrap();
}

#[test]
fn agent_sending_less_than_announced_is_an_error() {
    let (_d, client, h) = fake_agent(1, file_agent(vec![1; 5], 10));
    assert!(matches!(
        client.read_file("/f"),
        Err(ClientError::Protocol(_))
    ));
    h.join().unwrap();
}

#[test]
fn write_file_streams_data_and_reports_errors() {
    let (_d, client, h) = fake_agent(2, |mut s, first| {
        let Frame::WriteFile { path, mode } = first else {
            panic!()
        };
        let mut data = Vec::new();
        loop {
            match read_frame(&mut s).unwrap().unwrap() {
                Frame::Data(d) => data.extend(d),
                Frame::End => break,
                other => panic!("{other:?}"),
            }
        }
        if path == "/dir" {
            put(
                &s,
                Frame::Error {
                    kind: ErrorKind::IsDirectory,
                    message: "/dir: is a directory".into(),
                },
            );
        } else {
            assert_eq!(mode, 0o600);
            assert_eq!(data.len(), 300_000);
            put(&s, Frame::Ok);
        }
    });
    client.write_file("/f", 0o600, &vec![7; 300_000]).unwrap();
    assert!(matches!(
        client.write_file("/dir", 0o600, b"x"),
        Err(ClientError::Agent {
            kind: ErrorKind::IsDirectory,
            ..
        })
    ));
    h.join().unwrap();
}

#[test]
fn write_file_reports_the_agents_reason_when_it_stops_early() {
    let (_d, client, h) = fake_agent(1, |s, _| {
        put(
            &s,
            Frame::Error {
                kind: ErrorKind::PermissionDenied,
                message: "/ro: read-only file system".into(),
            },
        );
        // Closing with unread data resets the connection.
    });
    let err = client
        .write_file("/ro", 0o644, &vec![0; 4 << 20])
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::PermissionDenied,
                ..
            } | ClientError::Wire(_)
        ),
        "{err}"
    );
    h.join().unwrap();
}

#[test]
fn main_output_yields_gap_and_chunks_until_end() {
    let (_d, client, h) = fake_agent(2, |s, first| {
        let Frame::MainOutput { offset, .. } = first else {
            panic!()
        };
        if offset == 1 {
            put(&s, Frame::Gap { from: 1, to: 5 });
            put(
                &s,
                Frame::MainChunk {
                    offset: 5,
                    stream: 2,
                    time_ns: 1,
                    data: b"x".to_vec(),
                },
            );
            put(&s, Frame::End);
        } else {
            put(
                &s,
                Frame::MainChunk {
                    offset: 0,
                    stream: 7,
                    time_ns: 1,
                    data: vec![],
                },
            );
        }
    });
    let frames: Vec<_> = client
        .main_output(1, true)
        .unwrap()
        .map(|f| f.unwrap())
        .collect();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0], Frame::Gap { from: 1, to: 5 });
    let mut it = client.main_output(0, false).unwrap();
    assert!(matches!(it.next(), Some(Err(ClientError::Protocol(_)))));
    assert!(it.next().is_none());
    h.join().unwrap();
}

#[test]
fn client_errors_do_not_repeat_their_sources() {
    let io = || io::Error::other("disk on fire");
    // (error, what its Display alone said before sources were split off)
    let with_source = [
        (ClientError::Connect(io()), "connect: disk on fire"),
        (ClientError::from(io()), "wire: transport: disk on fire"),
        (
            ClientError::Wire(WireError::Malformed("exit status")),
            "wire: malformed frame: exit status",
        ),
    ];
    for (e, full) in with_source {
        let source = e.source().expect("has a source").to_string();
        assert!(!e.to_string().contains(&source), "{e} repeats {source}");
        assert_eq!(chain(&e), full);
    }
    let without = [
        ClientError::Agent {
            kind: ErrorKind::NotFound,
            message: "/x: no such file or directory".into(),
        },
        ClientError::Protocol("unexpected ok during ping".into()),
        ClientError::TooLarge { size: 2, max: 1 },
        ClientError::Closed,
    ];
    for e in without {
        assert!(e.source().is_none(), "{e}");
    }
}
