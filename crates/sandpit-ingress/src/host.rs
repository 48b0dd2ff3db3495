//! Service host names: `<port>-<sandbox-id>.<domain>`, built for the
//! daemon's `service_urls` and parsed back by the frontends.

/// Whether `id` can be a sandbox id in a host name: one DNS label of
/// lowercase letters, digits and '-', at most 63 bytes together with the
/// longest port prefix.
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        // "65535-" + id must fit in one 63-byte label.
        && id.len() <= 63 - 6
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.ends_with('-')
}

/// The host name of `port` of sandbox `sandbox_id` under `domain`.
pub fn service_host(domain: &str, sandbox_id: &str, port: u16) -> String {
    format!("{port}-{sandbox_id}.{}", normalize_domain(domain))
}

/// The URL of an HTTP service published by a frontend listening on
/// `listen_port` (the port left out when it is 80).
pub fn http_url(domain: &str, sandbox_id: &str, port: u16, listen_port: u16) -> String {
    url("http", 80, domain, sandbox_id, port, listen_port)
}

/// The URL of a TLS-passthrough service published by a frontend listening
/// on `listen_port` (the port left out when it is 443).
pub fn https_url(domain: &str, sandbox_id: &str, port: u16, listen_port: u16) -> String {
    url("https", 443, domain, sandbox_id, port, listen_port)
}

fn url(
    scheme: &str,
    default_port: u16,
    domain: &str,
    sandbox_id: &str,
    port: u16,
    listen_port: u16,
) -> String {
    let host = service_host(domain, sandbox_id, port);
    if listen_port == default_port {
        format!("{scheme}://{host}")
    } else {
        format!("{scheme}://{host}:{listen_port}")
    }
}

/// `domain` lowercased, without a trailing dot.
pub(crate) fn normalize_domain(domain: &str) -> String {
    domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase()
}

/// The sandbox id and port named by `host` (a Host header value or a TLS
/// server name) under `domain` (lowercase, without a trailing dot).
/// A `:port` suffix is ignored, case does not matter; anything that is
/// not exactly one `<port>-<id>` label directly under `domain` is `None`.
pub fn parse_service_host(host: &str, domain: &str) -> Option<(String, u16)> {
    let host = strip_port(host)?;
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let label = host.strip_suffix(domain)?.strip_suffix('.')?;
    let digits = label.bytes().take_while(u8::is_ascii_digit).count();
    let (port, rest) = label.split_at(digits);
    let id = rest.strip_prefix('-')?;
    // One canonical spelling per port: no leading zeros, no port 0.
    if port.is_empty() || port.starts_with('0') || !valid_sandbox_id(id) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some((id.to_owned(), port))
}

/// `host` without a `:port` suffix; `None` for bracketed IPv6 literals
/// and other shapes no service host has.
fn strip_port(host: &str) -> Option<&str> {
    match host.rsplit_once(':') {
        None => Some(host),
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (!name.contains(':')).then_some(name)
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_hosts_and_urls() {
        assert_eq!(
            service_host("Sb.Test.", "abc-1", 8080),
            "8080-abc-1.sb.test"
        );
        assert_eq!(http_url("sb.test", "abc", 80, 80), "http://80-abc.sb.test");
        assert_eq!(
            http_url("sb.test", "abc", 80, 8000),
            "http://80-abc.sb.test:8000"
        );
        assert_eq!(
            https_url("sb.test", "abc", 443, 443),
            "https://443-abc.sb.test"
        );
        assert_eq!(
            https_url("sb.test", "abc", 443, 8443),
            "https://443-abc.sb.test:8443"
        );
    }

    #[test]
    fn parses_hosts_back() {
        let d = "sb.test";
        let ok = |h: &str| parse_service_host(h, d);
        assert_eq!(ok("8080-abc-def.sb.test"), Some(("abc-def".into(), 8080)));
        assert_eq!(ok("8080-ABC.SB.TEST:9000"), Some(("abc".into(), 8080)));
        assert_eq!(ok("1-a.sb.test."), Some(("a".into(), 1)));
        assert_eq!(ok("65535-a.sb.test"), Some(("a".into(), 65535)));
        for bad in [
            "sb.test",
            "a.sb.test",
            "8080.sb.test",
            "8080-.sb.test",
            "-abc.sb.test",
            "0-abc.sb.test",
            "080-abc.sb.test",
            "65536-abc.sb.test",
            "8080-abc.other.test",
            "8080-abc.xsb.test",
            "x.8080-abc.sb.test",
            "8080-a_b.sb.test",
            "8080-abc-.sb.test",
            "8080-abc.sb.test:",
            "8080-abc.sb.test:x",
            "[::1]:80",
            "evil.com",
            "",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn sandbox_ids() {
        assert!(valid_sandbox_id("sb-0123"));
        assert!(!valid_sandbox_id(""));
        assert!(!valid_sandbox_id("Sb"));
        assert!(!valid_sandbox_id("a.b"));
        assert!(!valid_sandbox_id(&"a".repeat(58)));
        assert!(valid_sandbox_id(&"a".repeat(57)));
    }
}
