//! Bind mounts of host directories (volumes) into a sandbox: the spec type
//! and the checks of its paths. The spawner mounts them (see
//! [`crate::rootfs`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A host directory bind-mounted into a sandbox, e.g. a volume's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    /// An absolute host directory the caller owns (a trusted path).
    pub source: PathBuf,
    /// A directory inside `source` to mount instead of all of it. Volume
    /// contents are hostile: it is resolved without following any symlink
    /// and without leaving `source` (a link, `..` or a mount crossing is
    /// refused), and must be a directory.
    pub sub_path: Option<String>,
    /// Where it appears inside the sandbox: an absolute path, not `/`,
    /// nor under `/proc`, `/sys` or `/dev`, nor overlapping another
    /// mount's target. Missing directories are created in the sandbox's
    /// root; a symlink on the way (the image is hostile) is refused.
    pub target: String,
    /// Mounted read-only (writes fail with `EROFS` inside).
    pub read_only: bool,
}

/// The longest target or sub path accepted.
const MAX_PATH: usize = 4096;

/// Top-level directories that hold the sandbox's own system mounts.
const RESERVED: &[&str] = &["proc", "sys", "dev"];

/// Why a [`BindMount`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MountSpecError {
    /// The source is not an absolute path.
    #[error("source {} of target {target} is not an absolute path", path.display())]
    RelativeSource {
        /// The source.
        path: PathBuf,
        /// Its mount's target.
        target: String,
    },
    /// The target is relative, has `.`/`..`, a NUL or is too long.
    #[error("target {0:?} is not a plain absolute path")]
    BadTarget(String),
    /// The target is `/` or under `/proc`, `/sys`, `/dev`.
    #[error("target {0} is reserved (/, /proc, /sys and /dev hold the sandbox's system mounts)")]
    Reserved(String),
    /// The sub path is absolute, has `..`, a NUL or is too long.
    #[error("sub_path {sub_path:?} of target {target} is not a plain relative path")]
    BadSubPath {
        /// The sub path.
        sub_path: String,
        /// Its mount's target.
        target: String,
    },
    /// One target is the other, or lies beneath it.
    #[error("targets {0} and {1} overlap")]
    Overlap(String, String),
}

/// The components of a target (`/a//b/` -> `["a", "b"]`), once checked.
pub(crate) fn target_components(target: &str) -> Result<Vec<&str>, MountSpecError> {
    let bad = || MountSpecError::BadTarget(target.to_string());
    if !target.starts_with('/') || target.len() > MAX_PATH || target.contains('\0') {
        return Err(bad());
    }
    let comps: Vec<&str> = target.split('/').filter(|c| !c.is_empty()).collect();
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad());
    }
    match comps.first() {
        None => Err(MountSpecError::Reserved(target.to_string())),
        Some(first) if RESERVED.contains(first) => {
            Err(MountSpecError::Reserved(target.to_string()))
        }
        Some(_) => Ok(comps),
    }
}

fn check_sub_path(m: &BindMount) -> Result<(), MountSpecError> {
    let Some(sub) = &m.sub_path else {
        return Ok(());
    };
    let plain = !sub.starts_with('/')
        && sub.len() <= MAX_PATH
        && !sub.contains('\0')
        && sub.split('/').all(|c| c != "..");
    if plain {
        Ok(())
    } else {
        Err(MountSpecError::BadSubPath {
            sub_path: sub.clone(),
            target: m.target.clone(),
        })
    }
}

/// Checks every mount of a spec and that no two targets overlap (a mount
/// beneath another would be made inside a volume, whose contents other
/// sandboxes may change while we walk them).
pub(crate) fn check(mounts: &[BindMount]) -> Result<(), MountSpecError> {
    let mut seen: Vec<(Vec<&str>, &str)> = Vec::with_capacity(mounts.len());
    for m in mounts {
        if !m.source.is_absolute() {
            return Err(MountSpecError::RelativeSource {
                path: m.source.clone(),
                target: m.target.clone(),
            });
        }
        let comps = target_components(&m.target)?;
        check_sub_path(m)?;
        for (other, other_target) in &seen {
            let n = comps.len().min(other.len());
            if comps[..n] == other[..n] {
                return Err(MountSpecError::Overlap(
                    other_target.to_string(),
                    m.target.clone(),
                ));
            }
        }
        seen.push((comps, &m.target));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(target: &str) -> BindMount {
        BindMount {
            source: "/vol/a/mnt".into(),
            sub_path: None,
            target: target.into(),
            read_only: false,
        }
    }

    #[test]
    fn targets_are_plain_absolute_paths_outside_the_system_mounts() {
        assert_eq!(target_components("/data").unwrap(), ["data"]);
        assert_eq!(target_components("//a//b/").unwrap(), ["a", "b"]);
        assert_eq!(target_components("/devices").unwrap(), ["devices"]);
        for bad in ["data", "", "/a/../etc", "/a/./b", "/a\0b"] {
            assert_eq!(
                target_components(bad),
                Err(MountSpecError::BadTarget(bad.into())),
                "{bad:?}"
            );
        }
        for reserved in [
            "/",
            "//",
            "/proc",
            "/proc/sys",
            "/sys/fs",
            "/dev",
            "/dev/shm/x",
        ] {
            let e = target_components(reserved).unwrap_err();
            assert_eq!(e, MountSpecError::Reserved(reserved.into()));
            assert!(e
                .to_string()
                .starts_with(&format!("target {reserved} is reserved")));
        }
    }

    #[test]
    fn sub_paths_stay_relative_and_sources_absolute() {
        let mut m = at("/data");
        for ok in ["a", "a/b", "./a", "a/", ""] {
            m.sub_path = Some(ok.into());
            assert_eq!(check(std::slice::from_ref(&m)), Ok(()), "{ok:?}");
        }
        for bad in ["/etc", "..", "a/../../b", "a\0"] {
            m.sub_path = Some(bad.into());
            let e = check(std::slice::from_ref(&m)).unwrap_err();
            assert!(matches!(e, MountSpecError::BadSubPath { .. }), "{bad:?}");
        }
        m.sub_path = None;
        m.source = "vol/a".into();
        assert_eq!(
            check(&[m]).unwrap_err().to_string(),
            "source vol/a of target /data is not an absolute path"
        );
    }

    #[test]
    fn overlapping_targets_are_refused() {
        assert_eq!(check(&[at("/data"), at("/cache"), at("/data2")]), Ok(()));
        assert_eq!(
            check(&[at("/data"), at("/data/sub")])
                .unwrap_err()
                .to_string(),
            "targets /data and /data/sub overlap"
        );
        assert!(check(&[at("/a/b"), at("/a")]).is_err());
        assert!(check(&[at("/a"), at("/a/")]).is_err());
    }
}
