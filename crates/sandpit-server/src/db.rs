//! Persistence of sandbox records in SQLite (`<data-dir>/sandpitd.db`).
//!
//! Every record change is written here before it is reported to anyone, so
//! a restarted daemon (even after `kill -9`) knows every sandbox it ever
//! acknowledged. WAL mode with `synchronous=NORMAL`: a commit survives a
//! crash of the daemon; only a power loss may drop the last commits.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::model::{Principal, ResourceSpec, Resources, SandboxId, SandboxRecord, State};
use crate::offload::{Batch, Offload};

mod commands;

/// Errors of the database. Cloneable: one failed commit answers every
/// change of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("sqlite")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// The writer went away before the change was written (the daemon is
    /// shutting down).
    #[error("database writer stopped")]
    Stopped,
    /// A stored row does not decode.
    #[error("corrupt record {id}: {what}")]
    Corrupt {
        /// The sandbox id.
        id: String,
        /// What is wrong.
        what: &'static str,
    },
    /// The database was written by a newer sandpitd.
    #[error("database schema version {0} is newer than this sandpitd supports")]
    TooNew(i64),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(Arc::new(e))
    }
}

/// 1: the first schema. 2: resource requests (`cpu_request_millis`,
/// `memory_request_bytes`) next to the limits.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY NOT NULL,
    principal TEXT NOT NULL,
    request_id TEXT,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    create_time_ms INTEGER NOT NULL,
    start_time_ms INTEGER,
    end_time_ms INTEGER,
    exit_code INTEGER,
    image TEXT NOT NULL,
    tags TEXT NOT NULL,
    annotations TEXT NOT NULL,
    display_name TEXT NOT NULL,
    cpu_millis INTEGER,
    memory_bytes INTEGER,
    max_lifetime_seconds INTEGER NOT NULL,
    spec BLOB NOT NULL,
    cpu_request_millis INTEGER,
    memory_request_bytes INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS sandboxes_request
    ON sandboxes (principal, request_id) WHERE request_id IS NOT NULL;
";

/// The sandbox table.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::init(Connection::open(path)?)
    }

    /// A private in-memory database (tests).
    pub fn in_memory() -> Result<Self, DbError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, DbError> {
        // journal_mode answers with a row, hence query_row.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(DbError::TooNew(version));
        }
        if version == 1 {
            // Rows written before requests were kept read back with their
            // requests equal to their limits (what they reported then).
            conn.execute_batch(
                "ALTER TABLE sandboxes ADD COLUMN cpu_request_millis INTEGER;
                 ALTER TABLE sandboxes ADD COLUMN memory_request_bytes INTEGER;",
            )?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(commands::SCHEMA)?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        Ok(Self { conn })
    }

    /// Inserts or replaces a record.
    pub fn put(&self, r: &SandboxRecord) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT INTO sandboxes (id, principal, request_id, state, state_reason,
                    create_time_ms, start_time_ms, end_time_ms, exit_code, image, tags,
                    annotations, display_name, cpu_millis, memory_bytes,
                    max_lifetime_seconds, spec, cpu_request_millis, memory_request_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                    ?18, ?19)
                 ON CONFLICT (id) DO UPDATE SET
                    state = excluded.state, state_reason = excluded.state_reason,
                    start_time_ms = excluded.start_time_ms, end_time_ms = excluded.end_time_ms,
                    exit_code = excluded.exit_code, tags = excluded.tags,
                    annotations = excluded.annotations, display_name = excluded.display_name,
                    cpu_millis = excluded.cpu_millis, memory_bytes = excluded.memory_bytes,
                    cpu_request_millis = excluded.cpu_request_millis,
                    memory_request_bytes = excluded.memory_request_bytes,
                    max_lifetime_seconds = excluded.max_lifetime_seconds, spec = excluded.spec",
            )?
            .execute(params![
                r.id.as_str(),
                r.principal.as_str(),
                r.request_id,
                r.state.as_str(),
                r.state_reason,
                to_ms(r.create_time),
                r.start_time.map(to_ms),
                r.end_time.map(to_ms),
                r.exit_code,
                r.image,
                serde_json::to_string(&r.tags).expect("tags serialise"),
                serde_json::to_string(&r.annotations).expect("annotations serialise"),
                r.display_name,
                r.resources.limits.cpu_millis.map(|v| v as i64),
                r.resources.limits.memory_bytes.map(|v| v as i64),
                r.max_lifetime_seconds,
                r.spec_echo,
                r.resources.requests.cpu_millis.map(|v| v as i64),
                r.resources.requests.memory_bytes.map(|v| v as i64),
            ])?;
        Ok(())
    }

    /// Deletes a record (and its command records); deleting a missing one
    /// is not an error.
    pub fn delete(&self, id: &SandboxId) -> Result<(), DbError> {
        self.conn
            .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")?
            .execute([id.as_str()])?;
        self.delete_commands(id)?;
        Ok(())
    }

    /// One record.
    pub fn get(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, DbError> {
        let row = self
            .conn
            .prepare_cached("SELECT * FROM sandboxes WHERE id = ?1")?
            .query_row([id.as_str()], RawRow::read)
            .optional()?;
        row.map(RawRow::decode).transpose()
    }

    /// Every record, oldest first.
    pub fn load_all(&self) -> Result<Vec<SandboxRecord>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM sandboxes ORDER BY create_time_ms, id")?;
        let rows = stmt.query_map([], RawRow::read)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.decode()?);
        }
        Ok(out)
    }
}

/// Writes records from async code: every change is queued at once (so
/// changes are written in the order they were made) and committed on the
/// blocking pool, in one transaction per batch of concurrent changes; the
/// caller awaits its commit before it publishes the change. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecordWriter {
    offload: Offload<Db, DbJob>,
}

/// What to do once a change was committed (or failed): runs on the
/// blocking thread that committed it, so it must be quick (the manager
/// publishes the change there).
type Then = Box<dyn FnOnce(Result<(), DbError>) + Send>;

/// A queued change, and what follows its commit.
pub(crate) struct DbJob {
    change: Change,
    then: Then,
}

enum Change {
    Put(Box<SandboxRecord>),
    Delete(SandboxId),
    /// A command record (JSON) of a sandbox.
    Command(SandboxId, String),
}

impl Batch<Db> for DbJob {
    fn run(db: &mut Db, jobs: Vec<Self>) {
        let results = db.apply(jobs.iter().map(|j| &j.change));
        for (job, result) in jobs.into_iter().zip(results) {
            (job.then)(result);
        }
    }
}

impl Db {
    /// Applies changes in one transaction; one result per change. A
    /// statement that fails (a duplicate request id) fails alone; a failed
    /// commit fails them all.
    fn apply<'a>(&self, changes: impl Iterator<Item = &'a Change>) -> Vec<Result<(), DbError>> {
        let tx = match self.conn.unchecked_transaction() {
            Ok(tx) => tx,
            Err(e) => {
                let e = DbError::from(e);
                return changes.map(|_| Err(e.clone())).collect();
            }
        };
        let mut results: Vec<Result<(), DbError>> = changes
            .map(|c| match c {
                Change::Put(r) => self.put(r),
                Change::Delete(id) => self.delete(id),
                Change::Command(id, json) => self.put_command(id, json),
            })
            .collect();
        if let Err(e) = tx.commit() {
            let e = DbError::from(e);
            for r in &mut results {
                *r = Err(e.clone());
            }
        }
        results
    }
}

impl RecordWriter {
    /// Takes the database over.
    pub fn new(db: Db) -> Self {
        Self {
            offload: Offload::new(db),
        }
    }

    /// Queues an insert or update of `r`; `then` runs with the outcome of
    /// its commit. If the daemon shuts down first, `then` is dropped
    /// unrun.
    pub(crate) fn put(
        &self,
        r: SandboxRecord,
        then: impl FnOnce(Result<(), DbError>) + Send + 'static,
    ) {
        self.offload.push(DbJob {
            change: Change::Put(Box::new(r)),
            then: Box::new(then),
        });
    }

    /// Queues a command record of sandbox `id` (see
    /// [`crate::accounting`]); failures are logged, not reported.
    pub(crate) fn put_command(&self, id: SandboxId, record: &crate::accounting::CommandRecord) {
        let json = serde_json::to_string(record).expect("command records serialise");
        self.offload.push(DbJob {
            change: Change::Command(id, json),
            then: Box::new(|r| {
                if let Err(e) = r {
                    tracing::warn!(error = %crate::chain(&e), "store command record");
                }
            }),
        });
    }

    /// Queues the deletion of a record, like [`RecordWriter::put`].
    pub(crate) fn delete(
        &self,
        id: SandboxId,
        then: impl FnOnce(Result<(), DbError>) + Send + 'static,
    ) {
        self.offload.push(DbJob {
            change: Change::Delete(id),
            then: Box::new(then),
        });
    }
}

/// A row as SQLite returns it, before the checks of [`RawRow::decode`].
struct RawRow {
    id: String,
    principal: String,
    request_id: Option<String>,
    state: String,
    state_reason: String,
    create_time_ms: i64,
    start_time_ms: Option<i64>,
    end_time_ms: Option<i64>,
    exit_code: Option<i32>,
    image: String,
    tags: String,
    annotations: String,
    display_name: String,
    cpu_millis: Option<i64>,
    memory_bytes: Option<i64>,
    cpu_request_millis: Option<i64>,
    memory_request_bytes: Option<i64>,
    max_lifetime_seconds: u32,
    spec: Vec<u8>,
}

impl RawRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get("id")?,
            principal: r.get("principal")?,
            request_id: r.get("request_id")?,
            state: r.get("state")?,
            state_reason: r.get("state_reason")?,
            create_time_ms: r.get("create_time_ms")?,
            start_time_ms: r.get("start_time_ms")?,
            end_time_ms: r.get("end_time_ms")?,
            exit_code: r.get("exit_code")?,
            image: r.get("image")?,
            tags: r.get("tags")?,
            annotations: r.get("annotations")?,
            display_name: r.get("display_name")?,
            cpu_millis: r.get("cpu_millis")?,
            memory_bytes: r.get("memory_bytes")?,
            cpu_request_millis: r.get("cpu_request_millis")?,
            memory_request_bytes: r.get("memory_request_bytes")?,
            max_lifetime_seconds: r.get("max_lifetime_seconds")?,
            spec: r.get("spec")?,
        })
    }

    fn decode(self) -> Result<SandboxRecord, DbError> {
        let corrupt = |what| DbError::Corrupt {
            id: self.id.clone(),
            what,
        };
        let id = SandboxId::parse(&self.id).map_err(|_| corrupt("id"))?;
        let state = State::parse(&self.state).ok_or_else(|| corrupt("state"))?;
        let tags = serde_json::from_str(&self.tags).map_err(|_| corrupt("tags"))?;
        let annotations =
            serde_json::from_str(&self.annotations).map_err(|_| corrupt("annotations"))?;
        let unsigned = |v: Option<i64>, what| {
            v.map(|v| u64::try_from(v).map_err(|_| corrupt(what)))
                .transpose()
        };
        let limits = Resources {
            cpu_millis: unsigned(self.cpu_millis, "cpu_millis")?,
            memory_bytes: unsigned(self.memory_bytes, "memory_bytes")?,
        };
        let requests = Resources {
            cpu_millis: unsigned(self.cpu_request_millis, "cpu_request_millis")?
                .or(limits.cpu_millis),
            memory_bytes: unsigned(self.memory_request_bytes, "memory_request_bytes")?
                .or(limits.memory_bytes),
        };
        Ok(SandboxRecord {
            principal: Principal(self.principal),
            request_id: self.request_id,
            state,
            state_reason: self.state_reason,
            create_time: from_ms(self.create_time_ms),
            start_time: self.start_time_ms.map(from_ms),
            end_time: self.end_time_ms.map(from_ms),
            exit_code: self.exit_code,
            image: self.image,
            tags,
            annotations,
            display_name: self.display_name,
            resources: ResourceSpec { requests, limits },
            max_lifetime_seconds: self.max_lifetime_seconds,
            spec_echo: self.spec,
            id,
        })
    }
}

pub(crate) fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

pub(crate) fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::sync::oneshot;

    fn sid(id: &str) -> SandboxId {
        SandboxId::parse(id).unwrap()
    }

    pub(crate) fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: sid(id),
            principal: Principal("alice".into()),
            request_id: Some("req-1".into()),
            state: State::Running,
            state_reason: String::new(),
            create_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            start_time: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_200)),
            end_time: None,
            exit_code: None,
            image: "docker.io/library/python:3.11".into(),
            tags: vec!["a".into(), "b".into()],
            annotations: BTreeMap::from([("k".into(), "v".into())]),
            display_name: "dn".into(),
            resources: ResourceSpec {
                requests: Resources {
                    cpu_millis: Some(250),
                    memory_bytes: Some(128 << 20),
                },
                limits: Resources {
                    cpu_millis: Some(500),
                    memory_bytes: Some(256 << 20),
                },
            },
            max_lifetime_seconds: 3600,
            spec_echo: vec![1, 2, 3],
        }
    }

    #[test]
    fn records_round_trip_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = Db::open(&path).unwrap();
        let mut r = record("abc");
        db.put(&r).unwrap();
        assert_eq!(db.get(&sid("abc")).unwrap().unwrap(), r);
        r.state = State::Completed;
        r.exit_code = Some(0);
        r.end_time = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_100));
        db.put(&r).unwrap();
        drop(db);
        // Reopening sees the last write.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.load_all().unwrap(), vec![r]);
        db.delete(&sid("abc")).unwrap();
        db.delete(&sid("abc")).unwrap();
        assert!(db.get(&sid("abc")).unwrap().is_none());
    }

    #[test]
    fn request_ids_are_unique_per_principal() {
        let db = Db::in_memory().unwrap();
        db.put(&record("a")).unwrap();
        assert!(db.put(&record("b")).is_err());
        let mut other = record("c");
        other.principal = Principal("bob".into());
        db.put(&other).unwrap();
        let mut none = record("d");
        none.request_id = None;
        db.put(&none).unwrap();
        none.id = sid("e");
        db.put(&none).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_commits_in_order_and_fails_changes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let w = RecordWriter::new(Db::open(&path).unwrap());
        let put = |r: SandboxRecord| {
            let (tx, rx) = oneshot::channel();
            w.put(r, move |res| {
                let _ = tx.send(res);
            });
            rx
        };
        let committed =
            |rx: oneshot::Receiver<Result<(), DbError>>| async move { rx.await.unwrap() };
        let mut acks = Vec::new();
        let mut r = record("abc");
        for code in 0..50 {
            r.exit_code = Some(code);
            acks.push(put(r.clone()));
        }
        // Same principal and request id as "abc": refused by the unique
        // index, alone.
        let dup = put(record("dup"));
        let mut other = record("other");
        other.request_id = None;
        let ok = put(other.clone());
        let (tx, gone) = oneshot::channel();
        w.delete(sid("nothing"), move |res| {
            let _ = tx.send(res);
        });
        for a in acks {
            committed(a).await.unwrap();
        }
        assert!(matches!(committed(dup).await, Err(DbError::Sqlite(_))));
        committed(ok).await.unwrap();
        committed(gone).await.unwrap();
        let db = Db::open(&path).unwrap();
        assert_eq!(db.get(&sid("abc")).unwrap().unwrap().exit_code, Some(49));
        assert_eq!(db.get(&sid("other")).unwrap().unwrap(), other);
        assert!(db.get(&sid("dup")).unwrap().is_none());
    }

    #[test]
    fn errors_do_not_repeat_their_source() {
        let e = DbError::from(rusqlite::Error::InvalidQuery);
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(!e.to_string().contains(&source));
    }

    #[test]
    fn a_version_1_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE sandboxes (
                    id TEXT PRIMARY KEY NOT NULL, principal TEXT NOT NULL, request_id TEXT,
                    state TEXT NOT NULL, state_reason TEXT NOT NULL,
                    create_time_ms INTEGER NOT NULL, start_time_ms INTEGER, end_time_ms INTEGER,
                    exit_code INTEGER, image TEXT NOT NULL, tags TEXT NOT NULL,
                    annotations TEXT NOT NULL, display_name TEXT NOT NULL,
                    cpu_millis INTEGER, memory_bytes INTEGER,
                    max_lifetime_seconds INTEGER NOT NULL, spec BLOB NOT NULL);
                 INSERT INTO sandboxes VALUES ('abc', 'alice', NULL, 'running', '', 1, 2, NULL,
                    NULL, 'docker.io/library/python:3.11', '[]', '{}', '', 500, 1048576, 60, x'');
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let r = db.get(&sid("abc")).unwrap().unwrap();
        // What it reported before: requests equal to the limits.
        assert_eq!(r.resources.limits.cpu_millis, Some(500));
        assert_eq!(r.resources.requests, r.resources.limits);
        let mut r2 = record("def");
        r2.request_id = None;
        db.put(&r2).unwrap();
        assert_eq!(db.get(&sid("def")).unwrap().unwrap(), r2);
    }

    #[test]
    fn timestamps_before_the_epoch_survive() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(from_ms(to_ms(t)), t);
    }
}
