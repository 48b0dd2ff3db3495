//! Blocking work (SQLite commits, log file appends) moved off tokio's
//! workers, in batches.
//!
//! An [`Offload`] owns a blocking resource and a queue of jobs for it. The
//! first job pushed onto an idle queue starts one drain on tokio's blocking
//! pool; the drain takes every queued job at once, hands the batch to the
//! resource, and repeats until the queue is empty. So at most one thread
//! touches the resource at a time, jobs are done in the order they were
//! pushed, concurrent callers share one batch (one SQLite transaction for
//! many record changes), and no thread sits idle when there is nothing to
//! do (a parked drain thread would also stop tokio's paused test clock from
//! auto-advancing: a running `spawn_blocking` task holds it, as it should
//! while real work is in flight).
//!
//! Jobs carry their own way of answering (typically a `oneshot::Sender`),
//! so the resource's handler decides what each caller learns.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// Does a batch of jobs on the resource.
pub(crate) trait Batch<R>: Sized + Send + 'static {
    /// Runs on a blocking thread, with the resource to itself.
    fn run(resource: &mut R, jobs: Vec<Self>);
}

struct Queue<J> {
    jobs: Vec<J>,
    draining: bool,
}

struct Shared<R, J> {
    queue: Mutex<Queue<J>>,
    resource: Mutex<R>,
}

/// A resource used from async code through a queue drained on the blocking
/// pool. Cheap to clone.
pub(crate) struct Offload<R, J> {
    shared: Arc<Shared<R, J>>,
}

impl<R, J> Clone for Offload<R, J> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<R, J> fmt::Debug for Offload<R, J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offload").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a batch leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<R: Send + 'static, J: Batch<R>> Offload<R, J> {
    /// Takes ownership of `resource`.
    pub(crate) fn new(resource: R) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    jobs: Vec::new(),
                    draining: false,
                }),
                resource: Mutex::new(resource),
            }),
        }
    }

    /// Queues `job`; never blocks. Must be called within a tokio runtime.
    /// Jobs pushed by one caller run in the order they were pushed.
    pub(crate) fn push(&self, job: J) {
        let start = {
            let mut q = lock(&self.shared.queue);
            q.jobs.push(job);
            !std::mem::replace(&mut q.draining, true)
        };
        if start {
            let shared = Arc::clone(&self.shared);
            // If the runtime is shutting down the drain never runs: the
            // jobs are dropped, and with them their answer channels, so
            // every waiter learns that its job was not done.
            tokio::task::spawn_blocking(move || drain(&shared));
        }
    }
}

fn drain<R, J: Batch<R>>(shared: &Shared<R, J>) {
    let mut resource = lock(&shared.resource);
    loop {
        let jobs = {
            let mut q = lock(&shared.queue);
            if q.jobs.is_empty() {
                q.draining = false;
                return;
            }
            std::mem::take(&mut q.jobs)
        };
        J::run(&mut resource, jobs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    struct Append(u32, oneshot::Sender<usize>);

    impl Batch<Vec<Vec<u32>>> for Append {
        fn run(batches: &mut Vec<Vec<u32>>, jobs: Vec<Self>) {
            batches.push(jobs.iter().map(|j| j.0).collect());
            let n = jobs.len();
            for j in jobs {
                let _ = j.1.send(n);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_run_in_order_in_batches() {
        let off: Offload<Vec<Vec<u32>>, Append> = Offload::new(Vec::new());
        let mut waits = Vec::new();
        for i in 0..200 {
            let (tx, rx) = oneshot::channel();
            off.push(Append(i, tx));
            waits.push(rx);
        }
        for w in waits {
            assert!(w.await.unwrap() >= 1);
        }
        let batches = lock(&off.shared.resource).clone();
        let all: Vec<u32> = batches.iter().flatten().copied().collect();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
        // Pushed faster than a thread starts: fewer batches than jobs.
        assert!(batches.len() < 200, "{} batches", batches.len());
        // Idle again: the next job starts a new drain.
        let (tx, rx) = oneshot::channel();
        off.push(Append(7, tx));
        assert_eq!(rx.await.unwrap(), 1);
    }
}
