//! The TLS passthrough: routes by the ClientHello's server name, splices
//! the bytes to the backend without terminating TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::host::{normalize_domain, parse_service_host};
use crate::routes::{Auth, RouteKind, RouteTable};
use crate::sni::{self, Parsed};
use crate::{bind, splice, BindError, ACCEPT_BACKOFF};

/// The TLS passthrough's bounds.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The most bytes read before the server name is known (the
    /// ClientHello and its record headers).
    pub max_client_hello_bytes: usize,
    /// How long a client has to send its ClientHello.
    pub hello_timeout: Duration,
    /// How long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// The most connections served at once; further ones wait in the
    /// listen queue.
    pub max_connections: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            max_client_hello_bytes: 16 * 1024,
            hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

/// The TLS passthrough frontend.
#[derive(Debug)]
pub struct TlsPassthrough {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

#[derive(Debug)]
struct Ctx {
    domain: String,
    table: Arc<RouteTable>,
    config: TlsConfig,
}

/// Why a connection was closed before splicing.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("client hello refused ({0:?})")]
    Hello(sni::Refusal),
    #[error("client hello too large")]
    TooLarge,
    #[error("timed out")]
    Timeout,
    #[error("read client hello")]
    Io(#[source] std::io::Error),
    #[error("no route for {0:?}")]
    NoRoute(String),
    #[error("connect to backend")]
    Backend(#[source] std::io::Error),
}

impl TlsPassthrough {
    /// Listens on `addr` for `<port>-<sandbox-id>.<domain>` server names.
    pub async fn bind(
        addr: SocketAddr,
        domain: &str,
        table: Arc<RouteTable>,
    ) -> Result<Self, BindError> {
        Self::bind_with(addr, domain, table, TlsConfig::default()).await
    }

    /// [`bind`](Self::bind) with other bounds.
    pub async fn bind_with(
        addr: SocketAddr,
        domain: &str,
        table: Arc<RouteTable>,
        config: TlsConfig,
    ) -> Result<Self, BindError> {
        let listener = bind(addr).await?;
        let domain = normalize_domain(domain);
        Ok(Self {
            listener,
            ctx: Arc::new(Ctx {
                domain,
                table,
                config,
            }),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until the future is dropped (connections already
    /// accepted keep going).
    pub async fn run(self) {
        let limit = Arc::new(Semaphore::new(self.ctx.config.max_connections));
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return; // never closed
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "tls passthrough accept");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(why) = serve(stream, &ctx).await {
                    tracing::debug!(%peer, error = %sandpit_errors::Chain(&why), "tls passthrough refused");
                }
            });
        }
    }
}

async fn serve(mut client: TcpStream, ctx: &Ctx) -> Result<(), Refused> {
    let mut hello = Vec::with_capacity(1024);
    let name = tokio::time::timeout(
        ctx.config.hello_timeout,
        read_server_name(&mut client, &mut hello, ctx.config.max_client_hello_bytes),
    )
    .await
    .map_err(|_| Refused::Timeout)??;
    let route = parse_service_host(&name, &ctx.domain)
        .and_then(|(id, port)| ctx.table.get(&id, port))
        .filter(|r| r.kind == RouteKind::TlsPassthrough && r.auth == Auth::Open)
        .ok_or(Refused::NoRoute(name))?;
    let mut backend = tokio::time::timeout(
        ctx.config.connect_timeout,
        TcpStream::connect(route.backend),
    )
    .await
    .map_err(|_| Refused::Timeout)?
    .map_err(Refused::Backend)?;
    let _ = backend.set_nodelay(true);
    let _ = client.set_nodelay(true);
    backend.write_all(&hello).await.map_err(Refused::Backend)?;
    drop(hello);
    splice(client, backend).await;
    Ok(())
}

/// Reads from `client` into `buf` until it holds a ClientHello, never more
/// than `max` bytes and never past what the hello needs.
async fn read_server_name(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<String, Refused> {
    loop {
        let want = match sni::server_name(buf, max).map_err(Refused::Hello)? {
            Parsed::Done(name) => return Ok(name),
            Parsed::Incomplete(want) => want,
        };
        if want > max {
            return Err(Refused::TooLarge);
        }
        let have = buf.len();
        buf.resize(want, 0);
        let n = client.read(&mut buf[have..]).await.map_err(Refused::Io)?;
        buf.truncate(have + n);
        if n == 0 {
            return Err(Refused::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}
