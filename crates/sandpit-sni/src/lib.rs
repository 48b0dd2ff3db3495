//! The server name of a TLS ClientHello, read from hostile bytes without
//! terminating TLS: records reassembled (a ClientHello may span several),
//! the handshake header's length checked against the bound before anything
//! else, then a bounds-checked walk to the `server_name` extension. Shared by
//! the egress proxy (`sandpit-egress`, routing a sandbox's TLS by name) and
//! the public TLS frontend (`sandpit-ingress`); each judges the name itself.

use std::borrow::Cow;

/// The result of looking at the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// Not enough bytes: look again once there are at least this many.
    Incomplete(usize),
    /// Done.
    Done(T),
}

/// Why no server name can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// Not a TLS ClientHello, or not a well-formed one.
    #[error("not a tls client hello")]
    Malformed,
    /// A ClientHello without a host name.
    #[error("no server name")]
    NoName,
    /// The ClientHello announces more than the bound.
    #[error("client hello too large")]
    TooLarge,
}

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0x0000;
const HOST_NAME: u8 = 0x00;
/// The largest TLSPlaintext fragment (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;

/// The raw host name (as sent: any case, maybe a trailing dot) of the
/// ClientHello at the start of `buf`, whose handshake message may be at most
/// `max` bytes.
pub fn server_name(buf: &[u8], max: usize) -> Result<Parsed<Vec<u8>>, SniError> {
    let hello = match handshake(buf, max)? {
        Parsed::Done(hello) => hello,
        Parsed::Incomplete(n) => return Ok(Parsed::Incomplete(n)),
    };
    let raw = find_sni(&hello).ok_or(SniError::Malformed)?;
    raw.map(|n| Parsed::Done(n.to_vec()))
        .ok_or(SniError::NoName)
}

/// The ClientHello body (after the 4-byte handshake header), reassembled
/// from as many records as it spans.
fn handshake(buf: &[u8], max: usize) -> Result<Parsed<Cow<'_, [u8]>>, SniError> {
    let mut pos = 0;
    let mut joined: Option<Vec<u8>> = None;
    let mut single: &[u8] = &[];
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Ok(Parsed::Incomplete(pos + 5));
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            // The first byte decides whether this is TLS at all.
            return Err(SniError::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed);
        }
        let Some(fragment) = buf.get(pos + 5..pos + 5 + len) else {
            // Check the first handshake header as soon as it is there,
            // not once its whole record is.
            if pos == 0 {
                if let Some(partial) = buf.get(5..9) {
                    check_header(partial, max)?;
                }
            }
            return Ok(Parsed::Incomplete(pos + 5 + len));
        };
        pos += 5 + len;
        let body: &[u8] = match (&mut joined, pos == 5 + len) {
            (None, true) => {
                single = fragment;
                single
            }
            (joined, _) => {
                let v = joined.get_or_insert_with(|| single.to_vec());
                v.extend_from_slice(fragment);
                v
            }
        };
        if body.len() < 4 {
            continue;
        }
        let hello_len = check_header(body, max)?;
        if body.len() >= hello_len + 4 {
            return Ok(Parsed::Done(match joined {
                None => Cow::Borrowed(&single[4..hello_len + 4]),
                Some(mut v) => {
                    v.truncate(hello_len + 4);
                    v.drain(..4);
                    Cow::Owned(v)
                }
            }));
        }
    }
}

/// The length of the ClientHello whose handshake header starts `body`.
fn check_header(body: &[u8], max: usize) -> Result<usize, SniError> {
    if body[0] != CLIENT_HELLO {
        return Err(SniError::Malformed);
    }
    let len = usize::from(body[1]) << 16 | usize::from(body[2]) << 8 | usize::from(body[3]);
    if len + 4 > max {
        return Err(SniError::TooLarge);
    }
    Ok(len)
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The raw host name of the `server_name` extension: `Some(None)` when the
/// hello has none, `None` when it is malformed.
fn find_sni(hello: &[u8]) -> Option<Option<&[u8]>> {
    let mut r = Reader(hello);
    r.take(2 + 32)?; // legacy_version, random
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // compression methods
    }
    if r.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Reader(r.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Reader(data);
        let mut names = Reader(list.vec16()?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == HOST_NAME {
                return if name.is_empty() {
                    None
                } else {
                    Some(Some(name))
                };
            }
        }
        return Some(None);
    }
    Some(None)
}

/// ClientHellos for tests (feature `testing`, and this crate's own).
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use super::{CLIENT_HELLO, HANDSHAKE, HOST_NAME, MAX_RECORD, SERVER_NAME};

    /// A ClientHello record for `sni` (none when `None`) with `padding`
    /// bytes of an extra extension.
    pub fn client_hello(sni: Option<&str>, padding: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.len() as u16;
            exts.extend_from_slice(&SERVER_NAME.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(HOST_NAME);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        exts.extend_from_slice(&0x0015u16.to_be_bytes()); // padding
        exts.extend_from_slice(&(padding as u16).to_be_bytes());
        exts.resize(exts.len() + padding, 0);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        records(&hs, MAX_RECORD)
    }

    /// `hs` split into handshake records of at most `size` bytes.
    pub fn records(hs: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{client_hello, records};
    use super::*;

    #[test]
    fn reads_the_name_from_one_record_or_many() {
        let one = client_hello(Some("API.test"), 100);
        assert_eq!(
            server_name(&one, 16384),
            Ok(Parsed::Done(b"API.test".to_vec()))
        );
        let hs = &one[5..];
        let many = records(hs, 7);
        assert_eq!(
            server_name(&many, 16384),
            Ok(Parsed::Done(b"API.test".to_vec()))
        );
        // Every prefix asks for more, never for less than it has.
        for cut in 0..many.len() {
            match server_name(&many[..cut], 16384) {
                Ok(Parsed::Incomplete(n)) => assert!(n > cut, "{cut}: {n}"),
                other => panic!("{cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_route() {
        assert_eq!(
            server_name(&client_hello(None, 10), 16384),
            Err(SniError::NoName)
        );
        // Whatever the name is, it is the caller's to judge.
        assert_eq!(
            server_name(&client_hello(Some("10.0.0.1"), 10), 16384),
            Ok(Parsed::Done(b"10.0.0.1".to_vec()))
        );
        assert_eq!(
            server_name(b"GET / HTTP/1.1\r\n", 16384),
            Err(SniError::Malformed)
        );
        // A hello announcing more than the bound is cut at its header.
        let big = client_hello(Some("api.test"), 20000);
        assert_eq!(server_name(&big[..9], 16384), Err(SniError::TooLarge));
        // Truncated inner vectors are malformed, not out-of-bounds reads.
        let mut bad = client_hello(Some("api.test"), 0);
        let at = bad.len() - 20;
        bad[at] = 0xff;
        assert!(matches!(
            server_name(&bad, 16384),
            Err(SniError::Malformed) | Ok(Parsed::Done(_)) | Err(SniError::NoName)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let base = client_hello(Some("files.test"), 40);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut m = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % m.len();
                m[i] = (seed >> 32) as u8;
            }
            let cut = (seed >> 40) as usize % (m.len() + 1);
            let _ = server_name(&m[..cut], 16384);
        }
    }
}
