-- The schema, applied once by the first worker (or sync) to start; later changes get files of
-- their own (0002_..., applied in order, each once: worker/store.py migrate).

-- Customers as the time-ordered fold of their events (see worker/fold.py).
CREATE TABLE customers (
    -- Shop names are identifiers, not prose: compared byte by byte (memcmp, not the locale's
    -- strcoll) in every primary-key lookup of an upsert. The fold sorts keys the same way.
    project_name  text COLLATE "C" NOT NULL,
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
)
-- Room in each page for a new version of every row on it, so that an update stays on its page
-- and adds no index entry (a HOT update: the key never changes).
WITH (fillfactor = 50);

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

-- Where each shop's sync with its REST API stands (upgates-admin sync; shopapi/sync.py).
CREATE TABLE sync_state (
    project_name      text COLLATE "C" PRIMARY KEY,
    watermark         timestamptz,   -- an incremental read starts here, less SYNC_OVERLAP
    last_full_scan_at timestamptz,   -- when the last complete full scan began
    last_success_at   timestamptz,   -- when the last sync of any kind completed
    -- An unfinished scan, so that the next run resumes it instead of starting over.
    scan_kind         text CHECK (scan_kind IN ('full', 'incremental')),
    scan_started_at   timestamptz,
    scan_from         timestamptz,   -- an incremental scan's last_update_time_from
    scan_next_page    integer        -- every page before this one is stored
);

-- The customers an unfinished full scan has read so far: at its end, a shop's live row not
-- among them is a candidate tombstone (each absence is confirmed with the API first).
CREATE TABLE sync_seen (
    project_name  text COLLATE "C" NOT NULL,
    customer_id   bigint NOT NULL,
    PRIMARY KEY (project_name, customer_id)
);
