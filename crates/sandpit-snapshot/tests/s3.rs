//! `S3BlobStore` against a real S3-compatible server on loopback (s3s-fs,
//! installed by `scripts/install-s3-server.sh`; `SANDPIT_S3_SERVER` names
//! another binary). Each test starts its own server on a free port over a
//! temporary directory, and skips, saying why, when there is none.

mod common;

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sandpit_image::Digest;
use sandpit_snapshot::{
    restore_dir, snapshot_dir, BlobRef, BlobStore, Limits, S3BlobStore, S3Config, SnapshotError,
    S3_PART_SIZE,
};

const DEFAULT_SERVER: &str = "/opt/s3s-fs/bin/s3s-fs";
const ACCESS_KEY: &str = "sandpit-test";
const SECRET_KEY: &str = "sandpit-test-secret";
const BUCKET: &str = "snapshots";

struct Server {
    child: Child,
    endpoint: String,
    data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts the server, or None (after saying why) when it is absent.
    fn start() -> Option<Self> {
        let bin = std::env::var_os("SANDPIT_S3_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_SERVER.into());
        if !bin.is_file() {
            eprintln!(
                "skipped: no S3 server at {} (run scripts/install-s3-server.sh or set SANDPIT_S3_SERVER)",
                bin.display()
            );
            return None;
        }
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("root");
        fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = fs::File::create(data.path().join("server.log")).unwrap();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not listen: {}",
                fs::read_to_string(server.data.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    fn store(&self, prefix: &str) -> S3BlobStore {
        S3BlobStore::new(&S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            allow_http: true,
        })
        .unwrap()
    }
}

/// Writes `bytes` to a staged file; its blob reference.
fn stage(dir: &Path, name: &str, bytes: &[u8]) -> (PathBuf, BlobRef) {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    let blob = BlobRef {
        digest: Digest::sha256_of(bytes),
        size: bytes.len() as u64,
    };
    (path, blob)
}

fn read(store: &S3BlobStore, blob: &BlobRef) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::new();
    store
        .open(blob)?
        .read_to_end(&mut out)
        .map_err(|e| match SnapshotError::from_io_ref(&e) {
            Some(SnapshotError::DigestMismatch { digest, detail }) => {
                SnapshotError::DigestMismatch {
                    digest: digest.clone(),
                    detail: detail.clone(),
                }
            }
            _ => panic!("read: {e}"),
        })?;
    Ok(out)
}

#[test]
fn put_open_exists_list_delete_and_dedup() {
    let Some(server) = Server::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = server.store("sandpit/");
    assert_eq!(store.location(), "s3://snapshots/sandpit");
    assert!(store.list().unwrap().is_empty());

    let (staged, a) = stage(tmp.path(), "a", b"first blob");
    assert!(!store.exists(&a.digest).unwrap());
    store.put(&staged, &a).unwrap();
    assert!(!staged.exists(), "the staged file is consumed");
    assert!(store.exists(&a.digest).unwrap());
    assert_eq!(read(&store, &a).unwrap(), b"first blob");
    // Where it went: <prefix>/sha256/<hex> in the bucket.
    assert_eq!(
        store.key(&a.digest),
        format!("sandpit/sha256/{}", a.digest.hex())
    );
    let on_disk = server
        .data
        .path()
        .join("root")
        .join(BUCKET)
        .join(store.key(&a.digest));
    assert_eq!(fs::read(on_disk).unwrap(), b"first blob");

    // Dedup: the same blob again keeps the object and drops the file.
    let (staged, again) = stage(tmp.path(), "a2", b"first blob");
    store.put(&staged, &again).unwrap();
    assert!(!staged.exists());
    // A staged file of another size than claimed is refused.
    let (staged, mut wrong) = stage(tmp.path(), "w", b"abc");
    wrong.size = 4;
    assert!(matches!(
        store.put(&staged, &wrong),
        Err(SnapshotError::DigestMismatch { .. })
    ));

    // Larger than one part: a multipart upload.
    let big_bytes = noise(9, S3_PART_SIZE + S3_PART_SIZE / 2);
    let (staged, big) = stage(tmp.path(), "big", &big_bytes);
    store.put(&staged, &big).unwrap();
    assert_eq!(read(&store, &big).unwrap(), big_bytes);

    let mut want = vec![a.digest.clone(), big.digest.clone()];
    want.sort();
    assert_eq!(store.list().unwrap(), want);
    // Another prefix sees none of them.
    assert!(server.store("other").list().unwrap().is_empty());

    store.delete(&a.digest).unwrap();
    store.delete(&a.digest).unwrap();
    assert!(!store.exists(&a.digest).unwrap());
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&big.digest));
    assert!(matches!(
        store.open(&a),
        Err(SnapshotError::NotFound { .. })
    ));
}

#[test]
fn a_tampered_object_is_refused() {
    let Some(server) = Server::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = server.store("");
    assert_eq!(store.location(), "s3://snapshots");
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), noise(3, 100_000)).unwrap();
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/g"), b"g").unwrap();
    let staging = tmp.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let limits = Limits::default();
    let (blob, _) = snapshot_dir(&src, SHIFT_A, &limits, &store, &staging).unwrap();
    let original = read(&store, &blob).unwrap();

    // Overwrite the object through the S3 API with other bytes of the
    // same size.
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    store.delete(&blob.digest).unwrap();
    let (staged, _) = stage(tmp.path(), "tampered", &bytes);
    store.put(&staged, &blob).unwrap();
    assert!(matches!(
        read(&store, &blob),
        Err(SnapshotError::DigestMismatch { .. })
    ));
    if is_root() {
        let dst = tmp.path().join("dst");
        fs::create_dir(&dst).unwrap();
        assert!(matches!(
            restore_dir(&store, &blob, &dst, SHIFT_B, &limits),
            Err(SnapshotError::DigestMismatch { .. })
        ));
        assert_eq!(fs::read_dir(&dst).unwrap().count(), 0, "emptied");
    }
}

#[test]
fn snapshot_and_restore_from_tokios_blocking_pool() {
    if skip_unless_root() {
        return;
    }
    let Some(server) = Server::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    sample_tree(&src, SHIFT_A);
    // Incompressible content over a part: the blob goes up in parts.
    fs::write(src.join("big"), noise(5, S3_PART_SIZE + 1_000_000)).unwrap();
    chown(&src.join("big"), SHIFT_A.base, SHIFT_A.base);
    set_mtime(&src.join("big"), 1);
    set_mtime(&src, 1_234_567_890);
    let staging = tmp.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let dst = tmp.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let store = std::sync::Arc::new(server.store("pool"));

    // The daemon's way: blocking calls on the blocking pool of its runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (blob, stats, restored) = rt.block_on({
        let (store, src, dst, staging) = (store.clone(), src.clone(), dst.clone(), staging.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let limits = Limits::default();
                let (blob, stats) =
                    snapshot_dir(&src, SHIFT_A, &limits, &*store, &staging).unwrap();
                let restored = restore_dir(&*store, &blob, &dst, SHIFT_B, &limits).unwrap();
                (blob, stats, restored)
            })
            .await
            .unwrap()
        }
    });
    assert!(blob.size > S3_PART_SIZE as u64);
    assert_eq!(stats.files, restored.files);
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
    assert_eq!(describe(&src, SHIFT_A.base), describe(&dst, SHIFT_B.base));
    assert_eq!(store.list().unwrap(), [blob.digest]);
    // Dropping the store (and its runtime) from async code is fine.
    rt.block_on(async move { drop(store) });
}
