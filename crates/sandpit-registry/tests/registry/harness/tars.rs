//! Tars built header by header, hostile paths included.

use tar::{EntryType, Header};

/// Builds tars header by header: hostile paths included.
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
        assert!(name.len() < 100);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(size);
        h
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

    pub(crate) fn link(&mut self, kind: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.push(h, &[])
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Symlink, path, target)
    }

    pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(EntryType::Link, path, target)
    }

    pub(crate) fn chardev(&mut self, path: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Char, path, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        self.push(h, &[])
    }

    /// A PAX header for the next entry.
    pub(crate) fn pax(&mut self, key: &str, value: &[u8]) -> &mut Self {
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

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}
