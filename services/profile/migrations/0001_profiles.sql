-- The evaluation schema: the tables that compiled SQL rule predicates read.
--
-- A contract between the rule language (libs/audience/rules) and the profile service, which
-- owns these tables and mirrors this file in its migrations. `"profile"` stands for the
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

CREATE TABLE IF NOT EXISTS "profile".profiles (
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
    ON "profile".profiles (dataset, account_id)
    WHERE kind = 'user' AND account_id IS NOT NULL;

-- The non-empty time buckets of the registered aggregates (`AggregateSpec`) per subject.
-- A bucket starts at a multiple of its aggregate's width since the epoch (the epoch itself
-- for an all-time aggregate).
CREATE TABLE IF NOT EXISTS "profile".aggregate_buckets (
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
        REFERENCES "profile".profiles (dataset, kind, profile_id) ON DELETE CASCADE
);

-- ---------------------------------------------------------------------------------------
-- What the profile service keeps beside the evaluation schema. The text above is
-- libs/audience/rules/evaluation_schema.sql for schema "profile", verbatim
-- (tests/unit/test_profile_migrations.py holds it to that).
-- ---------------------------------------------------------------------------------------

-- Per subject: the sequence published with its last change; whether a user is known (has
-- a user_id identity), which identity resolution reads before it takes any lock; an
-- account's user count; a user's event count; and `state`, an audience.v1.Profile holding
-- what has no column (identities, the full visit and context, merged profile names).
ALTER TABLE "profile".profiles
    ADD COLUMN sequence    bigint NOT NULL DEFAULT 0,
    ADD COLUMN known       boolean NOT NULL DEFAULT false,
    ADD COLUMN user_count  bigint NOT NULL DEFAULT 0,
    ADD COLUMN event_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN state       bytea,
    ADD COLUMN create_time timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN update_time timestamptz NOT NULL DEFAULT now();

-- ListAccountProfiles pages an account's users by id.
CREATE INDEX profiles_account_members
    ON "profile".profiles (dataset, account_id, profile_id)
    WHERE kind = 'user' AND account_id IS NOT NULL;

-- The identity graph: each identity belongs to one user profile.
CREATE TABLE "profile".identities (
    dataset    text COLLATE "C" NOT NULL,
    type       text COLLATE "C" NOT NULL,
    value      text COLLATE "C" NOT NULL,
    profile_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (dataset, type, value)
);
CREATE INDEX identities_profile ON "profile".identities (dataset, profile_id);

-- The event history, unlimited, in monthly range partitions of `occurred_at` that the
-- service creates when an event first needs one (events_YYYYMM). The key doubles as the
-- record of applied events: a redelivered event conflicts with its own row.
CREATE TABLE "profile".events (
    dataset     text COLLATE "C" NOT NULL,
    occurred_at timestamptz NOT NULL,
    event_id    text COLLATE "C" NOT NULL,
    -- NULL for an account update that names no user.
    profile_id  text COLLATE "C",
    account_id  text COLLATE "C",
    name        text COLLATE "C" NOT NULL,
    -- The audience.v1.Event as ingest accepted it.
    payload     bytea NOT NULL,
    PRIMARY KEY (dataset, event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX events_profile
    ON "profile".events (dataset, profile_id, occurred_at DESC, event_id DESC);

-- Merges: the source no longer exists; its identities and history moved to the target.
CREATE TABLE "profile".merges (
    dataset    text COLLATE "C" NOT NULL,
    source     text COLLATE "C" NOT NULL,
    target     text COLLATE "C" NOT NULL,
    reason     text NOT NULL,
    merge_time timestamptz NOT NULL,
    PRIMARY KEY (dataset, source, merge_time)
);
CREATE INDEX merges_target ON "profile".merges (dataset, target);

-- Identities of erased profiles, as SHA-256 digests of dataset, type and value: events for
-- them are counted here and never applied until the identity is released.
CREATE TABLE "profile".erased_identities (
    dataset           text COLLATE "C" NOT NULL,
    identity_hash     bytea NOT NULL,
    erase_time        timestamptz NOT NULL,
    suppressed_count  bigint NOT NULL DEFAULT 0,
    last_suppress_time timestamptz,
    PRIMARY KEY (dataset, identity_hash)
);

-- The record of each erasure, without the personal data it removed.
CREATE TABLE "profile".erasures (
    dataset             text COLLATE "C" NOT NULL,
    erasure_id          bigint GENERATED ALWAYS AS IDENTITY,
    erase_time          timestamptz NOT NULL,
    identity_hashes     bytea[] NOT NULL,
    deleted_event_count bigint NOT NULL,
    PRIMARY KEY (dataset, erasure_id)
);

-- Registered aggregates (audience.v1.AggregateSpec, canonical, with id and retention).
-- `state`: 1 backfilling, 2 ready (AggregateSpec.State).
CREATE TABLE "profile".aggregate_specs (
    dataset       text COLLATE "C" NOT NULL,
    aggregate_id  text COLLATE "C" NOT NULL,
    event_name    text COLLATE "C" NOT NULL,
    spec          bytea NOT NULL,
    state         smallint NOT NULL,
    register_time timestamptz NOT NULL DEFAULT now(),
    ready_time    timestamptz,
    PRIMARY KEY (dataset, aggregate_id)
);

-- A dataset's catalogue version moves with every registration, so appliers can tell
-- cheaply, under their row locks, that their compiled aggregates are stale.
CREATE TABLE "profile".aggregate_catalogs (
    dataset text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL
);

-- A backfill in progress: the aggregates being filled and the last profile done.
CREATE TABLE "profile".backfills (
    dataset       text COLLATE "C" PRIMARY KEY,
    aggregate_ids text[] COLLATE "C" NOT NULL,
    cursor        text COLLATE "C",
    done_count    bigint NOT NULL DEFAULT 0,
    start_time    timestamptz NOT NULL DEFAULT now()
);
