//! The sandbox's main command: started once from `Init`, its stdout and stderr
//! kept in a bounded ring that hosts read (and follow) by offset.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sandpit_wire::{encode, ErrorKind, Frame, MainStatus, Signal, Usage, CHUNK_LEN};

use crate::creds::Creds;
use crate::reaper::{lock, ExitCell, Reaper};
use crate::spawn::{self, Command, SpawnError};
use crate::sys;

/// Bytes of output kept; older chunks are dropped first.
pub(crate) const RING_BYTES: usize = 16 << 20;
/// After the process exited, how long its pipes may stay silent before we
/// stop waiting for EOF (a background child may hold them open forever).
pub(crate) const EOF_GRACE: Duration = Duration::from_millis(250);
/// After the process exited, the longest we keep reading leftover output.
pub(crate) const EOF_CAP: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Chunk {
    offset: u64,
    stream: u8,
    time_ns: u64,
    data: Vec<u8>,
}

/// Output chunks over both streams, addressed by a running byte offset.
#[derive(Debug)]
pub(crate) struct Ring {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    cap: usize,
    /// First offset still held.
    start: u64,
    /// Offset after the last byte.
    end: u64,
}

impl Ring {
    /// An empty ring holding at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            chunks: VecDeque::new(),
            bytes: 0,
            cap,
            start: 0,
            end: 0,
        }
    }

    /// Appends a chunk, dropping the oldest ones beyond the cap.
    pub(crate) fn push(&mut self, stream: u8, time_ns: u64, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        let len = data.len();
        self.chunks.push_back(Chunk {
            offset: self.end,
            stream,
            time_ns,
            data,
        });
        self.end += len as u64;
        self.bytes += len;
        while self.bytes > self.cap && self.chunks.len() > 1 {
            let old = self.chunks.pop_front().expect("more than one chunk");
            self.bytes -= old.data.len();
            self.start = self.chunks.front().map_or(self.end, |c| c.offset);
        }
    }

    /// Frames from `*cursor` on (a `Gap` first if that was dropped), about
    /// `budget` bytes at most; advances the cursor.
    pub(crate) fn read_from(&self, cursor: &mut u64, budget: usize) -> Vec<Frame> {
        let mut frames = Vec::new();
        if *cursor < self.start {
            frames.push(Frame::Gap {
                from: *cursor,
                to: self.start,
            });
            *cursor = self.start;
        }
        let first = self
            .chunks
            .partition_point(|c| c.offset + c.data.len() as u64 <= *cursor);
        let mut sent = 0;
        for c in self.chunks.range(first..) {
            if sent >= budget {
                break;
            }
            let skip = cursor.saturating_sub(c.offset) as usize;
            let data = c.data[skip..].to_vec();
            sent += data.len();
            *cursor = c.offset + c.data.len() as u64;
            frames.push(Frame::MainChunk {
                offset: c.offset + skip as u64,
                stream: c.stream,
                time_ns: c.time_ns,
                data,
            });
        }
        frames
    }
}

#[derive(Debug)]
struct State {
    status: MainStatus,
    ring: Ring,
    /// No more output will come: the process exited and its pipes were drained.
    closed: bool,
    exit: Option<Arc<ExitCell>>,
}

/// The main command as the connections see it.
#[derive(Debug)]
pub(crate) struct Main {
    state: Mutex<State>,
    changed: Condvar,
}

impl Main {
    /// A main command that never runs: no argv, or `reason` why it failed.
    pub(crate) fn not_started(reason: Option<String>) -> Arc<Main> {
        Arc::new(Main {
            state: Mutex::new(State {
                status: reason.map_or(MainStatus::Idle, MainStatus::StartFailed),
                ring: Ring::new(0),
                closed: true,
                exit: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// Starts the main command with stdin on /dev/null and its output captured.
    pub(crate) fn start(
        reaper: &Reaper,
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        creds: &Creds,
    ) -> Arc<Main> {
        match Self::spawn(reaper, argv, env, cwd, creds) {
            Ok(main) => main,
            Err(e) => Main::not_started(Some(e.to_string())),
        }
    }

    fn spawn(
        reaper: &Reaper,
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        creds: &Creds,
    ) -> Result<Arc<Main>, SpawnError> {
        let os = |what| {
            move |e: io::Error| SpawnError::Os {
                what,
                desc: sys::io_desc(&e),
            }
        };
        let (out_r, out_w) = sys::pipe().map_err(os("pipe"))?;
        let (err_r, err_w) = sys::pipe().map_err(os("pipe"))?;
        // A pipe nobody writes reads as EOF, like /dev/null, when that is missing.
        let stdin: OwnedFd = match sys::open(c"/dev/null", libc::O_RDONLY) {
            Ok(fd) => fd,
            Err(_) => sys::pipe().map_err(os("pipe"))?.0,
        };
        let child = spawn::spawn(
            reaper,
            &Command {
                argv,
                env,
                cwd,
                stdio: [stdin.as_fd(), out_w.as_fd(), err_w.as_fd()],
                ctty: false,
                creds,
            },
        )?;
        drop((out_w, err_w, stdin));
        let main = Arc::new(Main {
            state: Mutex::new(State {
                status: MainStatus::Running {
                    pid: child.pid as u32,
                },
                ring: Ring::new(RING_BYTES),
                closed: false,
                exit: Some(Arc::clone(&child.exit)),
            }),
            changed: Condvar::new(),
        });
        let m = Arc::clone(&main);
        let exit = child.exit;
        let spawned = std::thread::Builder::new()
            .name("main-output".into())
            .stack_size(256 * 1024)
            .spawn(move || m.capture(out_r, err_r, &exit));
        if let Err(e) = spawned {
            // Without a reader the command would block on a full pipe: stop it.
            let _ = sys::kill(-child.pid, libc::SIGKILL);
            return Err(os("thread")(e));
        }
        Ok(main)
    }

    /// Reads both pipes into the ring. `Exited` is published once they are
    /// drained after the exit (or stayed silent for [`EOF_GRACE`], or
    /// [`EOF_CAP`] passed), so a host that saw it can read the complete output.
    /// Reading goes on after that while a background child still holds the
    /// pipes: closing them would kill a daemonised server with SIGPIPE.
    fn capture(&self, out: OwnedFd, err: OwnedFd, exit: &ExitCell) {
        let mut pipes = [Some(out), Some(err)];
        let mut exited_at: Option<Instant> = None;
        let mut published = false;
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            if exited_at.is_none() && exit.status().is_some() {
                exited_at = Some(Instant::now());
            }
            let drained = pipes.iter().all(Option::is_none);
            if let (Some(t), false) = (exited_at, published) {
                if drained || t.elapsed() > EOF_CAP {
                    self.publish_exit(exit);
                    published = true;
                }
            }
            if drained && published {
                return;
            }
            let mut fds = Vec::with_capacity(3);
            for p in pipes.iter().flatten() {
                fds.push(sys::pollfd(p.as_raw_fd(), libc::POLLIN));
            }
            if exited_at.is_none() {
                fds.push(sys::pollfd(exit.fd().as_raw_fd(), libc::POLLIN));
            }
            let timeout = match (exited_at, published) {
                (Some(_), false) => EOF_GRACE.as_millis() as i32,
                _ => -1,
            };
            match sys::poll(&mut fds, timeout) {
                Ok(0) => {
                    // Exited, and the pipes stayed silent: a background child holds them.
                    self.publish_exit(exit);
                    published = true;
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    if exited_at.is_some() && !published {
                        self.publish_exit(exit);
                    }
                    return;
                }
            }
            for (i, slot) in pipes.iter_mut().enumerate() {
                let Some(fd) = slot else { continue };
                let ready = fds.iter().any(|p| p.fd == fd.as_raw_fd() && p.revents != 0);
                if !ready {
                    continue;
                }
                match sys::read(fd.as_fd(), &mut buf) {
                    Ok(0) => *slot = None,
                    Ok(n) => {
                        let mut st = lock(&self.state);
                        st.ring.push(i as u8 + 1, sys::now_ns(), buf[..n].to_vec());
                        drop(st);
                        self.changed.notify_all();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => *slot = None,
                }
            }
        }
    }

    fn publish_exit(&self, exit: &ExitCell) {
        let Some(status) = exit.status() else { return };
        let mut st = lock(&self.state);
        st.status = MainStatus::Exited(status);
        st.closed = true;
        drop(st);
        self.changed.notify_all();
    }

    /// The status for `Pong`.
    pub(crate) fn status(&self) -> MainStatus {
        lock(&self.state).status.clone()
    }

    /// What the main process used, once its exit was published (the same
    /// moment `Pong` reports it).
    pub(crate) fn usage(&self) -> Option<Usage> {
        let st = lock(&self.state);
        match st.status {
            MainStatus::Exited(_) => st.exit.as_ref().and_then(|e| e.usage()),
            _ => None,
        }
    }

    /// Waits until `deadline` unless the main command ended (exited, or
    /// never started) first; returns its status if it did.
    pub(crate) fn wait_ended_until(&self, deadline: Instant) -> Option<MainStatus> {
        let ended =
            |s: &MainStatus| matches!(s, MainStatus::Exited(_) | MainStatus::StartFailed(_));
        let mut st = lock(&self.state);
        loop {
            if ended(&st.status) {
                return Some(st.status.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Signals the main command's process group.
    pub(crate) fn signal(&self, sig: Signal) -> Result<(), (ErrorKind, String)> {
        let st = lock(&self.state);
        let not_running = || {
            (
                ErrorKind::NotRunning,
                "main process is not running".to_string(),
            )
        };
        let MainStatus::Running { pid } = st.status else {
            return Err(not_running());
        };
        if st.exit.as_ref().is_some_and(|e| e.status().is_some()) {
            return Err(not_running());
        }
        let pid = pid as i32;
        // The group first (setsid made the command its leader); the process
        // itself if it moved to another group.
        let group = sys::kill(-pid, sig.number());
        let single = sys::kill(pid, sig.number());
        match (group, single) {
            (Ok(()), _) | (_, Ok(())) => Ok(()),
            (_, Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => Err((
                ErrorKind::InvalidArgument,
                format!("signal {}: invalid argument", sig.number()),
            )),
            (_, Err(_)) => Err(not_running()),
        }
    }

    /// Serves `MainOutput`: frames from `offset`, then `End`; with `follow`,
    /// `End` only once the process exited and its output was drained.
    pub(crate) fn serve_output(
        &self,
        stream: &UnixStream,
        offset: u64,
        follow: bool,
    ) -> io::Result<()> {
        const BATCH: usize = 1 << 20;
        let mut cursor = offset;
        let mut w = stream;
        loop {
            let (frames, end) = {
                let mut st = lock(&self.state);
                loop {
                    let frames = st.ring.read_from(&mut cursor, BATCH);
                    if !frames.is_empty() {
                        break (frames, false);
                    }
                    if !follow || st.closed {
                        break (frames, true);
                    }
                    st = self
                        .changed
                        .wait_timeout(st, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    // A quiet main command must not keep a departed host's thread.
                    if sys::peer_gone(stream.as_fd()) {
                        return Ok(());
                    }
                }
            };
            let mut buf = Vec::with_capacity(BATCH + 1024);
            for f in &frames {
                encode(f, &mut buf);
            }
            if end {
                encode(&Frame::End, &mut buf);
            }
            w.write_all(&buf)?;
            if end {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(frames: &[Frame]) -> Vec<(u64, u8, Vec<u8>)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::MainChunk {
                    offset,
                    stream,
                    data,
                    ..
                } => Some((*offset, *stream, data.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reads_from_any_offset_across_streams() {
        let mut r = Ring::new(100);
        r.push(1, 1, b"abc".to_vec());
        r.push(2, 2, b"de".to_vec());
        let mut c = 0;
        let f = r.read_from(&mut c, 1000);
        assert_eq!(data(&f), [(0, 1, b"abc".to_vec()), (3, 2, b"de".to_vec())]);
        assert_eq!(c, 5);
        let mut c = 2;
        assert_eq!(
            data(&r.read_from(&mut c, 1000)),
            [(2, 1, b"c".to_vec()), (3, 2, b"de".to_vec())]
        );
        let mut c = 5;
        assert!(r.read_from(&mut c, 1000).is_empty());
        let mut c = 9;
        assert!(r.read_from(&mut c, 1000).is_empty());
    }

    #[test]
    fn overflow_drops_oldest_and_reports_a_gap() {
        let mut r = Ring::new(10);
        for i in 0..5u8 {
            r.push(1, 0, vec![i; 4]);
        }
        // 20 bytes pushed, the last 8 kept.
        let mut c = 0;
        let f = r.read_from(&mut c, 1000);
        assert_eq!(f[0], Frame::Gap { from: 0, to: 12 });
        assert_eq!(data(&f), [(12, 1, vec![3; 4]), (16, 1, vec![4; 4])]);
        assert_eq!(c, 20);
    }

    #[test]
    fn budget_limits_a_batch() {
        let mut r = Ring::new(100);
        for _ in 0..5 {
            r.push(1, 0, vec![0; 10]);
        }
        let mut c = 0;
        assert_eq!(r.read_from(&mut c, 15).len(), 2);
        assert_eq!(c, 20);
    }
}
