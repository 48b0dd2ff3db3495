//! The agent on the host, unprivileged-capable: started as a normal child with
//! its listening socket at fd 3 and the `Init` frame at fd 4, exactly as the
//! spawner hands them over, and driven through the real client.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandpit_wire::client::{AgentClient, ClientError, ExecEvent, ExecSession};
use sandpit_wire::{
    read_frame, write_frame, ErrorKind, ExecRequest, ExitStatus, Frame, InitFile, InitSpec,
    MainStatus, Signal, WinSize,
};

mod common;
use common::*;

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; reaped, it is gone.
    Path::new(&format!("/proc/{pid}")).exists()
}

fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still there");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// (stdout, stderr, offsets contiguous from the first chunk)
fn collect_main(client: &AgentClient, offset: u64, follow: bool) -> (Vec<Frame>, Vec<u8>, Vec<u8>) {
    let mut frames = Vec::new();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut next: Option<u64> = None;
    for f in client.main_output(offset, follow).unwrap() {
        let f = f.unwrap();
        if let Frame::MainChunk {
            offset,
            stream,
            data,
            time_ns,
        } = &f
        {
            if let Some(n) = next {
                assert_eq!(*offset, n, "offsets are contiguous");
            }
            next = Some(offset + data.len() as u64);
            assert!(*time_ns > 1_600_000_000_000_000_000);
            match stream {
                1 => out.extend_from_slice(data),
                2 => err.extend_from_slice(data),
                s => panic!("stream {s}"),
            }
        }
        frames.push(f);
    }
    (frames, out, err)
}

// ------------------------------------------------------------- main command

#[test]
fn idle_agent_answers_and_has_no_output() {
    let a = start(&[]);
    assert_eq!(a.client.ping().unwrap(), MainStatus::Idle);
    assert!(a.client.main_output(0, true).unwrap().next().is_none());
    let err = a.client.signal_main(Signal::TERM).unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotRunning,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn main_runs_in_its_own_group_and_takes_signals() {
    let a = start(&["sleep", "1000"]);
    let MainStatus::Running { pid } = a.client.ping().unwrap() else {
        panic!("not running")
    };
    assert!(alive(pid));
    // setsid: the main command leads its own session and process group.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[2], pid.to_string(), "pgid");
    assert_eq!(fields[3], pid.to_string(), "sid");
    a.client.signal_main(Signal::TERM).unwrap();
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Signal(Signal::TERM));
    wait_gone(pid);
    // The agent outlives its main command.
    assert!(matches!(a.client.ping().unwrap(), MainStatus::Exited(_)));
    assert!(a.client.signal_main(Signal::TERM).is_err());
}

#[test]
fn main_command_env_cwd_files_and_output() {
    let a = start_with(
        &[
            "sh",
            "-c",
            "echo \"$GREETING from $(pwd)\"; cat note.txt; echo oops >&2; exit 3",
        ],
        |init, dir| {
            init.env.push(("GREETING".into(), "hello".into()));
            init.files.push(InitFile {
                path: dir.join("work/sub/../note.txt").to_str().unwrap().into(),
                mode: 0o600,
                content: b"mounted file\n".to_vec(),
            });
        },
    );
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(3));
    let (_, out, err) = collect_main(&a.client, 0, false);
    let cwd = a.cwd();
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        format!("hello from {}\nmounted file\n", cwd.display())
    );
    assert_eq!(err, b"oops\n");
    let mode = std::fs::metadata(cwd.join("note.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // From an offset in the middle of a chunk.
    let (frames, out2, _) = collect_main(&a.client, 6, false);
    assert!(matches!(frames[0], Frame::MainChunk { offset: 6, .. }));
    assert_eq!(out2, &out[6..]);
    // Past the end: nothing.
    assert!(collect_main(&a.client, 1 << 40, false).0.is_empty());
}

#[test]
fn following_main_output_ends_when_it_exits() {
    let a = start(&[
        "sh",
        "-c",
        "echo a; sleep 0.3; echo b >&2; sleep 0.2; echo c",
    ]);
    let t = Instant::now();
    let (_, out, err) = collect_main(&a.client, 0, true);
    assert_eq!(out, b"a\nc\n");
    assert_eq!(err, b"b\n");
    assert!(t.elapsed() >= Duration::from_millis(400));
    assert_eq!(
        a.client.ping().unwrap(),
        MainStatus::Exited(ExitStatus::Code(0))
    );
}

#[test]
fn a_daemonised_child_of_main_keeps_logging_after_main_exits() {
    // Bounded, so nothing outlives the test even if it fails.
    let a = start(&[
        "sh",
        "-c",
        "(for i in $(seq 1 60); do echo tick; sleep 0.05; done) & echo started",
    ]);
    let MainStatus::Running { pid } = a.client.ping().unwrap() else {
        panic!("not running")
    };
    let t = Instant::now();
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(0));
    // The background loop holds the pipes: Exited comes after the cap at most.
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let ticks = |c: &AgentClient| {
        let (_, out, _) = collect_main(c, 0, false);
        String::from_utf8(out).unwrap().matches("tick").count()
    };
    let before = ticks(&a.client);
    std::thread::sleep(Duration::from_millis(300));
    let after = ticks(&a.client);
    // Its output is still captured (and it was not killed by SIGPIPE).
    assert!(after > before, "{before} -> {after}");
    // SAFETY: kill takes plain integers; the group is the main command's.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

#[test]
fn main_that_cannot_start_is_reported() {
    let a = start(&["/no/such/binary"]);
    match a.client.ping().unwrap() {
        MainStatus::StartFailed(msg) => {
            assert_eq!(msg, "/no/such/binary: no such file or directory")
        }
        other => panic!("{other:?}"),
    }
    assert!(a.client.main_output(0, true).unwrap().next().is_none());
    let a = start(&["nope-cmd"]);
    assert_eq!(
        a.client.ping().unwrap(),
        MainStatus::StartFailed("nope-cmd: command not found".into())
    );
}

#[test]
fn overflowing_the_ring_leaves_a_gap() {
    const TOTAL: u64 = 20_000_000;
    let a = start(&["head", "-c", "20000000", "/dev/zero"]);
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(0));
    let (frames, out, _) = collect_main(&a.client, 0, false);
    let Frame::Gap { from: 0, to } = frames[0] else {
        panic!("no gap first: {:?}", frames.first())
    };
    assert!(to > 0 && to < TOTAL - (15 << 20), "gap to {to}");
    assert_eq!(out.len() as u64, TOTAL - to);
    assert!(matches!(frames[1], Frame::MainChunk { offset, .. } if offset == to));
    // Asking from the first offset held: no gap.
    let (frames, _, _) = collect_main(&a.client, to, false);
    assert!(matches!(frames[0], Frame::MainChunk { .. }));
}

// --------------------------------------------------------------------- exec

#[test]
fn exec_exit_codes_and_signals() {
    let a = start(&[]);
    assert_eq!(
        a.client.run(req(&["true"]), None).unwrap().status,
        ExitStatus::Code(0)
    );
    assert_eq!(sh(&a, "exit 42").status, ExitStatus::Code(42));
    assert_eq!(
        sh(&a, "kill -TERM $$").status,
        ExitStatus::Signal(Signal::TERM)
    );
    // SIGPIPE is ignored by the agent but back to default for its commands.
    assert_eq!(
        sh(&a, "kill -PIPE $$").status,
        ExitStatus::Signal(Signal::PIPE)
    );
    let mut s = a.client.exec(req(&["sleep", "1000"])).unwrap();
    s.signal(Signal::KILL).unwrap();
    assert_eq!(
        s.next_event().unwrap(),
        Some(ExecEvent::Exited(ExitStatus::Signal(Signal::KILL)))
    );
    assert_eq!(s.next_event().unwrap(), None);
}

#[test]
fn binary_stdin_round_trips_through_cat() {
    let a = start(&[]);
    let input: Vec<u8> = (0..=255u8).cycle().take(200 * 1024).collect();
    let out = a.client.run(req(&["cat"]), Some(&input)).unwrap();
    assert!(out.stdout == input, "binary stdin round trip");
    assert_eq!(out.status, ExitStatus::Code(0));
    // No stdin at all: EOF right away.
    let out = a.client.run(req(&["cat"]), None).unwrap();
    assert!(out.stdout.is_empty());
    // A command that ignores a large stdin still finishes.
    let big = vec![b'x'; 4 << 20];
    let out = a.client.run(req(&["true"]), Some(&big)).unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
}

#[test]
fn stdout_and_stderr_are_separate() {
    let a = start(&[]);
    let out = sh(&a, "echo out; echo err >&2");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn fifty_megabytes_of_output_arrive_intact() {
    let a = start(&[]);
    let out = a
        .client
        .run(req(&["head", "-c", "52428800", "/dev/zero"]), None)
        .unwrap();
    assert_eq!(out.stdout.len(), 52_428_800);
    assert!(out.stdout.iter().all(|&b| b == 0));
    assert_eq!(out.status, ExitStatus::Code(0));
}

#[test]
fn env_and_cwd_of_exec() {
    let a = start_with(&[], |init, _| {
        init.env = vec![("A".into(), "sandbox".into()), ("B".into(), "b".into())];
    });
    std::fs::create_dir_all(a.cwd().join("sub")).unwrap();
    let out = a
        .client
        .run(
            ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo $A $B; pwd; echo $PATH".into(),
                ],
                env: vec![("A".into(), "request".into())],
                cwd: Some("sub".into()),
                tty: None,
            },
            None,
        )
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!(
            "request b\n{}\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
            a.cwd().join("sub").display()
        )
    );
    let out = sh(&a, "pwd");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        a.cwd().to_str().unwrap()
    );
}

fn read_until(session: &mut ExecSession, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        assert!(Instant::now() < deadline, "never saw {want:?} in {seen:?}");
        match session.next_event().unwrap() {
            Some(ExecEvent::Stdout(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("stream ended: {seen:?}"),
        }
    }
}

#[test]
fn pty_reports_size_and_follows_resize() {
    let a = start(&[]);
    let mut session = a
        .client
        .exec(ExecRequest {
            argv: vec!["sh".into()],
            tty: Some(WinSize { cols: 91, rows: 17 }),
            ..Default::default()
        })
        .unwrap();
    let mut seen = String::new();
    session
        .send_stdin(b"stty size; tty; echo term=$TERM\n")
        .unwrap();
    read_until(&mut session, &mut seen, "17 91");
    read_until(&mut session, &mut seen, "/dev/pts/");
    read_until(&mut session, &mut seen, "term=xterm");
    session
        .resize(WinSize {
            cols: 120,
            rows: 40,
        })
        .unwrap();
    session.send_stdin(b"stty size; exit 5\n").unwrap();
    read_until(&mut session, &mut seen, "40 120");
    loop {
        match session.next_event().unwrap() {
            Some(ExecEvent::Exited(s)) => {
                assert_eq!(s, ExitStatus::Code(5));
                break;
            }
            Some(ExecEvent::Stdout(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn pty_stdin_eof_ends_a_reading_command() {
    let a = start(&[]);
    let mut session = a
        .client
        .exec(ExecRequest {
            argv: vec!["cat".into()],
            tty: Some(WinSize { cols: 80, rows: 24 }),
            ..Default::default()
        })
        .unwrap();
    let mut seen = String::new();
    session.send_stdin(b"hello\n").unwrap();
    read_until(&mut session, &mut seen, "hello\r\nhello\r\n");
    session.close_stdin().unwrap();
    loop {
        match session.next_event().unwrap() {
            Some(ExecEvent::Exited(s)) => break assert_eq!(s, ExitStatus::Code(0)),
            Some(ExecEvent::Stdout(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn dropping_a_session_kills_the_command() {
    let a = start(&[]);
    let session = a
        .client
        .exec(req(&["sh", "-c", "sleep 1000 & sleep 1000"]))
        .unwrap();
    let pid = session.pid();
    assert!(alive(pid));
    drop(session);
    wait_gone(pid);
    // The whole group went, the background sleep included.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|s| {
                let f: Vec<&str> = s
                    .rsplit_once(") ")
                    .map_or(vec![], |r| r.1.split(' ').collect());
                f.get(2) == Some(&pid.to_string().as_str())
            })
            .count();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} processes left in the group"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.client.ping().unwrap(), MainStatus::Idle);
}

#[test]
fn cancel_works_while_stdin_is_stuck() {
    let a = start(&[]);
    let session = a.client.exec(req(&["sleep", "1000"])).unwrap();
    let pid = session.pid();
    // `sleep` never reads: the pipe, the agent's pending stdin frame and the
    // socket all fill up, and the writer blocks.
    let mut w = session.stdin_writer().unwrap();
    let feeder = std::thread::spawn(move || w.send_stdin(&vec![0u8; 8 << 20]));
    std::thread::sleep(Duration::from_millis(200));
    drop(session);
    wait_gone(pid);
    assert!(feeder.join().unwrap().is_err());
}

#[test]
fn signals_arrive_while_the_host_does_not_read_output() {
    let a = start(&[]);
    // `yes` fills its pipe and the socket while we read nothing: the agent
    // must still take control frames from the host meanwhile.
    let mut s = a
        .client
        .exec(req(&["sh", "-c", "trap 'exit 7' TERM; yes; exit 3"]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.signal(Signal::TERM).unwrap();
    let status = loop {
        match s.next_event().unwrap() {
            Some(ExecEvent::Exited(status)) => break status,
            Some(_) => {}
            None => panic!("no exit"),
        }
    };
    // `yes` dies of the signal, then the shell runs its trap.
    assert_eq!(status, ExitStatus::Code(7));
}

#[test]
fn a_background_child_holding_stdout_does_not_hang_exec() {
    let a = start(&[]);
    let t = Instant::now();
    let out = sh(&a, "sleep 3 & echo done");
    assert_eq!(out.stdout, b"done\n");
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn orphans_are_reaped() {
    let a = start(&[]);
    let out = sh(&a, "sleep 0.2 & echo $!");
    let pid: u32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Its parent shell is gone: the agent (a subreaper here, PID 1 in a
    // sandbox) inherits and reaps it, so it leaves no zombie.
    wait_gone(pid);
}

#[test]
fn spawn_failures_are_reported() {
    let a = start(&[]);
    let err = a.client.run(ExecRequest::default(), None).unwrap_err();
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
    let agent_err = |r: ExecRequest| match a.client.run(r, None).unwrap_err() {
        ClientError::Agent { kind, message } => (kind, message),
        other => panic!("{other}"),
    };
    // Kinds by errno, not by message: what a shell reports as 127 or 126.
    assert_eq!(
        agent_err(req(&["nope-cmd"])),
        (ErrorKind::NotFound, "nope-cmd: command not found".into())
    );
    assert_eq!(
        agent_err(req(&["/no/such/binary"])),
        (
            ErrorKind::NotFound,
            "/no/such/binary: no such file or directory".into()
        )
    );
    let mut r = req(&["true"]);
    r.cwd = Some("/no/dir".into());
    assert_eq!(
        agent_err(r),
        (
            ErrorKind::NotFound,
            "chdir /no/dir: no such file or directory".into()
        )
    );
    let script = a.cwd().join("not-executable");
    std::fs::create_dir_all(a.cwd()).unwrap();
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let (kind, message) = agent_err(req(&["./not-executable"]));
    assert_eq!(kind, ErrorKind::PermissionDenied);
    assert_eq!(message, "./not-executable: permission denied");
    std::fs::create_dir_all(a.cwd().join("a-dir")).unwrap();
    assert_eq!(
        agent_err(req(&["./a-dir"])),
        (
            ErrorKind::PermissionDenied,
            "./a-dir: permission denied".into()
        )
    );
    // A file that is executable but in no format the kernel runs.
    let junk = a.cwd().join("junk");
    std::fs::write(&junk, [0u8; 64]).unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        agent_err(req(&["./junk"])),
        (
            ErrorKind::PermissionDenied,
            "./junk: exec format error".into()
        )
    );
    // A working directory that is a file.
    let mut r = req(&["true"]);
    r.cwd = Some("not-executable".into());
    assert_eq!(agent_err(r).0, ErrorKind::NotFound);
    // The agent carries on.
    assert_eq!(sh(&a, "echo ok").stdout, b"ok\n");
}

#[test]
fn concurrent_execs() {
    let a = start(&[]);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let client = a.client.clone();
                s.spawn(move || {
                    let out = client
                        .run(
                            req(&["sh", "-c", "sleep 0.1; echo $0", &i.to_string()]),
                            None,
                        )
                        .unwrap();
                    assert_eq!(out.stdout, format!("{i}\n").into_bytes());
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

// -------------------------------------------------------------------- files

#[test]
fn files_are_read_and_written_atomically() {
    let a = start(&[]);
    let c = &a.client;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
    // Relative paths start at the sandbox's cwd; parents are created.
    c.write_file("deep/er/file.bin", 0o640, &data).unwrap();
    let on_disk = a.cwd().join("deep/er/file.bin");
    assert!(std::fs::read(&on_disk).unwrap() == data);
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    assert!(c.read_file(on_disk.to_str().unwrap()).unwrap() == data);
    // An existing file keeps its mode.
    c.write_file("deep/er/file.bin", 0o600, b"short").unwrap();
    assert_eq!(c.read_file("deep/er/file.bin").unwrap(), b"short");
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    c.write_file("empty", 0o644, b"").unwrap();
    assert_eq!(c.read_file("empty").unwrap(), b"");
    // Streaming with a limit.
    let mut sink = Vec::new();
    assert!(matches!(
        c.read_file_to("deep/er/file.bin", &mut sink, 3),
        Err(ClientError::TooLarge { size: 5, max: 3 })
    ));
    assert_eq!(c.read_file_to("deep/er/file.bin", &mut sink, 5).unwrap(), 5);
    let mut src: &[u8] = b"streamed";
    c.write_file_from("streamed", 0o644, &mut src).unwrap();
    assert_eq!(c.read_file("streamed").unwrap(), b"streamed");
    // A symlink at the final component is replaced, not written through.
    let victim = a.dir.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, a.cwd().join("link")).unwrap();
    assert_eq!(c.read_file("link").unwrap(), b"untouched");
    c.write_file("link", 0o644, b"replaced").unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert_eq!(c.read_file("link").unwrap(), b"replaced");
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(a.cwd().join("deep/er"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["file.bin"]);
}

#[test]
fn file_errors_are_categorised() {
    let a = start(&[]);
    let c = &a.client;
    std::fs::create_dir_all(a.cwd().join("dir")).unwrap();
    let agent_err = |r: Result<Vec<u8>, ClientError>| match r.unwrap_err() {
        ClientError::Agent { kind, message } => (kind, message),
        other => panic!("{other}"),
    };
    assert_eq!(
        agent_err(c.read_file("/x/missing")),
        (
            ErrorKind::NotFound,
            "/x/missing: no such file or directory".into()
        )
    );
    assert_eq!(
        agent_err(c.read_file("dir")),
        (ErrorKind::IsDirectory, "dir: is a directory".into())
    );
    let fifo = a.cwd().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert_eq!(agent_err(c.read_file("fifo")).0, ErrorKind::NotRegularFile);
    assert_eq!(agent_err(c.read_file("")).0, ErrorKind::InvalidArgument);
    let err = c.write_file("dir", 0o644, &vec![0; 300_000]).unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Agent {
                kind: ErrorKind::IsDirectory,
                message
            } if message == "dir: is a directory"
        ),
        "{err}"
    );
    // A parent that is a file.
    std::fs::write(a.cwd().join("plain"), "x").unwrap();
    let err = c.write_file("plain/child", 0o644, b"x").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                kind: ErrorKind::NotFound | ErrorKind::Io,
                ..
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------- bad input

fn raw(a: &Agent) -> UnixStream {
    let s = UnixStream::connect(a.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn malformed_input_only_costs_the_connection() {
    let a = start(&["sleep", "1000"]);
    // A huge length, an unknown tag, a truncated frame, garbage after a frame.
    for bytes in [
        vec![0xff, 0xff, 0xff, 0xff, 1],
        vec![1, 0, 0, 0, 200],
        vec![9, 0, 0, 0, 3, 1],
        vec![],
    ] {
        let mut s = raw(&a);
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Dropped: EOF, or a reset when the agent left bytes unread.
        assert!(!matches!(read_frame(&mut s), Ok(Some(_))));
    }
    // A frame that is no operation.
    let mut s = raw(&a);
    write_frame(&mut s, &Frame::Ok).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Some(Frame::Error {
            kind: ErrorKind::Protocol,
            ..
        })
    ));
    // Garbage in the middle of an exec cancels it.
    let mut s = raw(&a);
    write_frame(&mut s, &Frame::Exec(req(&["sleep", "1000"]))).unwrap();
    let Some(Frame::Started { pid }) = read_frame(&mut s).unwrap() else {
        panic!()
    };
    write_frame(&mut s, &Frame::Ping).unwrap();
    wait_gone(pid);
    // An unexpected frame in a file write.
    let mut s = raw(&a);
    write_frame(
        &mut s,
        &Frame::WriteFile {
            path: "x".into(),
            mode: 0o644,
        },
    )
    .unwrap();
    write_frame(&mut s, &Frame::Ping).unwrap();
    assert!(matches!(
        read_frame(&mut s).unwrap(),
        Some(Frame::Error {
            kind: ErrorKind::Protocol,
            ..
        })
    ));
    assert!(!a.cwd().join("x").exists());
    // Still serving, main command untouched.
    assert!(matches!(
        a.client.ping().unwrap(),
        MainStatus::Running { .. }
    ));
    a.client.signal_main(Signal::KILL).unwrap();
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Signal(Signal::KILL));
}

// -------------------------------------------------------------------- probe

#[test]
fn probe_prints_one_json_object_with_every_key() {
    let mut cmd = Command::new(AGENT);
    cmd.arg("probe").env_clear();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // On the host as root, probe as nobody: every attempt is harmless
        // anyway, but the test should not even try privileged ones.
        // SAFETY: setgroups/setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(65534) < 0
                    || libc::setuid(65534) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["uid"].is_u64());
    assert!(v["uid_map"].is_string());
    assert!(v["hostname"].is_string());
    assert!(v["pids_visible"].as_u64().unwrap() > 0);
    assert!(v["no_new_privs"].is_u64());
    assert!(v["seccomp"].is_u64());
    let bnd = v["cap_bnd"].as_str().unwrap();
    assert_eq!(bnd.len(), 16);
    assert!(u64::from_str_radix(bnd, 16).is_ok());
    for key in [
        "mount_tmpfs",
        "unshare_user",
        "unshare_net",
        "init_module",
        "kexec_load",
        "bpf",
        "keyctl",
        "sethostname",
        "reboot",
        "swapon",
        "clock_settime",
        "open_kcore_read",
        "write_proc_sysrq",
        "write_sys",
        "chroot",
        "mknod_char",
        "open_by_handle_at",
        "ptrace_attach_pid1",
    ] {
        assert!(v["attempts"][key].is_string(), "{key} missing: {v}");
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // As nobody, the privileged operations are refused.
        for key in [
            "mount_tmpfs",
            "sethostname",
            "reboot",
            "swapon",
            "clock_settime",
        ] {
            assert_ne!(v["attempts"][key], "ok", "{key}: {v}");
        }
    }
}

// ------------------------------------------------- static binary as PID 1

/// The static build of `scripts/build-agent.sh`, if there is one.
fn static_agent() -> Option<PathBuf> {
    let path = std::env::var_os("SANDPIT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent")
        });
    path.is_file().then_some(path)
}

/// The static agent as real PID 1 of a PID namespace, chrooted into a
/// busybox root with an empty environment: close to a sandbox, minus the
/// user namespace and seccomp. Needs root, `unshare`, a static busybox and
/// `scripts/build-agent.sh`; skipped otherwise.
#[test]
fn static_agent_is_pid1_in_a_busybox_root() {
    let busybox = Path::new("/bin/busybox");
    // SAFETY: geteuid cannot fail.
    let root_user = unsafe { libc::geteuid() } == 0;
    // Absolute paths: the agent must start with an empty environment.
    let find = |name: &str| {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    };
    let (Some(agent), true, true, Some(unshare)) = (
        static_agent(),
        root_user,
        busybox.is_file(),
        find("unshare"),
    ) else {
        eprintln!("skipped: needs root, busybox, unshare and scripts/build-agent.sh");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for d in ["bin", "proc", "tmp", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // /dev/null (busybox sh needs it for background jobs), and /dev/ptmx as a
    // link into a private devpts, as a sandbox has them.
    nix::sys::stat::mknod(
        &root.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    std::fs::create_dir(root.join("dev/pts")).unwrap();
    std::os::unix::fs::symlink("pts/ptmx", root.join("dev/ptmx")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "sleep", "echo", "tr", "kill", "test", "ls", "head", "true", "stty",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::copy(&agent, root.join("sandpit-agent")).unwrap();
    // In the new mount namespace (private: nothing reaches the host), mount
    // the devpts, then become the agent as PID 1 of the new PID namespace.
    let script = format!(
        "/bin/busybox mount -t devpts -o newinstance,ptmxmode=0666 devpts {root}/dev/pts && \
         exec /bin/busybox chroot {root} /sandpit-agent \"$@\"",
        root = root.display()
    );
    let mut cmd = Command::new(unshare);
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
    ])
    .arg(format!("--mount-proc={}", root.join("proc").display()))
    .args(["/bin/busybox", "sh", "-c", &script, "sh"]);
    let a = launch(
        cmd,
        dir,
        InitSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo main; exec sleep 1000".into(),
            ],
            cwd: "/".into(),
            ..Default::default()
        },
    );
    let c = &a.client;
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        match c.ping() {
            Ok(MainStatus::Running { pid }) => break pid,
            Err(ClientError::Connect(_)) | Ok(MainStatus::Idle) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(pid > 1, "main pid {pid}");
    let run = |script: &str| {
        let out = c.run(req(&["sh", "-c", script]), None).unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        run("tr '\\0' ' ' < /proc/1/cmdline"),
        "/sandpit-agent serve --listen-fd 3 --init-fd 4 "
    );
    // Signals from inside without a handler do not touch PID 1.
    assert_eq!(run("kill -TERM 1; kill -INT 1; echo sent"), "sent\n");
    // Orphans come to PID 1 and are reaped.
    // Outlives the exec (which stops waiting for its output after a grace).
    let orphan = run("sleep 1 & echo $!").trim().to_string();
    assert!(orphan.parse::<u32>().is_ok(), "{orphan}");
    assert_eq!(
        run(&format!("test -e /proc/{orphan} && echo there")),
        "there\n"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while run(&format!("test -e /proc/{orphan} && echo there")) == "there\n" {
        assert!(Instant::now() < deadline, "orphan {orphan} not reaped");
        std::thread::sleep(Duration::from_millis(50));
    }
    let probe = c.run(req(&["/sandpit-agent", "probe"]), None).unwrap();
    assert_eq!(probe.status, ExitStatus::Code(0));
    let v: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert!(v["pids_visible"].as_u64().unwrap() < 5, "{v}");
    assert_eq!(v["attempts"]["chroot"], "ok");
    let mut pty = c
        .exec(ExecRequest {
            argv: vec!["sh".into()],
            tty: Some(WinSize { cols: 33, rows: 11 }),
            ..Default::default()
        })
        .unwrap();
    let mut seen = String::new();
    pty.send_stdin(b"stty size; exit 7\n").unwrap();
    read_until(&mut pty, &mut seen, "11 33");
    loop {
        match pty.next_event().unwrap() {
            Some(ExecEvent::Exited(s)) => break assert_eq!(s, ExitStatus::Code(7)),
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
    c.write_file("/tmp/f", 0o644, b"inside").unwrap();
    assert_eq!(run("cat /tmp/f"), "inside");
    let (_, out, _) = collect_main(c, 0, false);
    assert_eq!(out, b"main\n");
    c.signal_main(Signal::TERM).unwrap();
    assert_eq!(wait_main_exit(c), ExitStatus::Signal(Signal::TERM));
    assert!(c.ping().is_ok());
}

// ------------------------------------------------------------- accounting

/// Runs `argv` over a raw connection; returns its exit and the frame after it.
fn exec_raw(a: &Agent, argv: &[&str]) -> (ExitStatus, Option<Frame>) {
    let mut s = UnixStream::connect(a.socket()).unwrap();
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    write_frame(&mut s, &Frame::Exec(req)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    loop {
        match read_frame(&mut s).unwrap() {
            Some(Frame::Exited(status)) => return (status, read_frame(&mut s).unwrap()),
            Some(Frame::Started { .. } | Frame::Stdout(_) | Frame::Stderr(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn an_exec_reports_its_cpu_and_peak_memory_after_its_exit() {
    let a = start(&[]);
    // 64 MiB touched by one process: its resident peak is at least that.
    let (status, usage) = exec_raw(
        &a,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=2"],
    );
    assert_eq!(status, ExitStatus::Code(0));
    let Some(Frame::Usage(u)) = usage else {
        panic!("no usage: {usage:?}")
    };
    assert!(u.max_rss_bytes >= 64 << 20, "{u:?}");
    // CPU burnt by a child the command waited for counts too.
    let (status, usage) = exec_raw(
        &a,
        &[
            "sh",
            "-c",
            "sh -c 'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done'; exit 3",
        ],
    );
    assert_eq!(status, ExitStatus::Code(3));
    let Some(Frame::Usage(u)) = usage else {
        panic!("no usage: {usage:?}")
    };
    assert!(u.user_us + u.sys_us >= 50_000, "{u:?}");
}

#[test]
fn the_main_process_usage_is_there_once_it_ended() {
    let ask = |a: &Agent| {
        let mut s = UnixStream::connect(a.socket()).unwrap();
        write_frame(&mut s, &Frame::MainUsage).unwrap();
        read_frame(&mut s).unwrap()
    };
    let idle = start(&[]);
    assert!(matches!(
        ask(&idle),
        Some(Frame::Error {
            kind: ErrorKind::NotRunning,
            ..
        })
    ));
    let a = start(&["dd", "if=/dev/zero", "of=/dev/null", "bs=32M", "count=1"]);
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(0));
    let Some(Frame::Usage(u)) = ask(&a) else {
        panic!("no usage")
    };
    assert!(u.max_rss_bytes >= 32 << 20, "{u:?}");
}
