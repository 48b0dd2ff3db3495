//! Docker-style image references: parsing, validation and normalisation.
//!
//! The grammar is the one of the distribution project's `reference` package:
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [domain "/"] path-component ["/" path-component]*
//! domain           := host [":" port]
//! host             := domain-component ["." domain-component]* | "[" IPv6 "]"
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
//! separator        := "." | "_" | "__" | "-"+
//! tag              := [\w][\w.-]{0,127}
//! digest           := "sha256:" [a-f0-9]{64} | "sha512:" [a-f0-9]{128}
//! ```
//!
//! Normalisation follows Docker: a first component that contains no `.` or
//! `:`, is not `localhost` and is lowercase is not a registry, so `python`
//! means `docker.io/library/python`, `user/app` means `docker.io/user/app`;
//! `index.docker.io` is spelled `docker.io`; a reference with neither tag nor
//! digest gets the tag `latest`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{is_lower_hex, SHA256_HEX_LEN};
use crate::ImageError;

/// The registry Docker assumes when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The namespace of Docker Hub's official images.
const OFFICIAL_NAMESPACE: &str = "library/";
/// The tag assumed when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of `registry/repository`.
const NAME_MAX: usize = 255;
/// The longest tag the grammar allows.
const TAG_MAX: usize = 128;

/// A normalised image reference: `registry/repository[:tag][@digest]`.
///
/// `Display` prints the full normalised form (`docker.io/library/python:3.11`),
/// [`Reference::familiar`] Docker's short form (`python:3.11`). Serialised as
/// its `Display` string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// Registry host, with its port if any (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/python`).
    pub repository: String,
    /// Tag; `None` only when the reference is pinned by digest alone.
    pub tag: Option<String>,
    /// Content digest pinning the manifest: `sha256:<64 hex>`, or
    /// `sha512:<128 hex>`, which the grammar allows but the registry client
    /// cannot pull (see [`crate::Digest`]). A string, not a `Digest`, so
    /// that such references still parse and print.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses and normalises `input` (see the module documentation).
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let invalid = |reason: &'static str| ImageError::InvalidReference {
            reference: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(invalid("empty reference"));
        }
        if !input.is_ascii() {
            return Err(invalid("non-ascii character"));
        }
        if input
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(invalid("whitespace or control character"));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(invalid)?;
                (rest, Some(digest.to_owned()))
            }
            None => (input, None),
        };
        // A tag is a `:` after the last `/` (an earlier `:` is a registry port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                let tag = &rest[i + 1..];
                validate_tag(tag).map_err(invalid)?;
                (&rest[..i], Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(invalid("empty name"));
        }
        if digest.is_none() && is_lower_hex(name, SHA256_HEX_LEN) {
            return Err(invalid("64-character hex name looks like an image id"));
        }

        let (registry, repository) = split_registry(name);
        validate_registry(registry).map_err(invalid)?;
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository must be lowercase"));
        }
        validate_repository(repository).map_err(invalid)?;

        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY
        } else {
            registry
        };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("{OFFICIAL_NAMESPACE}{repository}")
        } else {
            repository.to_owned()
        };
        if registry.len() + 1 + repository.len() > NAME_MAX {
            return Err(invalid("name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag,
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Docker's short form: `python:3.11`, `user/app:latest`,
    /// `ghcr.io/a/b@sha256:...`.
    pub fn familiar(&self) -> String {
        let mut out = if self.registry == DEFAULT_REGISTRY {
            match self.repository.strip_prefix(OFFICIAL_NAMESPACE) {
                Some(short) if !short.contains('/') => short.to_owned(),
                _ => self.repository.clone(),
            }
        } else {
            self.name()
        };
        self.push_suffix(&mut out);
        out
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest);
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        self.push_suffix(&mut out);
        f.write_str(&out)
    }
}

impl FromStr for Reference {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Docker's rule: the first component names a registry when it looks like a
/// host (`.` or `:`), is `localhost`, or has an uppercase letter.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

fn validate_registry(registry: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or("unterminated ipv6 address")?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("invalid ipv6 address");
        }
        match after {
            "" => (None, None),
            _ => (
                None,
                Some(after.strip_prefix(':').ok_or("invalid registry")?),
            ),
        }
    } else {
        match registry.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err("empty registry host");
        }
        for component in host.split('.') {
            let b = component.as_bytes();
            let ok = !b.is_empty()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-';
            if !ok {
                return Err("invalid registry host");
            }
        }
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("invalid registry port");
        }
    }
    Ok(())
}

fn validate_repository(repository: &str) -> Result<(), &'static str> {
    if repository.is_empty() {
        return Err("empty repository");
    }
    for component in repository.split('/') {
        if !is_path_component(component.as_bytes()) {
            return Err("invalid repository path component");
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`
fn is_path_component(b: &[u8]) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut i = 0;
    loop {
        // One alphanumeric run.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // One separator.
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let separator = &b[start..i];
        let ok = matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|c| *c == b'-');
        if !ok {
            return false;
        }
    }
}

fn validate_tag(tag: &str) -> Result<(), &'static str> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if b.is_empty() {
        return Err("empty tag");
    }
    if b.len() > TAG_MAX {
        return Err("tag longer than 128 characters");
    }
    if !word(b[0]) || !b[1..].iter().all(|c| word(*c) || *c == b'.' || *c == b'-') {
        return Err("invalid tag");
    }
    Ok(())
}

/// Accepts `sha256:<64 lowercase hex>` and `sha512:<128 lowercase hex>`:
/// the reference grammar's digests. Wider than [`crate::Digest`] on
/// purpose: a sha512 reference is well formed, it just cannot be pulled.
fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let (algorithm, hex) = digest.split_once(':').ok_or("digest without algorithm")?;
    let len = match algorithm {
        "sha256" => SHA256_HEX_LEN,
        "sha512" => 2 * SHA256_HEX_LEN,
        _ => return Err("unsupported digest algorithm"),
    };
    if !is_lower_hex(hex, len) {
        return Err("invalid digest hex");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(input: &str) -> Reference {
        Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"))
    }

    #[test]
    fn normalises_valid_references() {
        let d = D;
        let cases: &[(&str, &str, &str)] = &[
            // input, full form, familiar form
            ("python", "docker.io/library/python:latest", "python:latest"),
            (
                "python:3.11",
                "docker.io/library/python:3.11",
                "python:3.11",
            ),
            ("user/app", "docker.io/user/app:latest", "user/app:latest"),
            (
                "docker.io/python",
                "docker.io/library/python:latest",
                "python:latest",
            ),
            (
                "index.docker.io/user/app:v1",
                "docker.io/user/app:v1",
                "user/app:v1",
            ),
            (
                "docker.io/library/python:3.11",
                "docker.io/library/python:3.11",
                "python:3.11",
            ),
            (
                "library/python",
                "docker.io/library/python:latest",
                "python:latest",
            ),
            ("a/b/c/d", "docker.io/a/b/c/d:latest", "a/b/c/d:latest"),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "localhost:5000/x/y:tag",
                "localhost:5000/x/y:tag",
                "localhost:5000/x/y:tag",
            ),
            (
                "127.0.0.1:5000/x",
                "127.0.0.1:5000/x:latest",
                "127.0.0.1:5000/x:latest",
            ),
            ("[::1]:5000/x:1", "[::1]:5000/x:1", "[::1]:5000/x:1"),
            ("[fe80::1]/x", "[fe80::1]/x:latest", "[fe80::1]/x:latest"),
            (
                "Registry.Example/x",
                "Registry.Example/x:latest",
                "Registry.Example/x:latest",
            ),
            ("Foo/bar", "Foo/bar:latest", "Foo/bar:latest"),
            (
                "sandpit.test/busybox-tar:latest",
                "sandpit.test/busybox-tar:latest",
                "sandpit.test/busybox-tar:latest",
            ),
            (
                "a.b-c__d_e.f---g:T_a.g-1",
                "docker.io/library/a.b-c__d_e.f---g:T_a.g-1",
                "a.b-c__d_e.f---g:T_a.g-1",
            ),
            ("x:_tag", "docker.io/library/x:_tag", "x:_tag"),
        ];
        for (input, full, familiar) in cases {
            let r = ok(input);
            assert_eq!(r.to_string(), *full, "{input}");
            assert_eq!(r.familiar(), *familiar, "{input}");
            // Idempotent: parsing either form gives the same reference.
            assert_eq!(ok(full), r, "{input}");
            assert_eq!(ok(familiar), r, "{input}");
        }
        let with_digest = format!("ghcr.io/a/b@{d}");
        let r = ok(&with_digest);
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d));
        assert_eq!(r.to_string(), with_digest);
        assert_eq!(r.familiar(), with_digest);

        let r = ok(&format!("python:3.11@{d}"));
        assert_eq!(r.tag.as_deref(), Some("3.11"));
        assert_eq!(r.to_string(), format!("docker.io/library/python:3.11@{d}"));
        assert_eq!(r.familiar(), format!("python:3.11@{d}"));

        let r = ok("localhost:5000/x/y:tag");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("localhost:5000", "x/y", Some("tag"))
        );
        assert_eq!(r.name(), "localhost:5000/x/y");
        // A 64-hex name is fine when a registry or digest disambiguates.
        ok(&format!("{}/x", "a".repeat(63)));
        ok(&format!("{}@{d}", &D[7..]));
        ok(&format!("x:{}", "t".repeat(128)));
        ok(&format!("x@sha512:{}", "0".repeat(128)));
    }

    #[test]
    fn rejects_invalid_references() {
        let long_tag = format!("x:{}", "t".repeat(129));
        let long_name = format!("x/{}", "a".repeat(260));
        let hex_name = "0123456789abcdef".repeat(4);
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Python", "lowercase"),
            ("user/App", "lowercase"),
            ("ghcr.io/A/b", "lowercase"),
            ("python:", "tag"),
            ("python:-x", "tag"),
            ("python:.x", "tag"),
            ("python:a/b", "port"),
            (&long_tag, "128"),
            (&long_name, "255"),
            (&hex_name, "image id"),
            ("/python", "repository"),
            ("python/", "repository"),
            ("a//b", "repository"),
            ("-a", "repository"),
            ("a-", "repository"),
            ("a..b", "repository"),
            ("a___b", "repository"),
            ("a.-b", "repository"),
            ("_a", "repository"),
            ("a b", "whitespace"),
            ("a\tb", "whitespace"),
            ("pythön", "non-ascii"),
            ("x@sha256:abc", "hex"),
            (
                "x@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
                "hex",
            ),
            ("x@md5:0123456789abcdef0123456789abcdef", "algorithm"),
            ("x@0123456789abcdef", "algorithm"),
            ("x@", "algorithm"),
            (
                "@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "name",
            ),
            (":tag", "name"),
            ("localhost:port/x", "port"),
            ("localhost:/x", "port"),
            ("-bad.io/x", "host"),
            ("bad-.io/x", "host"),
            ("bad_host.io/x", "host"),
            ("a..io/x", "host"),
            ("[::1/x", "ipv6"),
            ("[zz::1]:5000/x", "ipv6"),
            ("[::1]x/y", "registry"),
            ("ghcr.io/", "repository"),
            ("x:1@sha256:xyz", "hex"),
            (
                "a@b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "algorithm",
            ),
        ];
        for (input, reason) in cases {
            match Reference::parse(input) {
                Err(ImageError::InvalidReference {
                    reference,
                    reason: r,
                }) => {
                    assert_eq!(reference, *input);
                    assert!(
                        r.contains(reason),
                        "{input:?}: reason {r:?}, want {reason:?}"
                    );
                    let msg = ImageError::InvalidReference {
                        reference,
                        reason: r,
                    }
                    .to_string();
                    assert!(msg.contains(&format!("{input:?}")), "{msg}");
                }
                other => panic!("{input:?}: expected invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn serde_round_trip() {
        let r = ok("python:3.11");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"docker.io/library/python:3.11\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        assert!(serde_json::from_str::<Reference>("\"UPPER\"").is_err());
        assert_eq!(
            "user/app".parse::<Reference>().unwrap(),
            ok("docker.io/user/app:latest")
        );
    }
}
