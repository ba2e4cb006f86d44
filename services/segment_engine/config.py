"""The segment engine's configuration, read once at start from ``AUDIENCE_*`` variables."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from audience.config import Address, CommonConfig, Env

__all__ = ["SegmentEngineConfig"]

_P = "AUDIENCE_SEGMENT_ENGINE_"


@dataclass(frozen=True)
class SegmentEngineConfig:
    """What the segment engine reads besides the common configuration."""

    common: CommonConfig
    profile_address: Address
    """Where ProfileService answers (rule queries and aggregate registration); by default
    this process's own listen address."""
    change_retention: timedelta
    """How long the membership change log keeps a change; older tokens get OUT_OF_RANGE."""
    prune_interval: timedelta
    """How often changes older than the retention are deleted."""
    timer_interval: timedelta
    """The longest a due timer waits before the timer loop looks for it."""
    timer_batch: int
    """The most subjects one timer pass re-evaluates in one transaction."""
    consumer_name: str
    """This replica's consumer name in the ``segment_engine`` group."""
    consumer_batch: int
    """The most bus entries a consumer takes per partition per read."""
    consumer_workers: int
    """Consumers run side by side in this replica, each on its share of the partitions."""
    consumer_claim_idle: timedelta
    """How long a bus entry stays unacknowledged before another replica takes it over."""
    backfill_chunk: int
    """Profiles per backfill transaction: bounds how long real-time traffic waits on one."""
    backfill_poll: timedelta
    """How often an idle replica looks for a backfill to run."""
    aggregate_wait: timedelta
    """How long a backfill waits for the profile service to make new aggregates ready."""
    watch_batch: int
    """The most changes a subscriber reads from the log per query."""
    membership_cache_size: int
    """Profiles whose memberships are cached for ``ListMemberships``; 0 turns the cache off."""
    membership_cache_ttl: timedelta
    """The longest a cached answer is kept (a bound on staleness should a wake-up be lost)."""
    state_cache_bytes: int
    """About how much memory subjects' memberships, timers and roll-up counts take when
    kept between transactions (a subject at the revision this replica last wrote is not
    read again); 0 reads them every time."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SegmentEngineConfig:
        env = Env(environ)
        common = CommonConfig.from_env(environ)
        default_name = f"{socket.gethostname()}-{os.getpid()}"
        return cls(
            common=common,
            # By default the profile service is hosted beside this one, as `audience up`
            # does; a deployment that runs them apart names it.
            profile_address=env.address(
                "AUDIENCE_PROFILE_ADDRESS", common.listen.for_local_clients()
            ),
            change_retention=env.duration(
                f"{_P}CHANGE_RETENTION", timedelta(days=7), minimum=timedelta(seconds=1)
            ),
            prune_interval=env.duration(
                f"{_P}PRUNE_INTERVAL", timedelta(minutes=10), minimum=timedelta(milliseconds=10)
            ),
            timer_interval=env.duration(
                f"{_P}TIMER_INTERVAL",
                timedelta(milliseconds=250),
                minimum=timedelta(milliseconds=1),
                maximum=timedelta(minutes=1),
            ),
            timer_batch=env.integer(f"{_P}TIMER_BATCH", 500, minimum=1, maximum=100_000),
            consumer_name=env.string(f"{_P}CONSUMER_NAME", default_name),
            consumer_batch=env.integer(f"{_P}CONSUMER_BATCH", 64, minimum=1, maximum=10_000),
            consumer_workers=env.integer(f"{_P}CONSUMER_WORKERS", 2, minimum=1, maximum=64),
            consumer_claim_idle=env.duration(
                f"{_P}CONSUMER_CLAIM_IDLE", timedelta(seconds=60), minimum=timedelta(seconds=1)
            ),
            backfill_chunk=env.integer(f"{_P}BACKFILL_CHUNK", 5_000, minimum=1, maximum=100_000),
            backfill_poll=env.duration(
                f"{_P}BACKFILL_POLL", timedelta(seconds=1), minimum=timedelta(milliseconds=10)
            ),
            aggregate_wait=env.duration(
                f"{_P}AGGREGATE_WAIT", timedelta(minutes=30), minimum=timedelta(seconds=1)
            ),
            watch_batch=env.integer(f"{_P}WATCH_BATCH", 500, minimum=1, maximum=10_000),
            membership_cache_size=env.integer(
                f"{_P}MEMBERSHIP_CACHE_SIZE", 100_000, minimum=0, maximum=10_000_000
            ),
            membership_cache_ttl=env.duration(
                f"{_P}MEMBERSHIP_CACHE_TTL", timedelta(seconds=30), minimum=timedelta(0)
            ),
            state_cache_bytes=env.integer(f"{_P}STATE_CACHE_MB", 64, minimum=0) << 20,
        )
