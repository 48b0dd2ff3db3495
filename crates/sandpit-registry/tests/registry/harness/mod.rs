//! What the tests share: registries, pushes, tars, a proxy, a store.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sandpit_image::{Digest as ImageDigest, IdShift, ImageStore, Reference};
use sandpit_registry::{Progress, PullError, PullErrorKind, Puller, RegistryConfig, RegistryHost};
use sha2::{Digest, Sha256};

mod proxy;
mod push;
mod registry;
mod tars;

pub(crate) use proxy::*;
pub(crate) use push::*;
pub(crate) use registry::*;
pub(crate) use tars::*;

pub(crate) const BASE: u32 = 1_000_000_000;
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

pub(crate) fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The store's digest type for a digest computed here.
pub(crate) fn digest(s: &str) -> ImageDigest {
    ImageDigest::parse(s).unwrap()
}

/// A free loopback port (bound then released: a small race, fine on a test
/// machine).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn wait_for_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start");
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) struct Env {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) store: Arc<ImageStore>,
}

impl Env {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ImageStore::open(&dir.path().join("store"), IdShift::default()).unwrap());
        Self { _dir: dir, store }
    }

    pub(crate) fn puller(&self, config: RegistryConfig) -> Puller {
        Puller::new(self.store.clone(), config).unwrap()
    }

    pub(crate) fn layer_count(&self) -> usize {
        fs::read_dir(self.store.root().join("layers/sha256"))
            .unwrap()
            .count()
    }

    pub(crate) fn tmp_is_empty(&self) -> bool {
        fs::read_dir(self.store.root().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    }

    /// A failed pull leaves no layer and no staging.
    pub(crate) fn assert_nothing_left(&self) {
        assert_eq!(self.layer_count(), 0, "a layer was left behind");
        assert!(self.tmp_is_empty(), "staging was left behind");
        assert!(self.store.list().unwrap().is_empty());
    }

    pub(crate) fn top(&self, image: &sandpit_image::Image) -> PathBuf {
        self.store.layer_path(image.layers.last().unwrap())
    }
}

pub(crate) fn insecure(addr: &str) -> RegistryConfig {
    with_host(
        addr,
        RegistryHost {
            insecure: true,
            ..RegistryHost::default()
        },
    )
}

pub(crate) fn with_host(addr: &str, host: RegistryHost) -> RegistryConfig {
    RegistryConfig {
        registries: BTreeMap::from([(addr.to_owned(), host)]),
        ..RegistryConfig::default()
    }
}

pub(crate) fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

pub(crate) fn quiet(_: &Progress) {}

pub(crate) fn pull(puller: &Puller, reference: &str) -> Result<sandpit_image::Image, PullError> {
    puller.pull(&r(reference), None, &quiet)
}

pub(crate) fn expect_err(
    result: Result<sandpit_image::Image, PullError>,
    kind: PullErrorKind,
) -> PullError {
    match result {
        Err(e) => {
            eprintln!("{e}");
            assert_eq!(e.kind(), kind, "{e}");
            e
        }
        Ok(image) => panic!("expected a {kind} failure, pulled {}", image.reference),
    }
}

pub(crate) fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
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

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root");
    }
    root
}
