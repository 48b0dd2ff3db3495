//! An HTTP proxy in front of a registry: request logs, a token server,
//! delays, cuts, tampering.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Clone, Default)]
pub(crate) struct ProxyOptions {
    /// Answer 401 with a Bearer challenge unless the request carries the
    /// token `/token` hands out.
    pub(crate) bearer: bool,
    /// Cut blob responses after this many body bytes.
    pub(crate) cut_blobs_after: Option<usize>,
    /// Wait this long before forwarding each request.
    pub(crate) delay: Option<Duration>,
    /// Redirect blob requests to this base URL (a CDN, say).
    pub(crate) redirect_blobs: Option<String>,
    /// Flip a bit of the responses to paths containing this.
    pub(crate) tamper: Option<String>,
}

pub(crate) const TOKEN: &str = "sandpit-test-token";

/// An HTTP/1.1 proxy in front of a registry, one request per connection:
/// logs request lines, can play a token server, delay or cut responses.
pub(crate) struct Proxy {
    pub(crate) addr: String,
    pub(crate) requests: Arc<Mutex<Vec<String>>>,
    pub(crate) token_queries: Arc<Mutex<Vec<String>>>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Proxy {
    pub(crate) fn start(upstream: &str, options: ProxyOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let token_queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, me) = (upstream.to_owned(), addr.clone());
        let (r, t, s) = (requests.clone(), token_queries.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (upstream, me, options) = (upstream.clone(), me.clone(), options.clone());
                let (r, t) = (r.clone(), t.clone());
                thread::spawn(move || {
                    let _ = serve(conn, &upstream, &me, &options, &r, &t);
                });
            }
        });
        Self {
            addr,
            requests,
            token_queries,
            stop,
        }
    }

    pub(crate) fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    pub(crate) fn count(&self, pattern: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains(pattern))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

pub(crate) fn read_head(reader: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

pub(crate) fn respond(mut conn: &TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.write_all(body);
}

pub(crate) fn serve(
    conn: TcpStream,
    upstream: &str,
    me: &str,
    options: &ProxyOptions,
    requests: &Mutex<Vec<String>>,
    token_queries: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let head = read_head(&mut reader)?;
    let request_line = head[0].clone();
    let has_auth = head[1..]
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("authorization:"));
    let mut logged = request_line.clone();
    if has_auth {
        logged.push_str(" [auth]");
    }
    let agent = format!("user-agent: sandpit/{}", env!("CARGO_PKG_VERSION"));
    if head[1..].iter().any(|h| h.eq_ignore_ascii_case(&agent)) {
        logged.push_str(" [sandpit]");
    }
    requests.lock().unwrap().push(logged);
    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    if let Some(query) = path.strip_prefix("/token?") {
        token_queries.lock().unwrap().push(query.to_owned());
        respond(
            &conn,
            "200 OK",
            &["Content-Type: application/json".into()],
            format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#).as_bytes(),
        );
        return Ok(());
    }
    if options.bearer {
        let authorized = head[1..]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
        if !authorized {
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|p| p.split_once("/manifests/").or(p.split_once("/blobs/")))
                .map(|(repo, _)| repo.to_owned())
                .unwrap_or_default();
            respond(
                &conn,
                "401 Unauthorized",
                &[
                    "Content-Type: application/json".into(),
                    format!(
                        r#"Www-Authenticate: Bearer realm="http://{me}/token",service="sandpit-test",scope="repository:{repo}:pull""#
                    ),
                ],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
            return Ok(());
        }
    }
    if let Some(target) = &options.redirect_blobs {
        if path.contains("/blobs/") {
            respond(
                &conn,
                "307 Temporary Redirect",
                &[format!("Location: {target}{path}")],
                b"",
            );
            return Ok(());
        }
    }
    if let Some(delay) = options.delay {
        thread::sleep(delay);
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut out = format!("{request_line}\r\n");
    for h in &head[1..] {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes())?;
    let mut up_reader = BufReader::new(up);
    let response_head = read_head(&mut up_reader)?;
    let mut out = String::new();
    for h in &response_head {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut conn_w = conn.try_clone()?;
    conn_w.write_all(out.as_bytes())?;
    let tamper = options
        .tamper
        .as_ref()
        .is_some_and(|pattern| path.contains(pattern.as_str()));
    match options.cut_blobs_after {
        _ if tamper => {
            // Same length, one bit flipped: only a digest check notices.
            let mut body = Vec::new();
            up_reader.read_to_end(&mut body)?;
            if let Some(last) = body.last_mut() {
                *last ^= 1;
            }
            conn_w.write_all(&body)?;
        }
        Some(n) if path.contains("/blobs/") => {
            let mut body = vec![0u8; n];
            let got = read_up_to(&mut up_reader, &mut body)?;
            conn_w.write_all(&body[..got])?;
            conn_w.flush()?;
            // Abrupt: the client sees a reset or an early end.
            conn.shutdown(Shutdown::Both)?;
        }
        _ => {
            std::io::copy(&mut up_reader, &mut conn_w)?;
        }
    }
    Ok(())
}

pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
