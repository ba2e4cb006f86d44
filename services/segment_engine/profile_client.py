"""The profile service as the engine calls it: rule queries (backfills and previews) and
aggregate registration, over gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio

from audience.errors import AudienceError, decode, failed_precondition, unavailable
from audience.rules import timestamp_from_micros
from audience.v1 import (
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
    rule_pb2,
    segment_pb2,
)
from services.segment_engine.domain.model import Kind, dataset_name

__all__ = ["ProfileClient", "ProfileQueries", "QueryChunk", "ReferencedSegment"]

_READY = profile_pb2.AggregateSpec.STATE_READY


@dataclass(frozen=True, slots=True)
class QueryChunk:
    """One response of a rule query: matching ids (increasing) and progress."""

    ids: list[str]
    scanned: int
    total: int
    matched: int


@dataclass(frozen=True, slots=True)
class ReferencedSegment:
    """A segment a queried rule refers to: its rule, or an imported segment's members."""

    name: str
    rule: rule_pb2.Rule | None = None
    members: Sequence[str] = ()


class ProfileQueries(Protocol):
    """What the engine asks of the profile service."""

    async def register_aggregates(
        self, dataset: str, specs: Sequence[profile_pb2.AggregateSpec]
    ) -> list[str]: ...

    async def wait_ready(self, dataset: str, aggregate_ids: Sequence[str], wait: float) -> None: ...

    def query(
        self,
        dataset: str,
        kind: Kind,
        rule: rule_pb2.Rule,
        referenced: Sequence[ReferencedSegment],
        *,
        evaluation_time: int | None = None,
        limit: int = 0,
        count_only: bool = False,
        chunk_size: int = 0,
    ) -> AsyncIterator[QueryChunk]: ...


def _peer_error(error: grpc.aio.AioRpcError) -> AudienceError:
    decoded = decode(error)
    if decoded.code == grpc.StatusCode.INVALID_ARGUMENT:
        return failed_precondition(
            f"The profile service refused the rule: {decoded.message}",
            *decoded.violations,
            reason="PROFILE_QUERY_REFUSED",
        )
    return unavailable(
        f"The profile service failed: {decoded.code.name}: {decoded.message}",
        reason="PROFILE_SERVICE_UNAVAILABLE",
    )


class ProfileClient:
    """:class:`ProfileQueries` over a channel to ProfileService."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 30.0) -> None:
        self._stub = profile_service_pb2_grpc.ProfileServiceStub(channel)
        self._timeout = timeout

    async def register_aggregates(
        self, dataset: str, specs: Sequence[profile_pb2.AggregateSpec]
    ) -> list[str]:
        """Registers aggregates; returns their ids."""
        ids: list[str] = []
        for start in range(0, len(specs), 10_000):
            try:
                response = await self._stub.RegisterAggregates(
                    profile_service_pb2.RegisterAggregatesRequest(
                        parent=dataset_name(dataset), aggregates=specs[start : start + 10_000]
                    ),
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as error:
                raise _peer_error(error) from None
            ids.extend(spec.aggregate_id for spec in response.aggregates)
        return ids

    async def wait_ready(self, dataset: str, aggregate_ids: Sequence[str], wait: float) -> None:
        """Waits until every aggregate holds its whole history."""
        waiting = set(aggregate_ids)
        deadline = time.monotonic() + wait
        delay = 0.05
        while waiting:
            token = ""
            ready: set[str] = set()
            while True:
                try:
                    response = await self._stub.ListAggregates(
                        profile_service_pb2.ListAggregatesRequest(
                            parent=dataset_name(dataset), page_size=10_000, page_token=token
                        ),
                        timeout=self._timeout,
                    )
                except grpc.aio.AioRpcError as error:
                    raise _peer_error(error) from None
                ready.update(
                    spec.aggregate_id for spec in response.aggregates if spec.state == _READY
                )
                token = response.next_page_token
                if not token:
                    break
            waiting -= ready
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise unavailable(
                    f"{len(waiting)} aggregates were not ready in time.",
                    reason="AGGREGATES_NOT_READY",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def query(
        self,
        dataset: str,
        kind: Kind,
        rule: rule_pb2.Rule,
        referenced: Sequence[ReferencedSegment],
        *,
        evaluation_time: int | None = None,
        limit: int = 0,
        count_only: bool = False,
        chunk_size: int = 0,
    ) -> AsyncIterator[QueryChunk]:
        request = profile_service_pb2.QueryProfilesRequest(
            parent=dataset_name(dataset),
            kind=segment_pb2.SegmentKind.ValueType(kind),
            rule=rule,
            limit=limit,
            count_only=count_only,
            chunk_size=chunk_size,
        )
        for segment in referenced:
            definition = request.referenced_segments.add(segment=segment.name)
            if segment.rule is not None:
                definition.rule.CopyFrom(segment.rule)
            else:
                definition.members.profile_ids.extend(segment.members)
        if evaluation_time is not None:
            request.evaluation_time.CopyFrom(timestamp_from_micros(evaluation_time))
        call = self._stub.QueryProfiles(request)
        try:
            async for response in call:
                yield QueryChunk(
                    ids=list(response.profile_ids),
                    scanned=response.scanned_count,
                    total=response.total_count,
                    matched=response.matched_count,
                )
        except grpc.aio.AioRpcError as error:
            raise _peer_error(error) from None
        finally:
            call.cancel()
