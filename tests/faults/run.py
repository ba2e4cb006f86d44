"""One fault run: the suite started, the workload sent while faults are injected, the
pipeline drained, and the verdict (``check.judge``) returned as a report.

Also runnable alone, printing progress and, as its last line, the report as one JSON
object: ``python -m tests.faults.run [--long] [--seed N] [--keep DIR]``.

The services run with settings that bring the faults on sooner than the defaults would:
ingest refuses events past 64 unacknowledged bus entries (measured every 100 ms) so that
the flood meets its backpressure within seconds; consumers take over a dead consumer's
entries after 3 s instead of 60; backfills work in chunks of 40 profiles, so a backfill
spans many transactions that faults can fall between.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from audience.channels import ChannelSettings, open_channel
from audience.config import CommonConfig
from audience.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from tests.faults.check import drain, judge
from tests.faults.cluster import SERVICES, Cluster
from tests.faults.driver import Ingestor, ProfileEditor, SegmentEditor, SendStats
from tests.faults.subscriber import Subscriber
from tests.faults.workload import (
    EDITS,
    ERASE_AT,
    INITIAL_SEGMENTS,
    LONG,
    MERGE_AT,
    PARENT,
    SHORT,
    PlannedEvent,
    Scale,
    Workload,
    flood_events,
    plan_workload,
    segment_name,
)

__all__ = ["SERVICE_SETTINGS", "run_faults"]

SERVICE_SETTINGS = {
    "AUDIENCE_INGEST_MAX_BACKLOG": "64",
    "AUDIENCE_INGEST_BACKLOG_INTERVAL": "100ms",
    "AUDIENCE_PROFILE_CLAIM_IDLE": "3s",
    "AUDIENCE_SEGMENT_ENGINE_CONSUMER_CLAIM_IDLE": "3s",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_CHUNK": "40",
    "AUDIENCE_SEGMENT_ENGINE_BACKFILL_POLL": "200ms",
    "AUDIENCE_PROFILE_BACKFILL_PROFILES": "50",
}

FAULTS = (
    "kill ingest",
    "kill profile",
    "kill segment_engine",
    "kill export",
    "crash redis",
    "crash postgres",
    "restart postgres",
    "cut postgres",
    "cut redis",
    "drop subscriber",
)
_FLOOD_BATCH = 500
_FLOOD_CLIENTS = 8
# Each client refused about three times: ingest has pushed back for seconds, not once.
_FLOOD_REFUSALS = 3 * _FLOOD_CLIENTS
_FLOOD_LIMIT = 60.0
_FLOOD_PROFILES = {"short": 100, "long": 400}
_MB = 1024 * 1024


def _now() -> int:
    return time.time_ns() // 1000


@dataclass
class _Flood:
    events: int = 0
    seconds: float = 0.0
    resource_exhausted: int = 0
    baseline_rss: int = 0
    peak_rss: int = 0


class _Run:
    def __init__(
        self, seed: int, scale: Scale, cluster: Cluster, say: Callable[[str], None]
    ) -> None:
        self.seed = seed
        self.scale = scale
        self.cluster = cluster
        self.say = say
        self.rng = random.Random(seed * 7919 + 1)
        settings = ChannelSettings(
            api_key=cluster.api_key,
            tls=None,
            max_message_bytes=CommonConfig.from_env({}).max_message_bytes,
            keepalive=CommonConfig.from_env({}).keepalive,
        )
        self.channels = {name: open_channel(cluster.address(name), settings) for name in SERVICES}
        self.stats = SendStats()
        self.flood_stats = SendStats()
        self.faults: Counter[str] = Counter()
        self.floods: list[_Flood] = []
        self.sent = 0
        self.send_done = asyncio.Event()
        self.progress = asyncio.Condition()

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    # The workload.

    def _calls(self, events: Sequence[PlannedEvent]) -> list[tuple[str, list[list[PlannedEvent]]]]:
        rng = random.Random(self.seed * 31 + 7)
        calls: list[tuple[str, list[list[PlannedEvent]]]] = []
        index = 0
        while index < len(events):
            draw = rng.random()
            if draw < 0.15:
                calls.append(("one", [[events[index]]]))
                index += 1
            elif draw < 0.4:
                batches = []
                for _ in range(rng.randint(2, 5)):
                    size = rng.randint(1, 20)
                    if index < len(events):
                        batches.append(list(events[index : index + size]))
                        index += size
                calls.append(("stream", batches))
            else:
                size = rng.randint(1, 40)
                calls.append(("batch", [list(events[index : index + size])]))
                index += size
        return calls

    async def send(self, events: Sequence[PlannedEvent]) -> None:
        ingestor = Ingestor(self.channels["ingest"], self.stats, _now)
        calls = self._calls(events)
        total = len(events)
        started = time.monotonic()
        queue: asyncio.Queue[tuple[int, str, list[list[PlannedEvent]]]] = asyncio.Queue()
        before = 0
        for kind, batches in calls:
            queue.put_nowait((before, kind, batches))
            before += sum(len(batch) for batch in batches)

        async def client() -> None:
            while not queue.empty():
                offset, kind, batches = queue.get_nowait()
                due = started + self.scale.send_seconds * offset / total
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if kind == "one":
                    await ingestor.send_one(batches[0][0])
                elif kind == "stream":
                    await ingestor.stream(batches)
                else:
                    await ingestor.send_planned(batches[0])
                async with self.progress:
                    self.sent += sum(len(batch) for batch in batches)
                    self.progress.notify_all()

        await asyncio.gather(*(client() for _ in range(self.scale.senders)))
        self.say(f"  workload sent in {time.monotonic() - started:.1f} s")
        self.send_done.set()

    async def _sent(self, share: float, total: int) -> None:
        """Returns once ``share`` of the ``total`` sends are done."""
        async with self.progress:
            while self.sent < share * total:
                await self.progress.wait()

    async def edits(self, editor: SegmentEditor, total: int) -> None:
        for edit in EDITS:
            await self._sent(edit.at, total)
            await editor.apply(edit)

    async def profile_edits(self, editor: ProfileEditor, workload: Workload) -> None:
        await self._sent(ERASE_AT, len(workload.events))
        for user in workload.erasures:
            await editor.erase(user)
        await self._sent(MERGE_AT, len(workload.events))
        for source, target in workload.merges:
            await editor.merge(source, target)

    # Faults.

    async def flood(self, index: int) -> None:
        """Events from many clients at once, as fast as ingest takes them, until at least
        ``flood_events`` are in and ingest has refused each client a few times (or a
        minute has passed); ingest's memory is sampled meanwhile."""
        ingestor = Ingestor(self.channels["ingest"], self.flood_stats, _now)
        events = flood_events(index, _FLOOD_PROFILES[self.scale.name])
        result = _Flood(baseline_rss=self.cluster.rss("ingest") or 0)
        result.peak_rss = result.baseline_rss
        exhausted_before = self.flood_stats.resource_exhausted
        started = time.monotonic()

        def over() -> bool:
            refused = self.flood_stats.resource_exhausted - exhausted_before
            enough = result.events >= self.scale.flood_events and refused >= _FLOOD_REFUSALS
            return enough or time.monotonic() - started > _FLOOD_LIMIT

        async def sample() -> None:
            while True:
                result.peak_rss = max(result.peak_rss, self.cluster.rss("ingest") or 0)
                await asyncio.sleep(0.05)

        async def client() -> None:
            while not over():
                batch = list(itertools.islice(events, _FLOOD_BATCH))
                result.events += len(batch)
                await ingestor.send_batch(batch)

        sampler = asyncio.create_task(sample())
        try:
            await asyncio.gather(*(client() for _ in range(_FLOOD_CLIENTS)))
        finally:
            sampler.cancel()
        result.seconds = time.monotonic() - started
        result.resource_exhausted = self.flood_stats.resource_exhausted - exhausted_before
        self.floods.append(result)
        self.say(
            f"  flood {index}: {result.events} events in {result.seconds:.1f} s,"
            f" {result.resource_exhausted} RESOURCE_EXHAUSTED,"
            f" ingest RSS {result.baseline_rss / _MB:.0f} → peak {result.peak_rss / _MB:.0f} MB"
        )

    async def fault(self, kind: str, subscriber: Subscriber) -> None:
        rng = self.rng
        started = time.monotonic()
        verb, _, target = kind.partition(" ")
        if verb == "kill":
            await self.cluster.kill_service(target, rng.uniform(0.2, 2.0))
        elif kind == "crash redis":
            await self.cluster.crash_redis(rng.uniform(0.2, 1.5))
        elif kind == "crash postgres":
            await self.cluster.crash_postgres(rng.uniform(0.2, 1.5), immediate=True)
        elif kind == "restart postgres":
            await self.cluster.crash_postgres(rng.uniform(0.2, 1.5), immediate=False)
        elif kind == "cut postgres":
            self.cluster.cut_postgres()
        elif kind == "cut redis":
            self.cluster.cut_redis()
        elif kind == "drop subscriber":
            subscriber.drop()
        else:
            await self.flood(self.faults["flood"])
        self.faults[kind] += 1
        self.say(f"  fault: {kind} ({time.monotonic() - started:.1f} s)")

    async def inject(self, subscriber: Subscriber) -> None:
        """Faults at random moments, paced to spread one pass of every kind over the
        workload's sending time, and on (at that pace) until the workload is sent."""
        rng = self.rng
        plan: list[str] = []
        for round_index in range(self.scale.fault_rounds):
            kinds = list(FAULTS)
            if round_index < self.scale.floods:
                kinds.append("flood")
            rng.shuffle(kinds)
            plan.extend(kinds)
        gap = self.scale.send_seconds / len(plan)
        dropping = asyncio.create_task(self.drop_now_and_then(subscriber, gap))
        started = time.monotonic()
        index = 0
        try:
            while True:
                if index == len(plan):
                    if self.send_done.is_set():
                        return
                    kinds = list(FAULTS)
                    rng.shuffle(kinds)
                    plan.extend(kinds)
                due = started + gap * (index + rng.uniform(0.1, 0.9))
                await asyncio.sleep(max(0.05, due - time.monotonic()))
                await self.fault(plan[index], subscriber)
                index += 1
        finally:
            dropping.cancel()

    async def drop_now_and_then(self, subscriber: Subscriber, gap: float) -> None:
        """Drops the subscriber's stream at random moments besides the planned faults."""
        rng = random.Random(self.seed * 17 + 3)
        while True:
            await asyncio.sleep(rng.expovariate(1 / gap))
            subscriber.drop()
            self.faults["drop subscriber"] += 1

    async def failed_events(self) -> int:
        stub = ingest_service_pb2_grpc.IngestServiceStub(self.channels["ingest"])
        count = 0
        token = ""
        while True:
            reply = await stub.ListFailedEvents(
                ingest_service_pb2.ListFailedEventsRequest(
                    parent=PARENT, page_size=1000, page_token=token
                ),
                timeout=30,
            )
            count += len(reply.failed_events)
            token = reply.next_page_token
            if not token:
                return count

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        now = _now()
        workload = plan_workload(self.seed, self.scale, now)
        self.say(
            f"workload: {workload.unique_events} events ({len(workload.events)} sends) of"
            f" {workload.users} users ({workload.anonymous_visitors} first anonymous) in"
            f" {workload.accounts} accounts; {len(INITIAL_SEGMENTS)} segments,"
            f" {len(EDITS)} edits"
        )
        editor = SegmentEditor(self.channels["segment_engine"], self.say)
        profile_editor = ProfileEditor(self.channels["profile"], self.say)
        subscriber = Subscriber(self.channels["segment_engine"], start_time=now - 1_000_000)
        watching = asyncio.create_task(subscriber.run())
        tasks: list[asyncio.Task[None]] = []
        try:
            for spec in INITIAL_SEGMENTS:
                await editor.create(spec)
            tasks = [
                asyncio.create_task(self.send(workload.events)),
                asyncio.create_task(self.edits(editor, len(workload.events))),
                asyncio.create_task(self.profile_edits(profile_editor, workload)),
                asyncio.create_task(self.inject(subscriber)),
            ]
            await asyncio.gather(*tasks)
            self.say(f"faults over after {time.monotonic() - started:.1f} s; draining")
            redis = Redis.from_url(self.cluster.redis_url)
            try:
                drain_seconds = await drain(
                    redis,
                    self.channels["profile"],
                    self.channels["segment_engine"],
                    self.say,
                    within=120.0 + self.scale.send_seconds,
                )
            finally:
                await redis.aclose()
            acknowledged = self.stats.acknowledged | self.flood_stats.acknowledged
            # Events naming a user who was erased: gone, or never applied. Those naming
            # the user's own id must be in no history once the erasure answered.
            erased = set(profile_editor.erased)
            must_be_gone = {
                planned.event_id for planned in workload.events if planned.event.user_id in erased
            }
            verdict = await judge(
                self.channels["profile"],
                self.channels["segment_engine"],
                subscriber,
                acknowledged - workload.erased_events(),
                must_be_gone,
                workload.account_markers,
                [segment_name(e.spec.segment_id) for e in EDITS if e.action == "delete"],
                self.say,
            )
            failed = await self.failed_events()
        finally:
            for task in [*tasks, watching]:
                task.cancel()
            await asyncio.gather(*tasks, watching, return_exceptions=True)
        for example in [
            *(f"lost: {e}" for e in verdict.lost_examples),
            *(f"mismatch: {e}" for e in verdict.mismatch_examples),
            *(f"stream: {e}" for e in verdict.stream_examples),
            *(f"sql: {e}" for e in verdict.sql_examples),
            *(f"unexpected: {e}" for e in self.stats.unexpected + self.flood_stats.unexpected),
            *(f"rejected: {e}" for e in (self.stats.rejected + self.flood_stats.rejected)[:10]),
            *(f"segment edit: {e}" for e in editor.unexpected),
            *(f"profile edit: {e}" for e in profile_editor.unexpected),
            *(f"erasure leak: {e}" for e in verdict.erasure_leak_examples),
            *(f"subscriber: {e}" for e in subscriber.unexpected),
            *(
                f"{e.service} exited with {e.code}: ...{e.log_tail[-600:]}"
                for e in self.cluster.exits
            ),
        ]:
            self.say(f"  {example}")
        peak = max((flood.peak_rss for flood in self.floods), default=0)
        return {
            "seed": self.seed,
            "mode": self.scale.name,
            "lost": verdict.lost,
            "mismatches": verdict.mismatches,
            "gaps": verdict.gaps,
            "order_violations": verdict.order_violations,
            "duplicates": verdict.duplicates,
            "peak_rss_mb": round(peak / _MB, 1),
            "faults": dict(sorted(self.faults.items())),
            "double_applied": verdict.double_applied,
            "erasure_leaks": verdict.erasure_leaks,
            "profile_edits": {
                "erased": len(profile_editor.erased),
                "merged": len(profile_editor.merged),
                "planned": len(workload.erasures) + len(workload.merges),
            },
            "sql_disagreements": verdict.sql_disagreements,
            "failed_events": failed,
            "rejected": len(self.stats.rejected) + len(self.flood_stats.rejected),
            "unexpected_errors": len(self.stats.unexpected)
            + len(self.flood_stats.unexpected)
            + len(editor.unexpected)
            + len(profile_editor.unexpected)
            + len(subscriber.unexpected),
            "service_exits": dict(Counter(e.service for e in self.cluster.exits)),
            "events": {
                "unique": workload.unique_events,
                "sends": len(workload.events),
                "acknowledged": len(self.stats.acknowledged),
                "duplicate_replies": self.stats.duplicates_reported,
                "failed_calls": dict(self.stats.failed_calls + self.flood_stats.failed_calls),
            },
            "flood": {
                "events": sum(flood.events for flood in self.floods),
                "resource_exhausted": sum(flood.resource_exhausted for flood in self.floods),
                "seconds": round(sum(flood.seconds for flood in self.floods), 1),
                "baseline_rss_mb": round(
                    min((f.baseline_rss for f in self.floods), default=0) / _MB, 1
                ),
            },
            "subscriber": {
                "streams": subscriber.opened,
                "drops": subscriber.drops,
                "errors": dict(subscriber.errors),
                "changes": verdict.changes_received,
                "stream_skipped": verdict.stream_skipped,
                "causes": dict(verdict.causes),
            },
            "profiles": verdict.profiles,
            "accounts": verdict.accounts,
            "segments": verdict.segments,
            "memberships": verdict.members,
            "check_rounds": verdict.rounds,
            "deferred_pairs": verdict.deferred_pairs,
            "drain_seconds": round(drain_seconds, 1),
            "elapsed_seconds": round(time.monotonic() - started, 1),
        }


async def run_faults(
    seed: int, scale: Scale, root: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the fault test at ``scale`` from ``seed`` in ``root``; returns the report."""
    started = time.monotonic()

    def timed(line: str) -> None:
        say(f"[{time.monotonic() - started:6.1f}s] {line}")

    timed(f"fault run, seed {seed}, {scale.name} form, in {root}")
    cluster = Cluster(root, SERVICE_SETTINGS, timed)
    try:
        await cluster.start()
        timed("suite up: 4 services, PostgreSQL and Redis behind cutting proxies")
        run = _Run(seed, scale, cluster, timed)
        try:
            return await cluster.guard(run.run())
        finally:
            await run.close()
    finally:
        await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--long", action="store_true", help="the long form (make faults)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="a directory to keep data in")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    scale = LONG if args.long else SHORT
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run_faults(seed, scale, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="audience-faults-") as directory:
            report = asyncio.run(run_faults(seed, scale, Path(directory)))
    print(json.dumps(report), flush=True)
    failed = any(report[key] for key in ("lost", "mismatches", "gaps", "order_violations"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
