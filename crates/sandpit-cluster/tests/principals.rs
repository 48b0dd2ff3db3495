//! Principals against a real PostgreSQL (tests/support): add, list,
//! revoke, names and keys taken, and only digests in the table.

#[allow(dead_code)]
mod support;

use std::time::Duration;

use sandpit_cluster::{key_digest, Error, Store, StoreConfig};
use sha2::{Digest, Sha256};
use support::Pg;

async fn store(pg: &Pg) -> Store {
    Store::connect(
        &pg.url(),
        StoreConfig {
            lease: Duration::from_secs(30),
            ..StoreConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Every row of `principals`, each as PostgreSQL's text of the whole row.
async fn table_text(pg: &Pg) -> Vec<String> {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .query("SELECT t::text FROM principals t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_are_added_listed_and_revoked() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    assert!(s.principals().await.unwrap().is_empty());

    let alice = s.add_principal("alice", Some("acme")).await.unwrap();
    let bob = s.add_principal("bob", None).await.unwrap();
    assert_eq!(alice.len(), 64);
    assert!(alice.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(alice, bob);

    let rows = s.principals().await.unwrap();
    let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(rows[0].organization.as_deref(), Some("acme"));
    assert_eq!(rows[1].organization, None);
    assert_eq!(rows[0].key_sha256, key_digest(&alice));
    assert_eq!(rows[1].key_sha256, key_digest(&bob));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((rows[0].created_at_unix - now).abs() < 60, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| !r.revoked && r.revoked_at_unix.is_none()));

    // Revoked once; the row stays, marked.
    assert!(s.revoke_principal("alice").await.unwrap());
    assert!(!s.revoke_principal("alice").await.unwrap());
    assert!(!s.revoke_principal("nobody").await.unwrap());
    let rows = s.principals().await.unwrap();
    assert!(rows[0].revoked && rows[0].revoked_at_unix.is_some());
    assert!(!rows[1].revoked);

    // The name stays taken, revoked or not.
    for name in ["alice", "bob"] {
        match s.add_principal(name, None).await {
            Err(Error::PrincipalExists(n)) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(matches!(
        s.add_principal("has space", None).await,
        Err(Error::InvalidPrincipal(_))
    ));
    assert_eq!(s.principals().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_keys_digest_is_stored() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    let generated = s.add_principal("alice", None).await.unwrap();
    let imported = "an-existing-key-from-a-config-0123";
    s.import_principal("carol", imported, Some("acme"))
        .await
        .unwrap();

    let text = table_text(&pg).await;
    assert_eq!(text.len(), 2);
    for row in &text {
        for key in [generated.as_str(), imported] {
            assert!(!row.contains(key), "{row} holds a key");
            assert!(
                !row.contains(&hex::encode(key)),
                "{row} holds a key's bytes"
            );
        }
    }
    let carol = s
        .principals()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name == "carol")
        .unwrap();
    let want: [u8; 32] = Sha256::digest(imported.as_bytes()).into();
    assert_eq!(carol.key_sha256, want);
    assert!(text.iter().any(|r| r.contains(&hex::encode(want))));

    // A key is one principal's; a short one is refused.
    assert!(matches!(
        s.import_principal("dave", imported, None).await,
        Err(Error::KeyTaken)
    ));
    assert!(matches!(
        s.import_principal("dave", "short", None).await,
        Err(Error::InvalidPrincipal(_))
    ));
    assert!(matches!(
        s.import_principal("alice", "another-key-of-enough-length", None)
            .await,
        Err(Error::PrincipalExists(_))
    ));
}
