"""Webhook requests, through httpx."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

import httpx

from services.export.ports import WebhookResponse

__all__ = ["HttpSender"]

_USER_AGENT = "audience-webhooks/1"
_BODY_EXCERPT = 200


class HttpSender:
    """POSTs webhook bodies. Redirects are not followed: a receiver that moved must have
    its subscription's URL changed, so signed bodies never travel to an unvetted host."""

    def __init__(self, timeout: timedelta, *, max_connections: int = 64) -> None:
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            timeout=timeout.total_seconds(),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_connections),
            headers={"User-Agent": _USER_AGENT},
        )

    async def post(self, url: str, body: str, headers: Mapping[str, str]) -> WebhookResponse:
        try:
            response = await self._client.post(url, content=body.encode(), headers=dict(headers))
        except httpx.TimeoutException:
            return WebhookResponse(
                0, f"no answer within {self._timeout.total_seconds():g}s from {url}"
            )
        except httpx.HTTPError as error:
            return WebhookResponse(0, f"{type(error).__name__}: {error}")
        if 200 <= response.status_code < 300:
            return WebhookResponse(response.status_code, "")
        excerpt = response.text[:_BODY_EXCERPT]
        return WebhookResponse(
            response.status_code, f"HTTP {response.status_code}: {excerpt}".rstrip(": ")
        )

    async def close(self) -> None:
        await self._client.aclose()
