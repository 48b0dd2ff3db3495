use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use sandpit_wire::async_client::{AsyncAgentClient, ExecEvent};
use sandpit_wire::{ExecRequest, ExitStatus, WinSize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::Code;

use super::stream::{pump, Pumped};
use super::*;
use crate::fake::{FakeAgent, FakeConnector};

#[tokio::test]
async fn the_deadline_counts_after_the_half_close() {
    let agent = AsyncAgentClient::new(FakeConnector::new(FakeAgent::new(vec![], "/".into())));
    let session = agent
        .exec(ExecRequest {
            argv: vec!["sleep".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut events, _control) = session.into_split();
    let (tx, _rx) = mpsc::channel(CHANNEL);
    let (_stop_tx, stop_rx) = watch::channel(false);
    // The client half-closed at once; the command never ends.
    let deadline = Some(Instant::now() + Duration::from_millis(50));
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        pump(&mut events, &tx, async { false }, deadline, stop_rx),
    )
    .await
    .expect("the deadline was ignored");
    match outcome {
        Pumped::Stopped(Some(s), ending) => {
            assert_eq!(s.code(), Code::DeadlineExceeded);
            assert_eq!(ending, crate::accounting::Ending::DeadlinePassed);
        }
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
    assert_eq!(code(ExitStatus::Signal(sandpit_wire::Signal::KILL)), 137);
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
    // By the agent's kind, no longer by its message's text.
    assert_eq!(ErrorKind::NotFound.spawn_exit_code(), 127);
    assert_eq!(ErrorKind::PermissionDenied.spawn_exit_code(), 126);
    assert_eq!(ErrorKind::SpawnFailed.spawn_exit_code(), 126);
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
