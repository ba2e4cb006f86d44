-- The evaluation schema: the tables that compiled SQL rule predicates read.
--
-- A contract between the rule language (libs/audience/rules) and the profile service, which
-- owns these tables and mirrors this file in its migrations. `{schema}` stands for the
-- service's schema name (see `audience.rules.evaluation_schema_ddl`). The SQL predicates
-- read exactly these columns; `audience.rules.evaluation_row(view)` gives the values to
-- write, from the same evaluation view the Python predicates read, so the two evaluators see
-- the same data.
--
-- Conventions:
--   * Times are timestamptz (microseconds, as the rules' instants).
--   * Text columns use the "C" collation: equality is exact and ordering is by code point,
--     as in Python. An unset string is NULL, never ''.
--   * `attributes` is the JSON of `audience.rules.attributes_json`: timestamps are
--     {"$ts": <microseconds since the epoch>}, numbers are finite.
--   * Users and accounts share `profiles`, told apart by `kind`; an account's users point at
--     it through `account_id`. Erased profiles are deleted, with their aggregates.

CREATE TABLE IF NOT EXISTS {schema}.profiles (
    dataset             text COLLATE "C" NOT NULL,
    kind                text COLLATE "C" NOT NULL CHECK (kind IN ('user', 'account')),
    profile_id          text COLLATE "C" NOT NULL,
    attributes          jsonb NOT NULL DEFAULT '{}',
    -- The current (or most recent) visit; all NULL when there has been none.
    session_start       timestamptz,
    cart_value          double precision,
    cart_item_count     bigint,
    page_view_count     bigint,
    landing_page        text COLLATE "C",
    source              text COLLATE "C",
    referrer            text COLLATE "C",
    utm_source          text COLLATE "C",
    utm_medium          text COLLATE "C",
    utm_campaign        text COLLATE "C",
    utm_term            text COLLATE "C",
    utm_content         text COLLATE "C",
    channel             text COLLATE "C",
    visit_count         bigint NOT NULL DEFAULT 0,
    is_new_visitor      boolean,
    -- Where the subject was last seen.
    country             text COLLATE "C",
    region              text COLLATE "C",
    city                text COLLATE "C",
    postal_code         text COLLATE "C",
    latitude            double precision,
    longitude           double precision,
    weather_condition   text COLLATE "C",
    temperature_celsius double precision,
    device_type         text COLLATE "C",
    os                  text COLLATE "C",
    browser             text COLLATE "C",
    first_seen          timestamptz,
    last_seen           timestamptz,
    lifetime_value      double precision NOT NULL DEFAULT 0,
    order_count         bigint NOT NULL DEFAULT 0,
    -- For a user: the account it belongs to.
    account_id          text COLLATE "C",
    -- The non-empty time buckets of the registered aggregates (`AggregateSpec`), as
    -- `audience.rules.aggregates_json` writes them: {"<aggregate_id>": [bucket, …], …}, each
    -- aggregate's buckets in start order, a bucket being [start, count, sum, min, max,
    -- first_time, last_time] (null for an unknown min, max or time) with, for a
    -- DISTINCT_COUNT aggregate that has values, an eighth item: the distinct values (see
    -- `audience.rules.distinct_key`, at most 1,000). Instants are integer microseconds; a
    -- bucket starts at a multiple of its aggregate's width since the epoch (the epoch itself
    -- for an all-time aggregate); non-finite sums are the strings "Infinity", "-Infinity" and
    -- "NaN". One value per subject, so a change to any number of buckets rewrites one row.
    aggregates          jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (dataset, kind, profile_id)
);

-- Roll-ups count an account's users: `WHERE dataset = $1 AND kind = 'user' AND account_id = …`.
CREATE INDEX IF NOT EXISTS profiles_account_users
    ON {schema}.profiles (dataset, account_id)
    WHERE kind = 'user' AND account_id IS NOT NULL;
