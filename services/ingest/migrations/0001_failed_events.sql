-- Events that passed ingest but could not be applied later, kept for operators to list
-- and replay. One row per event: a later failure of the same event (after a replay)
-- updates it.
CREATE TABLE failed_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset text NOT NULL,
    event_id text NOT NULL,
    -- The audience.v1.Event as ingest accepted it.
    event bytea NOT NULL,
    -- The service that failed to apply it, such as 'profile'.
    stage text NOT NULL,
    reason text NOT NULL,
    message text NOT NULL,
    -- When it failed first, and last.
    fail_time timestamptz NOT NULL,
    last_fail_time timestamptz NOT NULL,
    -- The IngestedEvent.replay_count of the delivery that failed last: a redelivered
    -- failure report carries the same count and changes nothing.
    attempt integer NOT NULL,
    -- How many times it has been replayed; it awaits a replay while this is not above
    -- `attempt`.
    replay_count integer NOT NULL,
    replay_time timestamptz,
    UNIQUE (dataset, event_id)
);

-- Listing, newest first, with or without a reason.
CREATE INDEX failed_events_by_dataset ON failed_events (dataset, id DESC);
CREATE INDEX failed_events_by_reason ON failed_events (dataset, reason, id DESC);
