use super::*;

fn a() -> SandboxId {
    SandboxId::parse("a").unwrap()
}

fn chunk(offset: u64, data: &[u8]) -> OutputChunk {
    OutputChunk {
        offset,
        stream: Stream::Stdout,
        time_ns: offset,
        data: data.to_vec(),
    }
}

fn read_all(reader: &LogReader, id: &SandboxId, from: u64) -> (Vec<u8>, Option<u64>) {
    let mut c = reader.cursor(id);
    if let Some(gap) = c.seek(from).unwrap() {
        return (vec![], Some(gap));
    }
    let mut out = vec![];
    loop {
        match c.next().unwrap() {
            Next::Record(r) => out.extend(r.data),
            Next::Gap(g) => return (out, Some(g)),
            Next::Pending => return (out, None),
        }
    }
}

#[test]
fn file_sink_appends_skips_replays_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(&dir.path().join("logs")).unwrap();
    assert_eq!(sink.resume_offset(&a()), 0);
    sink.append(&a(), &chunk(0, b"hello "));
    sink.append(&a(), &chunk(6, b"world"));
    // A replay after a restart (overlapping, partly new) adds only what is new.
    sink.append(&a(), &chunk(0, b"hello "));
    sink.append(&a(), &chunk(8, b"rld!"));
    assert_eq!(sink.resume_offset(&a()), 12);
    sink.finish(&a());
    // Read back from disk after "a restart".
    let fresh = FileSink::new(&dir.path().join("logs")).unwrap();
    assert_eq!(fresh.resume_offset(&a()), 12);
    // Dropped output (a gap) is skipped, not written as a hole.
    fresh.append(&a(), &chunk(1 << 40, b"\n"));
    assert_eq!(fresh.resume_offset(&a()), (1 << 40) + 1);
    // A forged offset near the end of the range cannot overflow.
    fresh.append(&a(), &chunk(u64::MAX - 1, b"xyz"));
    let reader = fresh.reader();
    assert_eq!(read_all(&reader, &a(), 0).0, b"hello world!\nxyz");
    assert_eq!(read_all(&reader, &a(), 3).0, b"lo world!\nxyz");
    assert!(dir.path().join("logs/a.log").metadata().unwrap().len() < 200);
    fresh.remove(&a());
    assert!(!dir.path().join("logs/a.log").exists());
    assert!(!dir.path().join("logs/a.pos").exists());
    assert_eq!(read_all(&reader, &a(), 0), (vec![], None));
}

#[test]
fn records_keep_time_and_stream() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path()).unwrap();
    sink.append(&a(), &chunk(0, b"out"));
    sink.append(
        &a(),
        &OutputChunk {
            offset: 3,
            stream: Stream::Stderr,
            time_ns: 77,
            data: b"err".to_vec(),
        },
    );
    let mut c = sink.reader().cursor(&a());
    c.seek(0).unwrap();
    assert!(matches!(c.next().unwrap(), Next::Record(r) if r.stream == Stream::Stdout));
    let Next::Record(r) = c.next().unwrap() else {
        panic!()
    };
    assert_eq!((r.offset, r.time_ns, r.stream), (3, 77, Stream::Stderr));
    assert_eq!(c.next().unwrap(), Next::Pending);
    assert_eq!(c.offset(), 6);
}

#[test]
fn cap_drops_the_oldest_and_readers_follow_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::with_max_bytes(dir.path(), MIN_MAX_LOG_BYTES).unwrap();
    let reader = sink.reader();
    let line = vec![b'x'; 1000];
    let mut c = reader.cursor(&a());
    c.seek(0).unwrap();
    let mut seen = 0u64;
    let mut offset = 0u64;
    for _ in 0..3000 {
        sink.append(&a(), &chunk(offset, &line));
        offset += line.len() as u64;
        // A reader keeping up sees everything across rotations.
        while let Next::Record(r) = c.next().unwrap() {
            assert_eq!(r.offset, seen);
            seen = r.end();
        }
    }
    assert_eq!(seen, offset);
    let kept: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(kept <= MIN_MAX_LOG_BYTES + 64, "{kept}");
    // The oldest output is gone: a reader there is told where it resumes.
    let start = c.start().unwrap().unwrap();
    assert!(start > 0 && start < offset - 400_000, "{start}");
    let (data, gap) = read_all(&reader, &a(), 10);
    assert!(data.is_empty());
    assert_eq!(gap, Some(start));
    let (data, gap) = read_all(&reader, &a(), start);
    assert_eq!((data.len() as u64, gap), (offset - start, None));
}

#[test]
fn tail_finds_the_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path()).unwrap();
    let r = sink.reader();
    assert_eq!(r.tail_start(&a(), 2).unwrap(), 0);
    sink.append(&a(), &chunk(0, b"one\ntw"));
    sink.append(&a(), &chunk(6, b"o\nthree\n"));
    assert_eq!(r.tail_start(&a(), 1).unwrap(), 8);
    assert_eq!(r.tail_start(&a(), 2).unwrap(), 4);
    assert_eq!(r.tail_start(&a(), 10).unwrap(), 0);
    sink.append(&a(), &chunk(14, b"four"));
    assert_eq!(r.tail_start(&a(), 1).unwrap(), 14);
    assert_eq!(read_all(&r, &a(), 8).0, b"three\nfour");
    assert_eq!(r.end(&a()), 18);
}

#[test]
fn rfc3339() {
    assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(
        rfc3339_nanos(1_709_251_199_000_000_001),
        "2024-02-29T23:59:59.000000001Z"
    );
    assert_eq!(
        rfc3339_nanos(951_782_400 * 1_000_000_000),
        "2000-02-29T00:00:00.000000000Z"
    );
}
