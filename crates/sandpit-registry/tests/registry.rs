//! Pulls from a real registry (`docker-registry`, distribution 2.8) on
//! loopback, with images pushed by the helpers below or by `skopeo`.
//! Behind the `registry-tests` feature: these need the two binaries and root
//! (the store chowns and writes overlayfs whiteouts).
//!
//! Nothing here leaves loopback: the Docker Hub case points the registry
//! itself at a closed loopback port.

#![cfg(feature = "registry-tests")]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sandpit_image::{Digest as ImageDigest, IdShift, ImageStore, Reference};
use sandpit_registry::{
    Credentials, Progress, PullError, PullErrorKind, Puller, RegistryConfig, RegistryHost,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const BASE: u32 = 1_000_000_000;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The store's digest type for a digest computed here.
fn digest(s: &str) -> ImageDigest {
    ImageDigest::parse(s).unwrap()
}

/// A free loopback port (bound then released: a small race, fine on a test
/// machine).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start");
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- registry

#[derive(Default)]
struct RegistryOptions {
    htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a fresh self-signed certificate for 127.0.0.1.
    tls: bool,
}

/// A `docker-registry serve` on a loopback port, killed on drop.
struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
    user: Option<(String, String)>,
    /// PEM of the certificate when serving HTTPS.
    cert: Option<PathBuf>,
}

impl Registry {
    fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    fn start_with(options: RegistryOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cert_path = None;
        let mut tls = String::new();
        if options.tls {
            let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
            let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            fs::write(&cert_file, cert.cert.pem()).unwrap();
            fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
            tls = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_file.display(),
                key_file.display()
            );
            cert_path = Some(cert_file);
        }
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n  secret: sandpit-test\n{tls}\
             validation:\n  manifests:\n    urls:\n      allow:\n        - ^https://\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = &options.htpasswd {
            let hash = bcrypt::hash_with_result(password, 5)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoA);
            let path = dir.path().join("htpasswd");
            fs::write(&path, format!("{user}:{hash}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: sandpit-test\n    path: {}\n",
                path.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry is installed");
        wait_for_port(&addr);
        Self {
            child,
            addr,
            dir,
            user: options.htpasswd,
            cert: cert_path,
        }
    }

    fn pusher(&self) -> Pusher {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        Pusher {
            base: format!("{scheme}://{}", self.addr),
            cert: self.cert.as_ref().map(|p| fs::read(p).unwrap()),
            auth: self.user.as_ref().map(|(u, p)| {
                use base64::Engine;
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                )
            }),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ pushes

/// Pushes blobs and manifests over the distribution API.
struct Pusher {
    base: String,
    auth: Option<String>,
    cert: Option<Vec<u8>>,
}

impl Pusher {
    fn agent(&self) -> ureq::Agent {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &self.cert {
            let cert = ureq::tls::Certificate::from_pem(pem).unwrap();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])));
        }
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .tls_config(tls.build())
                .build(),
        )
    }

    fn with_auth<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.auth {
            Some(a) => r.header("Authorization", a),
            None => r,
        }
    }

    fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let agent = self.agent();
        let resp = self
            .with_auth(agent.post(format!("{}/v2/{repo}/blobs/uploads/", self.base)))
            .send_empty()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "start upload");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = self
            .with_auth(agent.put(format!("{location}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .send(data)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "finish upload of {digest}");
        digest
    }

    fn manifest(&self, repo: &str, reference: &str, media_type: &str, data: &[u8]) -> String {
        let resp = self
            .with_auth(
                self.agent()
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.base)),
            )
            .header("Content-Type", media_type)
            .send(data)
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "push manifest {repo}:{reference}: {body}");
        sha256(data)
    }

    /// Pushes an image; returns its manifest digest.
    fn image(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        for layer in &image.layers {
            self.blob(repo, &layer.blob);
        }
        self.blob(repo, &image.config);
        self.manifest(repo, tag, image.manifest_type(), &image.manifest())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Comp {
    None,
    Gzip,
    Zstd,
}

#[derive(Clone)]
struct TestLayer {
    blob: Vec<u8>,
    comp: Comp,
    diff_id: String,
}

impl TestLayer {
    fn new(tar: &[u8], comp: Comp) -> Self {
        let blob = match comp {
            Comp::None => tar.to_vec(),
            Comp::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                gz.write_all(tar).unwrap();
                gz.finish().unwrap()
            }
            Comp::Zstd => zstd::stream::encode_all(tar, 19).unwrap(),
        };
        Self {
            blob,
            comp,
            diff_id: sha256(tar),
        }
    }

    fn digest(&self) -> String {
        sha256(&self.blob)
    }

    fn media_type(&self, oci: bool) -> String {
        let base = if oci {
            "application/vnd.oci.image.layer.v1.tar"
        } else {
            "application/vnd.docker.image.rootfs.diff.tar"
        };
        match (self.comp, oci) {
            (Comp::None, _) => base.to_owned(),
            (Comp::Gzip, true) => format!("{base}+gzip"),
            (Comp::Gzip, false) => format!("{base}.gzip"),
            (Comp::Zstd, true) => format!("{base}+zstd"),
            (Comp::Zstd, false) => format!("{base}.zstd"),
        }
    }
}

struct TestImage {
    layers: Vec<TestLayer>,
    config: Vec<u8>,
    oci: bool,
    /// Overrides the layers' media types in the manifest.
    media_types: Option<Vec<String>>,
}

impl TestImage {
    fn new(layers: Vec<TestLayer>, oci: bool) -> Self {
        Self::with_arch(layers, oci, "amd64")
    }

    fn with_arch(layers: Vec<TestLayer>, oci: bool, arch: &str) -> Self {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
                "Entrypoint": ["/bin/sh"],
                "Cmd": ["-c", "echo hi"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        Self {
            layers,
            config,
            oci,
            media_types: None,
        }
    }

    fn manifest_type(&self) -> &'static str {
        if self.oci {
            OCI_MANIFEST
        } else {
            DOCKER_MANIFEST
        }
    }

    fn manifest(&self) -> Vec<u8> {
        let layers: Vec<_> = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let media_type = match &self.media_types {
                    Some(types) => types[i].clone(),
                    None => l.media_type(self.oci),
                };
                let mut d =
                    json!({"mediaType": media_type, "digest": l.digest(), "size": l.blob.len()});
                if media_type.contains("foreign") {
                    d["urls"] = json!(["https://layers.example.invalid/blob"]);
                }
                d
            })
            .collect();
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": self.manifest_type(),
            "config": {
                "mediaType": if self.oci { OCI_CONFIG } else { DOCKER_CONFIG },
                "digest": sha256(&self.config),
                "size": self.config.len(),
            },
            "layers": layers,
        }))
        .unwrap()
    }
}

// -------------------------------------------------------------------- tars

/// Builds tars header by header: hostile paths included.
struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, path: &str, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        let name = path.as_bytes();
        assert!(name.len() < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h
    }

    fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_owned(path, data, 0o644, 0, 0)
    }

    fn file_owned(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = Self::header(EntryType::Directory, path, mode, 0);
        self.push(h, &[])
    }

    fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.push(h, &[])
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    fn chardev(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Char, path, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        self.push(h, &[])
    }

    /// A PAX header for the next entry.
    fn pax(&mut self, key: &str, value: &[u8]) -> &mut Self {
        let body = 1 + key.len() + 1 + value.len() + 1;
        let mut len = body + 1;
        while body + len.to_string().len() != len {
            len = body + len.to_string().len();
        }
        let mut data = format!("{len} {key}=").into_bytes();
        data.extend_from_slice(value);
        data.push(b'\n');
        let h = Self::header(
            EntryType::XHeader,
            "././@PaxHeader",
            0o644,
            data.len() as u64,
        );
        self.push(h, &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

// ------------------------------------------------------------------- proxy

#[derive(Clone, Default)]
struct ProxyOptions {
    /// Answer 401 with a Bearer challenge unless the request carries the
    /// token `/token` hands out.
    bearer: bool,
    /// Cut blob responses after this many body bytes.
    cut_blobs_after: Option<usize>,
    /// Wait this long before forwarding each request.
    delay: Option<Duration>,
    /// Redirect blob requests to this base URL (a CDN, say).
    redirect_blobs: Option<String>,
    /// Flip a bit of the responses to paths containing this.
    tamper: Option<String>,
}

const TOKEN: &str = "sandpit-test-token";

/// An HTTP/1.1 proxy in front of a registry, one request per connection:
/// logs request lines, can play a token server, delay or cut responses.
struct Proxy {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
    token_queries: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: &str, options: ProxyOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let token_queries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, me) = (upstream.to_owned(), addr.clone());
        let (r, t, s) = (requests.clone(), token_queries.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (upstream, me, options) = (upstream.clone(), me.clone(), options.clone());
                let (r, t) = (r.clone(), t.clone());
                thread::spawn(move || {
                    let _ = serve(conn, &upstream, &me, &options, &r, &t);
                });
            }
        });
        Self {
            addr,
            requests,
            token_queries,
            stop,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self, pattern: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains(pattern))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn respond(mut conn: &TcpStream, status: &str, headers: &[String], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.write_all(body);
}

fn serve(
    conn: TcpStream,
    upstream: &str,
    me: &str,
    options: &ProxyOptions,
    requests: &Mutex<Vec<String>>,
    token_queries: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let head = read_head(&mut reader)?;
    let request_line = head[0].clone();
    let has_auth = head[1..]
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("authorization:"));
    let mut logged = request_line.clone();
    if has_auth {
        logged.push_str(" [auth]");
    }
    let agent = format!("user-agent: sandpit/{}", env!("CARGO_PKG_VERSION"));
    if head[1..].iter().any(|h| h.eq_ignore_ascii_case(&agent)) {
        logged.push_str(" [sandpit]");
    }
    requests.lock().unwrap().push(logged);
    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
    if let Some(query) = path.strip_prefix("/token?") {
        token_queries.lock().unwrap().push(query.to_owned());
        respond(
            &conn,
            "200 OK",
            &["Content-Type: application/json".into()],
            format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#).as_bytes(),
        );
        return Ok(());
    }
    if options.bearer {
        let authorized = head[1..]
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
        if !authorized {
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|p| p.split_once("/manifests/").or(p.split_once("/blobs/")))
                .map(|(repo, _)| repo.to_owned())
                .unwrap_or_default();
            respond(
                &conn,
                "401 Unauthorized",
                &[
                    "Content-Type: application/json".into(),
                    format!(
                        r#"Www-Authenticate: Bearer realm="http://{me}/token",service="sandpit-test",scope="repository:{repo}:pull""#
                    ),
                ],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
            return Ok(());
        }
    }
    if let Some(target) = &options.redirect_blobs {
        if path.contains("/blobs/") {
            respond(
                &conn,
                "307 Temporary Redirect",
                &[format!("Location: {target}{path}")],
                b"",
            );
            return Ok(());
        }
    }
    if let Some(delay) = options.delay {
        thread::sleep(delay);
    }
    let mut up = TcpStream::connect(upstream)?;
    let mut out = format!("{request_line}\r\n");
    for h in &head[1..] {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    up.write_all(out.as_bytes())?;
    let mut up_reader = BufReader::new(up);
    let response_head = read_head(&mut up_reader)?;
    let mut out = String::new();
    for h in &response_head {
        if !h.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut conn_w = conn.try_clone()?;
    conn_w.write_all(out.as_bytes())?;
    let tamper = options
        .tamper
        .as_ref()
        .is_some_and(|pattern| path.contains(pattern.as_str()));
    match options.cut_blobs_after {
        _ if tamper => {
            // Same length, one bit flipped: only a digest check notices.
            let mut body = Vec::new();
            up_reader.read_to_end(&mut body)?;
            if let Some(last) = body.last_mut() {
                *last ^= 1;
            }
            conn_w.write_all(&body)?;
        }
        Some(n) if path.contains("/blobs/") => {
            let mut body = vec![0u8; n];
            let got = read_up_to(&mut up_reader, &mut body)?;
            conn_w.write_all(&body[..got])?;
            conn_w.flush()?;
            // Abrupt: the client sees a reset or an early end.
            conn.shutdown(Shutdown::Both)?;
        }
        _ => {
            std::io::copy(&mut up_reader, &mut conn_w)?;
        }
    }
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

// ------------------------------------------------------------------- store

struct Env {
    _dir: tempfile::TempDir,
    store: Arc<ImageStore>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ImageStore::open(&dir.path().join("store"), IdShift::default()).unwrap());
        Self { _dir: dir, store }
    }

    fn puller(&self, config: RegistryConfig) -> Puller {
        Puller::new(self.store.clone(), config).unwrap()
    }

    fn layer_count(&self) -> usize {
        fs::read_dir(self.store.root().join("layers/sha256"))
            .unwrap()
            .count()
    }

    fn tmp_is_empty(&self) -> bool {
        fs::read_dir(self.store.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    }

    /// A failed pull leaves no layer and no staging.
    fn assert_nothing_left(&self) {
        assert_eq!(self.layer_count(), 0, "a layer was left behind");
        assert!(self.tmp_is_empty(), "staging was left behind");
        assert!(self.store.list().unwrap().is_empty());
    }

    fn top(&self, image: &sandpit_image::Image) -> PathBuf {
        self.store.layer_path(image.layers.last().unwrap())
    }
}

fn insecure(addr: &str) -> RegistryConfig {
    with_host(
        addr,
        RegistryHost {
            insecure: true,
            ..RegistryHost::default()
        },
    )
}

fn with_host(addr: &str, host: RegistryHost) -> RegistryConfig {
    RegistryConfig {
        registries: BTreeMap::from([(addr.to_owned(), host)]),
        ..RegistryConfig::default()
    }
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn quiet(_: &Progress) {}

fn pull(puller: &Puller, reference: &str) -> Result<sandpit_image::Image, PullError> {
    puller.pull(&r(reference), None, &quiet)
}

fn expect_err(result: Result<sandpit_image::Image, PullError>, kind: PullErrorKind) -> PullError {
    match result {
        Err(e) => {
            eprintln!("{e}");
            assert_eq!(e.kind(), kind, "{e}");
            e
        }
        Ok(image) => panic!("expected a {kind} failure, pulled {}", image.reference),
    }
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `buf` is valid for its length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root");
    }
    root
}

// ------------------------------------------------------------------- tests

#[test]
fn multi_layer_image_with_whiteouts_and_every_compression() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let base = TarBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/motd", b"welcome")
        .file("gone", b"to be deleted")
        .dir("var/cache/", 0o755)
        .file("var/cache/old", b"stale")
        .file_owned("usr/bin/tool", b"#!/bin/sh\n", 0o4755, 1000, 1000)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("usr/bin/alias", "tool")
        .pax("SCHILY.xattr.user.origin", b"registry-test")
        .file("tagged", b"x")
        .finish();
    let upper = TarBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.motd", b"")
        .file(".wh.gone", b"")
        .dir("var/cache/", 0o755)
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"fresh")
        .finish();
    let top = TarBuilder::new().file("srv/app", b"application").finish();
    let layers = vec![
        TestLayer::new(&base, Comp::Gzip),
        TestLayer::new(&upper, Comp::Zstd),
        TestLayer::new(&top, Comp::None),
    ];
    let image = TestImage::new(layers.clone(), true);
    let manifest_digest = pusher.image("multi/layers", "1", &image);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let events = Mutex::new(Vec::new());
    let reference = format!("{}/multi/layers:1", registry.addr);
    let pulled = puller
        .pull(&r(&reference), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(
        pulled.manifest_digest.as_ref().map(ImageDigest::as_str),
        Some(manifest_digest.as_str())
    );
    assert_eq!(
        pulled.layers,
        layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(pulled.config.env, ["PATH=/usr/bin:/bin", "GREETING=hello"]);
    assert_eq!(pulled.config.entrypoint, ["/bin/sh"]);
    assert_eq!(pulled.config.cmd, ["-c", "echo hi"]);
    assert_eq!(pulled.config.working_dir, "/srv");
    assert_eq!(pulled.config.user, "1000:1000");
    assert_eq!(env.store.get(&r(&reference)).unwrap(), pulled);

    // Bottom layer: modes, shifted ownership, links, xattrs.
    let lower = env.store.layer_path(&digest(&layers[0].diff_id));
    let tool = fs::symlink_metadata(lower.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid()), (BASE + 1000, BASE + 1000));
    let tool2 = fs::symlink_metadata(lower.join("usr/bin/tool2")).unwrap();
    assert_eq!(tool2.ino(), tool.ino());
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::read_link(lower.join("usr/bin/alias")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        getxattr(&lower.join("tagged"), "user.origin").as_deref(),
        Some(&b"registry-test"[..])
    );
    let etc = fs::symlink_metadata(lower.join("etc")).unwrap();
    assert_eq!((etc.uid(), etc.gid()), (BASE, BASE));
    // Middle layer: overlayfs whiteouts and opaque dir.
    let middle = env.store.layer_path(&digest(&layers[1].diff_id));
    for whiteout in ["etc/motd", "gone"] {
        let m = fs::symlink_metadata(middle.join(whiteout)).unwrap();
        assert!(m.file_type().is_char_device(), "{whiteout}");
        assert_eq!(m.rdev(), 0);
    }
    assert_eq!(
        getxattr(&middle.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(middle.join("var/cache/new")).unwrap(), b"fresh");
    assert_eq!(
        fs::read(env.top(&pulled).join("srv/app")).unwrap(),
        b"application"
    );

    let events = events.into_inner().unwrap();
    match &events[0] {
        Progress::Resolved {
            endpoint,
            manifest_digest: digest,
            layers: infos,
        } => {
            assert_eq!(endpoint, &format!("http://{}", registry.addr));
            assert_eq!(digest, &manifest_digest);
            assert_eq!(infos.len(), 3);
            assert_eq!(infos[1].digest, layers[1].digest());
            assert_eq!(infos[1].size, layers[1].blob.len() as u64);
        }
        other => panic!("first event {other:?}"),
    }
    for (index, layer) in layers.iter().enumerate() {
        assert!(events.contains(&Progress::LayerDone { index }), "{index}");
        let total = layer.blob.len() as u64;
        assert!(
            events.contains(&Progress::LayerBytes {
                index,
                done: total,
                total
            }),
            "{index}"
        );
    }
    assert!(env.tmp_is_empty());

    // Pulled again: every layer is cached.
    let events = Mutex::new(Vec::new());
    puller
        .pull(&r(&reference), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    let events = events.into_inner().unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::LayerCached { .. }))
            .count(),
        3
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, Progress::LayerBytes { .. })));
}

#[test]
fn docker_schema2_and_shared_layers() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(&registry.addr, ProxyOptions::default());
    let pusher = registry.pusher();
    let shared = TestLayer::new(&TarBuilder::new().file("shared", b"s").finish(), Comp::Gzip);
    let a = TestLayer::new(&TarBuilder::new().file("a", b"a").finish(), Comp::Gzip);
    let b = TestLayer::new(&TarBuilder::new().file("b", b"b").finish(), Comp::None);
    pusher.image(
        "docker/a",
        "1",
        &TestImage::new(vec![shared.clone(), a], false),
    );
    pusher.image(
        "docker/b",
        "1",
        &TestImage::new(vec![shared.clone(), b.clone()], false),
    );

    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let image_a = pull(&puller, &format!("{}/docker/a:1", proxy.addr)).unwrap();
    assert_eq!(env.layer_count(), 2);
    let image_b = pull(&puller, &format!("{}/docker/b:1", proxy.addr)).unwrap();
    assert_eq!(env.layer_count(), 3);
    assert_eq!(image_a.layers[0], image_b.layers[0]);
    assert_eq!(
        fs::read(
            env.store
                .layer_path(&digest(&shared.diff_id))
                .join("shared")
        )
        .unwrap(),
        b"s"
    );
    assert_eq!(fs::read(env.top(&image_b).join("b")).unwrap(), b"b");
    // The shared layer was downloaded once.
    assert_eq!(proxy.count(&format!("/blobs/{}", shared.digest())), 1);
    assert_eq!(proxy.count(&format!("/blobs/{}", b.digest())), 1);
    assert_eq!(env.store.list().unwrap().len(), 2);
}

#[test]
fn skopeo_pushed_busybox() {
    if !is_root() {
        return;
    }
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/busybox.tar");
    if !rootfs.exists() {
        eprintln!(
            "skipping: {} missing (scripts/build-test-images.sh)",
            rootfs.display()
        );
        return;
    }
    let registry = Registry::start();
    skopeo_push(&rootfs, &format!("{}/tools/busybox:1", registry.addr));
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let image = pull(&puller, &format!("{}/tools/busybox:1", registry.addr)).unwrap();
    assert_eq!(image.layers.len(), 1);
    let root = env.top(&image);
    let busybox = fs::symlink_metadata(root.join("bin/busybox")).unwrap();
    assert!(busybox.is_file());
    assert_eq!(busybox.uid(), BASE);
    assert!(fs::read(root.join("etc/passwd"))
        .unwrap()
        .starts_with(b"root:"));
}

fn skopeo_push(rootfs: &Path, destination: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("tarball:{}", rootfs.display()))
        .arg(format!("docker://{destination}"))
        .output()
        .expect("skopeo is installed");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn push_multi_arch(
    pusher: &Pusher,
    repo: &str,
    tag: &str,
    arches: &[(&str, Option<&str>)],
) -> Vec<TestLayer> {
    let mut entries = Vec::new();
    let mut layers = Vec::new();
    for (arch, variant) in arches {
        let layer = TestLayer::new(
            &TarBuilder::new().file("arch", arch.as_bytes()).finish(),
            Comp::Gzip,
        );
        let image = TestImage::with_arch(vec![layer.clone()], true, arch);
        let digest = pusher.image(repo, &format!("{tag}-{arch}"), &image);
        let mut platform = json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": image.manifest().len(),
            "platform": platform,
        }));
        layers.push(layer);
    }
    // An attestation manifest, as BuildKit writes them.
    let att = TestLayer::new(&TarBuilder::new().file("att", b"att").finish(), Comp::None);
    let att_image = TestImage::with_arch(vec![att], true, "amd64");
    let att_digest = pusher.image(repo, &format!("{tag}-att"), &att_image);
    entries.insert(
        0,
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": att_digest,
            "size": att_image.manifest().len(),
            "platform": {"os": "unknown", "architecture": "unknown"},
        }),
    );
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    pusher.manifest(repo, tag, OCI_INDEX, &index);
    layers
}

#[test]
fn multi_arch_index_picks_the_host_platform() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layers = push_multi_arch(
        &pusher,
        "multi/arch",
        "1",
        &[("arm64", Some("v8")), ("amd64", None), ("s390x", None)],
    );
    push_multi_arch(
        &pusher,
        "multi/arch",
        "noamd64",
        &[("arm64", Some("v8")), ("s390x", None)],
    );
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let image = pull(&puller, &format!("{}/multi/arch:1", registry.addr)).unwrap();
    assert_eq!(image.layers, [layers[1].diff_id.clone()]);
    assert_eq!(fs::read(env.top(&image).join("arch")).unwrap(), b"amd64");
    // The image records the index digest: what the tag names.
    let index_digest = image.manifest_digest.clone().unwrap();
    let by_digest = pull(
        &puller,
        &format!("{}/multi/arch@{index_digest}", registry.addr),
    )
    .unwrap();
    assert_eq!(by_digest.id, image.id);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/multi/arch:noamd64", registry.addr)),
        PullErrorKind::NoMatchingPlatform,
    );
    assert_eq!(
        e.message(),
        "no manifest for linux/amd64 (available: linux/arm64/v8, linux/s390x)"
    );
    env.assert_nothing_left();
    // A single-arch image for another platform.
    let e = expect_err(
        pull(&puller, &format!("{}/multi/arch:1-arm64", registry.addr)),
        PullErrorKind::NoMatchingPlatform,
    );
    assert_eq!(e.message(), "image is for linux/arm64, not linux/amd64");
}

#[test]
fn pull_by_digest_and_wrong_digests() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layer = TestLayer::new(&TarBuilder::new().file("d", b"digest").finish(), Comp::Gzip);
    let image = TestImage::new(vec![layer], true);
    let digest = pusher.image("by/digest", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let reference = format!("{}/by/digest@{digest}", registry.addr);
    let pulled = pull(&puller, &reference).unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(
        pulled.manifest_digest.as_ref().map(ImageDigest::as_str),
        Some(digest.as_str())
    );
    // Tag and digest: the digest decides.
    let both = pull(
        &puller,
        &format!("{}/by/digest:other@{digest}", registry.addr),
    )
    .unwrap();
    assert_eq!(both.id, pulled.id);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let wrong = sha256(b"no such manifest");
    let e = expect_err(
        pull(&puller, &format!("{}/by/digest@{wrong}", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert_eq!(
        e.to_string(),
        format!(
            "pull {}/by/digest@{wrong}: manifest unknown (not found)",
            registry.addr
        )
    );
    env.assert_nothing_left();
}

#[test]
fn tampered_content_is_refused() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    // Uncompressed: a flipped bit in the tar's padding is no format error.
    let layer = TestLayer::new(&TarBuilder::new().file("t", b"t").finish(), Comp::None);
    let image = TestImage::new(vec![layer.clone()], true);
    let digest = pusher.image("tamper/img", "1", &image);
    push_multi_arch(&pusher, "tamper/multi", "1", &[("amd64", None)]);
    let through = |pattern: String| {
        Proxy::start(
            &registry.addr,
            ProxyOptions {
                tamper: Some(pattern),
                ..ProxyOptions::default()
            },
        )
    };
    let env = Env::new();

    // Manifests addressed by digest: the reference's, an index entry's.
    let proxy = through("/manifests/sha256:".into());
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img@{digest}", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(
        e.message().starts_with(&format!(
            "manifest digest mismatch: expected {digest}, got sha256:"
        )),
        "{e}"
    );
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/multi:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("manifest digest mismatch"), "{e}");
    // Every request said who it is.
    assert!(proxy.requests().iter().all(|r| r.ends_with("[sandpit]")));

    // The config blob.
    let proxy = through(format!("/blobs/{}", sha256(&image.config)));
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("config digest mismatch"), "{e}");

    // A layer blob: refused after streaming, before it is visible.
    let proxy = through(format!("/blobs/{}", layer.digest()));
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(
        e.message().starts_with(&format!(
            "layer {}: layer digest mismatch: expected {}",
            layer.digest(),
            layer.digest()
        )),
        "{e}"
    );
    env.assert_nothing_left();
}

#[test]
fn missing_tags_and_repositories_are_not_found() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    pusher.image("present/repo", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/present/repo:2", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert_eq!(
        e.to_string(),
        format!(
            "pull {}/present/repo:2: manifest unknown (not found)",
            registry.addr
        )
    );
    let e = expect_err(
        pull(&puller, &format!("{}/absent/repo:1", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert!(e.message().ends_with("(not found)"), "{e}");
    env.assert_nothing_left();
}

#[test]
fn basic_auth_with_htpasswd() {
    if !is_root() {
        return;
    }
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("alice".into(), "wonderland".into())),
        ..RegistryOptions::default()
    });
    let pusher = registry.pusher();
    let layer = TestLayer::new(
        &TarBuilder::new().file("secret", b"s3cr3t").finish(),
        Comp::Gzip,
    );
    pusher.image("private/img", "1", &TestImage::new(vec![layer], true));
    let reference = format!("{}/private/img:1", registry.addr);

    let env = Env::new();
    let anonymous = env.puller(insecure(&registry.addr));
    let e = expect_err(pull(&anonymous, &reference), PullErrorKind::Unauthorized);
    assert_eq!(e.message(), "unauthorized: authentication required");
    let wrong = Credentials {
        username: "alice".into(),
        password: "looking-glass".into(),
    };
    expect_err(
        anonymous.pull(&r(&reference), Some(&wrong), &quiet),
        PullErrorKind::Unauthorized,
    );
    env.assert_nothing_left();

    // Per-call credentials.
    let right = Credentials {
        username: "alice".into(),
        password: "wonderland".into(),
    };
    let image = anonymous
        .pull(&r(&reference), Some(&right), &quiet)
        .unwrap();
    assert_eq!(fs::read(env.top(&image).join("secret")).unwrap(), b"s3cr3t");

    // Configured credentials; per-call ones win over them.
    let env = Env::new();
    let configured = |password: &str| {
        with_host(
            &registry.addr,
            RegistryHost {
                insecure: true,
                username: Some("alice".into()),
                password: Some(password.into()),
                ..RegistryHost::default()
            },
        )
    };
    pull(&env.puller(configured("wonderland")), &reference).unwrap();
    let env = Env::new();
    let misconfigured = env.puller(configured("stale"));
    expect_err(
        pull(&misconfigured, &reference),
        PullErrorKind::Unauthorized,
    );
    misconfigured
        .pull(&r(&reference), Some(&right), &quiet)
        .unwrap();
    // The failed anonymous-cache does not leak into credentialed pulls, nor
    // the other way round.
    expect_err(pull(&anonymous, &reference), PullErrorKind::Unauthorized);
}

#[test]
fn private_ca_over_tls() {
    if !is_root() {
        return;
    }
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("bob".into(), "builder".into())),
        tls: true,
    });
    let layer = TestLayer::new(
        &TarBuilder::new().file("tls", b"over tls").finish(),
        Comp::Zstd,
    );
    registry
        .pusher()
        .image("tls/img", "1", &TestImage::new(vec![layer], true));
    let reference = format!("{}/tls/img:1", registry.addr);
    let host = RegistryHost {
        username: Some("bob".into()),
        password: Some("builder".into()),
        ..RegistryHost::default()
    };
    let env = Env::new();
    // The system roots do not know the registry's certificate.
    let puller = env.puller(with_host(&registry.addr, host.clone()));
    let e = expect_err(pull(&puller, &reference), PullErrorKind::Unreachable);
    assert_eq!(
        e.message(),
        "registry unreachable: tls: invalid peer certificate: UnknownIssuer"
    );
    env.assert_nothing_left();
    let puller = env.puller(with_host(
        &registry.addr,
        RegistryHost {
            ca_file: registry.cert.clone(),
            ..host
        },
    ));
    let image = pull(&puller, &reference).unwrap();
    assert_eq!(fs::read(env.top(&image).join("tls")).unwrap(), b"over tls");
}

#[test]
fn authorization_is_not_forwarded_across_hosts() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let cdn = Proxy::start(&registry.addr, ProxyOptions::default());
    let cdn_port = cdn.addr.rsplit(':').next().unwrap().to_owned();
    let front = Proxy::start(
        &registry.addr,
        ProxyOptions {
            bearer: true,
            redirect_blobs: Some(format!("http://localhost:{cdn_port}")),
            ..ProxyOptions::default()
        },
    );
    let layer = TestLayer::new(
        &TarBuilder::new().file("r", b"redirected").finish(),
        Comp::Gzip,
    );
    registry
        .pusher()
        .image("redirect/img", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    let puller = env.puller(insecure(&front.addr));
    let image = pull(&puller, &format!("{}/redirect/img:1", front.addr)).unwrap();
    assert_eq!(fs::read(env.top(&image).join("r")).unwrap(), b"redirected");
    // The registry saw the token; the other host got the blobs without it.
    assert!(front.count("/blobs/") >= 2);
    assert_eq!(front.count("[auth]"), front.count(" /v2/") - 1);
    let cdn_requests = cdn.requests();
    assert_eq!(cdn.count("/blobs/"), 2, "{cdn_requests:?}");
    assert_eq!(cdn.count("[auth]"), 0, "{cdn_requests:?}");
}

#[test]
fn anonymous_bearer_token_flow() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            bearer: true,
            ..ProxyOptions::default()
        },
    );
    let pusher = registry.pusher();
    let layers = vec![
        TestLayer::new(&TarBuilder::new().file("t1", b"1").finish(), Comp::Gzip),
        TestLayer::new(&TarBuilder::new().file("t2", b"2").finish(), Comp::Zstd),
    ];
    pusher.image("token/img", "1", &TestImage::new(layers, true));
    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let image = pull(&puller, &format!("{}/token/img:1", proxy.addr)).unwrap();
    assert_eq!(fs::read(env.top(&image).join("t2")).unwrap(), b"2");
    let queries = proxy.token_queries.lock().unwrap().clone();
    assert_eq!(
        queries,
        ["service=sandpit-test&scope=repository%3Atoken%2Fimg%3Apull"],
        "one token for the whole pull"
    );
    // Only the first request went without the token.
    let requests = proxy.requests();
    let v2: Vec<_> = requests.iter().filter(|r| r.contains(" /v2/")).collect();
    assert_eq!(v2.len(), 5, "{requests:?}");
    // The token is cached across pulls.
    pull(&puller, &format!("{}/token/img:1", proxy.addr)).unwrap();
    assert_eq!(proxy.token_queries.lock().unwrap().len(), 1);
}

#[test]
fn docker_hub_mirror() {
    if !is_root() {
        return;
    }
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/busybox.tar");
    let registry = Registry::start();
    if rootfs.exists() {
        skopeo_push(&rootfs, &format!("{}/library/busybox:1", registry.addr));
    } else {
        let layer = TestLayer::new(
            &TarBuilder::new().file("bin/busybox", b"bb").finish(),
            Comp::Gzip,
        );
        registry
            .pusher()
            .image("library/busybox", "1", &TestImage::new(vec![layer], false));
    }
    // The registry itself would be Docker Hub: point it at a closed port.
    let closed = format!("127.0.0.1:{}", free_port());
    let hub = |mirrors: Vec<String>| {
        with_host(
            "docker.io",
            RegistryHost {
                mirrors,
                endpoint: Some(format!("https://{closed}")),
                ..RegistryHost::default()
            },
        )
    };

    let env = Env::new();
    let puller = env.puller(hub(vec![
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://{}/", registry.addr),
    ]));
    let events = Mutex::new(Vec::new());
    let image = puller
        .pull(&r("busybox:1"), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    assert_eq!(image.reference, "docker.io/library/busybox:1");
    assert_eq!(env.store.get(&r("busybox:1")).unwrap(), image);
    assert!(env.top(&image).join("bin/busybox").exists());
    assert!(matches!(
        &events.lock().unwrap()[0],
        Progress::Resolved { endpoint, .. } if *endpoint == format!("http://{}", registry.addr)
    ));

    // No mirror answers and the registry is unreachable.
    let env = Env::new();
    let puller = env.puller(hub(vec![format!("http://127.0.0.1:{}", free_port())]));
    let e = expect_err(pull(&puller, "busybox:1"), PullErrorKind::Unreachable);
    assert_eq!(
        e.to_string(),
        "pull docker.io/library/busybox:1: registry unreachable: connection refused"
    );
    // A mirror without the image falls through to the registry too.
    let puller = env.puller(hub(vec![format!("http://{}", registry.addr)]));
    expect_err(pull(&puller, "busybox:2"), PullErrorKind::Unreachable);
    env.assert_nothing_left();
    // With the registry itself reachable (plain http, opted in).
    let puller = env.puller(with_host(
        "docker.io",
        RegistryHost {
            mirrors: vec![format!("http://127.0.0.1:{}", free_port())],
            insecure: true,
            endpoint: Some(format!("http://{}", registry.addr)),
            ..RegistryHost::default()
        },
    ));
    pull(&puller, "docker.io/library/busybox:1").unwrap();
}

#[test]
fn plain_http_is_never_a_fallback() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    registry
        .pusher()
        .image("plain/img", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    // Configured, but not insecure; and not configured at all.
    for config in [
        with_host(&registry.addr, RegistryHost::default()),
        RegistryConfig::default(),
    ] {
        let puller = env.puller(config);
        let e = expect_err(
            pull(&puller, &format!("{}/plain/img:1", registry.addr)),
            PullErrorKind::Unreachable,
        );
        assert_eq!(
            e.message(),
            "registry unreachable: tls: received corrupt message of type InvalidContentType \
             (is it a plain http server?)"
        );
    }
    env.assert_nothing_left();
    // The registry never saw a plain request for the image.
    let log = registry.log();
    assert!(log.contains("method=PUT"), "the push is logged");
    assert!(!log.contains("method=GET"), "{log}");
}

#[test]
fn registry_going_away_mid_blob() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            cut_blobs_after: Some(256 << 10),
            ..ProxyOptions::default()
        },
    );
    // Incompressible content: the blob is as large as the file.
    let mut noise = vec![0u8; 2 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let layer = TestLayer::new(
        &TarBuilder::new().file("noise", &noise).finish(),
        Comp::Gzip,
    );
    let image = TestImage::new(vec![layer], true);
    // The config blob is small: only the layer is cut.
    registry.pusher().image("cut/img", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/cut/img:1", proxy.addr)),
        PullErrorKind::Unreachable,
    );
    assert_eq!(e.message(), "registry unreachable: connection closed early");
    env.assert_nothing_left();

    // The registry killed outright mid-pull (between manifest and blobs is
    // racy; a dead registry from the start is the deterministic variant).
    let addr = registry.addr.clone();
    drop(registry);
    let e = expect_err(
        pull(&puller, &format!("{}/cut/img:1", proxy.addr)),
        PullErrorKind::Unreachable,
    );
    assert!(e.message().starts_with("registry unreachable: "), "{e}");
    let direct = env.puller(insecure(&addr));
    let e = expect_err(
        pull(&direct, &format!("{addr}/cut/img:1")),
        PullErrorKind::Unreachable,
    );
    assert_eq!(e.message(), "registry unreachable: connection refused");
    env.assert_nothing_left();
}

#[test]
fn malicious_layers() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let push = |name: &str, layers: Vec<TestLayer>| {
        pusher.image(name, "1", &TestImage::new(layers, true));
        format!("{}/{name}:1", registry.addr)
    };
    let dotdot = push(
        "evil/dotdot",
        vec![TestLayer::new(
            &TarBuilder::new()
                .file("ok", b"ok")
                .file("../../escape", b"x")
                .finish(),
            Comp::Gzip,
        )],
    );
    let through_symlink = push(
        "evil/symlink",
        vec![TestLayer::new(
            &TarBuilder::new()
                .symlink("etc", "/")
                .file("etc/escape", b"x")
                .finish(),
            Comp::Gzip,
        )],
    );
    let across_layers = push(
        "evil/across",
        vec![
            TestLayer::new(
                &TarBuilder::new().symlink("up", "../../../..").finish(),
                Comp::Gzip,
            ),
            TestLayer::new(
                &TarBuilder::new().file("up/escape", b"x").finish(),
                Comp::Gzip,
            ),
        ],
    );
    let absolute = push(
        "evil/absolute",
        vec![TestLayer::new(
            &TarBuilder::new()
                .file("/abs/file", b"inside")
                .chardev("dev/mem")
                .finish(),
            Comp::None,
        )],
    );
    let bomb = {
        let tar = TarBuilder::new()
            .file("zeros", &vec![0u8; 4 << 20])
            .finish();
        push("evil/bomb", vec![TestLayer::new(&tar, Comp::Gzip)])
    };

    let env = Env::new();
    let mut config = insecure(&registry.addr);
    config.max_layer_bytes = 1 << 20;
    let puller = env.puller(config);
    let outside = env.store.root().parent().unwrap().to_owned();

    let e = expect_err(pull(&puller, &dotdot), PullErrorKind::Invalid);
    assert!(e.message().contains("tar entry \"../../escape\""), "{e}");
    let e = expect_err(pull(&puller, &through_symlink), PullErrorKind::Invalid);
    assert!(
        e.message()
            .contains("tar entry \"etc/escape\": path goes through a symlink"),
        "{e}"
    );
    let e = expect_err(pull(&puller, &bomb), PullErrorKind::TooLarge);
    assert_eq!(e.message(), "layer larger than 1048576 bytes");
    env.assert_nothing_left();

    // Each layer is unpacked on its own: `up/` is a plain directory of the
    // second layer, and overlayfs shows it over the symlink.
    let image = pull(&puller, &across_layers).unwrap();
    let top = env.top(&image);
    assert!(fs::symlink_metadata(top.join("up")).unwrap().is_dir());
    assert_eq!(fs::read(top.join("up/escape")).unwrap(), b"x");
    let image = pull(&puller, &absolute).unwrap();
    let top = env.top(&image);
    assert_eq!(fs::read(top.join("abs/file")).unwrap(), b"inside");
    assert!(!top.join("dev/mem").exists());
    assert!(!Path::new("/abs/file").exists());
    for path in [
        outside.join("escape"),
        outside.parent().unwrap().join("escape"),
        PathBuf::from("/escape"),
        PathBuf::from("/etc/escape"),
    ] {
        assert!(!path.exists(), "{}", path.display());
    }
    assert!(env.tmp_is_empty());
}

#[test]
fn foreign_and_unknown_layers_are_refused() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    let mut image = TestImage::new(vec![layer], false);
    image.media_types = Some(vec![
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip".into(),
    ]);
    registry.pusher().image("odd/foreign", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/odd/foreign:1", registry.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("foreign layer"), "{e}");
    let layer = TestLayer::new(&TarBuilder::new().file("g", b"g").finish(), Comp::Gzip);
    let mut image = TestImage::new(vec![layer], true);
    image.media_types = Some(vec!["application/vnd.oci.image.layer.v1.tar+bzip2".into()]);
    registry.pusher().image("odd/bzip2", "1", &image);
    let e = expect_err(
        pull(&puller, &format!("{}/odd/bzip2:1", registry.addr)),
        PullErrorKind::Invalid,
    );
    assert_eq!(
        e.message(),
        "unsupported layer media type \"application/vnd.oci.image.layer.v1.tar+bzip2\""
    );
    env.assert_nothing_left();
}

#[test]
fn concurrent_pulls_are_coalesced() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            delay: Some(Duration::from_millis(300)),
            ..ProxyOptions::default()
        },
    );
    let layers = vec![
        TestLayer::new(&TarBuilder::new().file("c1", b"1").finish(), Comp::Gzip),
        TestLayer::new(&TarBuilder::new().file("c2", b"2").finish(), Comp::Gzip),
    ];
    registry
        .pusher()
        .image("coalesce/img", "1", &TestImage::new(layers, true));
    let env = Env::new();
    let puller = Arc::new(env.puller(insecure(&proxy.addr)));
    let reference = r(&format!("{}/coalesce/img:1", proxy.addr));
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let waiting = Arc::new(Mutex::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (puller, barrier, reference, waiting) = (
                puller.clone(),
                barrier.clone(),
                reference.clone(),
                waiting.clone(),
            );
            thread::spawn(move || {
                barrier.wait();
                puller.pull(&reference, None, &|p: &Progress| {
                    if *p == Progress::Waiting {
                        *waiting.lock().unwrap() += 1;
                    }
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let first = results[0].as_ref().unwrap();
    for result in &results {
        assert_eq!(result.as_ref().unwrap(), first);
    }
    assert_eq!(*waiting.lock().unwrap(), threads - 1);
    assert_eq!(proxy.count("/manifests/"), 1, "{:?}", proxy.requests());
    // Config and two layers.
    assert_eq!(proxy.count("/blobs/"), 3, "{:?}", proxy.requests());

    // Failures are shared the same way.
    let missing = r(&format!("{}/coalesce/img:absent", proxy.addr));
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (puller, barrier, missing) = (puller.clone(), barrier.clone(), missing.clone());
            thread::spawn(move || {
                barrier.wait();
                puller.pull(&missing, None, &quiet)
            })
        })
        .collect();
    let errors: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err())
        .collect();
    assert!(errors.iter().all(|e| *e == errors[0]));
    assert_eq!(errors[0].kind(), PullErrorKind::NotFound);
    assert_eq!(proxy.count("/manifests/absent"), 1);

    // `pull_if_missing` (a sandbox start) takes the stored image without a
    // request, even right after a pull retired; `pull` always asks.
    let before = proxy.requests().len();
    let stored = puller.pull_if_missing(&reference, None, &quiet).unwrap();
    assert_eq!(&stored, first);
    assert_eq!(proxy.requests().len(), before, "{:?}", proxy.requests());
    pull(&puller, &reference.to_string()).unwrap();
    assert_eq!(proxy.count("/manifests/"), 3, "{:?}", proxy.requests());
    // A missing image is pulled.
    let other = r(&format!("{}/coalesce/img:absent", proxy.addr));
    expect_err(
        puller.pull_if_missing(&other, None, &quiet),
        PullErrorKind::NotFound,
    );
}

/// How long pulling the Python rootfs takes; `cargo test --features
/// registry-tests -- --ignored --nocapture python311`.
#[test]
#[ignore = "timing: pushes and pulls a 188 MB image"]
fn python311_timing() {
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/python311.tar");
    let registry = Registry::start();
    let started = Instant::now();
    skopeo_push(&rootfs, &format!("{}/library/python:3.11", registry.addr));
    eprintln!("skopeo push: {:?}", started.elapsed());
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let started = Instant::now();
    let image = pull(&puller, &format!("{}/library/python:3.11", registry.addr)).unwrap();
    eprintln!(
        "pull: {:?} ({} bytes unpacked)",
        started.elapsed(),
        image.size_bytes
    );
}
