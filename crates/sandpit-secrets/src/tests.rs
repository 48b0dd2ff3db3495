use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;

const VALUE: &str = "hunter2-very-secret";

fn stores(entries: &[(&str, StoreConfig)]) -> Stores {
    Stores::new(
        entries
            .iter()
            .map(|(n, c)| ((*n).to_owned(), c.clone()))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn dir_store(dir: &Path) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::Dir,
        dir: dir.to_owned(),
        key_file: None,
    }
}

fn managed_config(root: &Path) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::Managed,
        dir: root.join("store"),
        key_file: Some(root.join("store.key")),
    }
}

fn value(s: &str) -> SecretValue {
    SecretValue::new(s.to_owned())
}

/// Every file under `root`, as bytes.
fn all_bytes(root: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn debug_redacts_values() {
    let v = value(VALUE);
    assert_eq!(format!("{v:?}"), "SecretValue(<redacted>)");
    assert_eq!(v.expose(), VALUE);
}

#[test]
fn directory_values_and_fields() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("team")).unwrap();
    std::fs::write(d.path().join("team/token"), format!("{VALUE}\n")).unwrap();
    std::fs::write(d.path().join("crlf"), "a b\r\n").unwrap();
    std::fs::write(d.path().join("keep"), "two\n\n").unwrap();
    std::fs::write(
        d.path().join("db"),
        r#"{"password": "pw", "port": 5432, "nested": {"a": 1}, "none": null}"#,
    )
    .unwrap();
    let s = stores(&[("local", dir_store(d.path()))]);
    let get = |name: &str, field: &str| s.resolve("local", name, field);
    assert_eq!(get("team/token", "").unwrap().expose(), VALUE);
    assert_eq!(get("crlf", "").unwrap().expose(), "a b");
    assert_eq!(get("keep", "").unwrap().expose(), "two\n");
    assert_eq!(get("db", "password").unwrap().expose(), "pw");
    assert_eq!(get("db", "port").unwrap().expose(), "5432");
    assert_eq!(get("db", "nested").unwrap().expose(), r#"{"a":1}"#);
    let e = get("db", "none").unwrap_err();
    assert_eq!(
        e.to_string(),
        "secret \"db\" in store \"local\": has no field \"none\""
    );
    let e = get("team/token", "password").unwrap_err();
    assert!(matches!(e, SecretError::Unusable { .. }), "{e:?}");
    assert!(!e.to_string().contains(VALUE));
    assert_eq!(
        get("team/missing", "").unwrap_err(),
        SecretError::NotFound {
            store: "local".into(),
            name: "team/missing".into()
        }
    );
    assert_eq!(
        s.resolve("vault", "x", "").unwrap_err(),
        SecretError::UnknownStore("vault".into())
    );
}

#[test]
fn directory_paths_cannot_leave_the_store() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-secret"), "root:hunter2").unwrap();
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path().join("host-secret"), d.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("linkdir")).unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let s = stores(&[("local", dir_store(d.path()))]);
    for bad in [
        "../x",
        "/etc/shadow",
        "a/../b",
        "./a",
        ".hidden",
        "a//b",
        "a/",
        "",
    ] {
        assert!(
            matches!(
                s.resolve("local", bad, ""),
                Err(SecretError::BadName { .. })
            ),
            "{bad}"
        );
    }
    for not_there in ["link", "linkdir/host-secret", "sub"] {
        assert!(
            matches!(
                s.resolve("local", not_there, ""),
                Err(SecretError::NotFound { .. })
            ),
            "{not_there}"
        );
    }
}

#[test]
fn managed_round_trip_encrypted_at_rest() {
    let root = tempfile::tempdir().unwrap();
    let config = managed_config(root.path());
    let m = config.managed("vault").unwrap();
    m.set("HF_TOKEN", &value(VALUE)).unwrap();
    m.set("db-credentials", &value(r#"{"password": "pw-xyz"}"#))
        .unwrap();
    m.set("HF_TOKEN", &value(&format!("{VALUE}-2"))).unwrap();
    assert_eq!(m.list().unwrap(), ["HF_TOKEN", "db-credentials"]);
    let s = stores(&[("vault", config.clone())]);
    assert_eq!(
        s.resolve("vault", "HF_TOKEN", "").unwrap().expose(),
        format!("{VALUE}-2")
    );
    assert_eq!(
        s.resolve("vault", "db-credentials", "password")
            .unwrap()
            .expose(),
        "pw-xyz"
    );
    // Nothing in clear on disk, and the key file is private.
    let disk = all_bytes(root.path());
    for clear in [VALUE.as_bytes(), b"pw-xyz"] {
        assert!(!contains(&disk, clear));
    }
    let key = std::fs::metadata(root.path().join("store.key")).unwrap();
    assert_eq!((key.len(), key.permissions().mode() & 0o777), (32, 0o600));
    let dir = std::fs::metadata(root.path().join("store")).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);

    m.remove("HF_TOKEN").unwrap();
    assert!(matches!(
        m.remove("HF_TOKEN"),
        Err(ManagedError::NotFound(_))
    ));
    assert_eq!(
        s.resolve("vault", "HF_TOKEN", "").unwrap_err(),
        SecretError::NotFound {
            store: "vault".into(),
            name: "HF_TOKEN".into()
        }
    );
    for bad in ["a/b", "../x", ".hidden", "", "-x"] {
        assert!(
            matches!(
                s.resolve("vault", bad, ""),
                Err(SecretError::BadName { .. })
            ),
            "{bad}"
        );
        assert!(m.set(bad, &value("x")).is_err(), "{bad}");
    }
}

#[test]
fn sealed_files_do_not_open_under_another_name_or_store() {
    let root = tempfile::tempdir().unwrap();
    let config = managed_config(root.path());
    let m = config.managed("vault").unwrap();
    m.set("a", &value(VALUE)).unwrap();
    m.set("b", &value("other")).unwrap();
    let dir = root.path().join("store");
    // Swap a's file in for b.
    std::fs::copy(dir.join("a.secret"), dir.join("b.secret")).unwrap();
    let e = m.get("b").unwrap_err();
    assert!(matches!(e, ManagedError::Sealed { .. }), "{e:?}");
    // The same files and key under another store name.
    let renamed = config.managed("vault2").unwrap();
    assert!(matches!(renamed.get("a"), Err(ManagedError::Sealed { .. })));
    // A flipped byte.
    let mut data = std::fs::read(dir.join("a.secret")).unwrap();
    let last = data.len() - 1;
    data[last] ^= 1;
    std::fs::write(dir.join("a.secret"), data).unwrap();
    let e = m.get("a").unwrap_err();
    assert!(matches!(e, ManagedError::Sealed { .. }));
    assert!(!sandpit_errors::chain(&e).contains(VALUE));
}

#[test]
fn key_files_must_be_private_and_never_silently_replaced() {
    let root = tempfile::tempdir().unwrap();
    let config = managed_config(root.path());
    let m = config.managed("vault").unwrap();
    m.set("a", &value(VALUE)).unwrap();
    let key = root.path().join("store.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = m.get("a").unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(&key).unwrap();
    let e = m.init().unwrap_err();
    assert!(
        matches!(e, ManagedError::KeyMissing { count: 1, .. }),
        "{e:?}"
    );
    assert!(!key.exists());
    std::fs::write(&key, [0u8; 31]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(m.init().unwrap_err().to_string().contains("31 bytes"));
}

#[test]
fn config_is_checked() {
    let ok = StoreConfig {
        kind: StoreKind::Managed,
        dir: "/var/lib/sandpit/secrets/a".into(),
        key_file: Some("/var/lib/sandpit/secrets/a.key".into()),
    };
    assert_eq!(ok.validate("a"), Ok(()));
    let inside = StoreConfig {
        key_file: Some("/var/lib/sandpit/secrets/a/key".into()),
        ..ok.clone()
    };
    assert!(inside.validate("a").unwrap_err().contains("inside its dir"));
    let no_key = StoreConfig {
        key_file: None,
        ..ok.clone()
    };
    assert!(no_key
        .validate("a")
        .unwrap_err()
        .contains("needs a key_file"));
    let dir_with_key = StoreConfig {
        kind: StoreKind::Dir,
        ..ok.clone()
    };
    assert!(dir_with_key.validate("a").is_err());
    for bad in ["", "a/b", "..", ".x", "a b"] {
        assert!(ok.validate(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn errors_with_a_source_do_not_repeat_it() {
    let e = ManagedError::Io {
        op: "read",
        path: "/s/a.secret".into(),
        source: std::io::Error::other("disk on fire"),
    };
    let source = std::error::Error::source(&e).expect("has a source");
    assert!(!e.to_string().contains(&source.to_string()));
    assert_eq!(sandpit_errors::chain(&e), "read /s/a.secret: disk on fire");
    // Through a resolution, the chain is printed once.
    let resolved = e.into_secret_error("vault", "a");
    assert_eq!(
        resolved.to_string(),
        "secret \"a\" in store \"vault\": read /s/a.secret: disk on fire"
    );
}
