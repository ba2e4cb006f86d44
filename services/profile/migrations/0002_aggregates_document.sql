-- Aggregates move from one row per bucket (`aggregate_buckets`) into one JSON document per
-- subject, the `aggregates` column of `profiles` that the evaluation schema now defines
-- (libs/audience/rules/evaluation_schema.sql; ADR 0010): a unit of work then writes one row
-- per profile it changes, not one per bucket. 0001 opened with the evaluation schema as it
-- was then; with this file applied the schema holds the current one, which
-- tests/integration/test_profile_schema.py checks column by column.

-- `aggregates_expire`: no bucket of the profile expires before this instant (NULL: none
-- ever does); the sweep reads only the profiles it has passed.
ALTER TABLE "profile".profiles
    ADD COLUMN aggregates        jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN aggregates_expire timestamptz;

-- Each bucket as `audience.rules.aggregates_json` writes it: [start, count, sum, min, max,
-- first_time, last_time(, distinct values)], instants in integer microseconds. to_jsonb
-- writes a float8 as its shortest exact text (a non-finite one as a string), so every
-- number reads back as it was. The expiry is unknown here (retentions live in the encoded
-- specs): every profile with buckets is due for the first sweep, which sets it.
UPDATE "profile".profiles AS p
SET aggregates = d.document, aggregates_expire = now()
FROM (
    SELECT dataset, kind, profile_id, jsonb_object_agg(aggregate_id, buckets) AS document
    FROM (
        SELECT dataset, kind, profile_id, aggregate_id,
               jsonb_agg(
                   CASE WHEN cardinality(distinct_values) = 0 THEN
                       jsonb_build_array(
                           (extract(epoch FROM bucket_start) * 1000000)::int8, count,
                           to_jsonb(sum), to_jsonb(min), to_jsonb(max),
                           (extract(epoch FROM first_time) * 1000000)::int8,
                           (extract(epoch FROM last_time) * 1000000)::int8)
                   ELSE
                       jsonb_build_array(
                           (extract(epoch FROM bucket_start) * 1000000)::int8, count,
                           to_jsonb(sum), to_jsonb(min), to_jsonb(max),
                           (extract(epoch FROM first_time) * 1000000)::int8,
                           (extract(epoch FROM last_time) * 1000000)::int8,
                           to_jsonb(distinct_values))
                   END
                   ORDER BY bucket_start
               ) AS buckets
        FROM "profile".aggregate_buckets
        GROUP BY dataset, kind, profile_id, aggregate_id
    ) AS series
    GROUP BY dataset, kind, profile_id
) AS d
WHERE p.dataset = d.dataset AND p.kind = d.kind AND p.profile_id = d.profile_id;

DROP TABLE "profile".aggregate_buckets;

CREATE INDEX profiles_aggregates_expire
    ON "profile".profiles (aggregates_expire)
    WHERE aggregates_expire IS NOT NULL;
