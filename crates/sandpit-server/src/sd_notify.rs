//! The service manager's readiness protocol (`sd_notify`, what systemd's
//! `Type=notify` waits for): one datagram such as `READY=1` to the socket
//! named by `$NOTIFY_SOCKET`. Written here in a few lines rather than
//! linking libsystemd: the daemon needs only the send.

use std::ffi::OsString;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where readiness is reported; empty when no service manager asked.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<OsString>,
}

impl Notifier {
    /// Takes `$NOTIFY_SOCKET` out of the environment, so that nothing the
    /// daemon starts (the spawner, LXCFS, sandboxes) inherits it. Call it
    /// before any other thread exists: changing the environment races with
    /// readers on other threads.
    pub fn take_from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty());
        if socket.is_some() {
            std::env::remove_var("NOTIFY_SOCKET");
        }
        Self { socket }
    }

    /// Whether a service manager waits for the notifications.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, ...); nothing without a
    /// socket.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let bytes = socket.as_encoded_bytes();
        // A leading '@' names a socket in the abstract namespace.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(socket)?,
        };
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(path.into_os_string()),
        };
        assert!(n.enabled());
        n.notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn sends_the_state_to_an_abstract_socket() {
        let name = format!("sandpit-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier {
            socket: Some(format!("@{name}").into()),
        };
        n.notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn without_a_socket_nothing_is_sent() {
        let n = Notifier::default();
        assert!(!n.enabled());
        n.notify("READY=1").unwrap();
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier {
            socket: Some(dir.path().join("absent").into_os_string()),
        };
        assert!(n.notify("READY=1").is_err());
    }
}
