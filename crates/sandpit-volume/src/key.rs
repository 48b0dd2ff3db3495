//! [`VolumeKey`]: the name of a volume in a backend, safe as a file name.

use std::fmt;
use std::str::FromStr;

/// The most bytes a key may have.
pub const MAX_KEY_LEN: usize = 128;

/// The name a backend stores a volume under: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
///
/// It becomes a directory name (`<root>/<key>/`), so the first character is
/// never `.` or `-` (no `.`, `..`, hidden names or option-like names) and no
/// `/` can appear.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeKey(String);

/// A string that is not a [`VolumeKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid volume key {0:?}: want 1 to 128 of [A-Za-z0-9._-], starting with a letter or digit"
)]
pub struct InvalidVolumeKey(pub String);

impl VolumeKey {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, InvalidVolumeKey> {
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_KEY_LEN
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(InvalidVolumeKey(s.to_string()))
        }
    }

    /// The key as a string (and file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VolumeKey {
    type Err = InvalidVolumeKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VolumeKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_that_are_safe_file_names() {
        for ok in ["a", "0", "vol-1", "a.b_c-d", "Z9", &"x".repeat(128)] {
            let k: VolumeKey = ok.parse().unwrap();
            assert_eq!(k.as_str(), ok);
            assert_eq!(k.to_string(), ok);
        }
    }

    #[test]
    fn refuses_anything_else() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-rf",
            "_x",
            "a/b",
            "../etc",
            "a b",
            "a\0b",
            "é",
            "a:b",
            &"x".repeat(129),
        ] {
            let err = VolumeKey::parse(bad).unwrap_err();
            assert_eq!(err.0, bad);
        }
        assert!(VolumeKey::parse("a/b")
            .unwrap_err()
            .to_string()
            .starts_with("invalid volume key \"a/b\""));
    }
}
