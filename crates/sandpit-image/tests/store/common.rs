//! Helpers the store tests share: a tar builder that writes hostile
//! entries, digests computed independently, store probes.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sandpit_image::Digest as ImageDigest;
use sandpit_image::{IdShift, ImageConfig, ImageError, ImageStore, Reference};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

pub(crate) const BASE: u32 = 1_000_000_000;
pub(crate) const MTIME: u64 = 1_600_000_000;

pub(crate) fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipping: needs root");
        false
    }
}

pub(crate) fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

pub(crate) fn open(dir: &Path) -> ImageStore {
    ImageStore::open(dir, IdShift::default()).unwrap()
}

/// Builds tars byte by byte, hostile paths included (the `tar` crate's
/// path setters refuse `..`).
pub(crate) struct TarBuilder {
    pub(crate) builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub(crate) fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    pub(crate) fn header(kind: EntryType, path: &str, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        let name = path.as_bytes();
        assert!(name.len() < 100, "test paths must be short");
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    pub(crate) fn link_target(h: &mut Header, target: &str) {
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
    }

    pub(crate) fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    pub(crate) fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_owned(path, data, 0o644, 0, 0)
    }

    pub(crate) fn file_owned(
        &mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = Self::header(EntryType::Directory, path, mode, 0);
        self.push(h, &[])
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Symlink, path, 0o777, 0);
        Self::link_target(&mut h, target);
        self.push(h, &[])
    }

    pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Link, path, 0o644, 0);
        Self::link_target(&mut h, target);
        self.push(h, &[])
    }

    pub(crate) fn fifo(&mut self, path: &str) -> &mut Self {
        let h = Self::header(EntryType::Fifo, path, 0o620, 0);
        self.push(h, &[])
    }

    pub(crate) fn chardev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(EntryType::Char, path, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, &[])
    }

    /// A PAX extended header describing the next entry.
    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = 1 + key.len() + 1 + value.len() + 1;
            let mut len = body + 1;
            while body + len.to_string().len() != len {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let h = Self::header(
            EntryType::XHeader,
            "././@PaxHeader",
            0o644,
            data.len() as u64,
        );
        self.push(h, &data)
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

/// Computed here with `sha2`, not with the store's own hashing.
pub(crate) fn sha256(data: &[u8]) -> ImageDigest {
    ImageDigest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(data)))).unwrap()
}

pub(crate) fn layer_count(store: &ImageStore) -> usize {
    fs::read_dir(store.root().join("layers/sha256"))
        .unwrap()
        .count()
}

pub(crate) fn tmp_is_empty(store: &ImageStore) -> bool {
    fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
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

/// Imports `tar` as `reference` and returns its only lower dir.
pub(crate) fn import(
    store: &ImageStore,
    reference_str: &str,
    tar: &[u8],
) -> Result<PathBuf, ImageError> {
    let image = store.import_rootfs_tar(&reference(reference_str), tar, ImageConfig::default())?;
    let lower = store.lower_dirs(&image);
    assert_eq!(lower.len(), 1);
    Ok(lower[0].clone())
}

pub(crate) fn expect_bad_entry(result: Result<PathBuf, ImageError>, reason_part: &str) {
    match result {
        Err(ImageError::BadEntry { path, reason }) => {
            assert!(reason.contains(reason_part), "{path}: {reason}");
        }
        other => panic!("expected a refused entry ({reason_part}), got {other:?}"),
    }
}

pub(crate) fn zstd_compress(data: &[u8], level: i32) -> Vec<u8> {
    zstd::stream::encode_all(data, level).unwrap()
}
