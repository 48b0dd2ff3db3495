//! Principals: the API keys of a cluster, shared by every gateway and
//! runner (docs/scale-out.md, "Principals").
//!
//! Only a key's SHA-256 is stored. A new key is shown once, to whoever
//! added it, and never again: the table cannot give it back. A revoked
//! principal keeps its row (listings show it); processes drop its key from
//! their next sync on.

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;

use crate::store::q;
use crate::{Error, Store};

/// One principal as the store holds it: never its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalRow {
    /// The principal's name (what sandboxes are owned by).
    pub name: String,
    /// The organization discovery reports for it; the process's own when
    /// `None`.
    pub organization: Option<String>,
    /// The SHA-256 of its key: what a request's key is looked up by.
    pub key_sha256: [u8; 32],
    /// When it was added (seconds since the epoch, the database's clock).
    pub created_at_unix: i64,
    /// Revoked: its key is refused.
    pub revoked: bool,
    /// When it was revoked (seconds since the epoch), if it was.
    pub revoked_at_unix: Option<i64>,
}

/// The SHA-256 of a key, as the table stores it.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh key: 256 random bits, hex (the format of `sandpitd`'s
/// generated keys).
fn generate_key() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::InvalidPrincipal(format!("no random source for a key: {e}")))?;
    Ok(hex::encode(bytes))
}

/// The shortest key `import_principal` takes: a shared store's keys are
/// every process's, so a guessable one is refused.
pub const MIN_IMPORTED_KEY: usize = 16;

fn check_name(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::InvalidPrincipal(format!("name {name:?}: {why}")));
    if name.is_empty() || name.len() > 128 {
        return bad("1-128 bytes");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("no whitespace or control characters");
    }
    // `key-` and 16 hex digits name the principals of keys configured
    // without a name: a stored one must not take such a name.
    if name.starts_with("key-") {
        return bad("names starting with \"key-\" are the unnamed keys' own");
    }
    Ok(())
}

fn check_organization(org: Option<&str>) -> Result<(), Error> {
    match org {
        Some(o) if o.is_empty() || o.len() > 128 || o.chars().any(char::is_control) => {
            Err(Error::InvalidPrincipal(format!(
                "organization {o:?}: 1-128 bytes, no control characters"
            )))
        }
        _ => Ok(()),
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    if key.len() < MIN_IMPORTED_KEY {
        return Err(Error::InvalidPrincipal(format!(
            "the key is shorter than {MIN_IMPORTED_KEY} characters"
        )));
    }
    // Sent as a header value, compared after trimming: printable ASCII only.
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidPrincipal(
            "the key must be printable ASCII without whitespace".into(),
        ));
    }
    Ok(())
}

impl Store {
    /// Adds a principal with a new key and returns the key: the only time
    /// it is seen (the store keeps its SHA-256).
    pub async fn add_principal(
        &self,
        name: &str,
        organization: Option<&str>,
    ) -> Result<String, Error> {
        let key = generate_key()?;
        self.insert_principal(name, &key, organization).await?;
        Ok(key)
    }

    /// Adds a principal whose key already exists (one a process's config
    /// lists, moved into the store).
    pub async fn import_principal(
        &self,
        name: &str,
        key: &str,
        organization: Option<&str>,
    ) -> Result<(), Error> {
        check_key(key)?;
        self.insert_principal(name, key, organization).await
    }

    async fn insert_principal(
        &self,
        name: &str,
        key: &str,
        organization: Option<&str>,
    ) -> Result<(), Error> {
        check_name(name)?;
        check_organization(organization)?;
        let digest = key_digest(key);
        let client = self.client().await?;
        let inserted = client
            .execute(
                "INSERT INTO principals (key_sha256, name, organization) VALUES ($1, $2, $3)",
                &[&digest.as_slice(), &name, &organization],
            )
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let on_name = e
                    .as_db_error()
                    .and_then(|d| d.constraint())
                    .is_some_and(|c| c == "principals_name_key");
                Err(if on_name {
                    Error::PrincipalExists(name.to_owned())
                } else {
                    Error::KeyTaken
                })
            }
            Err(e) => Err(q("add a principal")(e)),
        }
    }

    /// Revokes the principal: its key is refused from every process's next
    /// sync on. False if there is no such principal or it was revoked
    /// already.
    pub async fn revoke_principal(&self, name: &str) -> Result<bool, Error> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE principals SET revoked_at = now()
                 WHERE name = $1 AND revoked_at IS NULL",
                &[&name],
            )
            .await
            .map_err(q("revoke a principal"))?;
        Ok(n == 1)
    }

    /// Every principal, live and revoked, by name.
    pub async fn principals(&self) -> Result<Vec<PrincipalRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT key_sha256, name, organization,
                     EXTRACT(EPOCH FROM created_at)::bigint,
                     EXTRACT(EPOCH FROM revoked_at)::bigint
                 FROM principals ORDER BY name",
                &[],
            )
            .await
            .map_err(q("list principals"))?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(1);
                let digest: &[u8] = r.get(0);
                let key_sha256 = digest
                    .try_into()
                    .map_err(|_| Error::Corrupt(format!("principal {name}'s key digest")))?;
                let revoked_at_unix: Option<i64> = r.get(4);
                Ok(PrincipalRow {
                    organization: r.get(2),
                    key_sha256,
                    created_at_unix: r.get(3),
                    revoked: revoked_at_unix.is_some(),
                    revoked_at_unix,
                    name,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_256_bits_of_hex() {
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        check_key(&a).unwrap();
    }

    #[test]
    fn names_organizations_and_keys_are_checked() {
        check_name("alice").unwrap();
        check_name("team/ml@acme").unwrap();
        for bad in [
            "",
            "has space",
            "tab\t",
            "key-0123456789abcdef",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(check_name(bad), Err(Error::InvalidPrincipal(_))),
                "{bad:?}"
            );
        }
        check_organization(None).unwrap();
        check_organization(Some("acme")).unwrap();
        assert!(check_organization(Some("")).is_err());
        assert!(check_key("short").is_err());
        assert!(check_key("sixteen chars ok").is_err(), "whitespace");
        check_key("sixteen-chars-ok").unwrap();
    }

    #[test]
    fn the_digest_is_the_keys_sha256() {
        // sha256("abc"), FIPS 180-2's example.
        assert_eq!(
            hex::encode(key_digest("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
