//! Extended attributes of tar entries: which are kept, and how the ids in
//! file capabilities and POSIX ACLs are shifted into the sandboxes' range.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::Unpacker;
use crate::IdShift;

/// `fsetxattr(2)`: on the entry's own fd, so nothing is resolved by path.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `fd` is a valid open descriptor for the duration of the call,
    // `name` is NUL-terminated, and `value` is valid for `value.len()` bytes.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum XattrPolicy {
    Keep,
    Capability,
    Acl,
    Drop,
}

fn xattr_policy(name: &[u8]) -> XattrPolicy {
    match name {
        b"security.capability" => XattrPolicy::Capability,
        b"system.posix_acl_access" | b"system.posix_acl_default" => XattrPolicy::Acl,
        n if n.starts_with(b"user.") => XattrPolicy::Keep,
        _ => XattrPolicy::Drop,
    }
}

/// Rewrites a `security.capability` value as a v3 (namespaced) capability
/// whose root is the shifted root id, so that file capabilities apply inside
/// the sandboxes' user namespace and nowhere else. `None` when malformed.
fn shift_capability(value: &[u8], shift: &IdShift) -> Option<Vec<u8>> {
    const REVISION_MASK: u32 = 0xff00_0000;
    const REVISION_1: u32 = 0x0100_0000;
    const REVISION_2: u32 = 0x0200_0000;
    const REVISION_3: u32 = 0x0300_0000;
    const FLAGS_EFFECTIVE: u32 = 0x0000_0001;
    let magic = u32::from_le_bytes(value.get(0..4)?.try_into().ok()?);
    let (words, root) = match (magic & REVISION_MASK, value.len()) {
        (REVISION_1, 12) => (1, 0),
        (REVISION_2, 20) => (2, 0),
        (REVISION_3, 24) => (2, u32::from_le_bytes(value[20..24].try_into().ok()?)),
        _ => return None,
    };
    let mut out = Vec::with_capacity(24);
    out.extend_from_slice(&(REVISION_3 | (magic & FLAGS_EFFECTIVE)).to_le_bytes());
    out.extend_from_slice(&value[4..4 + 8 * words]);
    out.resize(20, 0);
    out.extend_from_slice(&shift.map(u64::from(root)).0.to_le_bytes());
    Some(out)
}

/// Shifts the user and group ids of a POSIX ACL xattr value.
fn shift_acl(value: &[u8], shift: &IdShift) -> Option<Vec<u8>> {
    const VERSION: u32 = 2;
    const ACL_USER: u16 = 0x02;
    const ACL_GROUP: u16 = 0x08;
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return None;
    }
    if u32::from_le_bytes(value[..4].try_into().ok()?) != VERSION {
        return None;
    }
    let mut out = value.to_vec();
    for entry in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        if tag == ACL_USER || tag == ACL_GROUP {
            let id = u32::from_le_bytes(entry[4..8].try_into().ok()?);
            entry[4..8].copy_from_slice(&shift.map(u64::from(id)).0.to_le_bytes());
        }
    }
    Some(out)
}

impl Unpacker {
    /// Sets the xattrs of a PAX entry that the policy keeps, best effort:
    /// a filesystem without user xattrs must not fail the import.
    pub(super) fn set_xattrs(
        &mut self,
        fd: BorrowedFd<'_>,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        path: &[u8],
    ) {
        for (name, value) in xattrs {
            let value = match xattr_policy(name) {
                XattrPolicy::Keep => Some(value.clone()),
                XattrPolicy::Capability => shift_capability(value, &self.shift),
                XattrPolicy::Acl => shift_acl(value, &self.shift),
                XattrPolicy::Drop => None,
            };
            let lossy = String::from_utf8_lossy(name);
            let Some(value) = value else {
                tracing::debug!(path = %String::from_utf8_lossy(path), xattr = %lossy, "dropping xattr");
                self.stats.skipped_xattrs += 1;
                continue;
            };
            match fsetxattr(fd, name, &value) {
                Ok(()) => self.stats.xattrs += 1,
                Err(e) => {
                    tracing::debug!(path = %String::from_utf8_lossy(path), xattr = %lossy, error = %e, "cannot set xattr");
                    self.stats.skipped_xattrs += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_capabilities() {
        let shift = IdShift::default();
        // v2, effective, cap_net_raw (bit 13) permitted.
        let mut v2 = Vec::new();
        v2.extend_from_slice(&0x0200_0001u32.to_le_bytes());
        v2.extend_from_slice(&(1u32 << 13).to_le_bytes());
        v2.extend_from_slice(&0u32.to_le_bytes());
        v2.extend_from_slice(&[0; 8]);
        let v3 = shift_capability(&v2, &shift).unwrap();
        assert_eq!(v3.len(), 24);
        assert_eq!(&v3[0..4], &0x0300_0001u32.to_le_bytes());
        assert_eq!(&v3[4..20], &v2[4..20]);
        assert_eq!(&v3[20..24], &1_000_000_000u32.to_le_bytes());
        // v3 with a root of 1000 in the image.
        let mut v3_in = v3.clone();
        v3_in[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            &shift_capability(&v3_in, &shift).unwrap()[20..24],
            &1_000_001_000u32.to_le_bytes()
        );
        // v1 is widened.
        let mut v1 = 0x0100_0000u32.to_le_bytes().to_vec();
        v1.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let out = shift_capability(&v1, &shift).unwrap();
        assert_eq!(out.len(), 24);
        assert_eq!(&out[0..4], &0x0300_0000u32.to_le_bytes());
        assert_eq!(&out[4..12], &v1[4..12]);
        assert_eq!(&out[12..20], &[0; 8]);
        assert!(shift_capability(&v2[..19], &shift).is_none());
        assert!(shift_capability(b"", &shift).is_none());
    }

    #[test]
    fn shifts_acls() {
        let shift = IdShift::default();
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, id) in [
            (0x01u16, u32::MAX),
            (0x02, 1000),
            (0x04, u32::MAX),
            (0x08, 50),
            (0x10, u32::MAX),
            (0x20, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&7u16.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let out = shift_acl(&acl, &shift).unwrap();
        let id =
            |i: usize| u32::from_le_bytes(out[4 + 8 * i + 4..4 + 8 * i + 8].try_into().unwrap());
        assert_eq!(id(0), u32::MAX);
        assert_eq!(id(1), 1_000_001_000);
        assert_eq!(id(3), 1_000_000_050);
        assert_eq!(id(5), u32::MAX);
        assert!(shift_acl(&acl[..10], &shift).is_none());
        assert!(shift_acl(&[1, 0, 0, 0], &shift).is_none());
    }

    #[test]
    fn xattr_policies() {
        assert_eq!(xattr_policy(b"user.foo"), XattrPolicy::Keep);
        assert_eq!(
            xattr_policy(b"security.capability"),
            XattrPolicy::Capability
        );
        assert_eq!(xattr_policy(b"system.posix_acl_default"), XattrPolicy::Acl);
        assert_eq!(xattr_policy(b"trusted.overlay.opaque"), XattrPolicy::Drop);
        assert_eq!(xattr_policy(b"trusted.overlay.redirect"), XattrPolicy::Drop);
        assert_eq!(xattr_policy(b"security.selinux"), XattrPolicy::Drop);
    }
}
