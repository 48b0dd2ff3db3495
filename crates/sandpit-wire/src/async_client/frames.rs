//! Frames over tokio's `AsyncRead` / `AsyncWrite`.
//!
//! The reader keeps a partly read frame in its own state, so that a call
//! cancelled between two reads (its future dropped by a `select!` or a
//! timeout) loses nothing: each await point is a single `read` or
//! `read_buf`, which are cancel-safe, and whatever they returned is stored
//! before the next one. The writer likewise keeps the frame it is sending,
//! so that a cancelled send never leaves half a frame on the connection:
//! the next send finishes it first.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::codec::data_header;
use crate::{
    body_len, decode, encode, tail_prefix, with_tail, Frame, WireError, CHUNK_LEN, MAX_TAIL_PREFIX,
};

/// Length, tag and the longest fixed fields before a frame's raw bytes.
const HEAD: usize = 5 + MAX_TAIL_PREFIX;

/// A frame being read.
#[derive(Debug)]
pub(super) struct FrameState {
    head: [u8; HEAD],
    /// Bytes of `head` read so far.
    have: usize,
    /// The raw bytes of a tail frame, or tag and payload of any other.
    data: Vec<u8>,
}

impl FrameState {
    pub(super) fn new() -> Self {
        Self {
            head: [0; HEAD],
            have: 0,
            data: Vec::new(),
        }
    }

    /// Reads the rest of the current frame. `Ok(None)`: the peer closed the
    /// connection between frames. After an error the state is reset (the
    /// connection is unusable anyway).
    pub(super) async fn read<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, WireError> {
        let got = self.step(r).await;
        if got.is_err() {
            *self = Self::new();
        }
        got
    }

    async fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
        upto: usize,
    ) -> Result<(), WireError> {
        while self.have < upto {
            match r.read(&mut self.head[self.have..upto]).await? {
                0 => return Err(WireError::Truncated),
                n => self.have += n,
            }
        }
        Ok(())
    }

    async fn step<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<Frame>, WireError> {
        if self.have == 0 {
            match r.read(&mut self.head[..4]).await? {
                0 => return Ok(None),
                n => self.have = n,
            }
        }
        self.fill(r, 4).await?;
        // Hostile input: bounded before anything is allocated.
        let len = body_len([self.head[0], self.head[1], self.head[2], self.head[3]])?;
        if len == 0 {
            return Err(WireError::Malformed("short payload"));
        }
        self.fill(r, 5).await?;
        let tag = self.head[4];
        let (fixed, want) = match tail_prefix(tag) {
            Some(p) if len > p => (5 + p, len - 1 - p),
            Some(_) => return Err(WireError::Malformed("short payload")),
            // Tag and payload, in one buffer for `decode`.
            None => (5, len),
        };
        self.fill(r, fixed).await?;
        if self.data.is_empty() {
            self.data.reserve_exact(want);
            if tail_prefix(tag).is_none() {
                self.data.push(tag);
            }
        }
        while self.data.len() < want {
            let left = (want - self.data.len()) as u64;
            // Into the spare capacity: no zeroing, and a big frame goes
            // from the socket straight into its own buffer.
            if (&mut *r).take(left).read_buf(&mut self.data).await? == 0 {
                return Err(WireError::Truncated);
            }
        }
        let data = std::mem::take(&mut self.data);
        self.have = 0;
        match tail_prefix(tag) {
            Some(_) => with_tail(tag, &self.head[5..fixed], data).map(Some),
            None => decode(&data).map(Some),
        }
    }
}

/// Reads one frame. `Ok(None)` means the peer closed the connection cleanly
/// between frames. Hostile input is bounded: the length is checked against
/// [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) ([`body_len`]) before anything
/// is allocated, and output or data bytes are read straight into the
/// frame's own buffer.
///
/// Wrap a socket in a [`BufReader`]: a frame takes up to four reads. Not
/// cancel-safe (the part of a frame already read is lost with the future);
/// the client's streams are.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    FrameState::new().read(r).await
}

/// Writes one frame with a single `write_all`, so frames of tasks sharing a
/// writer (behind a lock) never interleave. Nothing is flushed: with a
/// buffered writer, flush at message boundaries.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let mut buf = Vec::with_capacity(64);
    encode(frame, &mut buf);
    w.write_all(&buf).await?;
    Ok(())
}

/// The reading half of an agent connection.
#[derive(Debug)]
pub(super) struct FrameReader<R> {
    inner: BufReader<R>,
    state: FrameState,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(r: R) -> Self {
        Self {
            // Room for one whole output frame, as the agent sends them.
            inner: BufReader::with_capacity(CHUNK_LEN + 64, r),
            state: FrameState::new(),
        }
    }

    /// The next frame; cancel-safe.
    pub(super) async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        self.state.read(&mut self.inner).await
    }

    pub(super) fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }
}

/// The writing half of an agent connection: one buffer, reused for every
/// frame, sent with as many writes as the transport needs.
#[derive(Debug)]
pub(super) struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` is sent.
    sent: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(super) fn new(w: W) -> Self {
        Self {
            inner: w,
            buf: Vec::new(),
            sent: 0,
        }
    }

    /// Sends what is left of the buffer; cancel-safe (`write` is).
    async fn drain(&mut self) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match self.inner.write(&self.buf[self.sent..]).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => self.sent += n,
            }
        }
        Ok(())
    }

    /// Finishes a frame an earlier, cancelled call left half sent, then
    /// starts a new one in the buffer.
    async fn begin(&mut self) -> io::Result<&mut Vec<u8>> {
        self.drain().await?;
        self.buf.clear();
        self.sent = 0;
        Ok(&mut self.buf)
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.drain().await?;
        self.inner.flush().await
    }

    /// Sends one frame.
    pub(super) async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        encode(frame, self.begin().await?);
        self.finish().await
    }

    /// Sends a frame of raw bytes (`Stdin`, `Data`) from a slice: one copy,
    /// into the reused buffer.
    pub(super) async fn send_bytes(&mut self, tag: u8, data: &[u8]) -> io::Result<()> {
        let buf = self.begin().await?;
        buf.extend_from_slice(&data_header(tag, data.len()));
        buf.extend_from_slice(data);
        self.finish().await
    }

    pub(super) fn get_ref(&self) -> &W {
        &self.inner
    }
}

/// Runs `f`, failing with `TimedOut` after `limit` (no timer without one).
pub(super) async fn within<T, E: From<io::Error>>(
    limit: Option<Duration>,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match limit {
        None => f.await,
        Some(d) => match tokio::time::timeout(d, f).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut).into()),
        },
    }
}
