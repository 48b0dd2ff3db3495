//! File reads and writes, main output and timeouts.

use super::*;

on_both_transports!(
    read_file_checks_sizes,
    agent_sending_more_than_announced_is_cut_off,
    agent_sending_less_than_announced_is_an_error,
    write_file_streams_data_and_reports_errors,
    write_file_reports_the_agents_reason_when_it_stops_early,
    main_output_yields_gap_and_chunks_until_end,
    request_response_calls_time_out,
    exec_and_followed_output_are_never_bounded,
);

/// Serves `ReadFile`: announces `announced` bytes, sends `content`.
fn file_agent(content: Vec<u8>, announced: u64) -> Handler {
    let content = Arc::new(content);
    handler(move |mut s, first| {
        let content = Arc::clone(&content);
        async move {
            let Frame::ReadFile { path } = first else {
                panic!()
            };
            if path == "/missing" {
                return s
                    .put(Frame::Error {
                        kind: ErrorKind::NotFound,
                        message: "/missing: no such file or directory".into(),
                    })
                    .await;
            }
            s.put(Frame::FileInfo {
                size: announced,
                mode: 0o644,
            })
            .await;
            for c in content.chunks(CHUNK_LEN) {
                if s.try_put(Frame::Data(c.to_vec())).await.is_err() {
                    return;
                }
            }
            let _ = s.try_put(Frame::End).await;
        }
    })
}

async fn read_file_checks_sizes<C: Connector>(make: Make<C>) {
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let f = make(4, file_agent(data.clone(), data.len() as u64));
    assert_eq!(f.client.read_file("/f", 1 << 30).await.unwrap(), data);
    // The limit itself is fine, one byte less is not (before any data).
    assert_eq!(f.client.read_file("/f", 200_000).await.unwrap(), data);
    assert!(matches!(
        f.client.read_file("/f", 1000).await,
        Err(ClientError::TooLarge {
            size: 200_000,
            max: 1000
        })
    ));
    let err = f.client.read_file("/missing", 1 << 30).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "agent: not found: /missing: no such file or directory"
    );
    f.done().await;
}

async fn agent_sending_more_than_announced_is_cut_off<C: Connector>(make: Make<C>) {
    let f = make(1, file_agent(vec![1; 300_000], 10));
    let err = f.client.read_file("/f", 100).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "protocol: agent sent more than the announced 10 bytes"
    );
    f.done().await;
}

async fn agent_sending_less_than_announced_is_an_error<C: Connector>(make: Make<C>) {
    let f = make(1, file_agent(vec![1; 5], 10));
    let err = f.client.read_file("/f", 100).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "protocol: agent sent 5 of the announced 10 bytes"
    );
    f.done().await;
}

async fn write_file_streams_data_and_reports_errors<C: Connector>(make: Make<C>) {
    let f = make(
        3,
        handler(|mut s, first| async move {
            let Frame::WriteFile { path, mode } = first else {
                panic!()
            };
            let mut data = Vec::new();
            loop {
                match s.get().await.unwrap() {
                    Frame::Data(d) => {
                        assert!(d.len() <= CHUNK_LEN);
                        data.extend(d)
                    }
                    Frame::End => break,
                    other => panic!("{other:?}"),
                }
            }
            match path.as_str() {
                "/dir" => {
                    s.put(Frame::Error {
                        kind: ErrorKind::IsDirectory,
                        message: "/dir: is a directory".into(),
                    })
                    .await
                }
                "/empty" => {
                    assert!(data.is_empty());
                    s.put(Frame::Ok).await
                }
                _ => {
                    assert_eq!(mode, 0o600);
                    assert_eq!(data, vec![7; 300_000]);
                    s.put(Frame::Ok).await
                }
            }
        }),
    );
    f.client
        .write_file("/f", 0o600, &vec![7; 300_000])
        .await
        .unwrap();
    f.client.write_file("/empty", 0o600, b"").await.unwrap();
    assert!(matches!(
        f.client.write_file("/dir", 0o600, b"x").await,
        Err(ClientError::Agent {
            kind: ErrorKind::IsDirectory,
            ..
        })
    ));
    f.done().await;
}

async fn write_file_reports_the_agents_reason_when_it_stops_early<C: Connector>(make: Make<C>) {
    let f = make(
        1,
        handler(|mut s, _| async move {
            s.put(Frame::Error {
                kind: ErrorKind::PermissionDenied,
                message: "/ro: read-only file system".into(),
            })
            .await;
            // Closing with data unread: our writes fail (a reset over a
            // socket), the answer is still there to read.
        }),
    );
    let err = f
        .client
        .write_file("/ro", 0o644, &vec![0; 4 << 20])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Agent {
                kind: ErrorKind::PermissionDenied,
                message,
            } if message == "/ro: read-only file system"
        ),
        "{err}"
    );
    f.done().await;
}

async fn main_output_yields_gap_and_chunks_until_end<C: Connector>(make: Make<C>) {
    let f = make(
        3,
        handler(|mut s, first| async move {
            let Frame::MainOutput { offset, follow } = first else {
                panic!()
            };
            match offset {
                1 => {
                    assert!(follow);
                    s.put(Frame::Gap { from: 1, to: 5 }).await;
                    for (offset, stream) in [(5, 2), (6, 1)] {
                        s.put(Frame::MainChunk {
                            offset,
                            stream,
                            time_ns: 1,
                            data: b"x".to_vec(),
                        })
                        .await;
                    }
                    s.put(Frame::End).await;
                }
                // A stream byte that is neither stdout nor stderr.
                0 => {
                    s.put(Frame::MainChunk {
                        offset: 0,
                        stream: 7,
                        time_ns: 1,
                        data: vec![],
                    })
                    .await
                }
                // Gone before `End`.
                _ => {}
            }
        }),
    );
    let mut stream = f.client.main_output(1, true).await.unwrap();
    let mut events = Vec::new();
    while let Some(e) = stream.next().await {
        events.push(e.unwrap());
    }
    let chunk = |offset, stream| MainOutputEvent::Chunk {
        offset,
        stream,
        time_ns: 1,
        data: b"x".to_vec(),
    };
    assert_eq!(
        events,
        [
            MainOutputEvent::Gap { from: 1, to: 5 },
            chunk(5, OutputStream::Stderr),
            chunk(6, OutputStream::Stdout),
        ]
    );
    assert!(stream.next().await.is_none());
    let mut stream = f.client.main_output(0, false).await.unwrap();
    let err = stream.next().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "protocol: main chunk of unknown stream 7");
    assert!(stream.next().await.is_none());
    let mut stream = f.client.main_output(9, false).await.unwrap();
    assert!(matches!(
        stream.next().await,
        Some(Err(ClientError::Closed))
    ));
    assert!(stream.next().await.is_none());
    f.done().await;
}

fn timed_out(r: &Result<impl std::fmt::Debug, ClientError>) -> bool {
    matches!(r, Err(ClientError::Wire(WireError::Io(e))) if e.kind() == io::ErrorKind::TimedOut)
}

/// An agent that answers nothing, and waits for the client to give up.
async fn silent(mut s: Peer, first: Frame) {
    if matches!(first, Frame::WriteFile { .. }) {
        // Takes the data, never answers.
        while let Some(Frame::Data(_) | Frame::End) = s.get().await {}
    } else if matches!(first, Frame::MainOutput { .. }) {
        // The client's writing side may be closed already (a half-close
        // over a socket): outlast its timeout instead.
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        assert!(s.get().await.is_none(), "the client should just leave");
    }
}

async fn request_response_calls_time_out<C: Connector>(make: Make<C>) {
    let f = make(5, handler(silent));
    let client = f.client.clone().with_timeout(Duration::from_millis(100));
    let t = tokio::time::Instant::now();
    assert!(timed_out(&client.ping().await));
    assert!(timed_out(&client.signal_main(Signal::TERM).await));
    assert!(timed_out(&client.read_file("/f", 10).await));
    assert!(timed_out(&client.write_file("/f", 0o644, b"data").await));
    let mut out = client.main_output(0, false).await.unwrap();
    assert!(timed_out(&out.next().await.unwrap()));
    assert!(out.next().await.is_none());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    f.done().await;
}

async fn exec_and_followed_output_are_never_bounded<C: Connector>(make: Make<C>) {
    let f = make(
        2,
        handler(|mut s, first| async move {
            // Longer than the client's timeout before every frame.
            let pause = || tokio::time::sleep(Duration::from_millis(300));
            pause().await;
            match first {
                Frame::Exec(_) => {
                    s.put(Frame::Started { pid: 3 }).await;
                    pause().await;
                    s.put(Frame::Exited(ExitStatus::Code(0))).await;
                }
                Frame::MainOutput { follow: true, .. } => s.put(Frame::End).await,
                other => panic!("{other:?}"),
            }
        }),
    );
    let client = f.client.clone().with_timeout(Duration::from_millis(100));
    let (mut events, _c) = client.exec(cmd(&["x"])).await.unwrap().into_split();
    assert_eq!(
        events.next_event().await.unwrap(),
        Some(ExecEvent::Exited(ExitStatus::Code(0)))
    );
    let mut out = client.main_output(0, true).await.unwrap();
    assert!(out.next().await.is_none());
    f.done().await;
}
