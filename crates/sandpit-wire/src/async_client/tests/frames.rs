//! The async frame functions: the same bytes as the blocking ones, the same
//! bounds on hostile input, and a reader that resumes anywhere.

use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use super::*;
use crate::{InitFile, InitSpec, MAX_FRAME_LEN};

fn every_frame() -> Vec<Frame> {
    vec![
        Frame::Ping,
        Frame::Pong(MainStatus::Exited(ExitStatus::Signal(Signal::KILL))),
        Frame::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b".into())],
            cwd: Some("/tmp".into()),
            tty: Some(WinSize { cols: 80, rows: 24 }),
        }),
        Frame::Started { pid: 42 },
        Frame::Stdin(vec![0, 1, 2, 255]),
        Frame::StdinEof,
        Frame::Resize(WinSize { cols: 1, rows: 2 }),
        Frame::Signal(Signal::TERM),
        Frame::Stdout(vec![5; CHUNK_LEN]),
        Frame::Stderr(vec![]),
        Frame::Exited(ExitStatus::Code(-1)),
        Frame::ReadFile { path: "/a".into() },
        Frame::FileInfo {
            size: 5,
            mode: 0o644,
        },
        Frame::Data(vec![9; 100]),
        Frame::End,
        Frame::WriteFile {
            path: "x".into(),
            mode: 0o600,
        },
        Frame::Ok,
        Frame::Error {
            kind: ErrorKind::IsDirectory,
            message: "is a directory".into(),
        },
        Frame::MainOutput {
            offset: 3,
            follow: true,
        },
        Frame::Gap { from: 0, to: 10 },
        Frame::MainChunk {
            offset: 10,
            stream: 2,
            time_ns: 99,
            data: b"line\n".to_vec(),
        },
        Frame::MainChunk {
            offset: 1,
            stream: 1,
            time_ns: 2,
            data: vec![],
        },
        Frame::SignalMain(Signal::INT),
        Frame::Init(InitSpec {
            argv: vec!["true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            files: vec![InitFile {
                path: "/etc/x".into(),
                mode: 0o644,
                content: b"c".to_vec(),
            }],
            ..Default::default()
        }),
        Frame::AwaitStartup,
        Frame::Startup(StartupState::Failed("probe failed".into())),
    ]
}

fn encoded(frames: &[Frame]) -> Vec<u8> {
    let mut buf = Vec::new();
    for f in frames {
        encode(f, &mut buf);
    }
    buf
}

#[tokio::test]
async fn frames_roundtrip_as_the_blocking_codec_encodes_them() {
    let frames = every_frame();
    let bytes = encoded(&frames);
    let mut r = &bytes[..];
    for want in &frames {
        assert_eq!(read_frame(&mut r).await.unwrap().as_ref(), Some(want));
    }
    assert_eq!(read_frame(&mut r).await.unwrap(), None);
    // And what we write is what the blocking side writes.
    let mut out: Vec<u8> = Vec::new();
    for f in &frames {
        write_frame(&mut out, f).await.unwrap();
    }
    assert!(out == bytes);
}

/// Hands out one byte per read, so every partial read path is taken.
struct Trickle<'a>(&'a [u8]);

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some((&b, rest)) = self.0.split_first() {
            buf.put_slice(&[b]);
            self.0 = rest;
        }
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn frames_arrive_whole_a_byte_at_a_time() {
    let frames = every_frame();
    let bytes = encoded(&frames);
    let mut r = Trickle(&bytes);
    for want in &frames {
        assert_eq!(read_frame(&mut r).await.unwrap().as_ref(), Some(want));
    }
    assert_eq!(read_frame(&mut r).await.unwrap(), None);
}

/// Polls `f` once (what a `select!` whose other branch won does), then
/// drops it.
fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[tokio::test]
async fn the_stream_reader_resumes_after_a_cancel_at_any_byte() {
    let frames = every_frame();
    let bytes = encoded(&frames);
    let (mut tx, rx) = tokio::io::duplex(bytes.len());
    let mut reader = super::super::frames::FrameReader::new(rx);
    let mut got = Vec::new();
    for &b in &bytes {
        tx.write_all(&[b]).await.unwrap();
        // One poll, then the future is dropped unless it has a frame.
        if let Some(f) = poll_once(reader.next()) {
            got.push(f.unwrap().unwrap());
        }
    }
    assert_eq!(got, frames);
    drop(tx);
    assert_eq!(reader.next().await.unwrap(), None);
}

#[tokio::test]
async fn clean_eof_is_none_and_partial_is_truncated() {
    assert_eq!(read_frame(&mut &[][..]).await.unwrap(), None);
    let bytes = encoded(&[
        Frame::Stdout(b"abc".to_vec()),
        Frame::FileInfo { size: 1, mode: 2 },
    ]);
    // Cut at every point inside either frame (the first one is 8 bytes).
    for cut in 1..bytes.len() {
        let mut r = &bytes[..cut];
        let first = read_frame(&mut r).await;
        let result = if cut >= 8 {
            assert!(first.unwrap().is_some());
            read_frame(&mut r).await
        } else {
            first
        };
        if cut == 8 {
            assert_eq!(result.unwrap(), None, "between frames");
        } else {
            assert!(matches!(result, Err(WireError::Truncated)), "cut at {cut}");
        }
    }
}

#[tokio::test]
async fn hostile_lengths_are_refused_before_allocating() {
    let huge = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
    assert!(matches!(
        read_frame(&mut &huge[..]).await,
        Err(WireError::TooLarge(n)) if n == MAX_FRAME_LEN + 1
    ));
    assert!(matches!(
        read_frame(&mut &u32::MAX.to_le_bytes()[..]).await,
        Err(WireError::TooLarge(_))
    ));
    // No tag at all; fixed fields the frame cannot hold.
    assert!(matches!(
        read_frame(&mut &[0, 0, 0, 0][..]).await,
        Err(WireError::Malformed("short payload"))
    ));
    let mut short_chunk = 4u32.to_le_bytes().to_vec();
    short_chunk.extend_from_slice(&[crate::codec::tag::MAIN_CHUNK, 1, 2, 3]);
    assert!(matches!(
        read_frame(&mut &short_chunk[..]).await,
        Err(WireError::Malformed("short payload"))
    ));
    // Decoding errors are the codec's.
    let mut bad = Vec::new();
    encode(&Frame::Signal(Signal::KILL), &mut bad);
    bad[5..9].copy_from_slice(&0i32.to_le_bytes());
    assert!(matches!(
        read_frame(&mut &bad[..]).await,
        Err(WireError::Malformed("signal"))
    ));
    assert!(matches!(
        read_frame(&mut &[1, 0, 0, 0, 200][..]).await,
        Err(WireError::UnknownTag(200))
    ));
}
