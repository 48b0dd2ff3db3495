//! The schema, brought up to date by whoever connects first.
//!
//! Migrations are the repo's `migrations/NNNN_*.sql`, compiled in, applied in
//! order in one transaction under an advisory lock: gateways and runners
//! starting together apply each exactly once, and a failed migration leaves
//! the schema as it was. A database migrated by a newer binary is refused
//! rather than used with a schema this one does not know.

use tokio_postgres::Client;

use crate::Error;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "runners_and_sandboxes",
        include_str!("../migrations/0001_runners_and_sandboxes.sql"),
    ),
    (
        2,
        "direct_endpoints",
        include_str!("../migrations/0002_direct_endpoints.sql"),
    ),
    (
        3,
        "principals",
        include_str!("../migrations/0003_principals.sql"),
    ),
];

/// The key of the advisory lock the migrations run under ("sandpit" in ASCII).
const LOCK_KEY: i64 = 0x73_61_6e_64_70_69_74;

/// The schema version this binary knows.
pub(crate) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies what is missing; returns the version the database had before.
pub(crate) async fn migrate(client: &mut Client) -> Result<i32, Error> {
    let q = |op| move |source| Error::Query { op, source };
    let tx = client.transaction().await.map_err(q("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(q("lock the schema"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sandpit_schema (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(q("create the schema table"))?;
    let found: i32 = tx
        .query_one("SELECT COALESCE(max(version), 0) FROM sandpit_schema", &[])
        .await
        .map_err(q("read the schema version"))?
        .get(0);
    if found > latest() {
        return Err(Error::SchemaNewer {
            found,
            known: latest(),
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.batch_execute(sql)
            .await
            .map_err(q("apply a migration"))?;
        tx.execute(
            "INSERT INTO sandpit_schema (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(q("record a migration"))?;
        tracing::info!(version, name, "applied a database migration");
    }
    tx.commit().await.map_err(q("commit migrations"))?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_from_one() {
        for (i, (version, name, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1, "{name}");
            assert!(!sql.trim().is_empty(), "{name}");
        }
        assert_eq!(latest() as usize, MIGRATIONS.len());
    }
}
