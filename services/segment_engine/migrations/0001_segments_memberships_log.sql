-- The segment engine's tables: segment definitions, each subject's latest evaluation view,
-- memberships, timers, roll-up counts, the membership change log and daily counters.
--
-- Ids are text in the "C" collation: equality is exact and order is by code point, the
-- order in which the profile service's rule queries return ids (backfills merge the two).
-- Kinds are SegmentKind numbers (1 user, 2 account).

CREATE TABLE segments (
    dataset          text COLLATE "C" NOT NULL,
    segment_id       text COLLATE "C" NOT NULL,
    kind             smallint NOT NULL CHECK (kind IN (1, 2)),
    source           smallint NOT NULL CHECK (source IN (1, 2)),
    display_name     text NOT NULL DEFAULT '',
    description      text NOT NULL DEFAULT '',
    labels           jsonb NOT NULL DEFAULT '{}',
    -- audience.v1.Rule of a rule segment.
    rule             bytea,
    rule_text        text NOT NULL DEFAULT '',
    -- Increases with every rule change (or imported list change).
    version          bigint NOT NULL DEFAULT 1,
    -- Increases with every change people make; the etag is derived from it.
    revision         bigint NOT NULL DEFAULT 1,
    -- SegmentState: 1 backfilling, 2 active, 3 failed.
    state            smallint NOT NULL,
    -- Deleted: members are being removed; the segment is gone for every reader.
    deleting         boolean NOT NULL DEFAULT false,
    backfill_version bigint NOT NULL DEFAULT 0,
    backfill_done    bigint NOT NULL DEFAULT 0,
    backfill_total   bigint NOT NULL DEFAULT 0,
    backfill_start   timestamptz,
    backfill_end     timestamptz,
    backfill_error   text NOT NULL DEFAULT '',
    create_time      timestamptz NOT NULL DEFAULT now(),
    update_time      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset, segment_id)
);

-- Work the backfill worker looks for.
CREATE INDEX segments_pending ON segments (dataset, segment_id) WHERE state = 1 OR deleting;

-- Bumped with every change of a dataset's rules: an evaluation that read its catalog at an
-- older revision notices inside its transaction and evaluates again.
CREATE TABLE catalogs (
    dataset  text COLLATE "C" PRIMARY KEY,
    revision bigint NOT NULL
);

-- Each subject's latest evaluation view, from the bus, with the sequence it came with. The
-- row is also the subject's lock: whoever changes its memberships holds it.
CREATE TABLE subjects (
    dataset    text COLLATE "C" NOT NULL,
    kind       smallint NOT NULL,
    subject_id text COLLATE "C" NOT NULL,
    sequence   bigint NOT NULL DEFAULT 0,
    -- audience.bus.v1.EvaluationView; NULL for a subject known only as a member of an
    -- imported segment or as the account of a user.
    view       bytea,
    -- When the profile service applied the change that carried the view.
    view_time  timestamptz,
    account_id text COLLATE "C",
    -- For a user: the roll-up keys whose user rule it satisfies.
    rollups    text[] NOT NULL DEFAULT '{}',
    -- Erased or merged away: the sequence is kept so late deliveries stay ignored.
    erased     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (dataset, kind, subject_id)
) WITH (fillfactor = 80);

CREATE TABLE memberships (
    dataset    text COLLATE "C" NOT NULL,
    segment_id text COLLATE "C" NOT NULL,
    subject_id text COLLATE "C" NOT NULL,
    kind       smallint NOT NULL,
    version    bigint NOT NULL,
    join_time  timestamptz NOT NULL,
    PRIMARY KEY (dataset, segment_id, subject_id) INCLUDE (version, join_time)
);

CREATE INDEX memberships_by_member
    ON memberships (dataset, kind, subject_id, segment_id) INCLUDE (version, join_time);

-- When time alone could change a subject's answer for a time-dependent segment (target: the
-- segment id) or roll-up (target: '@' and the roll-up key).
CREATE TABLE timers (
    dataset    text COLLATE "C" NOT NULL,
    kind       smallint NOT NULL,
    subject_id text COLLATE "C" NOT NULL,
    target     text COLLATE "C" NOT NULL,
    due        timestamptz NOT NULL,
    PRIMARY KEY (dataset, kind, subject_id, target)
);

CREATE INDEX timers_due ON timers (due);

-- Per account and roll-up key: how many of the account's users satisfy the user rule.
CREATE TABLE rollup_counts (
    dataset    text COLLATE "C" NOT NULL,
    account_id text COLLATE "C" NOT NULL,
    rollup_key text COLLATE "C" NOT NULL,
    count      bigint NOT NULL,
    PRIMARY KEY (dataset, account_id, rollup_key)
);

-- The head of each dataset's change log. Writers allocate log sequence numbers by updating
-- this row, which they hold locked until they commit: numbers are committed in the order
-- they are allocated, so a reader never passes one that commits later (docs/adr/0003).
CREATE TABLE log_heads (
    dataset    text COLLATE "C" PRIMARY KEY,
    last_seq   bigint NOT NULL,
    -- Every change at or below this has been pruned.
    pruned_seq bigint NOT NULL DEFAULT 0
);

CREATE TABLE changes (
    dataset         text COLLATE "C" NOT NULL,
    seq             bigint NOT NULL,
    kind            smallint NOT NULL,
    subject_id      text COLLATE "C" NOT NULL,
    segment_id      text COLLATE "C" NOT NULL,
    segment_version bigint NOT NULL,
    -- MembershipChangeKind: 1 join, 2 leave.
    change          smallint NOT NULL,
    change_time     timestamptz NOT NULL,
    -- audience.v1.ChangeReason.
    reason          bytea NOT NULL,
    PRIMARY KEY (dataset, seq)
);

CREATE INDEX changes_by_member ON changes (dataset, kind, subject_id, seq);
CREATE INDEX changes_by_time ON changes (dataset, change_time);

-- Joins and leaves per segment and UTC day, kept as changes are recorded (the log is
-- pruned; these are not). A segment's size is the sum of joins minus leaves.
CREATE TABLE segment_days (
    dataset    text COLLATE "C" NOT NULL,
    segment_id text COLLATE "C" NOT NULL,
    day        date NOT NULL,
    joins      bigint NOT NULL DEFAULT 0,
    leaves     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset, segment_id, day)
);

-- Ids uploaded to an imported segment, staged until the upload ends. Unlogged: a crash
-- loses only uploads that had not finished, which their clients see fail.
CREATE TABLE imports (
    import_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset    text COLLATE "C" NOT NULL,
    segment_id text COLLATE "C" NOT NULL,
    start_time timestamptz NOT NULL DEFAULT now()
);

CREATE UNLOGGED TABLE import_ids (
    import_id  bigint NOT NULL,
    subject_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (import_id, subject_id)
);
