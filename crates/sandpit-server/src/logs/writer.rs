//! [`LogWriter`]: a [`LogSink`] used from async code. Every call becomes a
//! job for the sink on tokio's blocking pool ([`crate::offload`]), in the
//! order the calls were made, so a sandbox's chunks are stored in order and
//! [`LogWriter::finish`] returns once everything before it was stored.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{LogSink, OutputChunk};
use crate::model::SandboxId;
use crate::offload::{Batch, Offload};

/// The async front of a [`LogSink`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct LogWriter {
    offload: Offload<Arc<dyn LogSink>, Job>,
}

pub(crate) enum Job {
    Append(SandboxId, OutputChunk, oneshot::Sender<()>),
    ResumeOffset(SandboxId, oneshot::Sender<u64>),
    Finish(SandboxId, oneshot::Sender<()>),
    Remove(SandboxId, oneshot::Sender<()>),
}

impl Batch<Arc<dyn LogSink>> for Job {
    fn run(sink: &mut Arc<dyn LogSink>, jobs: Vec<Self>) {
        // Answers go to callers that may have given up: ignored then.
        for job in jobs {
            match job {
                Job::Append(id, chunk, done) => {
                    sink.append(&id, &chunk);
                    let _ = done.send(());
                }
                Job::ResumeOffset(id, done) => {
                    let _ = done.send(sink.resume_offset(&id));
                }
                Job::Finish(id, done) => {
                    sink.finish(&id);
                    let _ = done.send(());
                }
                Job::Remove(id, done) => {
                    sink.remove(&id);
                    let _ = done.send(());
                }
            }
        }
    }
}

impl LogWriter {
    /// Takes `sink` over.
    pub fn new(sink: Arc<dyn LogSink>) -> Self {
        Self {
            offload: Offload::new(sink),
        }
    }

    /// Stores a chunk; returns once it is stored, so a follower that awaits
    /// each chunk stops reading the agent while the disk is slow (the
    /// agent's bounded buffer then drops the oldest output, never the
    /// daemon's memory growing).
    pub async fn append(&self, id: &SandboxId, chunk: OutputChunk) {
        let (done, rx) = oneshot::channel();
        self.offload.push(Job::Append(id.clone(), chunk, done));
        let _ = rx.await;
    }

    /// The offset to resume following from after a restart.
    pub async fn resume_offset(&self, id: &SandboxId) -> u64 {
        let (done, rx) = oneshot::channel();
        self.offload.push(Job::ResumeOffset(id.clone(), done));
        rx.await.unwrap_or(0)
    }

    /// The sandbox's output ended; returns once everything appended before
    /// is stored (a reader that sees the sandbox terminal then finds all of
    /// it).
    pub async fn finish(&self, id: &SandboxId) {
        let (done, rx) = oneshot::channel();
        self.offload.push(Job::Finish(id.clone(), done));
        let _ = rx.await;
    }

    /// Drops what was kept of the sandbox (its record was collected).
    pub async fn remove(&self, id: &SandboxId) {
        let (done, rx) = oneshot::channel();
        self.offload.push(Job::Remove(id.clone(), done));
        let _ = rx.await;
    }
}
