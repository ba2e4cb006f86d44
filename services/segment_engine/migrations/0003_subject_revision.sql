-- Raised by every transaction that changes a subject's row, memberships, timers or roll-up
-- counts, under the subject's row lock: a replica that cached what it last wrote uses it
-- only while the revision it locks is the one it wrote.
ALTER TABLE subjects ADD COLUMN revision bigint NOT NULL DEFAULT 0;
