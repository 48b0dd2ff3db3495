//! TEMPORARY: stands in for `sandpit_runtime::SandboxId` until the runtime
//! branch lands (same API).

use std::borrow::Borrow;
use std::fmt;

/// A sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

/// Not a valid sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sandbox id {0:?}")]
pub struct InvalidSandboxId(pub String);

impl SandboxId {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<Self, InvalidSandboxId> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric();
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidSandboxId(s.to_owned()))
        }
    }

    /// 12 random lowercase hex characters.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("the kernel's random source works");
        Self(hex::encode(bytes))
    }

    /// Whether it has the shape of [`SandboxId::generate`].
    pub fn is_generated(&self) -> bool {
        self.0.len() == 12
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
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

impl Borrow<str> for SandboxId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SandboxId {
    type Err = InvalidSandboxId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// TEMPORARY: stands in for `sandpit_wire::Signal`.
#[derive(Debug)]
pub(crate) struct Signal;

impl Signal {
    pub(crate) const TERM: i32 = 15;
}
