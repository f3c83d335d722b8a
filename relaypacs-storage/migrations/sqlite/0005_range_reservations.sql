-- Byte-range reservations of uploads in progress (SessionStore::
-- reserve_range): leases that keep two gateways from writing one range of
-- one file at once. `instance` is the holder's process, whose PostgreSQL
-- advisory lock tells whether it still lives. Times are Unix milliseconds.
-- (SQLite, one gateway per file, keeps its reservations in its process.)
CREATE TABLE range_reservations (
    session_id   TEXT NOT NULL,
    file_id      TEXT NOT NULL,
    range_start  BIGINT NOT NULL,
    range_end    BIGINT NOT NULL,
    holder       TEXT NOT NULL,
    instance     BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    PRIMARY KEY (session_id, file_id, range_start, holder)
);
