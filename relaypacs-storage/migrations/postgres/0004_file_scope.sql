-- File-scoped reads and writes (SessionStore::load_file_scope,
-- update_file_scope, files_with_instance) at a cost that does not grow with
-- the session: the session's file totals kept on its row, each file's
-- declared size and (once valid) SOP Instance UID in columns.
ALTER TABLE sessions ADD COLUMN file_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN declared_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE session_files ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE session_files ADD COLUMN sop_instance_uid TEXT;
UPDATE session_files SET
    size = (body::jsonb ->> 'size')::bigint,
    sop_instance_uid = body::jsonb -> 'state' -> 'dicom' ->> 'sop_instance_uid';
UPDATE sessions SET
    file_count = (SELECT COUNT(*) FROM session_files f WHERE f.session_id = sessions.id),
    declared_bytes = (SELECT COALESCE(SUM(f.size), 0) FROM session_files f WHERE f.session_id = sessions.id);
CREATE INDEX session_files_instance ON session_files (session_id, sop_instance_uid);
