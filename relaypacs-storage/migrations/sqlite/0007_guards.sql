-- Guards shared by every gateway on the database (issue 12, part 4): the
-- login limiter (relaypacs-http's LoginLimiter) and single-use event-stream
-- tickets (Tokens::ticket). SQLite dialect; migrations/postgres holds the same schema.
-- Times are Unix milliseconds. Rows past their window are deleted by the
-- limiter's sweep and at each ticket issue; the sweep is safe on every
-- gateway at once (plain DELETEs by time).

-- One row per client address seen in the last minute: upserting it first
-- takes its row lock (PostgreSQL) or the write lock (SQLite), so the count
-- of the address's attempts and the insert of a new one are one step.
CREATE TABLE login_addresses (
    address  TEXT PRIMARY KEY,
    last_at  BIGINT NOT NULL
);
CREATE INDEX login_addresses_last ON login_addresses (last_at);

-- The per-address sliding window: one row per attempt.
CREATE TABLE login_attempts (
    address  TEXT NOT NULL,
    at       BIGINT NOT NULL
);
CREATE INDEX login_attempts_address ON login_attempts (address, at);
CREATE INDEX login_attempts_at ON login_attempts (at);

-- Per account (the lowercased login name): consecutive failures, counted
-- by an atomic upsert, and the lockout they set.
CREATE TABLE login_accounts (
    account       TEXT PRIMARY KEY,
    consecutive   BIGINT NOT NULL,
    locked_until  BIGINT NOT NULL DEFAULT 0,
    last_failure  BIGINT NOT NULL
);
CREATE INDEX login_accounts_last ON login_accounts (last_failure);

-- The per-account hourly failure budget: one row per failure.
CREATE TABLE login_failures (
    account  TEXT NOT NULL,
    at       BIGINT NOT NULL
);
CREATE INDEX login_failures_account ON login_failures (account, at);
CREATE INDEX login_failures_at ON login_failures (at);

-- Event-stream tickets: the SHA-256 (hex) of the ticket, never the ticket;
-- the access token it stands for without its signature (not a credential:
-- the redeeming gateway signs it again with the shared key). Redeemed by
-- DELETE ... RETURNING, so a ticket is used once whichever gateway sees it.
CREATE TABLE event_tickets (
    digest      TEXT PRIMARY KEY,
    unsigned    TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX event_tickets_expires ON event_tickets (expires_at);
