//! [`Digest`]: a validated `sha256:<64 lowercase hex>` content digest, and
//! [`DigestWriter`], which computes one over a stream.
//!
//! Every digest the store and the registry client handle (diff ids, blob
//! and manifest digests, image ids) is a `Digest`: it is validated once,
//! where it enters (parsed from a registry document, read from a store
//! file, computed from bytes), and everything past that point can use it as
//! a path component or compare it without checking again.
//!
//! Only sha256 is supported. The OCI spec also registers sha512; no
//! registry we pull from uses it for content, and the store names layers by
//! sha256 diff id, so a sha512 digest is refused with
//! [`ImageError::InvalidDigest`] (a documented gap, not a silent mismatch).
//! References may still spell a sha512 digest (their grammar allows it); a
//! pull of one fails when the registry client parses it.

use std::borrow::Borrow;
use std::fmt;
use std::io;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::ImageError;

const PREFIX: &str = "sha256:";
/// Hex digits of a sha256 digest.
pub(crate) const SHA256_HEX_LEN: usize = 64;

/// Whether `s` is `len` lowercase hex digits, the only spelling OCI allows
/// (uppercase hex would name the same bytes with another string, and
/// digests are compared and used as file names as strings).
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// A content digest, `sha256:<64 lowercase hex>`. Only sha256 is
/// supported: a sha512 digest (which OCI also allows) is refused as
/// [`ImageError::InvalidDigest`], a known gap.
///
/// Serialised as that plain string (the store's JSON files hold digests
/// that way) and validated when deserialised, so a corrupt store file is
/// refused instead of yielding a digest that is no file name. Ordered and
/// hashed as its string, so it can be looked up by `&str` in sets and maps.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; anything else (bare hex, another
    /// algorithm, uppercase) is [`ImageError::InvalidDigest`].
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let invalid = |reason| ImageError::InvalidDigest {
            digest: s.to_owned(),
            reason,
        };
        let Some(hex) = s.strip_prefix(PREFIX) else {
            return Err(invalid(match s.split_once(':') {
                Some(_) => "unsupported digest algorithm (only sha256)",
                None => "missing sha256: prefix",
            }));
        };
        if !is_lower_hex(hex, SHA256_HEX_LEN) {
            return Err(invalid("not sha256:<64 lowercase hex>"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The digest whose hex is `hex` (64 lowercase hex digits, as in the
    /// store's directory names).
    pub fn from_sha256_hex(hex: &str) -> Result<Self, ImageError> {
        if is_lower_hex(hex, SHA256_HEX_LEN) {
            Ok(Self(format!("{PREFIX}{hex}")))
        } else {
            Err(ImageError::InvalidDigest {
                digest: hex.to_owned(),
                reason: "not 64 lowercase hex digits",
            })
        }
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        let mut writer = DigestWriter::new();
        writer.update(bytes);
        writer.finish()
    }

    /// The 64 hex digits, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The full `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Digest").field(&self.0).finish()
    }
}

impl FromStr for Digest {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// Hash, Eq and Ord are the string's: `HashSet<Digest>::contains("sha256:..")`
// is consistent.
impl Borrow<str> for Digest {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> Self {
        digest.0
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Digest {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        self.0 == *other
    }
}

impl PartialEq<Digest> for str {
    fn eq(&self, other: &Digest) -> bool {
        self == other.0
    }
}

impl PartialEq<Digest> for &str {
    fn eq(&self, other: &Digest) -> bool {
        *self == other.0
    }
}

impl PartialEq<Digest> for String {
    fn eq(&self, other: &Digest) -> bool {
        *self == other.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Computes a [`Digest`] over everything written to it (`io::Write`, or
/// [`DigestWriter::update`]), e.g. a layer blob as it streams past.
#[derive(Clone, Default)]
pub struct DigestWriter {
    hasher: Sha256,
}

impl DigestWriter {
    /// A writer that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data` to what is hashed.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    /// The digest of what was written so far; writing may go on.
    pub fn digest(&self) -> Digest {
        self.clone().finish()
    }

    /// The digest of everything written.
    pub fn finish(self) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(self.hasher.finalize())))
    }
}

impl io::Write for DigestWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for DigestWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestWriter").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Write;

    use super::*;

    const HELLO: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_only_sha256_lowercase_hex() {
        let d = Digest::parse(HELLO).unwrap();
        assert_eq!(d.as_str(), HELLO);
        assert_eq!(d.hex(), &HELLO[7..]);
        assert_eq!(d.to_string(), HELLO);
        assert_eq!(format!("{d:?}"), format!("Digest({HELLO:?})"));
        assert_eq!(HELLO.parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::from_sha256_hex(d.hex()).unwrap(), d);
        let sha512 = format!("sha512:{}", "0".repeat(128));
        for (bad, reason) in [
            ("", "prefix"),
            (&HELLO[7..], "prefix"),
            ("sha256:", "hex"),
            ("sha256:abc", "hex"),
            (&HELLO.to_uppercase().replace("SHA256", "sha256"), "hex"),
            (&format!("{HELLO}0"), "hex"),
            (&format!("{HELLO}\n"), "hex"),
            (&sha512, "only sha256"),
            ("md5:0123", "algorithm"),
        ] {
            match Digest::parse(bad) {
                Err(ImageError::InvalidDigest { digest, reason: r }) => {
                    assert_eq!(digest, bad);
                    assert!(r.contains(reason), "{bad:?}: {r}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Digest::from_sha256_hex(HELLO),
            Err(ImageError::InvalidDigest { .. })
        ));
        assert!(matches!(
            Digest::from_sha256_hex(&HELLO[8..]),
            Err(ImageError::InvalidDigest { .. })
        ));
    }

    #[test]
    fn hashes_bytes_and_streams() {
        assert_eq!(Digest::sha256_of(b"hello"), HELLO);
        let mut w = DigestWriter::new();
        w.write_all(b"hel").unwrap();
        assert_eq!(w.digest(), Digest::sha256_of(b"hel"));
        w.update(b"lo");
        assert_eq!(w.digest(), HELLO);
        assert_eq!(w.finish(), HELLO);
        assert_eq!(
            DigestWriter::default().finish(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn serde_is_the_plain_string_and_validates() {
        let d = Digest::parse(HELLO).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{HELLO}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let err = serde_json::from_str::<Digest>("\"sha256:nothex\"").unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{err}");
        assert!(serde_json::from_str::<Digest>("12").is_err());
    }

    #[test]
    fn compares_and_looks_up_as_its_string() {
        let d = Digest::parse(HELLO).unwrap();
        // Both ways, against &str, str and String.
        let (s, owned): (&str, String) = (HELLO, HELLO.to_owned());
        assert_eq!(d, s);
        assert_eq!(s, d);
        assert_eq!(d, *s);
        assert_eq!(*s, d);
        assert_eq!(d, owned);
        assert_eq!(owned, d);
        let set: HashSet<Digest> = [d.clone()].into();
        assert!(set.contains(HELLO));
        let zeros = Digest::from_sha256_hex(&"0".repeat(64)).unwrap();
        assert!(zeros < d, "ordered as strings");
        assert_eq!(String::from(d.clone()), HELLO);
        assert_eq!(AsRef::<str>::as_ref(&d), HELLO);
    }
}
