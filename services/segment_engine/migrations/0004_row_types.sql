-- The rows of the bulk statements, each passed as one array of these instead of an array
-- per column: asyncpg checks every element of an array parameter in Python, so a row
-- passed whole costs one check where its columns cost one each. Attributes follow the
-- tuples services/segment_engine/store/state.py builds.
CREATE TYPE subject_key AS (dataset text, kind smallint, subject_id text);

CREATE TYPE subject_write AS (
    dataset    text,
    kind       smallint,
    subject_id text,
    sequence   bigint,
    view       bytea,
    -- Microseconds since the epoch, as the service keeps times.
    view_time  bigint,
    account_id text,
    rollups    text[],
    erased     boolean
);

CREATE TYPE membership_key AS (dataset text, segment_id text, subject_id text);

CREATE TYPE membership_row AS (
    dataset    text,
    segment_id text,
    subject_id text,
    kind       smallint,
    version    bigint,
    join_time  bigint
);

CREATE TYPE timer_key AS (dataset text, kind smallint, subject_id text, target text);

CREATE TYPE timer_row AS (
    dataset    text,
    kind       smallint,
    subject_id text,
    target     text,
    due        bigint
);

CREATE TYPE change_row AS (
    kind            smallint,
    subject_id      text,
    segment_id      text,
    segment_version bigint,
    change          smallint,
    change_time     bigint,
    reason          bytea
);
