-- Principals: the API keys every gateway and runner of a cluster accepts
-- (docs/scale-out.md, "Principals").
--
-- Only the key's SHA-256 is stored, never the key: a copy of the database
-- authenticates no one. Processes look keys up by digest, as they do the
-- keys of their own config. A revoked principal's row stays (listings show
-- it) and its key is refused from the next sync on.

CREATE TABLE principals (
    key_sha256   BYTEA PRIMARY KEY CHECK (octet_length(key_sha256) = 32),
    name         TEXT NOT NULL UNIQUE,
    organization TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at   TIMESTAMPTZ
);
