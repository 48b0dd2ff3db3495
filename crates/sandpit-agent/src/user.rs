//! Who the sandbox's processes run as: the host's [`RunAs`] resolved against
//! the sandbox's own `/etc/passwd` and `/etc/group` (the image's: nothing
//! ran yet when the agent reads them), as Docker and containerd resolve an
//! image's `User`. No NSS: the files are parsed directly, which is all a
//! static binary in an arbitrary image can rely on.

use sandpit_wire::RunAs;

/// The most bytes read of `/etc/passwd` or `/etc/group`: the image is
/// semi-trusted, and a real one is a few kilobytes.
const MAX_DB_BYTES: u64 = 4 << 20;

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The uid.
    pub(crate) uid: u32,
    /// The primary gid.
    pub(crate) gid: u32,
    /// Supplementary groups (from `/etc/group`), without the primary one.
    pub(crate) groups: Vec<u32>,
    /// The home directory from `/etc/passwd`, when the user has an entry.
    pub(crate) home: Option<String>,
}

/// Why a [`RunAs`] does not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum UserError {
    /// A user name with no `/etc/passwd` entry.
    #[error("user {0:?} not found in /etc/passwd")]
    NoSuchUser(String),
    /// A group name with no `/etc/group` entry.
    #[error("group {0:?} not found in /etc/group")]
    NoSuchGroup(String),
    /// An id the sandbox's user namespace does not map.
    #[error("{kind} {id} is not mapped in the sandbox's user namespace")]
    Unmapped {
        /// `uid` or `gid`.
        kind: &'static str,
        /// The id.
        id: u32,
    },
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0].is_empty() {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// `(name, gid, members)` of every well-formed `/etc/group` line.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0].is_empty() {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `run_as` against the text of `/etc/passwd` and `/etc/group`:
/// a numeric user needs no entry (its group is then its uid, unless given);
/// a name must have one. Supplementary groups are those of `/etc/group`
/// that list the user's name, as Docker gives them.
pub(crate) fn resolve(run_as: &RunAs, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let entry = match run_as.user.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) if run_as.user.is_empty() => passwd_entries(passwd).find(|e| e.uid == 0),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == run_as.user)
                .ok_or_else(|| UserError::NoSuchUser(run_as.user.clone()))?,
        ),
    };
    let uid = match (&entry, run_as.user.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(e), Err(_)) => e.uid,
        (None, Err(_)) => 0,
    };
    let gid = if run_as.group.is_empty() {
        entry.as_ref().map_or(uid, |e| e.gid)
    } else if let Ok(gid) = run_as.group.parse::<u32>() {
        gid
    } else {
        group_entries(group)
            .find(|(name, ..)| *name == run_as.group)
            .map(|(_, gid, _)| gid)
            .ok_or_else(|| UserError::NoSuchGroup(run_as.group.clone()))?
    };
    let mut groups = Vec::new();
    if let Some(e) = &entry {
        for (_, g, members) in group_entries(group) {
            if g != gid && members.contains(&e.name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.map(|e| e.home.to_owned()).filter(|h| !h.is_empty()),
    })
}

/// Reads a user database of the sandbox, bounded; a missing or unreadable
/// one is empty (numeric ids still resolve).
pub(crate) fn read_db(path: &str) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_DB_BYTES).read_to_string(&mut text);
    }
    text
}

/// Whether `id` is inside one of the ranges of a `/proc/self/{uid,gid}_map`
/// text (`inside outside count` per line).
pub(crate) fn is_mapped(map: &str, id: u32) -> bool {
    map.lines().any(|line| {
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        matches!(n[..], [inside, _, count] if u64::from(id) >= inside && u64::from(id) < inside + count)
    })
}

/// Checks that every id of `who` is mapped in this user namespace: an
/// unmapped one would only fail later, at every exec, with `EINVAL`.
pub(crate) fn check_mapped(who: &Identity) -> Result<(), UserError> {
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let gid_map = std::fs::read_to_string("/proc/self/gid_map").unwrap_or_default();
    if !is_mapped(&uid_map, who.uid) {
        return Err(UserError::Unmapped {
            kind: "uid",
            id: who.uid,
        });
    }
    for &gid in std::iter::once(&who.gid).chain(&who.groups) {
        if !is_mapped(&gid_map, gid) {
            return Err(UserError::Unmapped {
                kind: "gid",
                id: gid,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        app:x:1000:1000:App,,,:/home/app:/bin/sh\n\
        broken:x:notanumber:1::/:/bin/sh\n\
        \n\
        nohome:x:1001:100:::/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:app,other\n\
        app:x:1000:\n\
        audio:x:29:app\n\
        staff:x:50:\n";

    fn run_as(user: &str, group: &str) -> RunAs {
        RunAs {
            user: user.into(),
            group: group.into(),
        }
    }

    #[test]
    fn numeric_and_named_users_resolve_like_docker() {
        let app = resolve(&run_as("1000", ""), PASSWD, GROUP).unwrap();
        assert_eq!(
            app,
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![100, 29],
                home: Some("/home/app".into()),
            }
        );
        assert_eq!(resolve(&run_as("app", ""), PASSWD, GROUP).unwrap(), app);
        // A numeric user without an entry: its own id as group, no home.
        assert_eq!(
            resolve(&run_as("4242", ""), PASSWD, GROUP).unwrap(),
            Identity {
                uid: 4242,
                gid: 4242,
                groups: vec![],
                home: None,
            }
        );
        // The group, by number or name, wins over the primary one.
        let g = resolve(&run_as("app", "staff"), PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid, g.groups), (1000, 50, vec![100, 29]));
        let g = resolve(&run_as("4242", "7"), PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid), (4242, 7));
        // Only a group: root with that group.
        let g = resolve(&run_as("", "100"), PASSWD, GROUP).unwrap();
        assert_eq!((g.uid, g.gid, g.home.as_deref()), (0, 100, Some("/root")));
        let g = resolve(&run_as("1001", ""), PASSWD, GROUP).unwrap();
        assert_eq!((g.gid, g.home), (100, None));
    }

    #[test]
    fn unknown_names_are_errors_and_bad_lines_are_skipped() {
        assert_eq!(
            resolve(&run_as("nobody", ""), PASSWD, GROUP).unwrap_err(),
            UserError::NoSuchUser("nobody".into())
        );
        assert_eq!(
            resolve(&run_as("broken", ""), PASSWD, GROUP).unwrap_err(),
            UserError::NoSuchUser("broken".into())
        );
        assert_eq!(
            resolve(&run_as("1000", "wheel"), PASSWD, GROUP)
                .unwrap_err()
                .to_string(),
            "group \"wheel\" not found in /etc/group"
        );
        // No databases at all: numbers still work.
        let g = resolve(&run_as("5", "6"), "", "").unwrap();
        assert_eq!((g.uid, g.gid), (5, 6));
    }

    #[test]
    fn id_maps_are_read_by_range() {
        let map = "         0 1000000000      65536\n";
        assert!(is_mapped(map, 0));
        assert!(is_mapped(map, 65535));
        assert!(!is_mapped(map, 65536));
        assert!(is_mapped("0 0 4294967295\n", 4_000_000_000));
        assert!(!is_mapped("", 0));
        assert!(is_mapped("0 1000 1\n5 2000 10\n", 14));
        assert!(!is_mapped("0 1000 1\n5 2000 10\n", 3));
        assert_eq!(
            UserError::Unmapped {
                kind: "uid",
                id: 70000
            }
            .to_string(),
            "uid 70000 is not mapped in the sandbox's user namespace"
        );
    }
}
