-- The rows of the bulk statements, passed as one array of these instead of an array per
-- column: asyncpg checks every element of an array parameter in Python, so a profile row
-- cost a check per column and costs one as a row (12.3 µs of client CPU per row against
-- 2.7, measured with 45 text columns). Attributes follow the order the service builds its
-- rows in (services/profile/store.py, checked by tests/integration/test_profile_schema.py).
CREATE TYPE "profile".profile_row AS (
    dataset             text,
    profile_id          text,
    attributes          text,
    session_start       timestamptz,
    cart_value          float8,
    cart_item_count     int8,
    page_view_count     int8,
    landing_page        text,
    source              text,
    referrer            text,
    utm_source          text,
    utm_medium          text,
    utm_campaign        text,
    utm_term            text,
    utm_content         text,
    channel             text,
    visit_count         int8,
    is_new_visitor      bool,
    country             text,
    region              text,
    city                text,
    postal_code         text,
    latitude            float8,
    longitude           float8,
    weather_condition   text,
    temperature_celsius float8,
    device_type         text,
    os                  text,
    browser             text,
    first_seen          timestamptz,
    last_seen           timestamptz,
    lifetime_value      float8,
    order_count         int8,
    account_id          text,
    aggregates          text,
    sequence            int8,
    known               bool,
    user_count          int8,
    event_count         int8,
    state               bytea,
    aggregates_expire   timestamptz
);

CREATE TYPE "profile".event_row AS (
    dataset     text,
    occurred_at timestamptz,
    event_id    text,
    profile_id  text,
    account_id  text,
    name        text,
    payload     bytea
);

-- Keys, as the statements that look rows up by them take them.
CREATE TYPE "profile".identity_key AS (dataset text, type text, value text);
CREATE TYPE "profile".erased_key AS (dataset text, identity_hash bytea);
CREATE TYPE "profile".profile_key AS (dataset text, profile_id text);
