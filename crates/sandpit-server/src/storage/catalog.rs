//! The storage records: registered volumes, snapshots and principals'
//! bucket choices, in their own SQLite file (`<data-dir>/storage.db`) so
//! they version apart from the sandbox records. Writes are rare (one per
//! API call) and small: one connection behind a mutex, called from the
//! blocking pool.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::model::{
    BucketConfig, SnapshotBlob, SnapshotRecord, SnapshotState, Trigger, VolumeRecord, VolumeState,
};
use crate::db::{from_ms, to_ms};
use crate::model::{Principal, SandboxId};

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("storage database")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not decode.
    #[error("corrupt storage record {0}")]
    Corrupt(String),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    principal TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    runner_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    claim_name TEXT NOT NULL,
    sub_path TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    description TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    capacity_bytes INTEGER NOT NULL,
    request_id TEXT,
    create_ms INTEGER NOT NULL,
    update_ms INTEGER NOT NULL,
    validated_ms INTEGER,
    PRIMARY KEY (principal, volume_id)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    trigger TEXT NOT NULL,
    source_sandbox TEXT NOT NULL,
    source_volume TEXT NOT NULL,
    digest TEXT,
    size INTEGER,
    bucket TEXT NOT NULL,
    content_bytes INTEGER NOT NULL,
    request_id TEXT,
    create_ms INTEGER NOT NULL,
    complete_ms INTEGER,
    update_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS snapshots_by_request
    ON snapshots (principal, request_id, source_volume) WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS bucket_configs (
    principal TEXT PRIMARY KEY,
    bucket_name TEXT NOT NULL,
    region TEXT NOT NULL
);
";

/// The storage records.
#[derive(Debug)]
pub struct Catalog {
    conn: Mutex<Connection>,
}

impl Catalog {
    /// Opens (creating if needed) the catalog file.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        Self::init(Connection::open(path)?)
    }

    /// A private in-memory catalog (tests).
    pub fn in_memory() -> Result<Self, CatalogError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, CatalogError> {
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- volumes

    /// Inserts or replaces a volume.
    pub fn put_volume(&self, v: &VolumeRecord) -> Result<(), CatalogError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO volumes VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)",
            params![
                v.principal.as_str(),
                v.volume_id,
                v.runner_id,
                v.namespace,
                v.claim_name,
                v.sub_path,
                v.read_only,
                v.description,
                v.state.as_str(),
                v.state_reason,
                v.capacity_bytes as i64,
                v.request_id,
                to_ms(v.create_time),
                to_ms(v.update_time),
                v.last_validated_time.map(to_ms),
            ],
        )?;
        Ok(())
    }

    /// The principal's volume `id`.
    pub fn volume(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<Option<VolumeRecord>, CatalogError> {
        self.conn()
            .query_row(
                "SELECT * FROM volumes WHERE principal = ?1 AND volume_id = ?2",
                params![principal.as_str(), id],
                volume_row,
            )
            .optional()?
            .transpose()
    }

    /// The principal's volumes, by id.
    pub fn volumes(&self, principal: &Principal) -> Result<Vec<VolumeRecord>, CatalogError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT * FROM volumes WHERE principal = ?1 ORDER BY volume_id")?;
        let rows = stmt.query_map(params![principal.as_str()], volume_row)?;
        rows.map(|r| r?).collect()
    }

    /// Every volume (start-up).
    pub fn all_volumes(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM volumes")?;
        let rows = stmt.query_map([], volume_row)?;
        rows.map(|r| r?).collect()
    }

    /// Removes a volume record.
    pub fn delete_volume(&self, principal: &Principal, id: &str) -> Result<(), CatalogError> {
        self.conn().execute(
            "DELETE FROM volumes WHERE principal = ?1 AND volume_id = ?2",
            params![principal.as_str(), id],
        )?;
        Ok(())
    }

    // ---- snapshots

    /// Inserts or replaces a snapshot.
    pub fn put_snapshot(&self, s: &SnapshotRecord) -> Result<(), CatalogError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)",
            params![
                s.id,
                s.principal.as_str(),
                s.state.as_str(),
                s.state_reason,
                s.trigger.as_str(),
                s.source_sandbox.as_str(),
                s.source_volume,
                s.blob.as_ref().map(|b| b.digest.to_string()),
                s.blob.as_ref().map(|b| b.size as i64),
                s.bucket,
                s.content_bytes as i64,
                s.request_id,
                to_ms(s.create_time),
                s.complete_time.map(to_ms),
                to_ms(s.update_time),
            ],
        )?;
        Ok(())
    }

    /// A snapshot by id, whoever owns it.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, CatalogError> {
        self.conn()
            .query_row(
                "SELECT * FROM snapshots WHERE id = ?1",
                params![id],
                snapshot_row,
            )
            .optional()?
            .transpose()
    }

    /// The principal's snapshot of `volume` made by `request_id`.
    pub fn snapshot_by_request(
        &self,
        principal: &Principal,
        request_id: &str,
        volume: &str,
    ) -> Result<Option<SnapshotRecord>, CatalogError> {
        self.conn()
            .query_row(
                "SELECT * FROM snapshots WHERE principal = ?1 AND request_id = ?2 AND source_volume = ?3",
                params![principal.as_str(), request_id, volume],
                snapshot_row,
            )
            .optional()?
            .transpose()
    }

    /// The principal's snapshots, oldest first (ids break ties).
    pub fn snapshots(&self, principal: &Principal) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT * FROM snapshots WHERE principal = ?1 ORDER BY create_ms, id")?;
        let rows = stmt.query_map(params![principal.as_str()], snapshot_row)?;
        rows.map(|r| r?).collect()
    }

    /// Removes a snapshot record.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), CatalogError> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Whether any snapshot record still names this archive.
    pub fn blob_referenced(&self, blob: &SnapshotBlob) -> Result<bool, CatalogError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM snapshots WHERE digest = ?1 AND bucket = ?2",
            params![blob.digest.to_string(), blob.bucket],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Digests of archives in `bucket` that records name.
    pub fn referenced_digests(&self, bucket: &str) -> Result<Vec<String>, CatalogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT digest FROM snapshots WHERE bucket = ?1 AND digest IS NOT NULL",
        )?;
        let rows = stmt.query_map(params![bucket], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks snapshots left CREATING (a daemon that died while taking
    /// them) FAILED with `reason`; returns how many.
    pub fn fail_unfinished(
        &self,
        reason: &str,
        now: std::time::SystemTime,
    ) -> Result<usize, CatalogError> {
        let n = self.conn().execute(
            "UPDATE snapshots SET state = 'failed', state_reason = ?1, complete_ms = ?2, update_ms = ?2
             WHERE state = 'creating'",
            params![reason, to_ms(now)],
        )?;
        Ok(n)
    }

    // ---- bucket configuration

    /// The principal's bucket choice (the default when none was made).
    pub fn bucket_config(&self, principal: &Principal) -> Result<BucketConfig, CatalogError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT bucket_name, region FROM bucket_configs WHERE principal = ?1",
                params![principal.as_str()],
                |r| {
                    Ok(BucketConfig {
                        bucket_name: r.get(0)?,
                        region: r.get(1)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    /// Stores the principal's bucket choice.
    pub fn put_bucket_config(
        &self,
        principal: &Principal,
        c: &BucketConfig,
    ) -> Result<(), CatalogError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO bucket_configs VALUES (?1, ?2, ?3)",
            params![principal.as_str(), c.bucket_name, c.region],
        )?;
        Ok(())
    }
}

fn volume_row(r: &Row<'_>) -> rusqlite::Result<Result<VolumeRecord, CatalogError>> {
    let id: String = r.get("volume_id")?;
    let state: String = r.get("state")?;
    let Some(state) = VolumeState::parse(&state) else {
        return Ok(Err(CatalogError::Corrupt(id)));
    };
    Ok(Ok(VolumeRecord {
        principal: Principal(r.get("principal")?),
        volume_id: id,
        runner_id: r.get("runner_id")?,
        namespace: r.get("namespace")?,
        claim_name: r.get("claim_name")?,
        sub_path: r.get("sub_path")?,
        read_only: r.get("read_only")?,
        description: r.get("description")?,
        state,
        state_reason: r.get("state_reason")?,
        capacity_bytes: r.get::<_, i64>("capacity_bytes")? as u64,
        request_id: r.get("request_id")?,
        create_time: from_ms(r.get("create_ms")?),
        update_time: from_ms(r.get("update_ms")?),
        last_validated_time: r.get::<_, Option<i64>>("validated_ms")?.map(from_ms),
    }))
}

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<Result<SnapshotRecord, CatalogError>> {
    let id: String = r.get("id")?;
    let corrupt = |id: &str| Ok(Err(CatalogError::Corrupt(id.to_owned())));
    let (Some(state), Some(trigger)) = (
        SnapshotState::parse(&r.get::<_, String>("state")?),
        Trigger::parse(&r.get::<_, String>("trigger")?),
    ) else {
        return corrupt(&id);
    };
    let Ok(source_sandbox) = SandboxId::parse(&r.get::<_, String>("source_sandbox")?) else {
        return corrupt(&id);
    };
    let bucket: String = r.get("bucket")?;
    let blob = match (
        r.get::<_, Option<String>>("digest")?,
        r.get::<_, Option<i64>>("size")?,
    ) {
        (Some(d), Some(size)) => match d.parse() {
            Ok(digest) => Some(SnapshotBlob {
                digest,
                size: size as u64,
                bucket: bucket.clone(),
            }),
            Err(_) => return corrupt(&id),
        },
        _ => None,
    };
    Ok(Ok(SnapshotRecord {
        id,
        principal: Principal(r.get("principal")?),
        state,
        state_reason: r.get("state_reason")?,
        trigger,
        source_sandbox,
        source_volume: r.get("source_volume")?,
        blob,
        bucket,
        content_bytes: r.get::<_, i64>("content_bytes")? as u64,
        request_id: r.get("request_id")?,
        create_time: from_ms(r.get("create_ms")?),
        complete_time: r.get::<_, Option<i64>>("complete_ms")?.map(from_ms),
        update_time: from_ms(r.get("update_ms")?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn snap(id: &str, principal: &str, digest: Option<&str>) -> SnapshotRecord {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        SnapshotRecord {
            id: id.into(),
            principal: Principal(principal.into()),
            state: if digest.is_some() {
                SnapshotState::Ready
            } else {
                SnapshotState::Creating
            },
            state_reason: String::new(),
            trigger: Trigger::Manual,
            source_sandbox: SandboxId::parse("sb-1").unwrap(),
            source_volume: "workspace".into(),
            blob: digest.map(|d| SnapshotBlob {
                digest: format!("sha256:{}", d.repeat(64)).parse().unwrap(),
                size: 10,
                bucket: "local".into(),
            }),
            bucket: "local".into(),
            content_bytes: 5,
            request_id: Some(format!("req-{id}")),
            create_time: t,
            complete_time: digest.map(|_| t),
            update_time: t,
        }
    }

    #[test]
    fn snapshots_round_trip_and_unfinished_ones_fail_at_start_up() {
        let c = Catalog::in_memory().unwrap();
        let a = snap("fss-a", "alice", Some("a"));
        let b = snap("fss-b", "alice", None);
        c.put_snapshot(&a).unwrap();
        c.put_snapshot(&b).unwrap();
        c.put_snapshot(&snap("fss-c", "bob", Some("a"))).unwrap();
        assert_eq!(c.snapshot("fss-a").unwrap().unwrap(), a);
        let alices = c.snapshots(&Principal("alice".into())).unwrap();
        assert_eq!(alices.len(), 2);
        assert_eq!(
            c.snapshot_by_request(&Principal("alice".into()), "req-fss-b", "workspace")
                .unwrap()
                .unwrap()
                .id,
            "fss-b"
        );
        assert_eq!(c.fail_unfinished("restarted", UNIX_EPOCH).unwrap(), 1);
        let b = c.snapshot("fss-b").unwrap().unwrap();
        assert_eq!(
            (b.state, b.state_reason.as_str()),
            (SnapshotState::Failed, "restarted")
        );
        // One archive, two records: referenced until both are gone.
        let blob = a.blob.clone().unwrap();
        c.delete_snapshot("fss-a").unwrap();
        assert!(c.blob_referenced(&blob).unwrap());
        c.delete_snapshot("fss-c").unwrap();
        assert!(!c.blob_referenced(&blob).unwrap());
    }

    #[test]
    fn volumes_are_per_principal_and_buckets_default_to_managed() {
        let c = Catalog::in_memory().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(5);
        let v = VolumeRecord {
            principal: Principal("alice".into()),
            volume_id: "data".into(),
            runner_id: "local".into(),
            namespace: "default".into(),
            claim_name: "c".into(),
            sub_path: String::new(),
            read_only: false,
            description: "d".into(),
            state: VolumeState::Ready,
            state_reason: String::new(),
            capacity_bytes: 1 << 30,
            request_id: None,
            create_time: t,
            update_time: t,
            last_validated_time: Some(t),
        };
        c.put_volume(&v).unwrap();
        assert_eq!(c.volume(&v.principal, "data").unwrap().unwrap(), v);
        assert!(c
            .volume(&Principal("bob".into()), "data")
            .unwrap()
            .is_none());
        let bob = Principal("bob".into());
        assert_eq!(c.bucket_config(&bob).unwrap(), BucketConfig::default());
        let cfg = BucketConfig {
            bucket_name: "b".into(),
            region: "r".into(),
        };
        c.put_bucket_config(&bob, &cfg).unwrap();
        assert_eq!(c.bucket_config(&bob).unwrap(), cfg);
        assert_ne!(
            super::super::model::storage_key(&v.principal, "default", "c"),
            super::super::model::storage_key(&bob, "default", "c")
        );
    }
}
