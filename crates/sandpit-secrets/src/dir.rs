//! The directory store: plain files an operator puts under a directory
//! (mode 0700, owned by root), one per secret, named by a relative path.
//!
//! Names come from API callers, so they are checked component by component
//! and opened without following symlinks: a request cannot read a file
//! outside its store.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path};

use crate::{strip_newline, SecretError, SecretValue, MAX_SECRET_BYTES};

/// Longest name.
pub const MAX_NAME_LEN: usize = 512;

/// A relative path of plain names: no `..`, `.`, empty or dot-first
/// components, no NUL, at most [`MAX_NAME_LEN`] bytes.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    const WHY: &str = "not a relative path of plain names";
    if path.is_empty() || path.len() > MAX_NAME_LEN || path.contains('\0') {
        return Err(WHY);
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) if !name.as_encoded_bytes().starts_with(b".") => {}
            _ => return Err(WHY),
        }
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(WHY);
    }
    Ok(())
}

/// The content of secret `name` in the store at `dir` (one trailing
/// newline dropped).
pub fn read(dir: &Path, store: &str, name: &str) -> Result<SecretValue, SecretError> {
    use nix::errno::Errno;
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;

    check_path(name).map_err(|why| SecretError::BadName {
        store: store.to_owned(),
        name: name.to_owned(),
        why,
    })?;
    let unusable = |why: String| SecretError::Unusable {
        store: store.to_owned(),
        name: name.to_owned(),
        why,
    };
    let missing = || SecretError::NotFound {
        store: store.to_owned(),
        name: name.to_owned(),
    };
    let map = |e: Errno| match e {
        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => missing(),
        other => unusable(format!("cannot be read ({})", other.desc().to_lowercase())),
    };
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| unusable(format!("store directory cannot be opened ({e})")))?;
    let mut current: std::os::fd::OwnedFd = root.into();
    let parts: Vec<&str> = name.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let flags = OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | if last {
                OFlag::O_RDONLY | OFlag::O_NONBLOCK
            } else {
                OFlag::O_DIRECTORY | OFlag::O_RDONLY
            };
        current = openat(&current, *part, flags, Mode::empty()).map_err(map)?;
    }
    let file = File::from(current);
    let meta = file
        .metadata()
        .map_err(|e| unusable(format!("cannot be read ({e})")))?;
    // A directory, fifo or device is no secret (O_NONBLOCK: a fifo cannot
    // hang the open).
    if !meta.is_file() {
        return Err(missing());
    }
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|_| unusable("is not UTF-8 text".into()))?;
    let value = strip_newline(text);
    if value.len() > MAX_SECRET_BYTES {
        return Err(unusable(format!("is larger than {MAX_SECRET_BYTES} bytes")));
    }
    Ok(value)
}
