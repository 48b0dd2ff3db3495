//! Command records (see [`crate::accounting`]) next to the sandbox records:
//! one JSON row per command, the last [`MAX_RECORDS`] per sandbox, deleted
//! with the sandbox's record.

use rusqlite::params;

use super::{Db, DbError};
use crate::accounting::{CommandRecord, MAX_RECORDS};
use crate::model::SandboxId;

/// The table; `seq` orders a sandbox's records.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS commands_sandbox ON commands (sandbox_id, seq);
";

impl Db {
    /// Adds a command record of `id` (JSON), dropping its oldest beyond
    /// [`MAX_RECORDS`].
    pub(super) fn put_command(&self, id: &SandboxId, json: &str) -> Result<(), DbError> {
        self.conn
            .prepare_cached("INSERT INTO commands (sandbox_id, record) VALUES (?1, ?2)")?
            .execute(params![id.as_str(), json])?;
        self.conn
            .prepare_cached(
                "DELETE FROM commands WHERE sandbox_id = ?1 AND seq <= (
                    SELECT seq FROM commands WHERE sandbox_id = ?1
                    ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![id.as_str(), MAX_RECORDS as i64])?;
        Ok(())
    }

    pub(super) fn delete_commands(&self, id: &SandboxId) -> Result<(), DbError> {
        self.conn
            .prepare_cached("DELETE FROM commands WHERE sandbox_id = ?1")?
            .execute([id.as_str()])?;
        Ok(())
    }

    /// Every command record, oldest first.
    pub fn load_commands(&self) -> Result<Vec<(SandboxId, CommandRecord)>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT sandbox_id, record FROM commands ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row?;
            let corrupt = |what| DbError::Corrupt {
                id: id.clone(),
                what,
            };
            let sid = SandboxId::parse(&id).map_err(|_| corrupt("sandbox id"))?;
            let record = serde_json::from_str(&json).map_err(|_| corrupt("command record"))?;
            out.push((sid, record));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::accounting::Outcome;

    fn command(n: usize) -> CommandRecord {
        CommandRecord {
            id: format!("exec-{n}"),
            argv: vec!["true".into()],
            start_time: SystemTime::UNIX_EPOCH + Duration::from_secs(n as u64),
            end_time: SystemTime::UNIX_EPOCH + Duration::from_secs(n as u64 + 1),
            duration: Duration::from_millis(1500),
            usage: None,
            outcome: Outcome::Exited { code: 0 },
            exit_code: Some(0),
            detail: String::new(),
        }
    }

    #[test]
    fn command_records_are_bounded_and_go_with_their_sandbox() {
        let db = Db::in_memory().unwrap();
        let (a, b) = (
            SandboxId::parse("a").unwrap(),
            SandboxId::parse("b").unwrap(),
        );
        db.put(&super::super::tests::record("a")).unwrap();
        for n in 1..=MAX_RECORDS + 5 {
            let json = serde_json::to_string(&command(n)).unwrap();
            db.put_command(&a, &json).unwrap();
        }
        db.put_command(&b, &serde_json::to_string(&command(1)).unwrap())
            .unwrap();
        let all = db.load_commands().unwrap();
        let of_a: Vec<_> = all.iter().filter(|(id, _)| *id == a).collect();
        assert_eq!(of_a.len(), MAX_RECORDS);
        assert_eq!(of_a[0].1, command(6));
        assert_eq!(of_a.last().unwrap().1, command(MAX_RECORDS + 5));
        db.delete(&a).unwrap();
        let left = db.load_commands().unwrap();
        assert_eq!(left, vec![(b, command(1))]);
    }
}
