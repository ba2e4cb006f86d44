-- A unit of work rewrites each changed profile's whole `aggregates` document (ADR 0010),
-- a few kilobytes that PostgreSQL compresses on every write: with pglz, the default, that
-- compression was most of a row update's cost (5-7 kB documents: ~175 µs a row with pglz,
-- ~100 µs with lz4, measured with bench.profile's traffic). lz4 also reads back faster for
-- QueryProfiles. Rows keep the method they were written with until their next write.
-- A server built without lz4 (`default_toast_compression` does not offer it) keeps pglz.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_settings
        WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)
    ) THEN
        ALTER TABLE "profile".profiles ALTER COLUMN aggregates SET COMPRESSION lz4;
    END IF;
END
$$;
