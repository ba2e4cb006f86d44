-- What lets a replica keep the memberships, timers and roll-up counts it wrote and know
-- when they are no longer the truth. A transaction that changes a subject's row,
-- memberships, timers or counts raises the subject's revision, under its row lock. The bulk
-- path of forced changes (a backfill's joins, a deleted segment's leaves) writes
-- memberships of many subjects without loading them: rather than a row update per subject,
-- it raises its dataset's bulk generation, with the log head it holds to the commit
-- anyway. A kept copy is used only while both are what they were when it was written.
ALTER TABLE subjects ADD COLUMN revision bigint NOT NULL DEFAULT 0;
ALTER TABLE log_heads ADD COLUMN bulk_generation bigint NOT NULL DEFAULT 0;
