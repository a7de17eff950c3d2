-- Customers as the time-ordered fold of their webhook events (see worker/fold.py).
CREATE TABLE customers (
    project_name  text        NOT NULL,
    customer_id   bigint      NOT NULL,
    email         text,
    code          text,
    active_yn     boolean,
    blocked_yn    boolean,
    created_at    timestamptz,            -- newest creation_time seen
    updated_at    timestamptz,            -- newest last_update_time seen
    deleted_at    timestamptz,            -- set while the newest event is a delete (tombstone)
    -- What orders events; the upsert compares these, not arrival order.
    version_at    timestamptz NOT NULL,   -- time of the event whose data the row shows
    version_rank  smallint    NOT NULL,   -- 0 create, 1 update, 2 delete: ties go to the higher
    version_fp    bytea       NOT NULL,   -- the event's values (fold.fingerprint): same-second tiebreak
    status_at     timestamptz,            -- the same three for the event active_yn/blocked_yn
    status_rank   smallint,               -- came from (the newest event carrying them)
    status_fp     bytea,
    ingested_at   timestamptz NOT NULL DEFAULT now(),  -- when the row last changed here
    PRIMARY KEY (project_name, customer_id)
);

-- Records that could not be applied, with the reason; they hold personal data, so they are
-- purged after a retention period.
CREATE TABLE rejected_records (
    id            bigserial   PRIMARY KEY,
    project_name  text        NOT NULL,
    event         text        NOT NULL,
    reason        text        NOT NULL,
    record        text        NOT NULL,   -- the record as sent (JSON text)
    received_at   timestamptz NOT NULL,   -- when the receiver accepted the webhook
    rejected_at   timestamptz NOT NULL DEFAULT now(),
    request_id    text        NOT NULL,
    position      integer     NOT NULL,   -- index of the record in its webhook
    UNIQUE (request_id, position)         -- a redelivered message adds nothing twice
);
CREATE INDEX rejected_records_received_at ON rejected_records (received_at);
