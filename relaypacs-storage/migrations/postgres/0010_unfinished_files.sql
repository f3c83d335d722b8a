-- The files still uploading (no SOP Instance UID yet) of a session, found
-- without reading its finished ones: the per-user cap of unfinished
-- uploads counts them at every file added (SqlSessionStore's
-- update_file_scope_capped), and 0009 dropped the plain index on
-- (session_id, sop_instance_uid) that served that count. Without this
-- index the count reads every file of the user's open studies, so adding
-- a file to a 10,000-file study slowed as the study grew.
-- PostgreSQL dialect; the other engine's folder holds the same schema.
CREATE INDEX session_files_unfinished
    ON session_files (session_id)
    WHERE sop_instance_uid IS NULL;
