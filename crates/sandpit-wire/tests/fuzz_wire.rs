//! Fuzzing of the frame decoder (proptest, stable toolchain): whatever bytes
//! the agent sends, the host's readers ([`read_frame`], and [`body_len`] with
//! [`decode`] as the daemon's async reader uses them) never panic, never
//! allocate beyond a frame's bounded size, and end in a frame, a need for
//! more bytes, or an error. Valid frames round-trip, whole and split at any
//! point. The seed corpus `fuzz/corpus/wire/*.bin` is replayed first
//! (`ok_*` files are streams of valid frames, `bad_*` ones end in an error)
//! and mutated by the byte strategies.
//!
//! `SANDPIT_FUZZ_CASES` sets the cases per property (256 by default);
//! `scripts/fuzz.sh` runs them long.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use sandpit_wire::{body_len, decode, encode, read_frame, Frame, WireError, MAX_FRAME_LEN};

#[path = "fuzz_wire/strategies.rs"]
mod strategies;
use strategies::arb_frame;

// ------------------------------------------------------------ allocations

/// Counts the bytes each thread holds, and their peak.
struct Counting;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(grow: usize, shrink: usize) {
    let _ = HELD.try_with(|held| {
        let now = held.get().saturating_add(grow).saturating_sub(shrink);
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counting touches only const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, layout.size());
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most bytes it held at once
/// beyond what this thread held before (its result included).
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = HELD.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    (out, PEAK.with(Cell::get) - before)
}

/// A decoded element costs a bounded multiple of the (at least 4) bytes it
/// takes on the wire: a `String` or a pair of them per length prefix, an
/// `InitFile` per counted file, twice that while a `Vec` grows.
const AMPLIFICATION: usize = 32;
/// What a decode may hold besides (small vectors' first capacity).
const SLACK: usize = 4096;

// ------------------------------------------------------------ readers

/// What a streaming reader does with the bytes it has so far.
#[derive(Debug)]
enum Step {
    /// A frame and the bytes it took.
    Frame(Frame, usize),
    /// Not a whole frame yet.
    NeedMore,
    /// Not a frame, whatever follows.
    Error(WireError),
}

/// One step of the daemon's way to read: the header's length bounded by
/// [`body_len`], then [`decode`] of the whole body.
fn step(buf: &[u8]) -> Step {
    let Some(header) = buf.get(..4) else {
        return Step::NeedMore;
    };
    let len = match body_len(header.try_into().expect("4 bytes")) {
        Ok(len) => len,
        Err(e) => return Step::Error(e),
    };
    match buf.get(4..4 + len) {
        None => Step::NeedMore,
        Some(body) => match decode(body) {
            Ok(frame) => Step::Frame(frame, 4 + len),
            Err(e) => Step::Error(e),
        },
    }
}

/// A reader that hands out at most `sizes[i]` bytes per read (cycling), and
/// an `Interrupted` error before every other read.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [usize],
    reads: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if self.reads.is_multiple_of(2) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let size = self.sizes[(self.reads / 2) % self.sizes.len()].max(1);
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Every frame [`read_frame`] gets from `r`, and the error that ended it.
fn read_all(mut r: impl Read) -> (Vec<Frame>, Option<WireError>) {
    let mut frames = Vec::new();
    loop {
        match read_frame(&mut r) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// Every frame the streaming [`step`]s get from `data` fed in chunks of
/// `sizes`, and the error that ended it (`Truncated` for a partial frame at
/// the end).
fn step_all(data: &[u8], sizes: &[usize]) -> (Vec<Frame>, Option<WireError>) {
    let mut frames = Vec::new();
    let mut buf = Vec::new();
    let mut fed = 0;
    let mut i = 0;
    loop {
        match step(&buf) {
            Step::Frame(f, n) => {
                frames.push(f);
                buf.drain(..n);
            }
            Step::Error(e) => return (frames, Some(e)),
            Step::NeedMore if fed == data.len() => {
                let end = (!buf.is_empty()).then_some(WireError::Truncated);
                return (frames, end);
            }
            Step::NeedMore => {
                let n = sizes[i % sizes.len()].max(1).min(data.len() - fed);
                buf.extend_from_slice(&data[fed..fed + n]);
                fed += n;
                i += 1;
            }
        }
    }
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(f, &mut out);
    }
    out
}

/// The same kind of error (payloads aside).
fn same_kind(a: &WireError, b: &WireError) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// Checks every property of arbitrary input `data`: no panic (proptest
/// reports one), bounded allocations, and the two readers agree.
fn check_arbitrary(data: &[u8]) -> Result<(), TestCaseError> {
    let ((frames, end), peak) = peak_during(|| read_all(data));
    prop_assert!(
        peak <= MAX_FRAME_LEN + AMPLIFICATION * data.len() + SLACK,
        "read_frame held {peak} bytes for {} bytes of input",
        data.len()
    );
    if let Some(body) = data.get(4..) {
        let (_, peak) = peak_during(|| decode(body));
        prop_assert!(
            peak <= AMPLIFICATION * body.len() + SLACK,
            "decode held {peak} bytes for a body of {}",
            body.len()
        );
    }
    let (stepped, step_end) = step_all(data, &[data.len().max(1)]);
    prop_assert_eq!(&frames, &stepped);
    match (&end, &step_end) {
        (None, None) => {}
        // read_frame refuses a tail frame too short for its fixed fields
        // from the tag alone; a reader that waits for the whole body first
        // finds the stream cut before that.
        (Some(WireError::Malformed(_)), Some(WireError::Truncated)) => {}
        (Some(a), Some(b)) => prop_assert!(same_kind(a, b), "read_frame: {a:?}, step: {b:?}"),
        _ => prop_assert!(false, "read_frame ended in {end:?}, step in {step_end:?}"),
    }
    // What was decoded is valid: its encoding takes as many bytes as it came
    // from (not always the same ones: the decoder takes any non-zero byte for
    // a flag or a present option, the encoder writes 1) and decodes back.
    let encoded = encode_all(&frames);
    let (again, end) = read_all(encoded.as_slice());
    prop_assert!(end.is_none(), "{:?}", end);
    prop_assert_eq!(&again, &frames);
    let consumed: usize = (0..frames.len()).fold(0, |at, _| {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        at + 4 + len as usize
    });
    prop_assert_eq!(consumed, encoded.len());
    Ok(())
}

// ------------------------------------------------------------ corpus

fn corpus() -> &'static [(String, Vec<u8>)] {
    static CORPUS: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).expect("corpus file"))
            })
            .collect();
        files.sort();
        assert!(files.len() >= 12, "corpus too small: {}", files.len());
        files
    })
}

/// One change to a seed.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    SetLength(u32),
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for m in mutations {
        match *m {
            Mutation::FlipBit(at, bit) if !b.is_empty() => {
                let at = at % b.len();
                b[at] ^= 1 << (bit % 8);
            }
            Mutation::Truncate(at) => b.truncate(at % (b.len() + 1)),
            Mutation::Insert(at, v) => b.insert(at % (b.len() + 1), v),
            Mutation::SetLength(len) if b.len() >= 4 => b[..4].copy_from_slice(&len.to_le_bytes()),
            _ => {}
        }
    }
    b
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::FlipBit(a, b)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(a, v)| Mutation::Insert(a, v)),
        1 => prop_oneof![Just(0u32), 0u32..64, Just(MAX_FRAME_LEN as u32), any::<u32>()]
            .prop_map(Mutation::SetLength),
    ]
}

fn mutated_seed() -> impl Strategy<Value = Vec<u8>> {
    (
        0..corpus().len(),
        proptest::collection::vec(arb_mutation(), 1..6),
    )
        .prop_map(|(i, m)| mutate(&corpus()[i].1, &m))
}

fn config() -> ProptestConfig {
    let cases = std::env::var("SANDPIT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------ tests

#[test]
fn fuzz_corpus_replays_as_labelled() {
    for (name, data) in corpus() {
        let (frames, end) = read_all(data.as_slice());
        if name.starts_with("ok_") {
            assert!(end.is_none(), "{name}: {end:?}");
            assert!(!frames.is_empty(), "{name}: no frame");
            assert_eq!(&encode_all(&frames), data, "{name}: does not re-encode");
        } else {
            assert!(name.starts_with("bad_"), "{name}: neither ok_ nor bad_");
            assert!(end.is_some(), "{name}: decoded without error: {frames:?}");
        }
        check_arbitrary(data).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn fuzz_oversize_headers_are_refused_before_allocating() {
    for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let mut data = len.to_le_bytes().to_vec();
        data.push(1);
        let (r, peak) = peak_during(|| read_frame(&mut data.as_slice()));
        assert!(
            matches!(r, Err(WireError::TooLarge(n)) if n == len as usize),
            "{r:?}"
        );
        assert!(peak < SLACK, "{peak} bytes held for a refused header");
    }
}

#[test]
fn fuzz_element_counts_cannot_amplify_allocations() {
    // Bodies that announce as many empty elements as they can hold (4 bytes
    // each): argv, env and the files of an Init (tags 3 and 23).
    for tag in [3u8, 23] {
        for n in [1usize << 10, 1 << 16] {
            let mut body = vec![tag];
            body.extend_from_slice(&(n as u32).to_le_bytes());
            body.resize(5 + 4 * n, 0);
            let (_, peak) = peak_during(|| decode(&body));
            assert!(
                peak <= AMPLIFICATION * body.len() + SLACK,
                "tag {tag}, {n} elements: {peak} bytes for a body of {}",
                body.len()
            );
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_arbitrary(&data)?;
    }

    #[test]
    fn fuzz_arbitrary_bodies_behind_a_valid_header(
        tag in prop_oneof![1u8..=27, any::<u8>()],
        payload in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut data = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
        data.push(tag);
        data.extend_from_slice(&payload);
        check_arbitrary(&data)?;
    }

    #[test]
    fn fuzz_mutated_corpus(data in mutated_seed()) {
        check_arbitrary(&data)?;
    }

    #[test]
    fn fuzz_valid_frames_round_trip(frame in arb_frame()) {
        let mut buf = Vec::new();
        encode(&frame, &mut buf);
        prop_assert_eq!(decode(&buf[4..])?, frame.clone());
        prop_assert_eq!(read_frame(&mut buf.as_slice())?, Some(frame));
    }

    #[test]
    fn fuzz_split_streams_decode_to_the_same_frames(
        frames in proptest::collection::vec(arb_frame(), 1..6),
        sizes in proptest::collection::vec(1usize..32, 1..8),
    ) {
        let data = encode_all(&frames);
        let reader = Chunked { data: &data, sizes: &sizes, reads: 0 };
        let (read, end) = read_all(reader);
        prop_assert!(end.is_none(), "{:?}", end);
        prop_assert_eq!(&read, &frames);
        let (stepped, end) = step_all(&data, &sizes);
        prop_assert!(end.is_none(), "{:?}", end);
        prop_assert_eq!(&stepped, &frames);
        // Cut short anywhere inside a frame, a stream ends in `Truncated`.
        let cut = sizes[0] % data.len();
        let boundaries: Vec<usize> = frames
            .iter()
            .scan(0, |at, f| {
                *at += encode_all(std::slice::from_ref(f)).len();
                Some(*at)
            })
            .collect();
        if cut > 0 && !boundaries.contains(&cut) {
            let (_, end) = read_all(&data[..cut]);
            prop_assert!(matches!(end, Some(WireError::Truncated)), "cut at {}: {:?}", cut, end);
        }
    }
}
