//! Sandbox ids: validated once, where they enter, and typed from then on.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// The id of a sandbox: `[a-z0-9][a-z0-9_.-]*`, 1 to [`MAX_LEN`] bytes.
///
/// It names the sandbox's state directory and cgroup and is its default
/// hostname, so it is validated whenever one is made ([`parse`], `FromStr`,
/// `TryFrom<String>`, deserialising); a `SandboxId` in hand is always safe
/// to put in a path. Serialised as a plain string.
///
/// Two families share a state directory: the daemon's ids are
/// [`generate`]d (12 lowercase hex characters, [`is_generated`]), those of
/// `sandpit run` are [`generate_prefixed`] (`run-…`), never taken for the
/// daemon's.
///
/// [`MAX_LEN`]: SandboxId::MAX_LEN
/// [`parse`]: SandboxId::parse
/// [`generate`]: SandboxId::generate
/// [`is_generated`]: SandboxId::is_generated
/// [`generate_prefixed`]: SandboxId::generate_prefixed
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SandboxId(String);

/// A string that is not a valid [`SandboxId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox id {0:?}")]
pub struct InvalidSandboxId(String);

impl InvalidSandboxId {
    /// The string that was refused.
    pub fn input(&self) -> &str {
        &self.0
    }
}

/// How many hex characters [`SandboxId::generate`] produces (6 random bytes).
const GENERATED_LEN: usize = 12;

impl SandboxId {
    /// The longest id, in bytes (a hostname's limit).
    pub const MAX_LEN: usize = 63;

    /// Validates `s` as an id.
    pub fn parse(s: &str) -> Result<Self, InvalidSandboxId> {
        if is_valid(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidSandboxId(s.to_owned()))
        }
    }

    /// A fresh random id: 12 lowercase hex characters, the daemon's ids.
    ///
    /// # Panics
    ///
    /// When the kernel's random source fails (`getrandom(2)`), which it
    /// does not once the system has booted.
    pub fn generate() -> Self {
        Self(random_hex())
    }

    /// Whether the id has exactly the shape [`generate`](Self::generate)
    /// gives: 12 lowercase hex characters. The daemon's sweep relies on it to
    /// tell its own sandboxes from those of `sandpit run` in the same state
    /// directory ([`generate_prefixed`](Self::generate_prefixed) ids never
    /// have it).
    pub fn is_generated(&self) -> bool {
        self.0.len() == GENERATED_LEN
            && self
                .0
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// A fresh random id `"{prefix}-{12 hex}"`, e.g. `run-3f9c0a7e12bd` for
    /// `sandpit run`. Never [`is_generated`](Self::is_generated).
    ///
    /// # Panics
    ///
    /// When `prefix` cannot start an id (it must be 1 to 50 characters of
    /// `[a-z0-9_.-]`, the first one `[a-z0-9]`): it is meant to be a
    /// constant. Also as [`generate`](Self::generate).
    pub fn generate_prefixed(prefix: &str) -> Self {
        let id = format!("{prefix}-{}", random_hex());
        match Self::try_from(id) {
            Ok(id) => id,
            Err(_) => panic!("invalid sandbox id prefix {prefix:?}"),
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// `[a-z0-9][a-z0-9_.-]*`, 1 to 63 bytes.
fn is_valid(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= SandboxId::MAX_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

fn random_hex() -> String {
    let mut bytes = [0u8; GENERATED_LEN / 2];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    let mut hex = String::with_capacity(GENERATED_LEN);
    for b in bytes {
        for nibble in [b >> 4, b & 0xf] {
            hex.push(char::from_digit(u32::from(nibble), 16).expect("a nibble"));
        }
    }
    hex
}

impl FromStr for SandboxId {
    type Err = InvalidSandboxId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(InvalidSandboxId(s))
        }
    }
}

impl TryFrom<&str> for SandboxId {
    type Error = InvalidSandboxId;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> Self {
        id.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SandboxId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for SandboxId {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

/// Hashes and compares as the string itself, so a `HashMap<SandboxId, _>`
/// or `BTreeMap` can be queried with a `&str`.
impl Borrow<str> for SandboxId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for SandboxId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for SandboxId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for SandboxId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl serde::Serialize for SandboxId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        for ok in ["a", "sb-0123abcd", "x.y_z-1"] {
            SandboxId::parse(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a/b", "..", ".a", "a b", &"a".repeat(64)] {
            assert!(SandboxId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(SandboxId::parse(&"a".repeat(63)).is_ok());
        assert!(SandboxId::parse("_a").is_err());
        assert!(SandboxId::parse("a\0").is_err());
        assert!(SandboxId::parse("é").is_err());
    }

    #[test]
    fn every_way_in_validates() {
        let err = SandboxId::parse("Bad/Id").unwrap_err();
        assert_eq!(err.to_string(), "invalid sandbox id \"Bad/Id\"");
        assert_eq!(err.input(), "Bad/Id");
        assert_eq!("Bad/Id".parse::<SandboxId>(), Err(err.clone()));
        assert_eq!(SandboxId::try_from("Bad/Id".to_string()), Err(err.clone()));
        assert_eq!(SandboxId::try_from("Bad/Id"), Err(err));
        let id: SandboxId = "sb-1".parse().unwrap();
        assert_eq!(SandboxId::try_from("sb-1".to_string()).unwrap(), id);
        assert_eq!(id.as_str(), "sb-1");
        assert_eq!(id.to_string(), "sb-1");
        assert_eq!(id, "sb-1");
        assert_eq!(String::from(id.clone()), "sb-1");
        assert_eq!(id.into_string(), "sb-1");
    }

    #[test]
    fn serialised_as_a_plain_string_and_validated_back() {
        let id = SandboxId::parse("sb-1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"sb-1\"");
        let back: SandboxId = serde_json::from_str("\"sb-1\"").unwrap();
        assert_eq!(back, id);
        let err = serde_json::from_str::<SandboxId>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("invalid sandbox id"), "{err}");
        assert!(serde_json::from_str::<SandboxId>("7").is_err());
    }

    #[test]
    fn maps_keyed_by_id_answer_str_lookups() {
        let mut map = std::collections::HashMap::new();
        map.insert(SandboxId::parse("sb-1").unwrap(), 1);
        assert_eq!(map.get("sb-1"), Some(&1));
        assert_eq!(map.get("sb-2"), None);
        let mut ids = vec![
            SandboxId::parse("b").unwrap(),
            SandboxId::parse("a").unwrap(),
        ];
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
    }

    /// `is_generated` is defined by what `generate` makes; the daemon's sweep
    /// depends on the two agreeing, and on `run-…` ids never matching.
    #[test]
    fn generated_ids_and_only_those_are_generated() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let id = SandboxId::generate();
            assert_eq!(id.as_str().len(), 12, "{id}");
            assert!(id.is_generated(), "{id}");
            assert_eq!(SandboxId::parse(id.as_str()).unwrap(), id, "valid");
            seen.insert(id);
            let run = SandboxId::generate_prefixed("run");
            assert!(!run.is_generated(), "{run}");
            let (prefix, hex) = run.as_str().split_once('-').unwrap();
            assert_eq!(prefix, "run");
            assert!(SandboxId::parse(hex).unwrap().is_generated(), "{run}");
        }
        assert_eq!(seen.len(), 200, "ids repeat");
        for other in [
            "0123456789a",
            "0123456789abc",
            "0123456789ag",
            "bench-0",
            "a",
        ] {
            assert!(!SandboxId::parse(other).unwrap().is_generated(), "{other}");
        }
        assert!(SandboxId::parse("0123456789ab").unwrap().is_generated());
        // A one-letter prefix is as long as a generated id plus 2: still not one.
        assert!(!SandboxId::generate_prefixed("a").is_generated());
        assert_eq!(
            SandboxId::generate_prefixed(&"p".repeat(50)).as_str().len(),
            63
        );
    }

    #[test]
    #[should_panic(expected = "invalid sandbox id prefix")]
    fn an_invalid_prefix_is_a_bug() {
        SandboxId::generate_prefixed("Run");
    }
}
