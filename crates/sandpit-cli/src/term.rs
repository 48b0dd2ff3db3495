//! The local terminal in raw mode, for commands attached to a PTY
//! (`sandpit run` with a terminal, `sandpit exec -t`).

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::sys::termios;

/// The terminal in raw mode (keys go to the sandbox's PTY as typed) until
/// dropped.
pub(crate) struct RawMode {
    saved: termios::Termios,
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}

impl RawMode {
    /// Puts standard input's terminal in raw mode.
    pub(crate) fn enter() -> Result<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("read terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw)
            .context("set raw mode")?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // After the output already written has reached the terminal.
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            termios::SetArg::TCSADRAIN,
            &self.saved,
        );
    }
}
