//! Persistence of sandbox records in SQLite (`<data-dir>/sandpitd.db`).
//!
//! Every record change is written here before it is reported to anyone, so
//! a restarted daemon (even after `kill -9`) knows every sandbox it ever
//! acknowledged. WAL mode with `synchronous=NORMAL`: a commit survives a
//! crash of the daemon; only a power loss may drop the last commits.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::model::{Principal, Resources, SandboxRecord, State};

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
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

const SCHEMA_VERSION: i64 = 1;

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
    spec BLOB NOT NULL
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
        conn.execute_batch(SCHEMA)?;
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
                    max_lifetime_seconds, spec)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                 ON CONFLICT (id) DO UPDATE SET
                    state = excluded.state, state_reason = excluded.state_reason,
                    start_time_ms = excluded.start_time_ms, end_time_ms = excluded.end_time_ms,
                    exit_code = excluded.exit_code, tags = excluded.tags,
                    annotations = excluded.annotations, display_name = excluded.display_name,
                    cpu_millis = excluded.cpu_millis, memory_bytes = excluded.memory_bytes,
                    max_lifetime_seconds = excluded.max_lifetime_seconds, spec = excluded.spec",
            )?
            .execute(params![
                r.id,
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
                r.limits.cpu_millis.map(|v| v as i64),
                r.limits.memory_bytes.map(|v| v as i64),
                r.max_lifetime_seconds,
                r.spec_echo,
            ])?;
        Ok(())
    }

    /// Deletes a record; deleting a missing one is not an error.
    pub fn delete(&self, id: &str) -> Result<(), DbError> {
        self.conn
            .prepare_cached("DELETE FROM sandboxes WHERE id = ?1")?
            .execute([id])?;
        Ok(())
    }

    /// One record.
    pub fn get(&self, id: &str) -> Result<Option<SandboxRecord>, DbError> {
        let row = self
            .conn
            .prepare_cached("SELECT * FROM sandboxes WHERE id = ?1")?
            .query_row([id], RawRow::read)
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
            max_lifetime_seconds: r.get("max_lifetime_seconds")?,
            spec: r.get("spec")?,
        })
    }

    fn decode(self) -> Result<SandboxRecord, DbError> {
        let corrupt = |what| DbError::Corrupt {
            id: self.id.clone(),
            what,
        };
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
            limits,
            max_lifetime_seconds: self.max_lifetime_seconds,
            spec_echo: self.spec,
            id: self.id,
        })
    }
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

fn from_ms(ms: i64) -> SystemTime {
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

    pub(crate) fn record(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
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
            limits: Resources {
                cpu_millis: Some(500),
                memory_bytes: Some(256 << 20),
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
        assert_eq!(db.get("abc").unwrap().unwrap(), r);
        r.state = State::Completed;
        r.exit_code = Some(0);
        r.end_time = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_100));
        db.put(&r).unwrap();
        drop(db);
        // Reopening sees the last write.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.load_all().unwrap(), vec![r]);
        db.delete("abc").unwrap();
        db.delete("abc").unwrap();
        assert!(db.get("abc").unwrap().is_none());
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
        none.id = "e".into();
        db.put(&none).unwrap();
    }

    #[test]
    fn timestamps_before_the_epoch_survive() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(from_ms(to_ms(t)), t);
    }
}
