//! An in-memory transport for tests of code that talks to an agent
//! (feature `testing`): every connect makes a [`tokio::io::duplex`] pipe and
//! hands its other end to a [`DuplexListener`], where a fake agent serves
//! it. No socket, no file system.

use std::io;

use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use super::Connector;

/// Connects through in-memory pipes of `buffer` bytes each way.
#[derive(Debug, Clone)]
pub struct DuplexConnector {
    tx: mpsc::UnboundedSender<DuplexStream>,
    buffer: usize,
}

/// The agent's side: each connection's other end, in order.
#[derive(Debug)]
pub struct DuplexListener {
    rx: mpsc::UnboundedReceiver<DuplexStream>,
}

impl DuplexConnector {
    /// A connector and the listener its connections arrive at. Small
    /// buffers exercise backpressure.
    pub fn new(buffer: usize) -> (Self, DuplexListener) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx, buffer }, DuplexListener { rx })
    }
}

impl DuplexListener {
    /// The next connection; `None` once every connector is gone.
    pub async fn accept(&mut self) -> Option<DuplexStream> {
        self.rx.recv().await
    }
}

impl Connector for DuplexConnector {
    type Reader = ReadHalf<DuplexStream>;
    type Writer = WriteHalf<DuplexStream>;

    /// Refused (`ConnectionRefused`) once the listener is dropped, like a
    /// socket nobody listens on.
    async fn connect(&self) -> io::Result<(Self::Reader, Self::Writer)> {
        let (ours, theirs) = tokio::io::duplex(self.buffer);
        self.tx
            .send(theirs)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(tokio::io::split(ours))
    }
}
