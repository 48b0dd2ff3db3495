//! Reading one file of an image from the host, as the sandbox's overlay
//! will show it: layers top-most first, whiteouts and opaque directories
//! honoured, symlinks followed *inside the image* (an absolute target is
//! the image's root, `..` stops at it), never out of it. Used to extend the
//! image's CA bundle before the sandbox starts.
//!
//! Layers are the store's: immutable and root-owned, so what is checked
//! here is what is read. Whatever the image is, the worst it can do is
//! point at another of its own files.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Symlinks followed at most (the kernel's own limit).
const MAX_HOPS: usize = 40;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let name = std::ffi::CString::new(OPAQUE_XATTR).expect("no nul");
    let mut v = [0u8; 1];
    // SAFETY: both strings are nul-terminated and live across the call;
    // `v` is a writable buffer of the length passed.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), 1) };
    n == 1 && v[0] == b'y'
}

enum Found {
    Dir,
    File(PathBuf),
    Link(PathBuf),
}

/// `rel` (components, no `..`) in the merged view of `layers`.
fn lookup(layers: &[PathBuf], rel: &[String]) -> Option<Found> {
    // Which layers still show the parent: an opaque directory hides the
    // layers below it, a whiteout or a non-directory ends the search.
    let mut visible = layers.len();
    for depth in 0..rel.len() {
        let prefix: PathBuf = rel[..depth].iter().collect();
        for (i, layer) in layers.iter().enumerate().take(visible) {
            let p = layer.join(&prefix);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    if depth > 0 && is_opaque(&p) {
                        visible = i + 1;
                        break;
                    }
                }
                Ok(_) => {
                    visible = i;
                    break;
                }
                Err(_) => {}
            }
        }
    }
    let path: PathBuf = rel.iter().collect();
    for layer in layers.iter().take(visible) {
        let p = layer.join(&path);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if is_whiteout(&m) => return None,
            Ok(m) if m.file_type().is_symlink() => {
                return std::fs::read_link(&p).ok().map(Found::Link)
            }
            Ok(m) if m.is_dir() => return Some(Found::Dir),
            Ok(m) if m.is_file() => return Some(Found::File(p)),
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// The contents of `path` (absolute, in the image) in the merged view of
/// `layers` (top-most first), if it is a regular file of at most `max`
/// bytes.
pub fn read_image_file(layers: &[PathBuf], path: &str, max: u64) -> Option<Vec<u8>> {
    let mut todo: Vec<String> = path.split('/').rev().map(str::to_owned).collect();
    let mut at: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => {}
        }
        at.push(c);
        match lookup(layers, &at)? {
            Found::Dir => {}
            Found::File(p) => {
                if !todo.iter().all(|c| c.is_empty() || c == ".") {
                    return None;
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .ok()?;
                if f.metadata().ok()?.len() > max {
                    return None;
                }
                let mut out = Vec::new();
                f.take(max).read_to_end(&mut out).ok()?;
                return Some(out);
            }
            Found::Link(target) => {
                hops += 1;
                if hops > MAX_HOPS {
                    return None;
                }
                at.pop();
                let t = target.to_str()?;
                if t.starts_with('/') {
                    at.clear();
                }
                todo.extend(t.split('/').rev().map(str::to_owned));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn files_are_read_through_layers_and_image_symlinks_only() {
        let t = tempfile::tempdir().unwrap();
        let (top, base) = (t.path().join("top"), t.path().join("base"));
        let host_secret = t.path().join("secret");
        std::fs::write(&host_secret, "host").unwrap();
        for d in ["etc/ssl/certs", "usr/share/ca"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::fs::create_dir_all(top.join("etc/ssl")).unwrap();
        std::fs::write(base.join("usr/share/ca/bundle.pem"), "image bundle").unwrap();
        // Relative and absolute links, resolved in the image.
        symlink(
            "../../../usr/share/ca/bundle.pem",
            base.join("etc/ssl/certs/rel.pem"),
        )
        .unwrap();
        symlink(
            "/usr/share/ca/bundle.pem",
            base.join("etc/ssl/certs/abs.pem"),
        )
        .unwrap();
        // A link aimed at the host's file reaches the image's path of that
        // name (absent), never the host's.
        symlink(&host_secret, base.join("etc/ssl/certs/escape.pem")).unwrap();
        symlink(
            "../../../../../../../../..".to_owned() + host_secret.to_str().unwrap(),
            base.join("etc/ssl/certs/dots.pem"),
        )
        .unwrap();
        symlink("loop.pem", base.join("etc/ssl/certs/loop.pem")).unwrap();
        std::fs::write(base.join("etc/ssl/certs/plain.pem"), "base").unwrap();
        std::fs::write(top.join("etc/ssl/plain-top"), "x").unwrap();
        let layers = [top.clone(), base.clone()];
        let read =
            |p: &str| read_image_file(&layers, p, 1 << 20).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            read("/etc/ssl/certs/rel.pem").as_deref(),
            Some("image bundle")
        );
        assert_eq!(
            read("/etc/ssl/certs/abs.pem").as_deref(),
            Some("image bundle")
        );
        assert_eq!(read("/etc/ssl/certs/plain.pem").as_deref(), Some("base"));
        assert_eq!(read("/etc/ssl/certs/escape.pem"), None);
        assert_eq!(read("/etc/ssl/certs/dots.pem"), None);
        assert_eq!(read("/etc/ssl/certs/loop.pem"), None);
        assert_eq!(read("/etc/ssl/certs/plain.pem/x"), None);
        assert_eq!(
            read_image_file(&layers, "/etc/ssl/certs/plain.pem", 2),
            None
        );
        // A file of the top layer hides the lower layer's directory.
        std::fs::create_dir_all(base.join("etc/hidden")).unwrap();
        std::fs::write(base.join("etc/hidden/f"), "lower").unwrap();
        std::fs::write(top.join("etc/hidden"), "file").unwrap();
        assert_eq!(read("/etc/hidden/f"), None);
    }
}
