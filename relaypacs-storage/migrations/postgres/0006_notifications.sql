-- Per-user notifications (SqlNotificationStore). PostgreSQL dialect;
-- migrations/sqlite holds the same schema.
--
-- One row per notification; `seq` orders a user's list (newest last) and
-- the cap (at most 1,000 per user: the oldest beyond it are deleted).
-- `body` is the notification as JSON without its read flag, which is the
-- `read` column (0 or 1).
CREATE TABLE notifications (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    owner       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    study       TEXT NOT NULL,
    subject     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    read        BIGINT NOT NULL DEFAULT 0,
    body        TEXT NOT NULL
);
CREATE INDEX notifications_owner ON notifications (owner, seq);

-- What was ever notified: one row per (study, kind, subject), never pruned
-- with the capped list, so a notification is created once per study
-- (`delivered`, `forward_failed`; `subject` = '') or per report
-- (`report_ready`; `subject` = its SOP Instance UID), whichever gateway or
-- repair pass tries, and a pruned one is not created again.
CREATE TABLE notification_keys (
    study       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    PRIMARY KEY (study, kind, subject)
);

-- Studies delivered or dead-lettered before this table existed were
-- notified by the earlier file store: the repair pass must not notify them
-- again.
INSERT INTO notification_keys (study, kind, subject)
SELECT id, 'delivered', '' FROM sessions WHERE state = 'delivered';
INSERT INTO notification_keys (study, kind, subject)
SELECT id, 'forward_failed', '' FROM sessions WHERE state = 'dead_letter';
