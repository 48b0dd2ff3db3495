//! The store: a pool of connections to PostgreSQL and the operations of
//! gateways (placement, release, routing, lease expiry) and runners
//! (registration, heartbeats, state changes).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{NoTls, Row};

use crate::model::{
    Capacity, DirectEndpoint, Labels, Placement, PlacementRequest, Registration, RunnerId,
    RunnerStatus, SandboxRow, SandboxState,
};
use crate::{migrate, placement, Error, NoFit};

/// How a store connects and how long a runner's lease lasts.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// A heartbeat older than this ends the runner's lease. Runners
    /// heartbeat at a quarter of it, so three may be lost in a row.
    pub lease: Duration,
    /// Connections kept open to PostgreSQL.
    pub max_connections: usize,
    /// How long an operation waits for a connection (and a new connection
    /// for PostgreSQL) before it fails as transient.
    pub connect_timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What a registering runner is told: its incarnation (which its
/// heartbeats carry) and the sandboxes it still holds. Any other sandbox
/// it finds running was failed while it was away and is to be destroyed.
#[derive(Clone, Debug)]
pub struct Adoption {
    pub incarnation: i64,
    pub live: Vec<SandboxRow>,
}

/// The shared state, through a pool of connections. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    lease_secs: f64,
}

const LIVE: &str = "('placed', 'running')";

const SANDBOX_COLUMNS: &str =
    "s.id, s.principal, s.runner_id, s.cpu_millis, s.memory_bytes, s.state, s.reason";

/// The runners that may take a create ($1 lease, $2 pins, $3 selector, $4
/// CPU, $5 memory), the few best by the spread score: a create reads a
/// handful of rows however many runners there are. `placement::rank` orders
/// them by the same score, and is what decides.
const CANDIDATES: &str = "WHERE heartbeat_at >= now() - make_interval(secs => $1)
       AND (cardinality($2::text[]) = 0 OR id = ANY($2))
       AND labels @> $3
       AND req_cpu_millis + $4 <= alloc_cpu_millis
       AND req_memory_bytes + $5 <= alloc_memory_bytes
       AND sandboxes + 1 <= alloc_sandboxes
     ORDER BY greatest((req_cpu_millis + $4)::float8 / NULLIF(alloc_cpu_millis, 0),
                       (req_memory_bytes + $5)::float8 / NULLIF(alloc_memory_bytes, 0),
                       (sandboxes + 1)::float8 / NULLIF(alloc_sandboxes, 0)) NULLS FIRST,
              sandboxes, id
     LIMIT 8";

/// Reads of candidates before a create is refused as full.
const ROUNDS: usize = 3;

const RUNNER_COLUMNS: &str = "id, endpoint, labels, alloc_cpu_millis, alloc_memory_bytes, \
     alloc_sandboxes, req_cpu_millis, req_memory_bytes, sandboxes, incarnation, \
     EXTRACT(EPOCH FROM (now() - heartbeat_at))::float8, direct_endpoint, direct_cert_pem";

pub(crate) fn q(op: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |source| Error::Query { op, source }
}

fn int(v: u64, what: &'static str) -> Result<i64, Error> {
    i64::try_from(v).map_err(|_| Error::Range(what))
}

fn uint(v: i64, what: &'static str) -> Result<u64, Error> {
    u64::try_from(v).map_err(|_| Error::Corrupt(format!("{what} {v}")))
}

fn labels_json(labels: &Labels) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

impl Store {
    /// Connects to `url` (`postgres://user:pass@host:port/db`) and brings
    /// the schema up to date.
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self, Error> {
        let mut pg = tokio_postgres::Config::from_str(url).map_err(Error::Url)?;
        pg.connect_timeout(config.connect_timeout);
        pg.application_name("sandpit");
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // A connection PostgreSQL closed (a restart) is noticed
                // without a round trip and replaced.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| Error::Corrupt(format!("connection pool: {e}")))?;
        let store = Self {
            pool,
            lease_secs: config.lease.as_secs_f64(),
        };
        let mut client = store.pool.get().await.map_err(Error::Pool)?;
        migrate::migrate(&mut client).await?;
        Ok(store)
    }

    /// The schema version this binary brings.
    pub fn schema_version() -> i32 {
        migrate::latest()
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        self.pool.get().await.map_err(Error::Pool)
    }

    // ------------------------------------------------------------ runners

    /// Registers a runner, or registers it again as a new incarnation:
    /// its endpoint, labels and capacity are replaced, its heartbeat is
    /// now, its requested capacity is recounted from its live sandboxes.
    pub async fn register(&self, reg: &Registration) -> Result<Adoption, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(q("begin register"))?;
        let incarnation: i64 = tx
            .query_one(
                "INSERT INTO runners (id, endpoint, labels, alloc_cpu_millis, \
                     alloc_memory_bytes, alloc_sandboxes, direct_endpoint, direct_cert_pem)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO UPDATE SET endpoint = EXCLUDED.endpoint,
                     labels = EXCLUDED.labels,
                     direct_endpoint = EXCLUDED.direct_endpoint,
                     direct_cert_pem = EXCLUDED.direct_cert_pem,
                     alloc_cpu_millis = EXCLUDED.alloc_cpu_millis,
                     alloc_memory_bytes = EXCLUDED.alloc_memory_bytes,
                     alloc_sandboxes = EXCLUDED.alloc_sandboxes,
                     incarnation = runners.incarnation + 1,
                     registered_at = now(), heartbeat_at = now()
                 RETURNING incarnation",
                &[
                    &reg.id.as_str(),
                    &reg.endpoint,
                    &labels_json(&reg.labels),
                    &int(reg.allocatable.cpu_millis, "allocatable cpu")?,
                    &int(reg.allocatable.memory_bytes, "allocatable memory")?,
                    &i32::try_from(reg.allocatable.sandboxes)
                        .map_err(|_| Error::Range("allocatable sandboxes"))?,
                    &reg.direct.as_ref().map(|d| d.uri.as_str()),
                    &reg.direct.as_ref().map(|d| d.cert_pem.as_str()),
                ],
            )
            .await
            .map_err(q("register the runner"))?
            .get(0);
        tx.execute(
            &format!(
                "UPDATE runners r SET req_cpu_millis = a.cpu, req_memory_bytes = a.mem,
                     sandboxes = a.n
                 FROM (SELECT COALESCE(sum(cpu_millis), 0)::bigint AS cpu,
                              COALESCE(sum(memory_bytes), 0)::bigint AS mem,
                              count(*)::int AS n
                       FROM sandboxes WHERE runner_id = $1 AND state IN {LIVE}) a
                 WHERE r.id = $1"
            ),
            &[&reg.id.as_str()],
        )
        .await
        .map_err(q("recount the runner's requests"))?;
        let live = tx
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes s
                     WHERE s.runner_id = $1 AND s.state IN {LIVE} ORDER BY s.id"
                ),
                &[&reg.id.as_str()],
            )
            .await
            .map_err(q("list the runner's sandboxes"))?
            .iter()
            .map(sandbox_row)
            .collect::<Result<_, _>>()?;
        tx.commit().await.map_err(q("commit register"))?;
        Ok(Adoption { incarnation, live })
    }

    /// Renews the lease of `incarnation` of the runner and records its
    /// capacity. Refused once another incarnation registered (or the lease
    /// was lost and the runner's row is gone).
    pub async fn heartbeat(
        &self,
        id: &RunnerId,
        incarnation: i64,
        allocatable: Capacity,
    ) -> Result<(), Error> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE runners SET heartbeat_at = now(), alloc_cpu_millis = $3,
                     alloc_memory_bytes = $4, alloc_sandboxes = $5
                 WHERE id = $1 AND incarnation = $2",
                &[
                    &id.as_str(),
                    &incarnation,
                    &int(allocatable.cpu_millis, "allocatable cpu")?,
                    &int(allocatable.memory_bytes, "allocatable memory")?,
                    &i32::try_from(allocatable.sandboxes)
                        .map_err(|_| Error::Range("allocatable sandboxes"))?,
                ],
            )
            .await
            .map_err(q("heartbeat"))?;
        if n == 0 {
            return Err(Error::Superseded(id.clone()));
        }
        Ok(())
    }

    /// Every registered runner, live or not, by id.
    pub async fn runners(&self) -> Result<Vec<RunnerStatus>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {RUNNER_COLUMNS} FROM runners ORDER BY id"),
                &[],
            )
            .await
            .map_err(q("list runners"))?;
        rows.iter().map(|r| self.runner_row(r)).collect()
    }

    /// Fails the live sandboxes of every runner whose lease ran out (with
    /// a reason naming the runner) and frees its capacity; returns them.
    /// Any gateway may run it at any time: rows another is expiring are
    /// skipped, not waited for.
    pub async fn expire_leases(&self) -> Result<Vec<SandboxRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH dead AS (
                         SELECT id FROM runners
                         WHERE heartbeat_at < now() - make_interval(secs => $1)
                         FOR UPDATE SKIP LOCKED),
                     failed AS (
                         UPDATE sandboxes s SET state = 'failed', updated_at = now(),
                             reason = format('runner %s stopped answering: no heartbeat \
                                 for %s s, its lease expired', s.runner_id, $1::text)
                         FROM dead WHERE s.runner_id = dead.id AND s.state IN {LIVE}
                         RETURNING {SANDBOX_COLUMNS}),
                     freed AS (
                         UPDATE runners r SET req_cpu_millis = 0, req_memory_bytes = 0,
                             sandboxes = 0
                         FROM dead WHERE r.id = dead.id AND r.sandboxes > 0)
                     SELECT * FROM failed s ORDER BY s.id"
                ),
                &[&self.lease_secs],
            )
            .await
            .map_err(q("expire leases"))?;
        rows.iter().map(sandbox_row).collect()
    }

    // ---------------------------------------------------------- sandboxes

    /// Takes capacity for a create on the best runner that has it and
    /// records the sandbox as placed there. Placing an id again (a retry
    /// whose first reply was lost) answers the first placement: the id's
    /// row is looked up only when this placement cannot be made (its insert
    /// conflicts, or nothing fits), not on every create.
    pub async fn place(&self, req: &PlacementRequest) -> Result<Placement, Error> {
        let mut client = self.client().await?;
        let refused = match self.take(&mut client, req).await {
            Err(e @ Error::NoCapacity(_)) => e,
            Err(e @ Error::Query { .. }) if is_unique_violation(&e) => e,
            other => return other,
        };
        let Some(row) = client
            .query_opt(
                "SELECT s.principal, s.runner_id, r.endpoint FROM sandboxes s
                 JOIN runners r ON r.id = s.runner_id WHERE s.id = $1",
                &[&req.sandbox_id],
            )
            .await
            .map_err(q("look the sandbox up"))?
        else {
            return Err(refused);
        };
        let principal: &str = row.get(0);
        if principal != req.principal {
            return Err(Error::Conflict(req.sandbox_id.clone()));
        }
        Ok(Placement {
            sandbox_id: req.sandbox_id.clone(),
            runner: RunnerId::new(row.get::<_, String>(1))?,
            endpoint: row.get(2),
        })
    }

    /// `place` for an id not placed yet: one transaction, rolled back
    /// unless it commits the placement.
    async fn take(
        &self,
        client: &mut deadpool_postgres::Object,
        req: &PlacementRequest,
    ) -> Result<Placement, Error> {
        let need = req.need();
        let cpu = int(need.cpu_millis, "cpu request")?;
        let mem = int(need.memory_bytes, "memory request")?;
        let tx = client.transaction().await.map_err(q("begin place"))?;
        let selector = labels_json(&req.selector);
        let pins: Vec<&str> = req.pins.iter().map(RunnerId::as_str).collect();
        // Rounds: the candidates of one read may all be taken by other
        // gateways before this one's UPDATE; read again before refusing.
        for _ in 0..ROUNDS {
            let rows = tx
                .query(
                    &format!("SELECT {RUNNER_COLUMNS} FROM runners {CANDIDATES}"),
                    &[&self.lease_secs, &pins, &selector, &cpu, &mem],
                )
                .await
                .map_err(q("list candidate runners"))?;
            if rows.is_empty() {
                return Err(why_none(&tx, self.lease_secs, &pins, &selector).await?);
            }
            let candidates = rows
                .iter()
                .map(|r| self.runner_row(r))
                .collect::<Result<Vec<_>, _>>()?;
            for i in placement::rank(&candidates, req).map_err(Error::NoCapacity)? {
                let runner = &candidates[i];
                // The row lock is taken here and the WHERE checked again on
                // the newest version of the row: two gateways that chose the
                // same runner both fit only if both requests fit together.
                let took = tx
                    .query_opt(
                        "UPDATE runners SET req_cpu_millis = req_cpu_millis + $2,
                             req_memory_bytes = req_memory_bytes + $3,
                             sandboxes = sandboxes + 1
                         WHERE id = $1
                           AND req_cpu_millis + $2 <= alloc_cpu_millis
                           AND req_memory_bytes + $3 <= alloc_memory_bytes
                           AND sandboxes + 1 <= alloc_sandboxes
                           AND heartbeat_at >= now() - make_interval(secs => $4)
                         RETURNING endpoint",
                        &[&runner.id.as_str(), &cpu, &mem, &self.lease_secs],
                    )
                    .await
                    .map_err(q("take capacity"))?;
                let Some(took) = took else { continue };
                tx.execute(
                    "INSERT INTO sandboxes
                         (id, principal, runner_id, cpu_millis, memory_bytes, state)
                     VALUES ($1, $2, $3, $4, $5, 'placed')",
                    &[
                        &req.sandbox_id,
                        &req.principal,
                        &runner.id.as_str(),
                        &cpu,
                        &mem,
                    ],
                )
                .await
                .map_err(q("record the placement"))?;
                tx.commit().await.map_err(q("commit place"))?;
                return Ok(Placement {
                    sandbox_id: req.sandbox_id.clone(),
                    runner: runner.id.clone(),
                    endpoint: took.get(0),
                });
            }
        }
        Err(Error::NoCapacity(NoFit::Full))
    }

    /// A placed sandbox has started on its runner.
    pub async fn mark_running(&self, sandbox_id: &str) -> Result<bool, Error> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE sandboxes SET state = 'running', updated_at = now()
                 WHERE id = $1 AND state = 'placed'",
                &[&sandbox_id],
            )
            .await
            .map_err(q("mark running"))?;
        Ok(n == 1)
    }

    /// Renames a placement to the id its runner gave the sandbox, and marks
    /// it running: a gateway places under a reservation id (the runner picks
    /// sandbox ids, from its warm pool among others) and binds once the
    /// runner answered. False if the reservation is gone (released, or
    /// expired by [`Store::expire_placements`]) or the id is bound already.
    pub async fn bind(&self, reservation: &str, sandbox_id: &str) -> Result<bool, Error> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE sandboxes SET id = $2, state = 'running', updated_at = now()
                 WHERE id = $1 AND state = 'placed'",
                &[&reservation, &sandbox_id],
            )
            .await
            .map_err(q("bind the placement"));
        match n {
            Ok(n) => Ok(n == 1),
            // The runner's id is bound already (a retried create).
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Fails `runner`'s placements still unbound after `max_age` (their
    /// gateway died between placing and binding) and frees their capacity.
    /// True if any expired. Runners call it with their heartbeat.
    pub async fn expire_placements(
        &self,
        runner: &RunnerId,
        max_age: Duration,
    ) -> Result<bool, Error> {
        let client = self.client().await?;
        let secs = max_age.as_secs_f64();
        client
            .execute(
                "WITH s AS (
                     UPDATE sandboxes SET state = 'failed', updated_at = now(),
                         reason = 'its create never reached the runner (the gateway placing it stopped)'
                     WHERE runner_id = $1 AND state = 'placed'
                       AND updated_at < now() - make_interval(secs => $2)
                     RETURNING runner_id, cpu_millis, memory_bytes)
                 UPDATE runners r SET req_cpu_millis = r.req_cpu_millis - t.cpu,
                     req_memory_bytes = r.req_memory_bytes - t.mem,
                     sandboxes = r.sandboxes - t.n
                 FROM (SELECT runner_id, sum(cpu_millis)::bigint AS cpu,
                              sum(memory_bytes)::bigint AS mem, count(*)::int AS n
                       FROM s GROUP BY runner_id) t
                 WHERE r.id = t.runner_id",
                &[&runner.as_str(), &secs],
            )
            .await
            .map(|n| n > 0)
            .map_err(q("expire placements"))
    }

    /// Ends a live sandbox (`Failed` or `Terminated`, with a reason) and
    /// gives its capacity back to its runner, in one statement. False if it
    /// had ended already: releasing twice frees once.
    pub async fn release(
        &self,
        sandbox_id: &str,
        state: SandboxState,
        reason: &str,
    ) -> Result<bool, Error> {
        if state.is_live() {
            return Err(Error::Corrupt(format!("release to {state:?}")));
        }
        let client = self.client().await?;
        let n = client
            .execute(
                &format!(
                    "WITH s AS (
                         UPDATE sandboxes SET state = $2, reason = $3, updated_at = now()
                         WHERE id = $1 AND state IN {LIVE}
                         RETURNING runner_id, cpu_millis, memory_bytes)
                     UPDATE runners r SET req_cpu_millis = r.req_cpu_millis - s.cpu_millis,
                         req_memory_bytes = r.req_memory_bytes - s.memory_bytes,
                         sandboxes = r.sandboxes - 1
                     FROM s WHERE r.id = s.runner_id"
                ),
                &[&sandbox_id, &state.as_sql(), &reason],
            )
            .await
            .map_err(q("release"))?;
        Ok(n == 1)
    }

    /// One sandbox's row, for routing a call to its runner.
    pub async fn sandbox(&self, sandbox_id: &str) -> Result<Option<SandboxRow>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE s.id = $1"),
                &[&sandbox_id],
            )
            .await
            .map_err(q("look the sandbox up"))?;
        row.as_ref().map(sandbox_row).transpose()
    }

    /// The live sandboxes on a runner (placed or running), by id: what it
    /// reconciles against on every heartbeat, however long its history.
    pub async fn live_on(&self, runner: &RunnerId) -> Result<Vec<SandboxRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes s
                     WHERE s.runner_id = $1 AND s.state IN {LIVE} ORDER BY s.id"
                ),
                &[&runner.as_str()],
            )
            .await
            .map_err(q("list a runner's live sandboxes"))?;
        rows.iter().map(sandbox_row).collect()
    }

    /// The sandboxes on a runner (every state), by id.
    pub async fn sandboxes_on(&self, runner: &RunnerId) -> Result<Vec<SandboxRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {SANDBOX_COLUMNS} FROM sandboxes s WHERE s.runner_id = $1
                     ORDER BY s.id"
                ),
                &[&runner.as_str()],
            )
            .await
            .map_err(q("list the runner's sandboxes"))?;
        rows.iter().map(sandbox_row).collect()
    }

    fn runner_row(&self, r: &Row) -> Result<RunnerStatus, Error> {
        let labels = match r.get::<_, serde_json::Value>(2) {
            serde_json::Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => Ok((k, s)),
                    other => Err(Error::Corrupt(format!("label {k}: {other}"))),
                })
                .collect::<Result<Labels, _>>()?,
            other => return Err(Error::Corrupt(format!("labels {other}"))),
        };
        let age: f64 = r.get(10);
        Ok(RunnerStatus {
            id: RunnerId::new(r.get::<_, String>(0))?,
            endpoint: r.get(1),
            labels,
            allocatable: Capacity {
                cpu_millis: uint(r.get(3), "allocatable cpu")?,
                memory_bytes: uint(r.get(4), "allocatable memory")?,
                sandboxes: count(r.get(5))?,
            },
            requested: Capacity {
                cpu_millis: uint(r.get(6), "requested cpu")?,
                memory_bytes: uint(r.get(7), "requested memory")?,
                sandboxes: count(r.get(8))?,
            },
            incarnation: r.get(9),
            heartbeat_age: Duration::from_secs_f64(age.max(0.0)),
            live: age <= self.lease_secs,
            direct: match (
                r.get::<_, Option<String>>(11),
                r.get::<_, Option<String>>(12),
            ) {
                (Some(uri), Some(cert_pem)) => Some(DirectEndpoint { uri, cert_pem }),
                _ => None,
            },
        })
    }
}

/// Why no runner is a candidate: none live (of the pinned), none of those
/// labelled, or all of those full.
async fn why_none(
    tx: &deadpool_postgres::Transaction<'_>,
    lease_secs: f64,
    pins: &[&str],
    selector: &serde_json::Value,
) -> Result<Error, Error> {
    let row = tx
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE labels @> $3) FROM runners
             WHERE heartbeat_at >= now() - make_interval(secs => $1)
               AND (cardinality($2::text[]) = 0 OR id = ANY($2))",
            &[&lease_secs, &pins, selector],
        )
        .await
        .map_err(q("count live runners"))?;
    let (live, labelled): (i64, i64) = (row.get(0), row.get(1));
    Ok(Error::NoCapacity(if live == 0 {
        NoFit::NoLiveRunner
    } else if labelled == 0 {
        NoFit::NoLabelMatch
    } else {
        NoFit::Full
    }))
}

/// The insert of an id that is placed already (by a retry, or by another
/// gateway at the same moment).
fn is_unique_violation(e: &Error) -> bool {
    matches!(e, Error::Query { source, .. }
        if source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

fn count(v: i32) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Corrupt(format!("count {v}")))
}

fn sandbox_row(r: &Row) -> Result<SandboxRow, Error> {
    Ok(SandboxRow {
        id: r.get(0),
        principal: r.get(1),
        runner: RunnerId::new(r.get::<_, String>(2))?,
        cpu_millis: uint(r.get(3), "cpu request")?,
        memory_bytes: uint(r.get(4), "memory request")?,
        state: SandboxState::from_sql(r.get(5))?,
        reason: r.get(6),
    })
}
