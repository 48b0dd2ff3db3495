//! The startup probe: run inside the sandbox by the agent, with Kubernetes'
//! timing, from the moment the main command started. Its verdict is kept for
//! the sandbox's whole life, so a host that asks again (a restarted daemon)
//! gets the same answer, or waits for the same probe.
//!
//! Checks run from inside: an exec probe is a command started like any exec
//! (the sandbox's user, environment, working directory and capabilities);
//! TCP and HTTP probes are connections from the agent to loopback in the
//! sandbox's network namespace. The host never connects into a sandbox.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sandpit_wire::{MainStatus, Probe, ProbeCheck, StartupState, MAX_PROBE_OUTPUT};

use crate::reaper::lock;
use crate::serve::Ctx;
use crate::spawn::{self, Command};
use crate::sys;

/// The sandbox's start, as decided (or not yet) by its probe.
#[derive(Debug)]
pub(crate) struct Startup {
    state: Mutex<Option<StartupState>>,
    changed: Condvar,
}

impl Startup {
    /// Decided already: no probe.
    pub(crate) fn ready() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Some(StartupState::Ready)),
            changed: Condvar::new(),
        })
    }

    /// Undecided until [`Startup::run`] decides.
    pub(crate) fn pending() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(None),
            changed: Condvar::new(),
        })
    }

    /// Runs `probe` on a thread of its own and records its verdict.
    pub(crate) fn run(ctx: Arc<Ctx>, probe: Probe) -> io::Result<()> {
        std::thread::Builder::new()
            .name("startup-probe".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let verdict = run_probe(&ctx, &probe);
                *lock(&ctx.startup.state) = Some(verdict);
                ctx.startup.changed.notify_all();
            })
            .map(drop)
    }

    /// The verdict, once there is one; `None` if the host behind `stream`
    /// hung up meanwhile (a quiet probe must not keep a departed host's
    /// thread).
    pub(crate) fn wait(&self, stream: &UnixStream) -> Option<StartupState> {
        let mut st = lock(&self.state);
        loop {
            if let Some(v) = &*st {
                return Some(v.clone());
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if st.is_none() && sys::peer_gone(stream.as_fd()) {
                return None;
            }
        }
    }
}

fn ended(status: &MainStatus) -> Option<String> {
    match status {
        MainStatus::Exited(s) => Some(format!(
            "main process exited with code {} before the probe succeeded",
            s.shell_code()
        )),
        MainStatus::StartFailed(why) => Some(format!("main command failed to start: {why}")),
        MainStatus::Idle | MainStatus::Running { .. } => None,
    }
}

/// Kubernetes' loop: the initial delay, then a check every period (from the
/// start of one to the start of the next), each bounded by the timeout;
/// `failure_threshold` failures in a row fail it, and so does the main
/// process ending first.
fn run_probe(ctx: &Ctx, probe: &Probe) -> StartupState {
    let ms = |v: u32| Duration::from_millis(v.into());
    let (period, timeout) = (ms(probe.period_ms.max(1)), ms(probe.timeout_ms.max(1)));
    let threshold = probe.failure_threshold.max(1);
    let mut last = String::new();
    let mut next = Instant::now() + ms(probe.initial_delay_ms);
    let mut failures = 0;
    loop {
        if let Some(why) = ctx.main.wait_ended_until(next).as_ref().and_then(ended) {
            return StartupState::Failed(match last.is_empty() {
                true => why,
                false => format!("{why}; last check: {last}"),
            });
        }
        next = Instant::now() + period;
        match check(ctx, &probe.check, timeout) {
            Ok(()) => return StartupState::Ready,
            Err(e) => last = e,
        }
        failures += 1;
        if failures >= threshold {
            return StartupState::Failed(format!(
                "{failures} consecutive checks failed; last: {last}"
            ));
        }
    }
}

/// One check: `Err` says what went wrong, output included (bounded).
fn check(ctx: &Ctx, check: &ProbeCheck, timeout: Duration) -> Result<(), String> {
    match check {
        ProbeCheck::Exec(argv) => check_exec(ctx, argv, timeout),
        ProbeCheck::Tcp { port } => connect(*port, timeout).map(drop),
        ProbeCheck::Http { port, path } => check_http(*port, path, timeout),
    }
}

/// Bytes as text for a reason: lossy UTF-8, its last [`MAX_PROBE_OUTPUT`]
/// bytes at most (the end of an error is where it says what broke),
/// trailing whitespace trimmed.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let tail = &bytes[bytes.len().saturating_sub(MAX_PROBE_OUTPUT)..];
    let text = String::from_utf8_lossy(tail);
    text.trim_end().to_owned()
}

fn check_exec(ctx: &Ctx, argv: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let os = |what: &str, e: io::Error| format!("exec: {what}: {}", sys::io_desc(&e));
    let (out_r, out_w) = sys::pipe().map_err(|e| os("pipe", e))?;
    let stdin: OwnedFd = sys::open(c"/dev/null", libc::O_RDONLY)
        .or_else(|_| sys::pipe().map(|p| p.0))
        .map_err(|e| os("stdin", e))?;
    let err_w = out_w.try_clone().map_err(|e| os("dup", e))?;
    let child = spawn::spawn(
        &ctx.reaper,
        &Command {
            argv,
            env: &ctx.env,
            cwd: &ctx.cwd,
            stdio: [stdin.as_fd(), out_w.as_fd(), err_w.as_fd()],
            ctty: false,
            creds: &ctx.creds,
        },
    )
    .map_err(|e| format!("exec: {e}"))?;
    drop((out_w, err_w, stdin));
    let mut output = Vec::new();
    let mut pipe = Some(out_r);
    let mut exited_at = None;
    let timed_out = loop {
        let now = Instant::now();
        if child.exit.status().is_some() {
            // Output a background child keeps writing is not waited for.
            let t = *exited_at.get_or_insert(now);
            if pipe.is_none() || now.duration_since(t) > Duration::from_millis(100) {
                break false;
            }
        }
        if now >= deadline {
            break true;
        }
        let wait = deadline.duration_since(now).min(Duration::from_millis(100));
        let mut fds = vec![sys::pollfd(child.exit.fd().as_raw_fd(), libc::POLLIN)];
        if let Some(p) = &pipe {
            fds.push(sys::pollfd(p.as_raw_fd(), libc::POLLIN));
        }
        if sys::poll(&mut fds, wait.as_millis() as i32).is_err() {
            continue;
        }
        if let (Some(p), Some(pf)) = (&pipe, fds.get(1)) {
            if pf.revents != 0 {
                match sys::read_append(p.as_fd(), &mut output, 16 * 1024) {
                    Ok(0) | Err(_) => pipe = None,
                    Ok(_) => {
                        // Keep the tail only: a chatty probe must not grow us.
                        if output.len() > 2 * MAX_PROBE_OUTPUT {
                            output.drain(..output.len() - MAX_PROBE_OUTPUT);
                        }
                    }
                }
            }
        }
    };
    if timed_out {
        let _ = sys::kill(-child.pid, libc::SIGKILL);
        let _ = sys::kill(child.pid, libc::SIGKILL);
        return Err(with_output(
            format!("exec timed out after {}", secs(timeout)),
            &output,
        ));
    }
    match child.exit.status().map(|s| s.shell_code()) {
        Some(0) => Ok(()),
        Some(code) => Err(with_output(
            format!("exec exited with code {code}"),
            &output,
        )),
        None => Err("exec: no exit status".into()),
    }
}

fn with_output(what: String, output: &[u8]) -> String {
    let text = excerpt(output);
    if text.is_empty() {
        what
    } else {
        format!("{what}: {text}")
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// Connects to `port` on loopback, IPv4 first, then IPv6 (a server bound to
/// `::1` only).
fn connect(port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, timeout) {
        Ok(s) => Ok(s),
        Err(e4) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v6, timeout)
                .map_err(|_| format!("tcp connect {v4}: {}", describe(&e4, timeout)))
        }
    }
}

fn describe(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("timed out after {}", secs(timeout))
        }
        _ => sys::io_desc(e),
    }
}

/// The most bytes of an HTTP response read.
const MAX_RESPONSE: usize = 64 * 1024;

fn check_http(port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let what = format!("http GET {path} on port {port}");
    let mut stream = connect(port, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let fail = |e: io::Error| format!("{what}: {}", describe(&e, timeout));
    stream.set_write_timeout(Some(left())).map_err(fail)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: sandpit-probe/1\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(fail)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(left())).map_err(fail)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                if response.len() >= MAX_RESPONSE {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A status line is all we need: a server that keeps the
            // connection open after it is judged by what it sent.
            Err(_) if head_complete(&response) => break,
            Err(e) => return Err(fail(e)),
        }
    }
    let (status, body) = parse_response(&response)
        .ok_or_else(|| with_output(format!("{what}: not an HTTP response"), &response))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(with_output(format!("{what}: status {status}"), body))
    }
}

fn head_complete(response: &[u8]) -> bool {
    response.windows(4).any(|w| w == b"\r\n\r\n")
}

/// The status code and the body (as much of it as arrived).
fn parse_response(response: &[u8]) -> Option<(u16, &[u8])> {
    let line_end = response.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&response[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    let status = code.parse().ok()?;
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |i| &response[i + 4..]);
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn responses_are_parsed_by_status_line() {
        let r = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy";
        assert_eq!(parse_response(r), Some((503, &b"busy"[..])));
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n"),
            Some((200, &b""[..]))
        );
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_response(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(parse_response(b"no line end"), None);
    }

    #[test]
    fn excerpts_keep_the_tail_and_trim() {
        assert_eq!(excerpt(b"not ready\n\n"), "not ready");
        let long = [b"a".repeat(10_000), b"END".to_vec()].concat();
        let e = excerpt(&long);
        assert_eq!(e.len(), MAX_PROBE_OUTPUT);
        assert!(e.ends_with("aEND"));
        assert_eq!(excerpt(&[0xff, b'x']), "\u{fffd}x");
    }

    #[test]
    fn tcp_checks_connect_to_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(connect(port, Duration::from_secs(1)).is_ok());
        drop(l);
        let e = connect(port, Duration::from_secs(1)).unwrap_err();
        assert_eq!(
            e,
            format!("tcp connect 127.0.0.1:{port}: connection refused")
        );
    }

    fn serve_once(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; 4096];
            let n = s.read(&mut req).unwrap();
            req.truncate(n);
            s.write_all(answer).unwrap();
            req
        });
        (port, t)
    }

    #[test]
    fn http_checks_judge_the_status() {
        let t = Duration::from_secs(2);
        let (port, server) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(check_http(port, "/healthz", t), Ok(()));
        let req = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("Host: localhost:{port}\r\n")),
            "{req}"
        );

        let (port, server) = serve_once(b"HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n");
        assert_eq!(check_http(port, "/", t), Ok(()));
        server.join().unwrap();

        let (port, server) = serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\nwarming up\n");
        assert_eq!(
            check_http(port, "/ready", t).unwrap_err(),
            format!("http GET /ready on port {port}: status 503: warming up")
        );
        server.join().unwrap();

        let (port, server) = serve_once(b"garbage");
        let e = check_http(port, "/", t).unwrap_err();
        assert_eq!(
            e,
            format!("http GET / on port {port}: not an HTTP response: garbage")
        );
        server.join().unwrap();
    }

    #[test]
    fn http_checks_time_out() {
        // Accepts (the kernel's backlog does) but never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let started = Instant::now();
        let e = check_http(port, "/", Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            e,
            format!("http GET / on port {port}: timed out after 0.3 s")
        );
        drop(l);
    }
}
