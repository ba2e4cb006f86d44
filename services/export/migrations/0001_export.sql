-- The export service's resources: destinations, export jobs, schedules, webhook
-- subscriptions and their deliveries. Every key starts with the dataset.

CREATE TABLE destinations (
    dataset         text NOT NULL,
    destination_id  text NOT NULL,
    display_name    text NOT NULL DEFAULT '',
    -- {"folder": {"path": ...}} or {"sftp": {"host": ..., ...}}; never credentials, only
    -- the name of the environment variable that holds them.
    target          jsonb NOT NULL,
    version         bigint NOT NULL DEFAULT 1,
    create_time     timestamptz NOT NULL,
    update_time     timestamptz NOT NULL,
    PRIMARY KEY (dataset, destination_id)
);

CREATE TABLE schedules (
    dataset             text NOT NULL,
    schedule_id         text NOT NULL,
    display_name        text NOT NULL DEFAULT '',
    cron                text NOT NULL,
    time_zone           text NOT NULL,
    job_template        jsonb NOT NULL,
    destination_id      text NOT NULL,
    paused              boolean NOT NULL DEFAULT false,
    next_run_time       timestamptz,
    last_run_time       timestamptz,
    last_job_id         text,
    -- Where the delta feed's last successful run stopped reading the change stream, and the
    -- time it had reached.
    delta_resume_token  text,
    delta_time          timestamptz,
    version             bigint NOT NULL DEFAULT 1,
    create_time         timestamptz NOT NULL,
    update_time         timestamptz NOT NULL,
    PRIMARY KEY (dataset, schedule_id),
    -- A destination in use by a schedule cannot be deleted.
    FOREIGN KEY (dataset, destination_id) REFERENCES destinations ON DELETE RESTRICT
);

CREATE INDEX schedules_due ON schedules (next_run_time) WHERE NOT paused;

CREATE TABLE export_jobs (
    dataset           text NOT NULL,
    job_id            text NOT NULL,
    spec              jsonb NOT NULL,
    schedule_id       text,
    time_zone         text NOT NULL DEFAULT 'UTC',
    state             text NOT NULL
        CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    rows_written      bigint NOT NULL DEFAULT 0,
    percent           double precision NOT NULL DEFAULT 0,
    file_path         text NOT NULL DEFAULT '',
    sha256            text NOT NULL DEFAULT '',
    error             text NOT NULL DEFAULT '',
    attempt_count     integer NOT NULL DEFAULT 0,
    delta_start_time  timestamptz,
    delta_end_time    timestamptz,
    create_time       timestamptz NOT NULL,
    start_time        timestamptz,
    end_time          timestamptz,
    -- When a pending job may be claimed; later than create_time while an upload backs off.
    not_before        timestamptz NOT NULL,
    -- The worker running the job and until when its claim holds; a job whose claim ran out
    -- (its worker died) is claimed again.
    worker            text,
    lease_until       timestamptz,
    PRIMARY KEY (dataset, job_id)
);

CREATE INDEX export_jobs_claimable ON export_jobs (not_before)
    WHERE state IN ('pending', 'running');
CREATE INDEX export_jobs_newest ON export_jobs (dataset, create_time DESC, job_id DESC);
CREATE INDEX export_jobs_by_schedule
    ON export_jobs (dataset, schedule_id, create_time DESC, job_id DESC)
    WHERE schedule_id IS NOT NULL;

CREATE TABLE webhook_subscriptions (
    dataset          text NOT NULL,
    subscription_id  text NOT NULL,
    display_name     text NOT NULL DEFAULT '',
    url              text NOT NULL,
    segment_ids      text[] NOT NULL DEFAULT '{}',
    kinds            text[] NOT NULL DEFAULT '{}',
    secret           text NOT NULL,
    paused           boolean NOT NULL DEFAULT false,
    max_attempts     integer NOT NULL,
    -- The durable cursor: the change stream is read from this resume token, or from
    -- create_time before the first token is known.
    resume_token     text,
    -- The replica watching the subscription's changes, and until when.
    watcher          text,
    watch_until      timestamptz,
    version          bigint NOT NULL DEFAULT 1,
    create_time      timestamptz NOT NULL,
    update_time      timestamptz NOT NULL,
    PRIMARY KEY (dataset, subscription_id)
);

CREATE TABLE webhook_deliveries (
    sequence          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset           text NOT NULL,
    subscription_id   text NOT NULL,
    delivery_id       uuid NOT NULL UNIQUE,
    member            text NOT NULL,
    segment_id        text NOT NULL,
    member_sequence   bigint NOT NULL,
    kind              text NOT NULL,
    payload           text NOT NULL,
    state             text NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempt_count     integer NOT NULL DEFAULT 0,
    last_http_status  integer NOT NULL DEFAULT 0,
    last_error        text NOT NULL DEFAULT '',
    create_time       timestamptz NOT NULL,
    last_attempt_time timestamptz,
    next_attempt_time timestamptz,
    -- A sender holds a delivery while its request is in flight; a sender that died lets go
    -- when this passes.
    claimed_until     timestamptz,
    FOREIGN KEY (dataset, subscription_id) REFERENCES webhook_subscriptions ON DELETE CASCADE,
    -- The change stream is at least once; the table holds each change once.
    UNIQUE (dataset, subscription_id, member, segment_id, member_sequence, kind)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_time)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_member_queue
    ON webhook_deliveries (dataset, subscription_id, member, sequence)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_listing
    ON webhook_deliveries (dataset, subscription_id, state, sequence DESC);
