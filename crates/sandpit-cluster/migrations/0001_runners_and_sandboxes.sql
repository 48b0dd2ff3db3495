-- The runner registry and the sandboxes placed on runners (docs/scale-out.md).
--
-- Times are the database's own (now()), never a runner's or a gateway's:
-- hosts' clocks disagree, and a lease measured on two clocks is no lease.

CREATE TABLE runners (
    id                 TEXT PRIMARY KEY,
    -- Where gateways reach the runner's gRPC service (host:port).
    endpoint           TEXT NOT NULL,
    -- Placement selectors match these (`labels @> selector`).
    labels             JSONB NOT NULL DEFAULT '{}'::jsonb,
    alloc_cpu_millis   BIGINT NOT NULL CHECK (alloc_cpu_millis >= 0),
    alloc_memory_bytes BIGINT NOT NULL CHECK (alloc_memory_bytes >= 0),
    alloc_sandboxes    INTEGER NOT NULL CHECK (alloc_sandboxes >= 0),
    -- The sum of the requests of its live sandboxes, kept by placement and
    -- release in the same transactions as the sandboxes' rows.
    req_cpu_millis     BIGINT NOT NULL DEFAULT 0 CHECK (req_cpu_millis >= 0),
    req_memory_bytes   BIGINT NOT NULL DEFAULT 0 CHECK (req_memory_bytes >= 0),
    sandboxes          INTEGER NOT NULL DEFAULT 0 CHECK (sandboxes >= 0),
    -- Bumped by every registration: a runner that comes back is a new
    -- incarnation, and what the old one held is re-adopted or failed.
    incarnation        BIGINT NOT NULL DEFAULT 1,
    registered_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sandboxes (
    id           TEXT PRIMARY KEY,
    principal    TEXT NOT NULL,
    runner_id    TEXT NOT NULL REFERENCES runners (id),
    cpu_millis   BIGINT NOT NULL CHECK (cpu_millis >= 0),
    memory_bytes BIGINT NOT NULL CHECK (memory_bytes >= 0),
    -- placed: capacity taken, the runner is creating it; running; and the
    -- two ends: failed (with a reason), terminated.
    state        TEXT NOT NULL CHECK (state IN ('placed', 'running', 'failed', 'terminated')),
    reason       TEXT NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A runner's live sandboxes: lease expiry, re-registration, accounting.
CREATE INDEX sandboxes_live_by_runner ON sandboxes (runner_id) WHERE state IN ('placed', 'running');
CREATE INDEX sandboxes_by_principal ON sandboxes (principal, created_at);
