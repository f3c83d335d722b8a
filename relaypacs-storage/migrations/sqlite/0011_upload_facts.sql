-- Upload analytics (issue 13): one row per upload outcome (a study
-- delivered, dead-lettered, aborted or expired; a file refused), written
-- where the outcome happens and kept when the session is deleted
-- (SessionStore::record_upload_fact). Counted with GROUP BY over the
-- indexed time column (SqlSessionStore's count_upload_facts).
-- SQLite dialect; the other engine's folder holds the same schema.
CREATE TABLE upload_facts (
    session_id  TEXT NOT NULL,
    -- '' for a study outcome.
    file_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    occurrence  BIGINT NOT NULL,
    -- The reason class ('' when none).
    cause       TEXT NOT NULL,
    owner       TEXT NOT NULL,
    -- '' when unknown.
    modality    TEXT NOT NULL,
    -- The UTC day of at_ms, YYYY-MM-DD (the by-day key).
    day         TEXT NOT NULL,
    -- Milliseconds since the Unix epoch.
    at_ms       BIGINT NOT NULL,
    files       BIGINT NOT NULL,
    bytes       BIGINT NOT NULL,
    -- When the upload started (ms), NULL when unknown.
    started_ms  BIGINT,
    PRIMARY KEY (session_id, file_id, kind, occurrence)
);
CREATE INDEX upload_facts_at ON upload_facts (at_ms);
CREATE INDEX upload_facts_owner_at ON upload_facts (owner, at_ms);
