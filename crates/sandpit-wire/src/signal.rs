//! Signal numbers as the protocol carries them.

use std::fmt;

/// A Linux signal number, 1 to 64 (the real-time ones included). The
/// protocol refuses any other number, so a value of this type is always one
/// the kernel knows.
///
/// Numbers are the kernel's (x86-64 and arm64 share them for the classic
/// signals, which is what the agent runs on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signal(u8);

/// The classic names, index = number - 1 (1 to 31).
const NAMES: [&str; 31] = [
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// The largest signal number (`_NSIG - 1` on Linux).
const MAX: i32 = 64;

impl Signal {
    /// Hang-up.
    pub const HUP: Signal = Signal(1);
    /// Interrupt (Ctrl-C).
    pub const INT: Signal = Signal(2);
    /// Quit (Ctrl-\).
    pub const QUIT: Signal = Signal(3);
    /// Kill; cannot be caught.
    pub const KILL: Signal = Signal(9);
    /// User-defined 1.
    pub const USR1: Signal = Signal(10);
    /// User-defined 2.
    pub const USR2: Signal = Signal(12);
    /// Write to a pipe nobody reads.
    pub const PIPE: Signal = Signal(13);
    /// Termination request.
    pub const TERM: Signal = Signal(15);

    /// The signal numbered `n`, if `n` is in 1..=64.
    pub const fn new(n: i32) -> Option<Signal> {
        if n >= 1 && n <= MAX {
            Some(Signal(n as u8))
        } else {
            None
        }
    }

    /// Its number, as `kill(2)` takes it.
    pub const fn number(self) -> i32 {
        self.0 as i32
    }

    /// Its name: `"SIGSEGV"` for 11. Real-time signals (32 to 64) are all
    /// `"SIGRT"`: libcs number `SIGRTMIN` differently (glibc reserves 32
    /// and 33), so a name like `SIGRTMIN+3` would depend on the image; the
    /// number tells them apart.
    pub fn name(self) -> &'static str {
        NAMES
            .get(usize::from(self.0) - 1)
            .copied()
            .unwrap_or("SIGRT")
    }
}

/// The name (`SIGTERM`); `signal 40` for a real-time signal.
impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES.get(usize::from(self.0) - 1) {
            Some(name) => f.write_str(name),
            None => write!(f, "signal {}", self.0),
        }
    }
}

impl From<Signal> for i32 {
    fn from(s: Signal) -> i32 {
        s.number()
    }
}

/// A number that is no signal (outside 1..=64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signal {0} is out of range (1 to 64)")]
pub struct InvalidSignal(pub i32);

impl TryFrom<i32> for Signal {
    type Error = InvalidSignal;

    fn try_from(n: i32) -> Result<Signal, InvalidSignal> {
        Signal::new(n).ok_or(InvalidSignal(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_linux_signal_numbers_exist() {
        for bad in [i32::MIN, -9, 0, 65, 128, i32::MAX] {
            assert_eq!(Signal::new(bad), None, "{bad}");
            assert_eq!(Signal::try_from(bad), Err(InvalidSignal(bad)));
        }
        for n in 1..=64 {
            assert_eq!(Signal::new(n).map(Signal::number), Some(n));
            assert_eq!(i32::from(Signal::try_from(n).unwrap()), n);
        }
        // The C library's idea of the range.
        assert!(Signal::new(libc::SIGRTMAX()).is_some());
        assert!(Signal::new(libc::SIGRTMAX() + 1).is_none());
        assert_eq!(
            InvalidSignal(0).to_string(),
            "signal 0 is out of range (1 to 64)"
        );
    }

    #[test]
    fn constants_and_names_match_linux() {
        let consts = [
            (Signal::HUP, 1, "SIGHUP"),
            (Signal::INT, 2, "SIGINT"),
            (Signal::QUIT, 3, "SIGQUIT"),
            (Signal::KILL, 9, "SIGKILL"),
            (Signal::USR1, 10, "SIGUSR1"),
            (Signal::USR2, 12, "SIGUSR2"),
            (Signal::PIPE, 13, "SIGPIPE"),
            (Signal::TERM, 15, "SIGTERM"),
        ];
        for (sig, n, name) in consts {
            assert_eq!(sig.number(), n);
            assert_eq!(sig.name(), name);
            assert_eq!(sig.to_string(), name);
        }
        let name = |n| Signal::new(n).unwrap().name();
        assert_eq!(name(11), "SIGSEGV");
        assert_eq!(name(17), "SIGCHLD");
        assert_eq!(name(19), "SIGSTOP");
        assert_eq!(name(28), "SIGWINCH");
        assert_eq!(name(31), "SIGSYS");
        // The table against the C library's numbering.
        let libc_names = [
            (libc::SIGHUP, "SIGHUP"),
            (libc::SIGILL, "SIGILL"),
            (libc::SIGTRAP, "SIGTRAP"),
            (libc::SIGABRT, "SIGABRT"),
            (libc::SIGBUS, "SIGBUS"),
            (libc::SIGFPE, "SIGFPE"),
            (libc::SIGSEGV, "SIGSEGV"),
            (libc::SIGALRM, "SIGALRM"),
            (libc::SIGSTKFLT, "SIGSTKFLT"),
            (libc::SIGCHLD, "SIGCHLD"),
            (libc::SIGCONT, "SIGCONT"),
            (libc::SIGSTOP, "SIGSTOP"),
            (libc::SIGTSTP, "SIGTSTP"),
            (libc::SIGTTIN, "SIGTTIN"),
            (libc::SIGTTOU, "SIGTTOU"),
            (libc::SIGURG, "SIGURG"),
            (libc::SIGXCPU, "SIGXCPU"),
            (libc::SIGXFSZ, "SIGXFSZ"),
            (libc::SIGVTALRM, "SIGVTALRM"),
            (libc::SIGPROF, "SIGPROF"),
            (libc::SIGWINCH, "SIGWINCH"),
            (libc::SIGIO, "SIGIO"),
            (libc::SIGPWR, "SIGPWR"),
            (libc::SIGSYS, "SIGSYS"),
        ];
        for (n, want) in libc_names {
            assert_eq!(name(n), want, "{n}");
        }
        for rt in [32, 34, 40, 64] {
            assert_eq!(name(rt), "SIGRT");
            assert_eq!(Signal::new(rt).unwrap().to_string(), format!("signal {rt}"));
        }
    }
}
