//! Both directions of a proxied connection, with an idle timeout and the
//! sandbox's byte counters kept as the bytes flow.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::usage::SandboxUsage;

/// The sandbox's side of the connection: every read and write counts and
/// marks the connection active.
struct Tracked<'a> {
    inner: &'a mut TcpStream,
    usage: &'a SandboxUsage,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte either way.
    last: &'a AtomicU64,
}

impl Tracked<'_> {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Relaxed);
    }
}

impl AsyncRead for Tracked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.usage.add_out(n as u64);
            this.touch();
        }
        poll
    }
}

impl AsyncWrite for Tracked<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            if n > 0 {
                this.usage.add_in(n as u64);
                this.touch();
            }
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a spliced connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Both sides closed (or one failed).
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
}

/// Copies both ways between the sandbox's `client` and `upstream` until
/// both close, one fails, or nothing moves for `idle`.
pub(crate) async fn splice(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    usage: &SandboxUsage,
    idle: Duration,
    buffer: usize,
) -> End {
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let mut tracked = Tracked {
        inner: client,
        usage,
        epoch,
        last: &last,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut tracked, upstream, buffer, buffer);
    let watchdog = async {
        loop {
            let deadline = epoch + Duration::from_millis(last.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = copy => End::Closed,
        () = watchdog => End::Idle,
    }
}
