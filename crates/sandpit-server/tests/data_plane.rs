//! The data plane over gRPC without root: StreamExec, Exec, ReadFile,
//! WriteFile and StreamLogs through the real handlers, the manager, the
//! engine's agent client and the in-memory agent (which speaks the real
//! agent protocol), driven by the generated tonic clients.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_request::Message as In;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_server::engine::MainExit;
use sandpit_wire::ExitStatus;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

mod common;
use common::*;

fn reason(s: &Status) -> String {
    let d = s.get_error_details();
    let info = d.error_info().expect("ErrorInfo in the status details");
    assert_eq!(info.domain, "cwsandbox.com");
    info.reason.clone()
}

/// A running sandbox of Alice's, with one mounted file.
async fn sandbox(c: &mut SandboxServiceClient<Channel>) -> String {
    let spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: "python:3.11".into(),
            command: "python3".into(),
            environment_variables: [("GREETING".to_owned(), "hello".to_owned())].into(),
            files: vec![pb::FileMount {
                path: "/etc/motd".into(),
                content: b"welcome\n".to_vec(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let sb = c
        .create_sandbox(with_key(
            pb::CreateSandboxRequest {
                sandbox: Some(pb::Sandbox {
                    spec: Some(spec),
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sb.status.as_ref().map(|s| s.state),
        Some(pb::State::Running as i32)
    );
    sb.sandbox_id
}

fn init(id: &str, argv: &[&str]) -> pb::ExecStreamRequest {
    pb::ExecStreamRequest {
        message: Some(In::Init(pb::ExecStreamInit {
            sandbox_id: id.into(),
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    }
}

/// What a StreamExec returned: stdout, stderr, the exit code (if any) and
/// the final status (if it ended with one).
#[derive(Debug, Default)]
struct Streamed {
    ready: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<i32>,
    status: Option<Status>,
}

async fn stream_exec(
    c: &mut SandboxServiceClient<Channel>,
    key: &str,
    requests: Vec<pb::ExecStreamRequest>,
    timeout: Option<&str>,
) -> Result<Streamed, Status> {
    let mut req = with_key(tokio_stream::iter(requests), key);
    if let Some(t) = timeout {
        req.metadata_mut()
            .insert("grpc-timeout", MetadataValue::try_from(t).unwrap());
    }
    let mut out = c.stream_exec(req).await?.into_inner();
    let mut got = Streamed::default();
    while let Some(item) = out.next().await {
        match item {
            Ok(m) => match m.message {
                Some(Out::Ready(_)) => got.ready = true,
                Some(Out::Output(o)) if o.stream == PbStream::Stdout as i32 => {
                    got.stdout.extend(o.data)
                }
                Some(Out::Output(o)) => got.stderr.extend(o.data),
                Some(Out::Exit(e)) => got.exit = Some(e.exit_code),
                other => panic!("unexpected {other:?}"),
            },
            Err(s) => {
                got.status = Some(s);
                break;
            }
        }
    }
    Ok(got)
}

#[tokio::test]
async fn stream_exec_runs_commands_through_the_agent() {
    let server = start().await;
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;

    let r = stream_exec(
        &mut c,
        ALICE,
        vec![init(&id, &["echo", "hi", "there"])],
        None,
    )
    .await
    .unwrap();
    assert!(r.ready);
    assert_eq!((r.stdout.as_slice(), r.exit), (&b"hi there\n"[..], Some(0)));

    // Stdin in, through close.
    let stdin = |d: &[u8]| pb::ExecStreamRequest {
        message: Some(In::Stdin(d.to_vec())),
    };
    let close = pb::ExecStreamRequest {
        message: Some(In::Close(pb::ExecStreamClose {})),
    };
    let r = stream_exec(
        &mut c,
        ALICE,
        vec![init(&id, &["cat"]), stdin(b"abc"), stdin(b"def"), close],
        None,
    )
    .await
    .unwrap();
    assert_eq!((r.stdout.as_slice(), r.exit), (&b"abcdef"[..], Some(0)));

    // The sandbox's environment, and the exec's own on top.
    let r = stream_exec(
        &mut c,
        ALICE,
        vec![init(&id, &["printenv", "GREETING"])],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.stdout, b"hello\n");
    let mut with_env = init(&id, &["printenv", "GREETING"]);
    if let Some(In::Init(i)) = &mut with_env.message {
        i.env.insert("GREETING".into(), "bonjour".into());
    }
    let r = stream_exec(&mut c, ALICE, vec![with_env], None)
        .await
        .unwrap();
    assert_eq!(r.stdout, b"bonjour\n");
    let r = stream_exec(&mut c, ALICE, vec![init(&id, &["warn", "careful"])], None)
        .await
        .unwrap();
    assert_eq!((r.stderr.as_slice(), r.exit), (&b"careful\n"[..], Some(0)));
    let r = stream_exec(&mut c, ALICE, vec![init(&id, &["exit", "7"])], None)
        .await
        .unwrap();
    assert_eq!(r.exit, Some(7));

    // Commands that cannot start answer like a shell, by the agent's kind.
    let r = stream_exec(&mut c, ALICE, vec![init(&id, &["nope"])], None)
        .await
        .unwrap();
    assert_eq!(
        (r.stderr.as_slice(), r.exit),
        (&b"nope: command not found\n"[..], Some(127))
    );
    let r = stream_exec(&mut c, ALICE, vec![init(&id, &["/not-executable"])], None)
        .await
        .unwrap();
    assert_eq!(r.exit, Some(126));

    // The call's deadline kills a command that runs on.
    let r = stream_exec(&mut c, ALICE, vec![init(&id, &["sleep"])], Some("200m"))
        .await
        .unwrap();
    let status = r.status.expect("ended by the deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&status), "CWSANDBOX_COMMAND_TIMEOUT");

    // What the agent was asked to run.
    let argv: Vec<Vec<String>> = server
        .engine
        .execs(&id)
        .into_iter()
        .map(|e| e.argv)
        .collect();
    assert_eq!(argv[0], ["echo", "hi", "there"]);
    assert_eq!(argv.last().unwrap(), &["sleep"]);
}

#[tokio::test]
async fn stream_exec_refusals() {
    let server = start().await;
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;
    // Another principal's sandbox, an unknown id and a malformed one are
    // all NOT_FOUND.
    for (key, sid) in [(BOB, id.as_str()), (ALICE, "0123456789ab"), (ALICE, "../x")] {
        let e = stream_exec(&mut c, key, vec![init(sid, &["true"])], None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{key} {sid}");
    }
    let mut other = init(&id, &["true"]);
    if let Some(In::Init(i)) = &mut other.message {
        i.container = "sidecar".into();
    }
    let e = stream_exec(&mut c, ALICE, vec![other], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A sandbox that ended answers FAILED_PRECONDITION with its state.
    server.engine.exit(
        &id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    for _ in 0..200 {
        let e = stream_exec(&mut c, ALICE, vec![init(&id, &["true"])], None).await;
        if let Err(e) = e {
            assert_eq!(e.code(), Code::FailedPrecondition);
            assert_eq!(reason(&e), "CWSANDBOX_SANDBOX_NOT_RUNNING");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("an ended sandbox still ran commands");
}

#[tokio::test]
async fn unary_exec_collects_and_caps_output() {
    let server = start().await;
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;
    let exec = |argv: &[&str], max: i32| pb::ExecRequest {
        sandbox_id: id.clone(),
        command: argv.iter().map(|s| s.to_string()).collect(),
        max_output_bytes: max,
        ..Default::default()
    };
    let r = c
        .exec(with_key(exec(&["echo", "ok"], 0), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"ok\n"[..], 0));
    assert!(!r.stdout_truncated);

    let r = c
        .exec(with_key(exec(&["spew", "200000"], 1000), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated);
    assert_eq!(r.stdout_bytes_produced, 200_000);

    let r = c
        .exec(with_key(exec(&["exit", "3"], 0), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 3);
    let r = c
        .exec(with_key(exec(&["nope"], 0), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.stderr.as_slice(), r.exit_code),
        (&b"nope: command not found\n"[..], 127)
    );
    let e = c
        .exec(with_key(exec(&["true"], -1), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut req = with_key(exec(&["sleep"], 0), ALICE);
    req.metadata_mut()
        .insert("grpc-timeout", MetadataValue::from_static("200m"));
    let e = c.exec(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
}

#[tokio::test]
async fn files_move_through_the_agent() {
    let server = start().await;
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;
    let read = |path: &str| pb::ReadFileRequest {
        sandbox_id: id.clone(),
        path: path.into(),
        ..Default::default()
    };
    let write = |path: &str, content: &[u8]| pb::WriteFileRequest {
        sandbox_id: id.clone(),
        path: path.into(),
        content: content.to_vec(),
        ..Default::default()
    };
    // Mounted at create.
    let got = c
        .read_file(with_key(read("/etc/motd"), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.content, b"welcome\n");

    // Bigger than one frame, with parents created.
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    c.write_file(with_key(write("/work/out/data.bin", &data), ALICE))
        .await
        .unwrap();
    let got = c
        .read_file(with_key(read("/work/out/data.bin"), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(got.content == data);
    assert_eq!(
        server
            .engine
            .agent_file(&id, "/work/out/data.bin")
            .as_deref(),
        Some(&data[..])
    );

    let e = c
        .read_file(with_key(read("/missing"), ALICE))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::NotFound, "CWSANDBOX_FILE_NOT_FOUND")
    );
    let e = c
        .read_file(with_key(read("/work"), ALICE))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::FailedPrecondition, "CWSANDBOX_FILE_IS_DIRECTORY")
    );
    let e = c
        .write_file(with_key(write("/work", b"x"), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Larger than the server takes in one message: the client's cue to
    // stream.
    let big = vec![0u8; (32 << 20) + 1];
    let e = c
        .write_file(with_key(write("/big", &big), ALICE))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::ResourceExhausted, "CWSANDBOX_FILE_TOO_LARGE")
    );
    let e = c
        .read_file(with_key(read("/etc/motd"), BOB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn logs_stream_what_the_main_process_printed() {
    let server = start_with(true).await;
    server.engine.set_output(b"one\ntwo\n");
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;
    let logs = |follow: bool| pb::StreamLogsRequest {
        sandbox_id: id.clone(),
        follow,
        ..Default::default()
    };
    // Without follow: what was kept so far (the watcher stores it as it
    // arrives, so wait for it).
    let mut data = Vec::new();
    for _ in 0..200 {
        let mut s = c
            .stream_logs(with_key(logs(false), ALICE))
            .await
            .unwrap()
            .into_inner();
        data.clear();
        while let Some(e) = s.next().await {
            data.extend(e.unwrap().data);
        }
        if !data.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(data, b"one\ntwo\n");

    // With follow: everything, then the end once the main process exited.
    let mut s = c
        .stream_logs(with_key(logs(true), ALICE))
        .await
        .unwrap()
        .into_inner();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first.data, b"one\ntwo\n");
    assert!(!first.log_session_id.is_empty());
    assert_eq!(first.next_log_offset, 8);
    server.engine.exit(
        &id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        let mut n = 0;
        while let Some(e) = s.next().await {
            e.unwrap();
            n += 1;
        }
        n
    })
    .await
    .expect("the followed stream ends with the sandbox");
    assert_eq!(rest, 0);
}

#[tokio::test]
async fn log_resumes_continue_exactly_where_they_stopped() {
    let server = start_with(true).await;
    server.engine.set_output(b"one\ntwo\n");
    let mut c = server.client().await;
    let id = sandbox(&mut c).await;
    let read = |req: pb::StreamLogsRequest| {
        let mut c = c.clone();
        async move {
            let mut s = c
                .stream_logs(with_key(req, ALICE))
                .await
                .unwrap()
                .into_inner();
            let mut entries = Vec::new();
            while let Some(e) = s.next().await {
                entries.push(e.unwrap());
            }
            entries
        }
    };
    // The watcher stores the output as it arrives: wait for all of it.
    let mut first = Vec::new();
    for _ in 0..200 {
        first = read(pb::StreamLogsRequest {
            sandbox_id: id.clone(),
            timestamps: true,
            ..Default::default()
        })
        .await;
        if first.last().map(|e| e.next_log_offset) == Some(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let session = first[0].log_session_id.clone();
    let text = |entries: &[pb::LogEntry]| {
        String::from_utf8(entries.iter().flat_map(|e| e.data.clone()).collect()).unwrap()
    };
    let stamped = text(&first);
    let stamp = &stamped[..stamped.find(' ').unwrap()];
    assert_eq!(stamped, format!("{stamp} one\n{stamp} two\n"));
    let resume = |offset: u64| pb::StreamLogsRequest {
        sandbox_id: id.clone(),
        resume_log_session_id: session.clone(),
        resume_log_offset: offset,
        ..Default::default()
    };
    // A resume inside a line continues it unstamped; at a line start it
    // stamps the line, as the first stream did.
    for (offset, want) in [
        (0, format!("{stamp} one\n{stamp} two\n")),
        (2, format!("e\n{stamp} two\n")),
        (4, format!("{stamp} two\n")),
        (6, "o\n".to_owned()),
        (8, String::new()),
    ] {
        let entries = read(resume(offset)).await;
        assert_eq!(text(&entries), want, "resume at {offset}");
        if let Some(last) = entries.last() {
            assert_eq!((last.next_log_offset, &last.log_session_id), (8, &session));
        }
    }
    let entries = read(resume(9)).await;
    assert_eq!(
        entries[0].error.as_ref().map(|e| e.code.as_str()),
        Some("INVALID_RESUME_OFFSET")
    );
}
