//! A pool of reusable threads for the agent's short jobs (one connection
//! each). Creating a thread (stack mapping, guard page, TLS,
//! signal stack) costs tens of microseconds, a visible share of a
//! sub-millisecond exec round trip; a parked worker picks a job up in a few.
//!
//! Workers are created on demand, so concurrency is never limited by the
//! pool; at most [`MAX_IDLE`] of them stay parked between jobs.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Parked workers kept for the next jobs; more than a burst of execs needs.
const MAX_IDLE: usize = 16;
/// Jobs are short-lived but may recurse into reads of big frames.
const STACK_SIZE: usize = 256 * 1024;

/// Idle workers, each waiting on its own channel.
static IDLE: OnceLock<Mutex<Vec<Sender<Job>>>> = OnceLock::new();

fn idle() -> &'static Mutex<Vec<Sender<Job>>> {
    IDLE.get_or_init(|| Mutex::new(Vec::new()))
}

/// Runs `job` on a parked worker, or on a new thread when none is idle.
pub(crate) fn spawn(job: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let mut job: Job = Box::new(job);
    loop {
        let worker = idle().lock().unwrap_or_else(|e| e.into_inner()).pop();
        match worker {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                // That worker exited (its job panicked): try the next one.
                Err(mpsc::SendError(back)) => job = back,
            },
            None => break,
        }
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("agent-worker".into())
        .stack_size(STACK_SIZE)
        .spawn(move || worker(job, tx, &rx))?;
    Ok(())
}

/// Runs `first`, then parks itself in the idle list and runs whatever it is
/// handed, until the list is full.
fn worker(first: Job, tx: Sender<Job>, rx: &Receiver<Job>) {
    first();
    loop {
        {
            let mut idle = idle().lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(tx.clone());
        }
        match rx.recv() {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn jobs_run_and_workers_are_reused() {
        let ran = Arc::new(AtomicUsize::new(0));
        let mut names = Vec::new();
        for _ in 0..5 {
            let r = Arc::clone(&ran);
            let (tx, rx) = mpsc::channel();
            spawn(move || {
                r.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(std::thread::current().id());
            })
            .unwrap();
            names.push(rx.recv().unwrap());
            // Let the worker park itself again before the next job.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 5);
        // Sequential jobs land on the worker the first one created (other
        // tests may add workers, so only require reuse, not a single one).
        names.sort_by_key(|id| format!("{id:?}"));
        names.dedup();
        assert!(names.len() < 5, "no worker was reused: {names:?}");
    }

    #[test]
    fn concurrent_jobs_are_not_serialised() {
        // Two jobs that each wait for the other: a pool that ran them one
        // after the other would deadlock.
        let (a_tx, a_rx) = mpsc::channel::<()>();
        let (b_tx, b_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done2 = done_tx.clone();
        spawn(move || {
            a_tx.send(()).unwrap();
            b_rx.recv().unwrap();
            done_tx.send(()).unwrap();
        })
        .unwrap();
        spawn(move || {
            a_rx.recv().unwrap();
            b_tx.send(()).unwrap();
            done2.send(()).unwrap();
        })
        .unwrap();
        done_rx.recv().unwrap();
        done_rx.recv().unwrap();
    }

    #[test]
    fn a_panicking_job_does_not_break_the_pool() {
        spawn(|| panic!("boom")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // The pool still works afterwards.
        let (tx, rx) = mpsc::channel();
        spawn(move || tx.send(7).unwrap()).unwrap();
        assert_eq!(rx.recv().unwrap(), 7);
    }
}
