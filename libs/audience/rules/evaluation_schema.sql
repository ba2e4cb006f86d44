-- The evaluation schema: the tables that compiled SQL rule predicates read.
--
-- A contract between the rule language (libs/audience/rules) and the profile service, which
-- owns these tables and mirrors this file in its migrations. `{schema}` stands for the
-- service's schema name (see `audience.rules.evaluation_schema_ddl`). The SQL predicates
-- read exactly these columns; `audience.rules.evaluation_row(view)` and
-- `audience.rules.bucket_rows(view)` give the values to write, from the same evaluation view
-- the Python predicates read, so the two evaluators see the same data.
--
-- Conventions:
--   * Times are timestamptz (microseconds, as the rules' instants).
--   * Text columns use the "C" collation: equality is exact and ordering is by code point,
--     as in Python. An unset string is NULL, never ''.
--   * `attributes` is the JSON of `audience.rules.attributes_json`: timestamps are
--     {"$ts": <microseconds since the epoch>}, numbers are finite.
--   * Users and accounts share `profiles`, told apart by `kind`; an account's users point at
--     it through `account_id`. Erased profiles are deleted, with their buckets.

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
    PRIMARY KEY (dataset, kind, profile_id)
);

-- Roll-ups count an account's users: `WHERE dataset = $1 AND kind = 'user' AND account_id = …`.
CREATE INDEX IF NOT EXISTS profiles_account_users
    ON {schema}.profiles (dataset, account_id)
    WHERE kind = 'user' AND account_id IS NOT NULL;

-- The non-empty time buckets of the registered aggregates (`AggregateSpec`) per subject.
-- A bucket starts at a multiple of its aggregate's width since the epoch (the epoch itself
-- for an all-time aggregate).
CREATE TABLE IF NOT EXISTS {schema}.aggregate_buckets (
    dataset         text COLLATE "C" NOT NULL,
    kind            text COLLATE "C" NOT NULL,
    profile_id      text COLLATE "C" NOT NULL,
    aggregate_id    text COLLATE "C" NOT NULL,
    bucket_start    timestamptz NOT NULL,
    count           bigint NOT NULL CHECK (count > 0),
    sum             double precision NOT NULL DEFAULT 0,
    min             double precision,
    max             double precision,
    first_time      timestamptz,
    last_time       timestamptz,
    -- Distinct values of a DISTINCT_COUNT aggregate (see `audience.rules.distinct_key`),
    -- at most 1,000.
    distinct_values text[] COLLATE "C" NOT NULL DEFAULT '{}',
    -- The key serves the correlated lookup of one subject's buckets in a window.
    PRIMARY KEY (dataset, kind, profile_id, aggregate_id, bucket_start),
    FOREIGN KEY (dataset, kind, profile_id)
        REFERENCES {schema}.profiles (dataset, kind, profile_id) ON DELETE CASCADE
);
