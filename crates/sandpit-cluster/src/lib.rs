//! The shared state of a scaled-out Sandpit, in PostgreSQL
//! (docs/scale-out.md): the runner registry with heartbeats and leases,
//! the sandboxes placed on runners, placement by capacity and labels, and
//! the principals (API keys, stored as digests) every process accepts.
//!
//! PostgreSQL is the source of truth and the only arbiter: no process
//! holds state another needs, and nothing here is consensus of its own.
//! - Times are the database's (`now()`): a lease is measured on one clock.
//! - Capacity is taken by one conditional `UPDATE` of the runner's row
//!   (its `WHERE` re-checked on the newest row version once the row lock
//!   is had), in the transaction that inserts the sandbox's row: creates
//!   on many gateways never over-commit a runner, and no transaction holds
//!   more than one runner's lock, so none deadlocks.
//! - A runner whose heartbeat stops loses its lease: its live sandboxes
//!   are failed with a reason and its capacity is freed (`expire_leases`).
//!   When it registers again it is a new incarnation, told what it still
//!   holds; the old incarnation's heartbeats are refused from then on.

#![forbid(unsafe_code)]

mod migrate;
pub mod model;
pub mod placement;
mod principals;
mod store;

pub use model::{
    Capacity, DirectEndpoint, Labels, Placement, PlacementRequest, Registration, RunnerId,
    RunnerStatus, SandboxRow, SandboxState,
};
pub use placement::NoFit;
pub use principals::{key_digest, PrincipalRow, MIN_IMPORTED_KEY};
pub use store::{Adoption, Store, StoreConfig};

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid database url")]
    Url(#[source] tokio_postgres::Error),
    #[error("no database connection")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("{op}")]
    Query {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database schema version {found} is newer than this binary's {known}")]
    SchemaNewer { found: i32, known: i32 },
    #[error("invalid runner id {0:?}: lowercase letters, digits and '-', 1-63 characters")]
    InvalidRunnerId(String),
    #[error("runner {0} was registered again: this incarnation's lease is gone")]
    Superseded(RunnerId),
    #[error("sandbox {0} is already placed for another principal")]
    Conflict(String),
    #[error("{}", no_fit(.0))]
    NoCapacity(NoFit),
    #[error("{0} is out of range")]
    Range(&'static str),
    #[error("a principal named {0:?} exists already (revoked principals keep their names)")]
    PrincipalExists(String),
    #[error("that key is already another principal's")]
    KeyTaken,
    #[error("invalid principal: {0}")]
    InvalidPrincipal(String),
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
}

impl Error {
    /// Worth a retry: the connection, not the request, failed (PostgreSQL
    /// restarting, a connection the pool handed out already closed), or
    /// PostgreSQL asked for one (a serialization failure, a deadlock).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Query { source, .. } => {
                if source.is_closed() {
                    return true;
                }
                if let Some(code) = source.code() {
                    let code = code.code();
                    // 08: connection exception; 57P01-3: admin shutdown, crash
                    // shutdown, cannot connect now; 40001, 40P01: retry the
                    // transaction.
                    return code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
                }
                // No SQLSTATE: transient if the socket failed, not if a value
                // did not convert (that is a bug, and a retry repeats it).
                std::error::Error::source(source).is_some_and(|s| s.is::<std::io::Error>())
            }
            _ => false,
        }
    }
}

fn no_fit(n: &NoFit) -> &'static str {
    match n {
        NoFit::NoLiveRunner => "no live runner can take the sandbox",
        NoFit::NoLabelMatch => "no live runner carries the requested labels",
        NoFit::Full => "every runner that could take the sandbox is at capacity",
    }
}
