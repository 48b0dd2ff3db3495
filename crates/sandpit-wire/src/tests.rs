//! Codec tests: every frame, hostile lengths, signal and error rules.

use super::*;
use crate::codec::tag;
use std::error::Error as _;

#[test]
fn wire_errors_do_not_repeat_their_sources() {
    let e = WireError::Io(io::Error::other("disk on fire"));
    let source = e.source().expect("io has a source").to_string();
    assert!(!e.to_string().contains(&source), "{e}");
    // What the Display alone said before sources were split off.
    assert_eq!(chain(&e), "transport: disk on fire");
    for e in [
        WireError::TooLarge(5),
        WireError::Malformed("x"),
        WireError::UnknownTag(9),
        WireError::Truncated,
    ] {
        assert!(e.source().is_none(), "{e}");
    }
}

fn roundtrip(f: Frame) {
    let mut buf = Vec::new();
    encode(&f, &mut buf);
    let got = read_frame(&mut &buf[..]).unwrap().unwrap();
    assert_eq!(got, f);
}

#[test]
fn output_headers_match_encoded_frames() {
    for (stderr, data) in [
        (false, &b"out"[..]),
        (true, &b""[..]),
        (true, &[7u8; 300][..]),
    ] {
        let mut raw = output_header(stderr, data.len()).to_vec();
        raw.extend_from_slice(data);
        let frame = if stderr {
            Frame::Stderr(data.to_vec())
        } else {
            Frame::Stdout(data.to_vec())
        };
        let mut encoded = Vec::new();
        encode(&frame, &mut encoded);
        assert_eq!(raw, encoded);
    }
}

#[test]
fn every_frame_roundtrips() {
    roundtrip(Frame::Ping);
    roundtrip(Frame::Pong(MainStatus::Idle));
    roundtrip(Frame::Pong(MainStatus::Running { pid: 7 }));
    roundtrip(Frame::Pong(MainStatus::Exited(ExitStatus::Signal(
        Signal::KILL,
    ))));
    roundtrip(Frame::Pong(MainStatus::StartFailed("nope".into())));
    roundtrip(Frame::Exec(ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
        env: vec![("A".into(), "b".into())],
        cwd: Some("/tmp".into()),
        tty: Some(WinSize { cols: 80, rows: 24 }),
    }));
    roundtrip(Frame::Exec(ExecRequest::default()));
    roundtrip(Frame::Started { pid: 42 });
    roundtrip(Frame::Stdin(vec![0, 1, 2, 255]));
    roundtrip(Frame::StdinEof);
    roundtrip(Frame::Resize(WinSize { cols: 1, rows: 2 }));
    roundtrip(Frame::Signal(Signal::TERM));
    roundtrip(Frame::Signal(Signal::new(64).unwrap()));
    roundtrip(Frame::Stdout(b"out".to_vec()));
    roundtrip(Frame::Stderr(vec![]));
    roundtrip(Frame::Exited(ExitStatus::Code(-1)));
    roundtrip(Frame::ReadFile { path: "/a".into() });
    roundtrip(Frame::FileInfo {
        size: 5,
        mode: 0o644,
    });
    roundtrip(Frame::Data(vec![9; 100]));
    roundtrip(Frame::End);
    roundtrip(Frame::WriteFile {
        path: "x".into(),
        mode: 0o600,
    });
    roundtrip(Frame::Ok);
    roundtrip(Frame::Error {
        kind: ErrorKind::IsDirectory,
        message: "is a directory".into(),
    });
    roundtrip(Frame::MainOutput {
        offset: 3,
        follow: true,
    });
    roundtrip(Frame::Gap { from: 0, to: 10 });
    roundtrip(Frame::MainChunk {
        offset: 10,
        stream: 2,
        time_ns: 99,
        data: b"line\n".to_vec(),
    });
    roundtrip(Frame::SignalMain(Signal::INT));
    roundtrip(Frame::Init(InitSpec {
        argv: vec!["true".into()],
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        files: vec![InitFile {
            path: "/etc/x".into(),
            mode: 0o644,
            content: b"c".to_vec(),
        }],
        ..Default::default()
    }));
    for (run_as, capabilities, check) in [
        (
            RunAs {
                user: "1000".into(),
                group: String::new(),
            },
            Some(0xa804_25fb),
            ProbeCheck::Exec(vec!["test".into(), "-e".into(), "/ready".into()]),
        ),
        (
            RunAs {
                user: "app".into(),
                group: "staff".into(),
            },
            Some(0),
            ProbeCheck::Tcp { port: 8080 },
        ),
        (
            RunAs::default(),
            None,
            ProbeCheck::Http {
                port: 80,
                path: "/healthz?x=1".into(),
            },
        ),
    ] {
        roundtrip(Frame::Init(InitSpec {
            argv: vec!["sleep".into(), "1".into()],
            run_as,
            capabilities,
            startup_probe: Some(Probe {
                check,
                initial_delay_ms: 1,
                period_ms: 2,
                timeout_ms: 3,
                failure_threshold: u32::MAX,
            }),
            ..Default::default()
        }));
    }
    roundtrip(Frame::Idle);
    roundtrip(Frame::Claim(InitSpec::default()));
    roundtrip(Frame::Claim(InitSpec {
        argv: vec!["python".into(), "-c".into(), "pass".into()],
        env: vec![("A".into(), "1".into())],
        cwd: "/work".into(),
        files: vec![InitFile {
            path: "a/b".into(),
            mode: 0o600,
            content: vec![0, 1, 2],
        }],
        run_as: RunAs {
            user: "1000".into(),
            group: String::new(),
        },
        capabilities: Some(1),
        startup_probe: None,
    }));
    roundtrip(Frame::AwaitStartup);
    roundtrip(Frame::Startup(StartupState::Ready));
    roundtrip(Frame::Startup(StartupState::Failed(
        "startup probe failed 3 times: exit 1".into(),
    )));
    roundtrip(Frame::MainUsage);
    roundtrip(Frame::Usage(Usage::default()));
    roundtrip(Frame::Usage(Usage {
        user_us: u64::MAX,
        sys_us: 1,
        max_rss_bytes: 1 << 40,
    }));
}

#[test]
fn usage_frames_have_exactly_three_counters() {
    let mut body = vec![tag::USAGE];
    body.extend_from_slice(&[0; 23]);
    assert!(matches!(
        decode(&body),
        Err(WireError::Malformed("short payload"))
    ));
    body.extend_from_slice(&[0; 2]);
    assert!(matches!(
        decode(&body),
        Err(WireError::Malformed("trailing bytes"))
    ));
    body.pop();
    assert_eq!(decode(&body).unwrap(), Frame::Usage(Usage::default()));
}

#[test]
fn bad_startup_encodings_are_refused() {
    // An unknown probe kind, an unknown startup state.
    let mut buf = Vec::new();
    encode(
        &Frame::Init(InitSpec {
            startup_probe: Some(Probe {
                check: ProbeCheck::Tcp { port: 1 },
                initial_delay_ms: 0,
                period_ms: 0,
                timeout_ms: 0,
                failure_threshold: 0,
            }),
            ..Default::default()
        }),
        &mut buf,
    );
    // length(4) tag(1) argv count(4) env count(4) cwd(4) files(4) user(4)
    // group(4) caps flag(1): then the probe kind.
    let kind = 4 + 1 + 4 * 6 + 1;
    assert_eq!(buf[kind], 2);
    buf[kind] = 9;
    assert!(matches!(decode(&buf[4..]), Err(WireError::Malformed(_))));
    assert!(matches!(
        decode(&[tag::STARTUP, 7]),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        decode(&[tag::STARTUP]),
        Err(WireError::Malformed(_))
    ));
}

#[test]
fn clean_eof_is_none_and_partial_is_error() {
    assert!(read_frame(&mut &[][..]).unwrap().is_none());
    assert!(matches!(
        read_frame(&mut &[5, 0][..]),
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        read_frame(&mut &[5, 0, 0, 0, tag::PING][..]),
        Err(WireError::Truncated)
    ));
}

#[test]
fn hostile_lengths_are_refused_before_allocating() {
    let huge = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
    assert!(matches!(
        read_frame(&mut &huge[..]),
        Err(WireError::TooLarge(_))
    ));
    // A string that claims more bytes than the frame holds.
    let body = [tag::READ_FILE, 0xff, 0xff, 0xff, 0x7f];
    assert!(matches!(decode(&body), Err(WireError::Malformed(_))));
    // A list count larger than the payload can hold.
    let body = [tag::EXEC, 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(decode(&body), Err(WireError::Malformed(_))));
    assert!(matches!(decode(&[200]), Err(WireError::UnknownTag(200))));
    assert!(matches!(
        decode(&[tag::PING, 0]),
        Err(WireError::Malformed("trailing bytes"))
    ));
}

#[test]
fn spawn_failures_get_shell_exit_codes() {
    assert_eq!(ErrorKind::NotFound.spawn_exit_code(), 127);
    for kind in [
        ErrorKind::PermissionDenied,
        ErrorKind::SpawnFailed,
        ErrorKind::IsDirectory,
        ErrorKind::Io,
    ] {
        assert_eq!(kind.spawn_exit_code(), 126, "{kind:?}");
    }
}

#[test]
fn frames_shorter_than_their_fixed_fields_are_malformed() {
    let body = [tag::MAIN_CHUNK, 1, 2, 3];
    assert!(matches!(
        decode(&body),
        Err(WireError::Malformed("short payload"))
    ));
    let mut raw = (body.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(&body);
    assert!(matches!(
        read_frame(&mut &raw[..]),
        Err(WireError::Malformed("short payload"))
    ));
    // A frame without even a tag.
    assert!(matches!(
        read_frame(&mut &[0, 0, 0, 0][..]),
        Err(WireError::Malformed("short payload"))
    ));
    assert!(matches!(decode(&[]), Err(WireError::Malformed(_))));
}

#[test]
fn shell_code_follows_the_shell_convention() {
    assert_eq!(ExitStatus::Code(3).shell_code(), 3);
    assert_eq!(ExitStatus::Signal(Signal::KILL).shell_code(), 137);
    assert_eq!(
        ExitStatus::Signal(Signal::new(64).unwrap()).shell_code(),
        192
    );
}

#[test]
fn signal_numbers_outside_linux_are_malformed() {
    let frames = |n: i32| {
        let n = n.to_le_bytes();
        [
            [&[tag::SIGNAL][..], &n].concat(),
            [&[tag::SIGNAL_MAIN][..], &n].concat(),
            [&[tag::EXITED, 1][..], &n].concat(),
            [&[tag::PONG, 2, 1][..], &n].concat(),
        ]
    };
    for bad in [0, -1, 65, 128, i32::MAX] {
        for body in frames(bad) {
            assert!(
                matches!(decode(&body), Err(WireError::Malformed("signal"))),
                "{bad}: {body:?}"
            );
        }
    }
    for good in [1, 64] {
        for body in frames(good) {
            assert!(decode(&body).is_ok(), "{good}: {body:?}");
        }
    }
}
