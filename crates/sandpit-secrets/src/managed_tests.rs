//! Rotation, which needs to stop one half-way.

use std::path::Path;

use super::*;

const VALUE: &str = "hunter2-very-secret";

fn value(s: &str) -> SecretValue {
    SecretValue::new(s.to_owned())
}

fn store(root: &Path) -> ManagedStore {
    ManagedStore::new("vault", &root.join("store"), &root.join("store.key"))
}

#[test]
fn rotation_reseals_everything_and_resumes_after_an_interruption() {
    let root = tempfile::tempdir().unwrap();
    let m = store(root.path());
    for i in 0..5 {
        m.set(&format!("s{i}"), &value(&format!("{VALUE}-{i}")))
            .unwrap();
    }
    let key_path = root.path().join("store.key");
    let old_key = std::fs::read(&key_path).unwrap();
    assert_eq!(m.rotate_key().unwrap(), 5);
    let new_key = std::fs::read(&key_path).unwrap();
    assert_ne!(old_key, new_key);
    assert!(!root.path().join("store.key.next").exists());
    for i in 0..5 {
        assert_eq!(
            m.get(&format!("s{i}")).unwrap().expose(),
            format!("{VALUE}-{i}")
        );
    }

    // An interrupted rotation: the next key exists and two secrets are
    // already under it. Readers see every secret meanwhile; running it
    // again finishes with that key.
    assert_eq!(m.rotate_key().unwrap(), 5);
    let third = std::fs::read(&key_path).unwrap();
    let next = root.path().join("store.key.next");
    let interrupted = {
        // Re-run a rotation by hand up to its middle.
        let k = Key::generate();
        replace_file(&next, k.bytes.as_slice()).unwrap();
        for name in ["s0", "s1"] {
            let v = m.get(name).unwrap();
            replace_file(&m.path(name), &m.seal(&k, name, v.expose())).unwrap();
        }
        k
    };
    for i in 0..5 {
        assert_eq!(
            m.get(&format!("s{i}")).unwrap().expose(),
            format!("{VALUE}-{i}")
        );
    }
    assert_eq!(m.rotate_key().unwrap(), 3);
    assert_eq!(
        std::fs::read(&key_path).unwrap(),
        interrupted.bytes.as_slice()
    );
    assert_ne!(std::fs::read(&key_path).unwrap(), third);
    for i in 0..5 {
        assert_eq!(
            m.get(&format!("s{i}")).unwrap().expose(),
            format!("{VALUE}-{i}")
        );
    }
    // The old key opens nothing any more.
    std::fs::write(&key_path, &old_key).unwrap();
    assert!(matches!(m.get("s0"), Err(ManagedError::Sealed { .. })));
}
