-- The engine's own state, written by each snapshot beside the report tables,
-- so that a node with an empty data directory recovers exactly: open holds,
-- the ids seen within the idempotency window and the previous cycle's totals
-- are not in the report tables. Each row is the engine's encoding (format
-- version byte, CRC32, postcard) of one school (without its audit trail, which
-- is ai_allocation_history) or one teacher account, as of quotad_snapshot.wal_seq.
CREATE TABLE quotad_school_state (
    school_id text   PRIMARY KEY,
    wal_seq   bigint NOT NULL CHECK (wal_seq >= 0),
    state     bytea  NOT NULL
);

CREATE TABLE quotad_account_state (
    school_id  text   NOT NULL,
    teacher_id text   NOT NULL,
    wal_seq    bigint NOT NULL CHECK (wal_seq >= 0),
    state      bytea  NOT NULL,
    PRIMARY KEY (school_id, teacher_id)
);

-- An event id is unique only within the idempotency window (8 days by
-- default): a client may use the same id again after it, and that is a new
-- event. The snapshotter keys rows by WAL position, so the index on event ids
-- serves lookups, not uniqueness.
DROP INDEX ai_usage_logs_event;
CREATE INDEX ai_usage_logs_event ON ai_usage_logs (school_id, teacher_id, event_id) WHERE event_id IS NOT NULL;
