//! The server name of a sandbox's TLS ClientHello, as the egress policy
//! reads it: parsed by `sandpit-sni`, then judged by [`host_name`] (a DNS
//! name, never an address literal).

use crate::access::host_name;
use crate::usage::ProxyRefusal;

pub(crate) use sandpit_sni::Parsed;
use sandpit_sni::SniError;

/// The host name in the ClientHello at the start of `buf`, whose
/// handshake message may be at most `max` bytes.
pub(crate) fn server_name(buf: &[u8], max: usize) -> Result<Parsed<String>, ProxyRefusal> {
    match sandpit_sni::server_name(buf, max) {
        Ok(Parsed::Incomplete(n)) => Ok(Parsed::Incomplete(n)),
        Ok(Parsed::Done(raw)) => host_name(&raw)
            .map(Parsed::Done)
            .ok_or(ProxyRefusal::BadName),
        Err(SniError::Malformed) => Err(ProxyRefusal::Malformed),
        Err(SniError::NoName) => Err(ProxyRefusal::NoName),
        Err(SniError::TooLarge) => Err(ProxyRefusal::TooLarge),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_sni::testing::client_hello;

    #[test]
    fn names_are_judged_as_the_policy_reads_them() {
        assert_eq!(
            server_name(&client_hello(Some("API.test."), 10), 16384),
            Ok(Parsed::Done("api.test".into()))
        );
        assert_eq!(
            server_name(&client_hello(Some("10.0.0.1"), 10), 16384),
            Err(ProxyRefusal::BadName)
        );
        assert_eq!(
            server_name(&client_hello(None, 10), 16384),
            Err(ProxyRefusal::NoName)
        );
        assert_eq!(
            server_name(b"GET / HTTP/1.1\r\n", 16384),
            Err(ProxyRefusal::Malformed)
        );
        let big = client_hello(Some("api.test"), 20000);
        assert_eq!(server_name(&big[..9], 16384), Err(ProxyRefusal::TooLarge));
        assert!(matches!(
            server_name(&big[..3], 16384),
            Ok(Parsed::Incomplete(_))
        ));
    }
}
