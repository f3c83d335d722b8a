-- The audit trail (SqlAuditSink): one hash chain in this database. SQLite
-- dialect; migrations/postgres holds the same schema.
--
-- Each row is one record of the chain, in the format of the JSON-lines
-- trail: `hash` = SHA-256(previous hash || seq as 8 little-endian bytes ||
-- event), hex; `prev` is the previous row's `hash` (64 zeros for seq 0).
CREATE TABLE audit_events (
    seq    INTEGER PRIMARY KEY CHECK (seq >= 0),
    prev   TEXT NOT NULL,
    hash   TEXT NOT NULL,
    -- The AuditEvent as JSON, exactly the text that was hashed.
    event  TEXT NOT NULL
);

-- The chain head, one row: an append's first statement updates it, which
-- takes the database's write lock for the whole transaction. Also a weak
-- anchor: a verifier reports a chain shorter than `records` as cut.
CREATE TABLE audit_head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    records    BIGINT NOT NULL,
    last_hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, records, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Append-only: UPDATE and DELETE of audit_events are refused (SQLite has no
-- TRUNCATE; `DELETE FROM` without WHERE fires the trigger too).
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused');
END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused');
END;
