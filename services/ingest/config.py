"""Configuration of the ingest service, read once at start from ``AUDIENCE_INGEST_*``."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from audience.config import CommonConfig, Env

__all__ = ["IngestConfig"]


@dataclass(frozen=True)
class IngestConfig:
    """What the ingest service reads from the environment.

    Attributes:
        dedup_window: how long an accepted event id makes a later event with the same id
            (in the same dataset) a duplicate.
        max_backlog: the most ``events`` entries the ``profile`` group may have left to
            acknowledge before ingest refuses new events with ``RESOURCE_EXHAUSTED``. An
            entry is one call's events for one partition: up to 1,000 events from a batch,
            one from ``SendEvent``. The default, 10,000 entries, is at most 10 million
            events (a few GB of Redis at 1,000-event batches over one partition) and
            typically about a million (1,000-event batches over 8 partitions).
        backlog_interval: how often the backlog is measured; calls read the last figure.
        stream_depth: how many batches of one ``StreamEvents`` call are in flight at once.
        consumer_name: this replica's name in the ``ingest`` group of ``failed-events``.
    """

    common: CommonConfig
    dedup_window: timedelta
    max_backlog: int
    backlog_interval: timedelta
    stream_depth: int
    consumer_name: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IngestConfig:
        env = Env(environ)
        return cls(
            common=CommonConfig.from_env(environ),
            dedup_window=env.duration(
                "AUDIENCE_INGEST_DEDUP_WINDOW",
                timedelta(hours=24),
                minimum=timedelta(milliseconds=1),
                maximum=timedelta(days=30),
            ),
            max_backlog=env.integer("AUDIENCE_INGEST_MAX_BACKLOG", 10_000, minimum=1),
            backlog_interval=env.duration(
                "AUDIENCE_INGEST_BACKLOG_INTERVAL",
                timedelta(seconds=1),
                minimum=timedelta(milliseconds=10),
                maximum=timedelta(minutes=1),
            ),
            stream_depth=env.integer("AUDIENCE_INGEST_STREAM_DEPTH", 4, minimum=1, maximum=64),
            consumer_name=env.string(
                "AUDIENCE_INGEST_CONSUMER_NAME", socket.gethostname() or "ingest"
            ),
        )
