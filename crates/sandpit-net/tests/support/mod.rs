//! Test scaffolding: a private "host" network namespace per test (so the
//! real host's links, rules, forwarding and conntrack are never touched,
//! and nothing can leave through the real uplink: the test host has none),
//! an "upstream" namespace routed from it with echo servers, and clients
//! that connect from inside a sandbox's namespace. Every namespace is
//! anonymous: it dies with its last fd or thread, pass or fail.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub fn new_netns() -> OwnedFd {
    std::thread::spawn(|| {
        // SAFETY: only this short-lived thread changes namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        let f = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        OwnedFd::from(f)
    })
    .join()
    .unwrap()
}

pub fn enter(ns: &OwnedFd) {
    // SAFETY: setns on a descriptor we own changes the calling thread's
    // network namespace only; no memory is involved.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0);
}

/// Runs `f` on a thread inside `ns`.
pub fn in_ns<T: Send>(ns: &OwnedFd, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap()
    })
}

/// A shell command in the calling thread's namespace (a forked child
/// starts in its parent thread's namespaces).
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn path(ns: &OwnedFd) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
}

/// The test's host and upstream: upstream 198.51.100.2/24 and
/// 2001:db8:100::2/64 behind the host's uh0 (.1), plus "cloud metadata"
/// 169.254.169.254 on the upstream, routed there.
pub struct World {
    pub host: OwnedFd,
    pub up: OwnedFd,
    servers: Vec<Server>,
}

impl World {
    pub fn new() -> World {
        let host = new_netns();
        let up = new_netns();
        let up_path = path(&up);
        in_ns(&host, || {
            sh(&format!(
                "ip link set lo up && ip link add uh0 type veth peer name ue0 && \
                 ip link set ue0 netns {up_path} && ip addr add 198.51.100.1/24 dev uh0 && \
                 ip -6 addr add 2001:db8:100::1/64 dev uh0 nodad && ip link set uh0 up && \
                 ip route add 169.254.169.254/32 via 198.51.100.2"
            ));
        });
        in_ns(&up, || {
            sh("ip link set lo up && ip addr add 198.51.100.2/24 dev ue0 && \
                ip -6 addr add 2001:db8:100::2/64 dev ue0 nodad && \
                ip addr add 169.254.169.254/32 dev lo && ip link set ue0 up && \
                ip route add default via 198.51.100.1 && ip -6 route add default via 2001:db8:100::1");
        });
        let mut w = World {
            host,
            up,
            servers: vec![],
        };
        for a in [
            "198.51.100.2:7",
            "198.51.100.2:8080",
            "[2001:db8:100::2]:7",
            "169.254.169.254:80",
        ] {
            let s = Server::tcp(&w.up, a.parse().unwrap());
            w.servers.push(s);
        }
        w.servers
            .push(Server::udp(&w.up, "198.51.100.2:7".parse().unwrap()));
        w
    }

    /// An echo server in the host's namespace (the host's own address).
    pub fn host_tcp(&mut self, addr: &str) {
        let s = Server::tcp(&self.host, addr.parse().unwrap());
        self.servers.push(s);
    }

    pub fn host_udp(&mut self, addr: &str) {
        let s = Server::udp(&self.host, addr.parse().unwrap());
        self.servers.push(s);
    }

    pub fn add_server(&mut self, s: Server) {
        self.servers.push(s);
    }
}

/// An echo server on a thread inside a namespace, stopped on drop. TCP
/// answers with the peer's address after the echo (to see NAT).
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn tcp(ns: &OwnedFd, addr: SocketAddr) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let ns = ns.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        std::thread::spawn(move || {
                            c.set_nonblocking(false).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            let mut buf = [0u8; 512];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                let mut out = buf[..n].to_vec();
                                out.extend_from_slice(format!(" from {}", peer.ip()).as_bytes());
                                if c.write_all(&out).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv().unwrap();
        Server {
            stop,
            thread: Some(thread),
        }
    }

    pub fn udp(ns: &OwnedFd, addr: SocketAddr) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let ns = ns.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let u = UdpSocket::bind(addr).unwrap();
            u.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(&buf[..n], peer);
                }
            }
        });
        rx.recv().unwrap();
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const TIMEOUT: Duration = Duration::from_millis(2000);

/// A TCP round trip from inside `ns`: what came back, or why not.
pub fn tcp(ns: &OwnedFd, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(ns, || {
        let mut c = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A UDP round trip from inside `ns`.
pub fn udp(ns: &OwnedFd, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(ns, || {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let u = UdpSocket::bind(bind).unwrap();
        u.set_read_timeout(Some(TIMEOUT)).unwrap();
        u.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = u.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// An open TCP connection made from inside `ns`.
pub fn connect(ns: &OwnedFd, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    in_ns(ns, || {
        let c = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c
    })
}

pub fn round_trip(c: &mut TcpStream) -> Result<String, String> {
    c.write_all(b"again").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("closed".into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
