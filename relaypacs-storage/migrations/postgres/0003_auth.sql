-- Accounts (UserStore, with TOTP state) and refresh-token families
-- (relaypacs-http's Tokens). PostgreSQL dialect; migrations/sqlite holds
-- the same schema. Booleans are BIGINT 0/1 and times of families are Unix
-- seconds, so one SQL text serves both engines.
CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    username            TEXT NOT NULL,
    -- The username lowercased by the gateway (Unicode, unlike SQLite's
    -- lower()): the unique index makes a taken name fail atomically.
    name_key            TEXT NOT NULL,
    role                TEXT NOT NULL,
    password_hash       TEXT NOT NULL,
    -- Encrypted TOTP secrets (confirmed, awaiting confirmation).
    totp                TEXT,
    totp_pending        TEXT,
    -- Last accepted TOTP time step; only ever raised (a code is usable once).
    totp_last_step      BIGINT NOT NULL DEFAULT 0,
    disabled            BIGINT NOT NULL DEFAULT 0,
    tokens_valid_after  TEXT NOT NULL,
    created_at          TEXT NOT NULL
);
CREATE UNIQUE INDEX users_name_key ON users (name_key);

-- One row per login; rotation is a conditional UPDATE of current_hash.
CREATE TABLE refresh_families (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    -- SHA-256 (hex) of the family's current refresh token.
    current_hash  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used     BIGINT NOT NULL,
    revoked       BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX refresh_families_current ON refresh_families (current_hash);
CREATE INDEX refresh_families_user ON refresh_families (user_id);
CREATE INDEX refresh_families_created ON refresh_families (created_at);

-- Rotated-out tokens: one coming back revokes its family.
CREATE TABLE refresh_rotated (
    token_hash  TEXT PRIMARY KEY,
    family_id   TEXT NOT NULL
);
CREATE INDEX refresh_rotated_family ON refresh_rotated (family_id);
