-- The audit trail (SqlAuditSink): one hash chain shared by every gateway on
-- this database. PostgreSQL dialect; migrations/sqlite holds the same schema.
--
-- Each row is one record of the chain, in the format of the JSON-lines
-- trail: `hash` = SHA-256(previous hash || seq as 8 little-endian bytes ||
-- event), hex; `prev` is the previous row's `hash` (64 zeros for seq 0).
CREATE TABLE audit_events (
    seq    BIGINT PRIMARY KEY CHECK (seq >= 0),
    prev   TEXT NOT NULL,
    hash   TEXT NOT NULL,
    -- The AuditEvent as JSON, exactly the text that was hashed.
    event  TEXT NOT NULL
);

-- The chain head, one row: appends take its row lock (UPDATE ... RETURNING)
-- first, inside their transaction, so two gateways never hand out the same
-- seq or link to the same previous hash. Also a weak anchor: a verifier
-- reports a chain shorter than `records` as cut.
CREATE TABLE audit_head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    records    BIGINT NOT NULL,
    last_hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, records, last_hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Append-only: UPDATE, DELETE and TRUNCATE of audit_events are refused for
-- everyone, the owner running these migrations included (a trigger binds
-- the owner too; only dropping it, which takes the owner, lifts it).
CREATE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Deployment: run the gateways as a dedicated role that does not own the
-- tables, so it cannot drop the trigger either. As the owner, once these
-- migrations ran:
--   CREATE ROLE relaypacs LOGIN;
--   GRANT SELECT, INSERT ON audit_events TO relaypacs;
--   REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM relaypacs;
--   GRANT SELECT, UPDATE ON audit_head TO relaypacs;
-- plus its rights on the other state tables, and, while every start runs
-- the migrator, SELECT on _sqlx_migrations and CREATE on the schema (its
-- CREATE TABLE IF NOT EXISTS checks that right even when the table
-- exists). The head row is the only audit row the role may change:
-- rewriting it can hide a cut tail from the verifier, never a changed,
-- removed or reordered record.
