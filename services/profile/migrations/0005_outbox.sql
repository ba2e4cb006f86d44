-- Changes committed outside the bus consumer's path (explicit merges, erasures, backfill
-- pages) and not yet known to be published. The transaction that makes the change records
-- its rows; once it has committed and published, it deletes them. Rows left behind (the
-- publish failed, the process died in between) are published again by the relay after a
-- grace period (services/profile/outbox.py, ADR 9): such a call has no redelivery to
-- heal it, and a retried call finds its source gone.
CREATE TABLE "profile".outbox (
    outbox_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset     text COLLATE "C" NOT NULL,
    kind        text COLLATE "C" NOT NULL CHECK (kind IN ('user', 'account')),
    subject_id  text COLLATE "C" NOT NULL,
    -- The sequence of the change. A MERGED or ERASED change is published with it again; an
    -- UPDATED one with the subject's current state and sequence.
    sequence    bigint NOT NULL,
    change_type text COLLATE "C" NOT NULL CHECK (change_type IN ('updated', 'merged', 'erased')),
    -- For a MERGED change: the profile the subject went into.
    merged_into text COLLATE "C",
    -- clock_timestamp(), not now(): a merge can wait long on row locks before it records,
    -- and the grace period is counted from about its commit.
    record_time timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When a relay last took the row: another relay leaves it for a grace period.
    claim_time  timestamptz
);
CREATE INDEX outbox_due ON "profile".outbox ((coalesce(claim_time, record_time)));
