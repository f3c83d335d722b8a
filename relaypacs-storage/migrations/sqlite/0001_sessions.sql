-- Sessions, their files, chunk records and the index of accepted instances
-- (SessionStore). SQLite dialect; migrations/postgres holds the same schema.
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    version     BIGINT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    -- The SessionRecord without its files, as JSON.
    head        TEXT NOT NULL
);
CREATE INDEX sessions_owner ON sessions (owner);
CREATE INDEX sessions_state ON sessions (state);

CREATE TABLE session_files (
    session_id  TEXT NOT NULL,
    file_id     TEXT NOT NULL,
    -- The FileRecord as JSON.
    body        TEXT NOT NULL,
    PRIMARY KEY (session_id, file_id)
);

CREATE TABLE chunks (
    session_id    TEXT NOT NULL,
    file_id       TEXT NOT NULL,
    chunk_offset  BIGINT NOT NULL,
    length        BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    receipt       TEXT NOT NULL,
    PRIMARY KEY (session_id, file_id, chunk_offset)
);

CREATE TABLE instance_claims (
    sop_instance_uid    TEXT PRIMARY KEY,
    data_set_sha256     TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    file_id             TEXT NOT NULL,
    claimed_at          TEXT NOT NULL
);
CREATE INDEX instance_claims_session ON instance_claims (session_id);
