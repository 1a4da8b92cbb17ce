-- quotad's long-term store. Table names are the original system's, so that
-- existing reports keep working. Units are bigint (quotad caps them far below
-- 2^63); times are timestamptz in UTC.

CREATE TABLE school_ai_subscriptions (
    school_id               text        NOT NULL,
    service_type            text        NOT NULL,
    school_name             text        NOT NULL,
    tier                    text        NOT NULL CHECK (tier IN ('preschool', 'k12', 'individual')),
    billing_anchor_day      smallint    NOT NULL CHECK (billing_anchor_day BETWEEN 1 AND 28),
    next_billing_anchor_day smallint             CHECK (next_billing_anchor_day BETWEEN 1 AND 28),
    borrowing_enabled       boolean     NOT NULL,
    self_service_requests   boolean     NOT NULL,
    cycle_start             timestamptz NOT NULL,
    cycle_end               timestamptz NOT NULL,
    cycle_units             bigint      NOT NULL CHECK (cycle_units >= 0),
    allocated_units         bigint      NOT NULL CHECK (allocated_units >= 0),
    borrowed_units          bigint      NOT NULL CHECK (borrowed_units >= 0),
    used_units              bigint      NOT NULL CHECK (used_units >= 0),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (school_id, service_type),
    CHECK (allocated_units + borrowed_units <= cycle_units)
);
CREATE INDEX school_ai_subscriptions_tier ON school_ai_subscriptions (tier, school_id);

CREATE TABLE teacher_ai_allocations (
    school_id       text        NOT NULL,
    teacher_id      text        NOT NULL,
    service_type    text        NOT NULL,
    allocated_units bigint      NOT NULL CHECK (allocated_units >= 0),
    used_units      bigint      NOT NULL CHECK (used_units >= 0),
    reserved_units  bigint      NOT NULL CHECK (reserved_units >= 0),
    borrowed_units  bigint      NOT NULL CHECK (borrowed_units >= 0),
    overage_units   bigint      NOT NULL CHECK (overage_units >= 0),
    priority        text        NOT NULL CHECK (priority IN ('low', 'normal', 'high')),
    auto_renew      boolean     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('active', 'suspended')),
    cycle_start     timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (school_id, teacher_id, service_type)
);
CREATE INDEX teacher_ai_allocations_service ON teacher_ai_allocations (school_id, service_type);

CREATE TABLE ai_allocation_requests (
    school_id       text        NOT NULL,
    request_id      bigint      NOT NULL,
    teacher_id      text        NOT NULL,
    service_type    text        NOT NULL,
    requested_units bigint      NOT NULL CHECK (requested_units > 0),
    reason          text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    approved_units  bigint      NOT NULL DEFAULT 0 CHECK (approved_units >= 0),
    decision_reason text,
    decided_by      text,
    created_at      timestamptz NOT NULL,
    decided_at      timestamptz,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (school_id, request_id)
);
CREATE INDEX ai_allocation_requests_status ON ai_allocation_requests (school_id, status, created_at);
CREATE INDEX ai_allocation_requests_teacher ON ai_allocation_requests (school_id, teacher_id, created_at);

-- The hash-chained audit trail. Append-only: the trigger below refuses every
-- UPDATE and DELETE, so the table can only grow, like the chain.
CREATE TABLE ai_allocation_history (
    school_id    text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq > 0),
    at           timestamptz NOT NULL,
    actor        text        NOT NULL,
    action       text        NOT NULL,
    teacher_id   text,
    service_type text,
    reason       text        NOT NULL,
    before       jsonb       NOT NULL,
    after        jsonb       NOT NULL,
    prev_hash    bytea       NOT NULL CHECK (length(prev_hash) = 32),
    hash         bytea       NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (school_id, seq)
);
CREATE INDEX ai_allocation_history_teacher ON ai_allocation_history (school_id, teacher_id, at);
CREATE INDEX ai_allocation_history_service ON ai_allocation_history (school_id, service_type, at);

CREATE FUNCTION ai_allocation_history_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ai_allocation_history is append-only: % refused', TG_OP;
END;
$$;
CREATE TRIGGER ai_allocation_history_append_only
    BEFORE UPDATE OR DELETE ON ai_allocation_history
    FOR EACH ROW EXECUTE FUNCTION ai_allocation_history_append_only();
CREATE TRIGGER ai_allocation_history_no_truncate
    BEFORE TRUNCATE ON ai_allocation_history
    FOR EACH STATEMENT EXECUTE FUNCTION ai_allocation_history_append_only();

-- One row per usage decision: charged events and commits, and denials.
CREATE TABLE ai_usage_logs (
    wal_seq        bigint      PRIMARY KEY,
    event_id       text,
    reservation_id text,
    school_id      text        NOT NULL,
    teacher_id     text        NOT NULL,
    service_type   text        NOT NULL,
    units          bigint      NOT NULL CHECK (units >= 0),
    borrowed_units bigint      NOT NULL DEFAULT 0 CHECK (borrowed_units >= 0),
    overage_units  bigint      NOT NULL DEFAULT 0 CHECK (overage_units >= 0),
    model          text        NOT NULL DEFAULT '',
    decision       text        NOT NULL CHECK (decision IN ('allowed', 'committed', 'exhausted', 'suspended', 'no_allocation')),
    cycle_start    timestamptz NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL,
    CHECK (event_id IS NOT NULL OR reservation_id IS NOT NULL)
);
CREATE INDEX ai_usage_logs_teacher ON ai_usage_logs (school_id, teacher_id, occurred_at);
CREATE INDEX ai_usage_logs_service ON ai_usage_logs (school_id, service_type, occurred_at);
CREATE UNIQUE INDEX ai_usage_logs_event ON ai_usage_logs (school_id, teacher_id, event_id) WHERE event_id IS NOT NULL;

-- The WAL position the last snapshot in these tables covers.
CREATE TABLE quotad_snapshot (
    id       smallint    PRIMARY KEY CHECK (id = 1),
    wal_seq  bigint      NOT NULL CHECK (wal_seq >= 0),
    taken_at timestamptz NOT NULL
);

-- Rollups of charged usage (denials count nothing), per UTC day and month.
CREATE VIEW ai_usage_daily AS
SELECT (date_trunc('day', occurred_at AT TIME ZONE 'UTC'))::date AS day,
       school_id, teacher_id, service_type,
       sum(units)::bigint          AS units,
       sum(borrowed_units)::bigint AS borrowed_units,
       sum(overage_units)::bigint  AS overage_units,
       count(*)                    AS events
  FROM ai_usage_logs
 WHERE decision IN ('allowed', 'committed')
 GROUP BY 1, 2, 3, 4;

CREATE VIEW ai_usage_monthly AS
SELECT (date_trunc('month', occurred_at AT TIME ZONE 'UTC'))::date AS month,
       school_id, teacher_id, service_type,
       sum(units)::bigint          AS units,
       sum(borrowed_units)::bigint AS borrowed_units,
       sum(overage_units)::bigint  AS overage_units,
       count(*)                    AS events
  FROM ai_usage_logs
 WHERE decision IN ('allowed', 'committed')
 GROUP BY 1, 2, 3, 4;
