-- A merge keeps the sequence of its source's MERGED change. The change is published after
-- the commit; when that publish is lost (Redis gone, the process killed), the batch is
-- redelivered, but the source's row is gone and its identities already point at the
-- target, so the unit merges nothing: it finds the merges its events caused by their
-- reason and publishes them again with the sequence kept here (ADR 9).
ALTER TABLE "profile".merges ADD COLUMN sequence bigint;
CREATE INDEX merges_reason ON "profile".merges (dataset, reason);
