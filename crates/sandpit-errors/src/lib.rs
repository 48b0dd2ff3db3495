//! The one place where an error becomes a line of text.
//!
//! Errors of this workspace name only their own step and leave their cause
//! to `source()` (`#[error("read layer")] Archive(#[source] io::Error)`,
//! never `"read layer: {0}"`), so nothing is printed twice and a caller can
//! still match on the cause. Where an error must become text (a gRPC
//! message, a sandbox's state reason, a log line, a report that crosses a
//! process boundary), [`chain`] prints it and its sources once, joined by
//! `": "`. The binaries print with anyhow's `{:#}`, which does the same.
//!
//! A foreign error that prints its own source (some TLS and HTTP client
//! errors do) would read twice; such a source is skipped when the text so
//! far already ends with it.

#![forbid(unsafe_code)]

use std::error::Error;
use std::fmt;

/// `e` and its sources along `source()`, joined by `": "`.
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

/// Displays an error and its sources like [`chain`], without allocating the
/// whole line first (for `tracing` fields: `error = %Chain(&e)`).
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    /// A foreign style: prints its source itself, and returns it too.
    #[derive(Debug, thiserror::Error)]
    #[error("tls: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn sources_are_joined_once() {
        let e = Outer(Middle(std::io::Error::other("disk on fire")));
        assert_eq!(chain(&e), "outer: middle: disk on fire");
        assert_eq!(format!("{}", Chain(&e)), "outer: middle: disk on fire");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }

    #[test]
    fn a_source_already_printed_is_not_repeated() {
        let e = Repeats(std::io::Error::other("bad certificate"));
        assert_eq!(chain(&e), "tls: bad certificate");
    }
}
