-- The periodic notification repair pass (Hub::repair_recent) looks only at
-- the sessions delivered or dead-lettered lately: it reads them by state
-- and by the time of their last write, so the pass costs what happened in
-- its window, not every study ever delivered. The index on state alone is
-- the prefix of this one and is dropped.
-- SQLite dialect; the other engine's folder holds the same schema.
CREATE INDEX sessions_state_updated ON sessions (state, updated_at);
DROP INDEX sessions_state;
