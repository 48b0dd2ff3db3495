//! The server name of a TLS ClientHello, as the public TLS frontend routes
//! by it: parsed by `sandpit-sni`, lowercased without a trailing dot (the
//! caller matches it against the service host pattern, which is stricter
//! than any DNS check).

pub(crate) use sandpit_sni::Parsed;
use sandpit_sni::SniError;

/// Why a ClientHello names no service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a TLS ClientHello.
    Malformed,
    /// No server name in it.
    NoName,
    /// The name is not text.
    BadName,
    /// It is longer than the bound.
    TooLarge,
}

/// The name lowercased, without a trailing dot; `None` if not UTF-8.
fn host_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    Some(text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase())
}

/// The host name in the ClientHello at the start of `buf`, whose
/// handshake message may be at most `max` bytes.
pub(crate) fn server_name(buf: &[u8], max: usize) -> Result<Parsed<String>, Refusal> {
    match sandpit_sni::server_name(buf, max) {
        Ok(Parsed::Incomplete(n)) => Ok(Parsed::Incomplete(n)),
        Ok(Parsed::Done(raw)) => host_name(&raw).map(Parsed::Done).ok_or(Refusal::BadName),
        Err(SniError::Malformed) => Err(Refusal::Malformed),
        Err(SniError::NoName) => Err(Refusal::NoName),
        Err(SniError::TooLarge) => Err(Refusal::TooLarge),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_sni::testing::client_hello;

    #[test]
    fn names_are_lowercased_and_refusals_kept_apart() {
        assert_eq!(
            server_name(
                &client_hello(Some("8443-Abc.Sandpit.Localhost."), 10),
                16384
            ),
            Ok(Parsed::Done("8443-abc.sandpit.localhost".into()))
        );
        let mut bad = client_hello(Some("ab"), 0);
        let at = bad.windows(2).position(|w| w == b"ab").unwrap();
        bad[at] = 0xff;
        assert_eq!(server_name(&bad, 16384), Err(Refusal::BadName));
        assert_eq!(
            server_name(&client_hello(None, 10), 16384),
            Err(Refusal::NoName)
        );
        assert_eq!(
            server_name(b"GET / HTTP/1.1\r\n", 16384),
            Err(Refusal::Malformed)
        );
        let big = client_hello(Some("a.test"), 20000);
        assert_eq!(server_name(&big[..9], 16384), Err(Refusal::TooLarge));
    }
}
