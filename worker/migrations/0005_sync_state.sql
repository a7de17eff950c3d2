-- Where each shop's sync stands (upgates-admin sync; shopapi/sync.py). Times as everywhere.
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

-- The customers an unfinished full scan has read so far: at its end, a shop's row not among
-- them is a candidate for a tombstone (each absence is confirmed with the API first).
CREATE TABLE sync_seen (
    project_name  text COLLATE "C" NOT NULL,
    customer_id   bigint NOT NULL,
    PRIMARY KEY (project_name, customer_id)
);
