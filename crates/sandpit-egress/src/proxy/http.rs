//! The host of the first HTTP/1 request on a connection, from its `Host`
//! header (or its absolute-form target), read without rewriting anything:
//! the proxy forwards the bytes as they came.

use crate::access::host_name;
use crate::proxy::sni::Parsed;
use crate::usage::ProxyRefusal;

/// Headers a request head may have.
const MAX_HEADERS: usize = 64;

/// Where the request head ending lies in `buf`, looking from `from` on
/// (so a head trickling in is scanned once, not once per read): the
/// offset just past the blank line. Bare LF line ends are accepted.
pub(crate) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// The host the request head in `buf` (complete: see [`head_end`]) is
/// for, normalised by [`host_name`].
pub(crate) fn request_host(head: &[u8]) -> Result<Parsed<String>, ProxyRefusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(Parsed::Incomplete(head.len() + 1)),
        Err(httparse::Error::TooManyHeaders) => return Err(ProxyRefusal::TooLarge),
        Err(_) => return Err(ProxyRefusal::Malformed),
    }
    if req.method == Some("CONNECT") {
        return Err(ProxyRefusal::Malformed);
    }
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let header = hosts.next().map(|h| h.value);
    if hosts.next().is_some() {
        return Err(ProxyRefusal::Malformed);
    }
    // An absolute-form target wins over Host at the origin (RFC 9112
    // 3.2.2): it must name the same host, or the two could disagree.
    let target = req.path.unwrap_or("");
    let absolute = strip_scheme(target).map(|rest| {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        &rest.as_bytes()[..end]
    });
    let authority = match (header, absolute) {
        (Some(h), Some(a)) if !strip_port(h).eq_ignore_ascii_case(strip_port(a)) => {
            return Err(ProxyRefusal::Malformed);
        }
        (Some(h), _) => h,
        (None, Some(a)) => a,
        (None, None) => return Err(ProxyRefusal::NoName),
    };
    let host = strip_port(authority.trim_ascii());
    if host.is_empty() {
        return Err(ProxyRefusal::NoName);
    }
    host_name(host)
        .map(Parsed::Done)
        .ok_or(ProxyRefusal::BadName)
}

fn strip_scheme(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")).then_some(rest)
}

/// `authority` without `:port` (userinfo is refused by [`host_name`]).
fn strip_port(authority: &[u8]) -> &[u8] {
    match authority.iter().rposition(|&b| b == b':') {
        Some(i) if authority[i + 1..].iter().all(u8::is_ascii_digit) => &authority[..i],
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(req: &str) -> Result<Parsed<String>, ProxyRefusal> {
        let end = head_end(req.as_bytes(), 0).expect("a complete head");
        request_host(&req.as_bytes()[..end])
    }

    #[test]
    fn finds_the_head_end_incrementally() {
        let req = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\nbody";
        for split in 0..req.len() {
            let found = head_end(&req[..split], 0).or_else(|| head_end(req, split));
            assert_eq!(found, Some(req.len() - 4), "{split}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
    }

    #[test]
    fn reads_the_host() {
        let done = |s: &str| Ok(Parsed::Done(s.to_owned()));
        assert_eq!(
            host("GET / HTTP/1.1\r\nHost: API.test\r\n\r\n"),
            done("api.test")
        );
        assert_eq!(
            host("GET / HTTP/1.1\r\nhost: api.test:80\r\n\r\n"),
            done("api.test")
        );
        assert_eq!(
            host("GET http://api.test/x HTTP/1.1\r\nHost: api.test\r\n\r\n"),
            done("api.test")
        );
        assert_eq!(
            host("GET http://api.test:80/x HTTP/1.0\r\n\r\n"),
            done("api.test")
        );
    }

    #[test]
    fn refuses_ambiguity_and_literals() {
        let cases = [
            ("GET / HTTP/1.0\r\n\r\n", ProxyRefusal::NoName),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", ProxyRefusal::NoName),
            (
                "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
                ProxyRefusal::Malformed,
            ),
            (
                "GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                ProxyRefusal::Malformed,
            ),
            (
                "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n",
                ProxyRefusal::Malformed,
            ),
            (
                "GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
                ProxyRefusal::BadName,
            ),
            (
                "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
                ProxyRefusal::BadName,
            ),
            (
                "GET / HTTP/1.1\r\nHost: user@a.test\r\n\r\n",
                ProxyRefusal::BadName,
            ),
            ("\x16\x03\x01\x00\x05hello\r\n\r\n", ProxyRefusal::Malformed),
        ];
        for (req, want) in cases {
            assert_eq!(host(req), Err(want), "{req:?}");
        }
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..100 {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("Host: a.test\r\n\r\n");
        assert_eq!(host(&many), Err(ProxyRefusal::TooLarge));
    }
}
