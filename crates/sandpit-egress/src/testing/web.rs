//! HTTP and HTTPS origin servers for tests, a private CA made at run time,
//! and clients that connect from a chosen source address (a sandbox's).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// A private certificate authority, made fresh for a test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA (ECDSA P-256).
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, "sandpit egress test ca");
        let key = KeyPair::generate().expect("ca key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("ca certificate");
        Self { issuer }
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server configuration with a certificate for `names`.
    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        Arc::new(config)
    }

    /// A client configuration trusting this CA only.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.issuer.der().to_vec()))
            .expect("ca root");
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// An origin server: one request per connection. `GET /bytes/N` answers
/// N bytes; anything else answers `<scheme> sni=<sni> host=<host>
/// path=<path>` so tests see which name reached it.
#[derive(Debug)]
pub struct TestWeb {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TestWeb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestWeb {
    /// Plain HTTP on `bind`.
    pub async fn http(bind: SocketAddr) -> io::Result<Self> {
        Self::start(bind, None).await
    }

    /// HTTPS on `bind` with `tls`.
    pub async fn https(bind: SocketAddr, tls: Arc<ServerConfig>) -> io::Result<Self> {
        Self::start(bind, Some(TlsAcceptor::from(tls))).await
    }

    async fn start(bind: SocketAddr, tls: Option<TlsAcceptor>) -> io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Relaxed);
                let _ = stream.set_nodelay(true);
                let tls = tls.clone();
                conns.spawn(async move {
                    let _ = match tls {
                        None => serve(stream, "http", "-").await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(s) => {
                                let sni = s.get_ref().1.server_name().unwrap_or("-").to_owned();
                                serve(s, "https", &sni).await
                            }
                            Err(e) => Err(e),
                        },
                    };
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it accepted (refused connections never reach it).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    scheme: &str,
    sni: &str,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (path, host) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(_)) = req.parse(&buf) {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default();
            break (req.path.unwrap_or("/").to_owned(), host);
        }
    };
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        let block = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(block.len() as u64) as usize;
            s.write_all(&block[..k]).await?;
            left -= k as u64;
        }
    } else {
        let body = format!("{scheme} sni={sni} host={host} path={path}\n");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).await?;
    }
    s.shutdown().await
}

/// A TCP connection to `to` from `source` (a loopback address standing in
/// for a sandbox's).
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A response, read to the end of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` with `Host: host` over `s`, read to its end (10 s at most).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
) -> io::Result<Reply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    parse_reply(&raw)
}

/// Splits a raw HTTP/1 response into status and body.
pub fn parse_reply(raw: &[u8]) -> io::Result<Reply> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an http response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(Reply {
        status,
        body: raw[end + 4..].to_vec(),
    })
}

/// `GET http://host/path` from `source` through the HTTP listener `proxy`.
pub async fn http_get(
    source: IpAddr,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> io::Result<Reply> {
    exchange(connect_from(source, proxy).await?, host, path).await
}

/// `GET https://sni/path` from `source` through the TLS listener `proxy`:
/// a real handshake with the origin (verified against `client`'s roots)
/// through the proxy.
pub async fn https_get(
    source: IpAddr,
    proxy: SocketAddr,
    client: Arc<ClientConfig>,
    sni: &str,
    path: &str,
) -> io::Result<Reply> {
    let tcp = connect_from(source, proxy).await?;
    let name = ServerName::try_from(sni.to_owned()).map_err(tls_err)?;
    let tls = TlsConnector::from(client).connect(name, tcp).await?;
    exchange(tls, sni, path).await
}
