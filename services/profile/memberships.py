"""The segments a profile or an account is in, asked of the segment engine over gRPC."""

from __future__ import annotations

import logging

import grpc
import grpc.aio

from audience.channels import Channels
from audience.v1 import membership_service_pb2, membership_service_pb2_grpc

__all__ = ["Memberships"]

_log = logging.getLogger(__name__)

# A member in more segments than this is shown with the first ones only.
_MAX_PAGES = 10


class Memberships:
    """A client of ``MembershipService.ListMemberships``.

    Reads degrade rather than fail: when the engine does not answer in time, a profile is
    returned without its segments and the reason is logged.
    """

    def __init__(self, channels: Channels, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._channels = channels
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> membership_service_pb2_grpc.MembershipServiceStub:
        if self._channel is None:
            self._channel = self._channels.open(self.address)
        return membership_service_pb2_grpc.MembershipServiceStub(self._channel)

    async def segments(self, member: str) -> list[str] | None:
        """The names of the segments ``member`` is in; ``None`` when the engine did not say."""
        stub = self._stub()
        found: list[str] = []
        token = ""
        for _ in range(_MAX_PAGES):
            try:
                response = await stub.ListMemberships(
                    membership_service_pb2.ListMembershipsRequest(parent=member, page_token=token),
                    timeout=self.timeout,
                )
            except grpc.aio.AioRpcError as error:
                _log.warning(
                    "segments of %s left out: the segment engine at %s answered %s: %s",
                    member,
                    self.address,
                    error.code().name,
                    error.details(),
                )
                return None
            found.extend(membership.segment for membership in response.memberships)
            token = response.next_page_token
            if not token:
                break
        return found

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
