"""Configuration of the profile service, read once at start from ``AUDIENCE_PROFILE_*``."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from audience.config import Address, CommonConfig, ConfigError, Env

__all__ = ["ProfileConfig"]


@dataclass(frozen=True)
class ProfileConfig:
    """What the profile service reads from the environment.

    Attributes:
        session_timeout: inactivity after which a person's next event starts a new visit.
        consumer_name: this replica's name in the ``profile`` group of ``events``; each
            worker appends ``-{n}``.
        workers: concurrent appliers per replica, each reading its own share of the
            partitions, so one computes while another waits on PostgreSQL.
        read_count: entries read per partition at a time.
        unit_events: the most events applied in one transaction. Both matter only with a
            backlog (a read returns what is there): a unit writes each profile it touches
            once, whole, so larger units write fewer rows per event (16 entries and 8,000
            events: 15-35% less CPU per event than 8 and 4,000 in ``bench.profile``, for
            row locks held twice as long). After a read that found nothing, units start at
            256 events and double up to this, so a burst's first changes go out early.
        cache_bytes: memory for states kept between batches (a sixteenth of it for
            accounts), as the states' approximate sizes add up; each is checked against
            its row's sequence under the row lock before use. A profile takes about 1.5 KB,
            plus about 1 KB per aggregate it holds and 0.5 KB per bucket (70 KB with the
            fifty series of ``bench.profile``), so size it to the pod's memory: the default
            (128 MiB) suits the manifests' 384–512 MiB limits.
        claim_idle: how long an entry stays unacknowledged before another consumer takes
            it over; more than the longest time a batch takes to apply.
        segment_engine: where ``MembershipService`` answers, for the segments of a profile.
        segment_timeout: how long a profile read waits for the segment engine.
        backfill_profiles: profiles backfilled per transaction.
        backfill_pause: pause between backfill transactions, so live traffic keeps its share.
        prune_interval: how often buckets past retention are swept from profiles no event
            has touched since they expired.
        outbox_grace: how long a change committed by a merge, an erasure or a backfill page
            stays in the outbox before the relay publishes it in case its own publish was
            lost; the relay looks this often. Longer than a publish takes, so the relay
            rarely publishes a change twice (harmless: the segment engine drops a sequence
            it has passed).
    """

    common: CommonConfig
    session_timeout: timedelta
    consumer_name: str
    workers: int
    read_count: int
    unit_events: int
    cache_bytes: int
    claim_idle: timedelta
    segment_engine: Address
    segment_timeout: timedelta
    backfill_profiles: int
    backfill_pause: timedelta
    prune_interval: timedelta
    outbox_grace: timedelta

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProfileConfig:
        env = Env(environ)
        if env.optional_string("AUDIENCE_PROFILE_CACHE_SIZE") is not None:
            # Refused rather than ignored: a deployment that sized the cache would otherwise
            # start with the default without a word.
            raise ConfigError(
                "AUDIENCE_PROFILE_CACHE_SIZE: replaced by AUDIENCE_PROFILE_CACHE_MB (the"
                " cache is bounded by memory, not by a count of profiles)"
            )
        common = CommonConfig.from_env(environ)
        return cls(
            common=common,
            session_timeout=env.duration(
                "AUDIENCE_PROFILE_SESSION_TIMEOUT",
                timedelta(minutes=30),
                minimum=timedelta(seconds=1),
                maximum=timedelta(days=1),
            ),
            consumer_name=env.string(
                "AUDIENCE_PROFILE_CONSUMER_NAME", socket.gethostname() or "profile"
            ),
            workers=env.integer("AUDIENCE_PROFILE_WORKERS", 2, minimum=1, maximum=64),
            read_count=env.integer("AUDIENCE_PROFILE_READ_COUNT", 16, minimum=1, maximum=1000),
            unit_events=env.integer(
                "AUDIENCE_PROFILE_UNIT_EVENTS", 8000, minimum=1, maximum=100_000
            ),
            cache_bytes=env.integer("AUDIENCE_PROFILE_CACHE_MB", 128, minimum=0) << 20,
            claim_idle=env.duration(
                "AUDIENCE_PROFILE_CLAIM_IDLE", timedelta(seconds=60), minimum=timedelta(seconds=1)
            ),
            segment_engine=env.address(
                "AUDIENCE_SEGMENT_ENGINE_ADDRESS", common.listen.for_local_clients()
            ),
            segment_timeout=env.duration(
                "AUDIENCE_PROFILE_SEGMENT_TIMEOUT",
                timedelta(seconds=2),
                minimum=timedelta(milliseconds=10),
            ),
            backfill_profiles=env.integer(
                "AUDIENCE_PROFILE_BACKFILL_PROFILES", 500, minimum=1, maximum=100_000
            ),
            backfill_pause=env.duration(
                "AUDIENCE_PROFILE_BACKFILL_PAUSE", timedelta(milliseconds=20), minimum=timedelta(0)
            ),
            prune_interval=env.duration(
                "AUDIENCE_PROFILE_PRUNE_INTERVAL", timedelta(hours=1), minimum=timedelta(seconds=1)
            ),
            outbox_grace=env.duration(
                "AUDIENCE_PROFILE_OUTBOX_GRACE",
                timedelta(seconds=5),
                minimum=timedelta(milliseconds=100),
                maximum=timedelta(hours=1),
            ),
        )
