-- One file per SOP Instance UID in a session, refused by the database
-- itself (issue 12, review): a write that would give a second file of a
-- session the SOP Instance UID of a valid one fails with a unique
-- violation inside its own transaction, which SqlSessionStore answers as
-- Conflict RELAY_DUPLICATE_INSTANCE. Only valid files carry the column
-- (uploading ones hold NULL), hence a partial index.
-- SQLite dialect; migrations/postgres holds the same schema.
-- Until now the pipeline checked this before its compare-and-set, so a
-- database holds no such pair and the index builds; were one there, the
-- migration fails and the gateway does not start (nothing is removed).
CREATE UNIQUE INDEX session_files_one_instance
    ON session_files (session_id, sop_instance_uid)
    WHERE sop_instance_uid IS NOT NULL;
-- The unique index serves every lookup the plain one did.
DROP INDEX session_files_instance;
