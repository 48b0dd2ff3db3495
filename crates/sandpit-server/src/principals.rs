//! Principals from the cluster's store (docs/scale-out.md, "Principals"):
//! every gateway and runner of a cluster accepts the keys in PostgreSQL
//! next to the keys of its own config, and the operator's
//! `sandpitd principal` commands that manage them.
//!
//! A process loads the store's principals once before it serves, then
//! again every [`sync_every`] ([`spawn_sync`]). A revoked principal's key
//! is refused from the next sync on. A failed load keeps the last good
//! set: PostgreSQL away locks no one out who was let in.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use sandpit_cluster::{Error as StoreError, PrincipalRow, Store, StoreConfig};

use crate::auth::Auth;
use crate::clusterconfig::ClusterSettings;

/// How often a process reloads the store's principals, at most.
pub const SYNC_EVERY: Duration = Duration::from_secs(2);

/// The sync interval of a cluster with this lease: [`SYNC_EVERY`], or a
/// quarter of a shorter lease.
pub fn sync_every(lease: Duration) -> Duration {
    SYNC_EVERY.min(lease / 4).max(Duration::from_millis(100))
}

/// What one load installed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loaded {
    installed: usize,
    /// Stored principals left out: their name or key is configured.
    shadowed: Vec<String>,
}

async fn load(store: &Store, auth: &Auth) -> Result<Loaded, StoreError> {
    let rows = store.principals().await?;
    let live: Vec<_> = rows
        .into_iter()
        .filter(|r| !r.revoked)
        .map(|r| (r.key_sha256, r.name, r.organization))
        .collect();
    let total = live.len();
    let shadowed = auth.set_shared(live);
    Ok(Loaded {
        installed: total - shadowed.len(),
        shadowed,
    })
}

fn warn_shadowed(shadowed: &[String]) {
    if !shadowed.is_empty() {
        tracing::warn!(
            names = ?shadowed,
            "stored principals left out: a configured key has the name or the key (the configured one wins)"
        );
    }
}

/// Loads the store's principals into `auth` once: what a process does
/// before it serves. A failure is logged (the process serves its
/// configured keys, and the sync tries again) and returned.
pub async fn load_once(store: &Store, auth: &Auth) -> Result<usize, StoreError> {
    match load(store, auth).await {
        Ok(l) => {
            tracing::info!(
                principals = l.installed,
                "principals loaded from the cluster's store"
            );
            warn_shadowed(&l.shadowed);
            Ok(l.installed)
        }
        Err(e) => {
            tracing::warn!(
                error = %sandpit_errors::chain(&e),
                "cannot load principals from the cluster's store; serving the configured keys until a sync succeeds"
            );
            Err(e)
        }
    }
}

/// Reloads the store's principals into `auth` at once and then every
/// `every`, until aborted. A failed load is logged at warn (once, until
/// one succeeds again) and keeps the last good set.
pub fn spawn_sync(store: Store, auth: Auth, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<Loaded> = None;
        let mut failing = false;
        loop {
            tick.tick().await;
            match load(&store, &auth).await {
                Ok(l) => {
                    if failing {
                        tracing::info!(
                            principals = l.installed,
                            "principals loaded from the cluster's store again"
                        );
                        failing = false;
                    } else if last.as_ref().is_some_and(|p| p.installed != l.installed) {
                        tracing::info!(principals = l.installed, "principals changed in the store");
                    }
                    if last.as_ref().map(|p| &p.shadowed) != Some(&l.shadowed) {
                        warn_shadowed(&l.shadowed);
                    }
                    last = Some(l);
                }
                Err(e) if !failing => {
                    tracing::warn!(
                        error = %sandpit_errors::chain(&e),
                        kept = auth.shared_len(),
                        "cannot sync principals from the cluster's store; keeping the last set"
                    );
                    failing = true;
                }
                Err(e) => {
                    tracing::debug!(error = %sandpit_errors::chain(&e), "principals sync failed again");
                }
            }
        }
    })
}

/// What a cluster process does at start-up: [`load_once`], then
/// [`spawn_sync`] every [`sync_every`] of the lease. The task runs until
/// aborted or the runtime ends.
pub async fn start(store: &Store, auth: &Auth, lease: Duration) -> tokio::task::JoinHandle<()> {
    let _ = load_once(store, auth).await;
    spawn_sync(store.clone(), auth.clone(), sync_every(lease))
}

// ------------------------------------------------------------ commands

/// `sandpitd principal ...`: the cluster's principals, in its PostgreSQL
/// (`--config FILE` with a `[cluster]` section).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PrincipalCommand {
    /// Add a principal with a new key, printed once on stdout (the store
    /// keeps only its SHA-256).
    Add {
        /// The principal's name (what its sandboxes belong to).
        name: String,
        /// The organization discovery reports for it.
        #[arg(long, value_name = "ORG")]
        organization: Option<String>,
    },
    /// Add a principal whose key exists already, read from a file.
    Import {
        /// The principal's name.
        name: String,
        /// A file holding the key (surrounding whitespace is ignored).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The organization discovery reports for it.
        #[arg(long, value_name = "ORG")]
        organization: Option<String>,
    },
    /// Revoke a principal: every gateway and runner refuses its key from
    /// its next sync on (within seconds).
    Revoke {
        /// The principal's name.
        name: String,
    },
    /// List the principals: names, organizations, when added and revoked.
    /// Never keys.
    List,
}

/// `sandpitd principal ...` as a process: reads `config` (its `[cluster]`
/// section names the database), runs the command, and returns the exit
/// status (0; 1 the store refused or failed; 2 bad config or usage).
pub fn run_cli(config: Option<&std::path::Path>, command: &PrincipalCommand) -> u8 {
    let settings = match crate::config::Config::load(config, Default::default(), None) {
        Ok(c) => c.cluster,
        Err(e) => {
            eprintln!("sandpitd: {}", crate::chain(&e));
            return 2;
        }
    };
    let Some(cluster) = settings else {
        eprintln!(
            "sandpitd principal: principals are kept in the cluster's PostgreSQL: \
             give --config FILE with a [cluster] section (database_url or database_url_file)"
        );
        return 2;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandpitd: start tokio: {e}");
            return 1;
        }
    };
    let mut stdout = std::io::stdout().lock();
    match runtime.block_on(run_command(command, &cluster, &mut stdout)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sandpitd principal: {e}");
            e.exit_code()
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad input: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// The store refused or failed: exit status 1.
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// The process's exit status (the daemon's: 1 failed, 2 bad config or
    /// usage).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
        }
    }
}

fn failed(e: &StoreError) -> CommandError {
    match e {
        StoreError::InvalidPrincipal(_) => CommandError::Usage(sandpit_errors::chain(e)),
        _ => CommandError::Failed(sandpit_errors::chain(e)),
    }
}

/// Reads an imported key: the file's text, trimmed.
fn read_key(path: &std::path::Path) -> Result<String, CommandError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CommandError::Usage(format!("read {}: {e}", path.display())))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(CommandError::Usage(format!(
            "{} holds no key",
            path.display()
        )));
    }
    Ok(key.to_owned())
}

/// Runs `command` against the cluster's store; what it prints goes to
/// `out` (a new key, the listing), progress to the log.
pub async fn run_command(
    command: &PrincipalCommand,
    cluster: &ClusterSettings,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    // Read input before connecting: a bad file is a usage error whatever
    // the database's state.
    let imported = match command {
        PrincipalCommand::Import { key_file, .. } => Some(read_key(key_file)?),
        _ => None,
    };
    let store = Store::connect(
        &cluster.database_url,
        StoreConfig {
            lease: cluster.lease,
            max_connections: 1,
            ..StoreConfig::default()
        },
    )
    .await
    .map_err(|e| {
        CommandError::Failed(format!(
            "connect to the cluster's PostgreSQL: {}",
            sandpit_errors::chain(&e)
        ))
    })?;
    let io = |e: std::io::Error| CommandError::Failed(format!("write the output: {e}"));
    match command {
        PrincipalCommand::Add { name, organization } => {
            let key = store
                .add_principal(name, organization.as_deref())
                .await
                .map_err(|e| failed(&e))?;
            writeln!(out, "{key}").map_err(io)?;
        }
        PrincipalCommand::Import {
            name, organization, ..
        } => {
            let key = imported.unwrap_or_default();
            store
                .import_principal(name, &key, organization.as_deref())
                .await
                .map_err(|e| failed(&e))?;
        }
        PrincipalCommand::Revoke { name } => {
            if !store.revoke_principal(name).await.map_err(|e| failed(&e))? {
                return Err(CommandError::Failed(format!(
                    "no live principal named {name:?} (see `sandpitd principal list`)"
                )));
            }
        }
        PrincipalCommand::List => {
            let rows = store.principals().await.map_err(|e| failed(&e))?;
            out.write_all(listing(&rows).as_bytes()).map_err(io)?;
        }
    }
    Ok(())
}

fn time(unix: i64) -> String {
    let ns = u64::try_from(unix)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000);
    crate::logs::rfc3339_nanos(ns).replace(".000000000Z", "Z")
}

/// The listing: a header and a row per principal, columns aligned.
fn listing(rows: &[PrincipalRow]) -> String {
    let mut table = vec![[
        "NAME".to_owned(),
        "ORGANIZATION".to_owned(),
        "CREATED".to_owned(),
        "REVOKED".to_owned(),
    ]];
    for r in rows {
        table.push([
            r.name.clone(),
            r.organization.clone().unwrap_or_else(|| "-".into()),
            time(r.created_at_unix),
            r.revoked_at_unix.map_or_else(|| "-".into(), time),
        ]);
    }
    let mut widths = [0usize; 4];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_shows_no_keys_and_aligns() {
        let rows = [
            PrincipalRow {
                name: "alice".into(),
                organization: Some("acme".into()),
                key_sha256: [7; 32],
                created_at_unix: 1_700_000_000,
                revoked: false,
                revoked_at_unix: None,
            },
            PrincipalRow {
                name: "bob-the-builder".into(),
                organization: None,
                key_sha256: [9; 32],
                created_at_unix: 1_700_000_000,
                revoked: true,
                revoked_at_unix: Some(1_700_000_060),
            },
        ];
        let text = listing(&rows);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME             ORGANIZATION  CREATED               REVOKED",
                "alice            acme          2023-11-14T22:13:20Z  -",
                "bob-the-builder  -             2023-11-14T22:13:20Z  2023-11-14T22:14:20Z",
            ]
        );
        assert!(!text.contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn the_interval_follows_a_short_lease() {
        assert_eq!(sync_every(Duration::from_secs(10)), Duration::from_secs(2));
        assert_eq!(sync_every(Duration::from_secs(60)), Duration::from_secs(2));
        assert_eq!(
            sync_every(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn an_imported_key_file_is_trimmed_and_must_hold_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "  a-key-of-some-length\n").unwrap();
        assert_eq!(read_key(&p).unwrap(), "a-key-of-some-length");
        std::fs::write(&p, "\n").unwrap();
        assert_eq!(read_key(&p).unwrap_err().exit_code(), 2);
        assert_eq!(
            read_key(&dir.path().join("missing"))
                .unwrap_err()
                .exit_code(),
            2
        );
    }
}
