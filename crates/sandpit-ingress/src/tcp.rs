//! Raw TCP publications: one host port per published (sandbox, port),
//! allocated from a configured range, each with its own listener task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::host::valid_sandbox_id;
use crate::{splice, ACCEPT_BACKOFF};

/// Where and how [`TcpPorts`] listens.
#[derive(Debug, Clone)]
pub struct TcpPortsConfig {
    /// The host address the ports are opened on.
    pub bind_ip: IpAddr,
    /// The host ports handed out.
    pub ports: RangeInclusive<u16>,
    /// How long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// The most connections forwarded at once per publication; further
    /// ones are closed at once.
    pub max_connections_per_port: usize,
}

impl TcpPortsConfig {
    /// `ports` on `bind_ip`, with default bounds.
    pub fn new(bind_ip: IpAddr, ports: RangeInclusive<u16>) -> Self {
        Self {
            bind_ip,
            ports,
            connect_timeout: Duration::from_secs(5),
            max_connections_per_port: 256,
        }
    }
}

/// Why a port was not published.
#[derive(Debug, thiserror::Error)]
pub enum TcpPortsError {
    /// Every port of the range is taken (by a publication or by someone
    /// else).
    #[error("no free host port in {}-{}", .0.start(), .0.end())]
    Exhausted(RangeInclusive<u16>),
    /// This (sandbox, port) is already published to another backend.
    #[error("port {port} of sandbox {sandbox_id} is already published")]
    AlreadyPublished {
        /// The sandbox.
        sandbox_id: String,
        /// Its port.
        port: u16,
    },
    /// The id is not a sandbox id.
    #[error("sandbox id {0:?} is malformed")]
    BadSandboxId(String),
    /// Listening failed for another reason than the port being taken.
    #[error("listen on host port {port}")]
    Listen {
        /// The host port.
        port: u16,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Publication {
    host_port: u16,
    backend: SocketAddr,
    /// The listener task; it owns the listener and, in a [`JoinSet`], the
    /// connection tasks, so aborting it closes them all.
    task: JoinHandle<()>,
}

/// Raw TCP publications. Must be used from within a Tokio runtime.
/// Dropping it closes every publication.
#[derive(Debug)]
pub struct TcpPorts {
    config: TcpPortsConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    published: HashMap<(String, u16), Publication>,
    /// Where the next search for a free port starts, so a port just
    /// released is not handed out again at once.
    next: u16,
}

impl TcpPorts {
    /// Publications on the ports of `config`.
    pub fn new(config: TcpPortsConfig) -> Self {
        let next = *config.ports.start();
        Self {
            config,
            state: Mutex::new(State {
                published: HashMap::new(),
                next,
            }),
        }
    }

    /// Publishes `port` of `sandbox_id`, forwarding to `backend`; returns
    /// the host port. Publishing the same (sandbox, port, backend) again
    /// returns the port it has.
    pub fn publish(
        &self,
        sandbox_id: &str,
        port: u16,
        backend: SocketAddr,
    ) -> Result<u16, TcpPortsError> {
        if !valid_sandbox_id(sandbox_id) {
            return Err(TcpPortsError::BadSandboxId(sandbox_id.to_owned()));
        }
        let mut state = self.lock();
        let key = (sandbox_id.to_owned(), port);
        if let Some(p) = state.published.get(&key) {
            if p.backend == backend {
                return Ok(p.host_port);
            }
            return Err(TcpPortsError::AlreadyPublished {
                sandbox_id: key.0,
                port,
            });
        }
        let (start, end) = (*self.config.ports.start(), *self.config.ports.end());
        if start > end {
            return Err(TcpPortsError::Exhausted(self.config.ports.clone()));
        }
        let taken: std::collections::HashSet<u16> =
            state.published.values().map(|p| p.host_port).collect();
        let size = usize::from(end - start) + 1;
        let first = state.next.clamp(start, end);
        for i in 0..size {
            // Wrapping within [start, end] from `first`.
            let offset = (usize::from(first - start) + i) % size;
            let candidate = start + u16::try_from(offset).unwrap_or(0);
            if taken.contains(&candidate) {
                continue;
            }
            let listener = match listen(SocketAddr::new(self.config.bind_ip, candidate)) {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(source) => {
                    return Err(TcpPortsError::Listen {
                        port: candidate,
                        source,
                    })
                }
            };
            let task = tokio::spawn(forward(
                listener,
                backend,
                self.config.connect_timeout,
                self.config.max_connections_per_port,
            ));
            state.next = candidate.checked_add(1).unwrap_or(start);
            state.published.insert(
                key,
                Publication {
                    host_port: candidate,
                    backend,
                    task,
                },
            );
            return Ok(candidate);
        }
        Err(TcpPortsError::Exhausted(self.config.ports.clone()))
    }

    /// The host port of `port` of `sandbox_id`, if published.
    pub fn host_port(&self, sandbox_id: &str, port: u16) -> Option<u16> {
        let state = self.lock();
        state
            .published
            .get(&(sandbox_id.to_owned(), port))
            .map(|p| p.host_port)
    }

    /// Unpublishes `port` of `sandbox_id`: closes its listener and every
    /// connection through it, and returns its host port. The listener is
    /// closed when this returns.
    pub async fn release(&self, sandbox_id: &str, port: u16) -> Option<u16> {
        let p = self
            .lock()
            .published
            .remove(&(sandbox_id.to_owned(), port))?;
        let host_port = p.host_port;
        stop(p).await;
        Some(host_port)
    }

    /// Unpublishes every port of `sandbox_id`; returns how many there were.
    pub async fn release_sandbox(&self, sandbox_id: &str) -> usize {
        let gone: Vec<Publication> = {
            let mut state = self.lock();
            let keys: Vec<_> = state
                .published
                .keys()
                .filter(|(id, _)| id == sandbox_id)
                .cloned()
                .collect();
            keys.iter()
                .filter_map(|k| state.published.remove(k))
                .collect()
        };
        let n = gone.len();
        for p in gone {
            stop(p).await;
        }
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every mutation is one map call; a poisoned map is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TcpPorts {
    fn drop(&mut self) {
        for p in self.lock().published.values() {
            p.task.abort();
        }
    }
}

async fn stop(p: Publication) {
    p.task.abort();
    // Once the aborted task has finished its future is dropped: the
    // listener is closed and the connection tasks are aborted.
    let _ = p.task.await;
}

/// A listener on `addr`, bound synchronously (so that `publish`, which
/// holds the state's lock, need not be async) and handed to tokio.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

async fn forward(listener: TcpListener, backend: SocketAddr, connect: Duration, max: usize) {
    let limit = Arc::new(Semaphore::new(max));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "tcp port accept");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, %backend, "tcp port at its connection limit");
                    continue; // `client` dropped: closed
                };
                conns.spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(connect, TcpStream::connect(backend)).await {
                        Ok(Ok(b)) => {
                            let _ = b.set_nodelay(true);
                            let _ = client.set_nodelay(true);
                            splice(client, b).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, %backend, error = %e, "tcp backend"),
                        Err(_) => tracing::debug!(%peer, %backend, "tcp backend connect timed out"),
                    }
                });
            }
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
