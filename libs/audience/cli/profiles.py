"""``audience profiles get | erase`` and ``audience accounts get``.

Profiles and accounts are named by id within ``--dataset`` (or ``AUDIENCE_DATASET``), or
by their full resource names (``datasets/shop/profiles/u42``); a profile can also be found
by one of its identities (``--identity email=ada@example.com``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC
from typing import TypeVar

import click
import grpc.aio
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from audience.cli.connection import connect, connection_options
from audience.cli.names import DATASET_OPTION, dataset_name, resource_name
from audience.errors import decode
from audience.v1 import (
    common_pb2,
    event_pb2,
    profile_pb2,
    profile_service_pb2,
    profile_service_pb2_grpc,
)

__all__ = ["accounts", "profiles"]

T = TypeVar("T")

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the resource as JSON.")


def _call(
    address: str, action: Callable[[profile_service_pb2_grpc.ProfileServiceStub], Awaitable[T]]
) -> T:
    async def run() -> T:
        async with connect(address) as channel:
            return await action(profile_service_pb2_grpc.ProfileServiceStub(channel))

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as error:
        decoded = decode(error)
        lines = [f"{decoded.code.name}: {decoded.message}"]
        lines += [f"  {v.field}: {v.description}" for v in decoded.violations]
        raise click.ClickException("\n".join(lines)) from None


def _print_json(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "—"
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def _value(value: common_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return f"{value.number_value:g}"
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "timestamp_value":
        return _when(value.timestamp_value)
    if kind is None or kind == "null_value":
        return "null"
    return json_format.MessageToJson(value, indent=None)


def _facts(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _attributes(attributes: Iterable[tuple[str, common_pb2.Value]]) -> Table:
    table = Table(title="Attributes", title_justify="left")
    table.add_column("name")
    table.add_column("value")
    for key, value in sorted(attributes):
        table.add_row(key, _value(value))
    return table


def _event_label(event: event_pb2.Event) -> str:
    kind = event_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_").lower()
    return event.name if event.type == event_pb2.EVENT_TYPE_TRACK else kind


def _show_profile(profile: profile_pb2.Profile) -> None:
    console = Console()
    session = profile.current_session
    place = profile.last_context.location
    console.print(
        _facts(
            profile.name,
            [
                ("identities", ", ".join(f"{i.type}={i.value}" for i in profile.identities)),
                ("account", profile.account or "—"),
                ("first seen", _when(profile.first_seen_time)),
                ("last seen", _when(profile.last_seen_time)),
                ("visits", f"{profile.visit_count:,}"),
                ("events", f"{profile.event_count:,}"),
                ("orders", f"{profile.order_count:,}"),
                ("lifetime value", f"{profile.lifetime_value:,.2f}"),
                ("last place", ", ".join(p for p in (place.city, place.country) if p) or "—"),
                ("merged from", ", ".join(profile.merged_profiles) or "—"),
                ("sequence", str(profile.sequence)),
            ],
        )
    )
    if profile.attributes:
        console.print(_attributes(profile.attributes.items()))
    if profile.HasField("current_session"):
        console.print(
            _facts(
                "Current visit",
                [
                    ("session", session.session_id),
                    ("started", _when(session.start_time)),
                    ("last activity", _when(session.last_activity_time)),
                    ("visit number", str(session.visit_number)),
                    ("pages", str(session.page_view_count)),
                    ("landing page", session.landing_page or "—"),
                    ("source", session.source or "—"),
                    ("referrer", session.referrer or "—"),
                    (
                        "cart",
                        f"{len(session.cart.items)} items, {session.cart.value:,.2f} "
                        f"{session.cart.currency}".strip()
                        if session.HasField("cart")
                        else "—",
                    ),
                ],
            )
        )
    if profile.segments:
        console.print(_facts("Segments", [(segment, "") for segment in profile.segments]))
    if profile.aggregates:
        table = Table(title="Aggregates", title_justify="left")
        table.add_column("aggregate")
        table.add_column("buckets", justify="right")
        table.add_column("count", justify="right")
        table.add_column("last event")
        for aggregate in profile.aggregates:
            last = max(
                (b.last_time for b in aggregate.buckets if b.HasField("last_time")),
                key=lambda stamp: (stamp.seconds, stamp.nanos),
                default=timestamp_pb2.Timestamp(),
            )
            table.add_row(
                aggregate.aggregate_id,
                str(len(aggregate.buckets)),
                f"{sum(b.count for b in aggregate.buckets):,}",
                _when(last),
            )
        console.print(table)
    if profile.recent_events:
        table = Table(title="Recent events", title_justify="left")
        table.add_column("time")
        table.add_column("event")
        table.add_column("id")
        for event in profile.recent_events:
            table.add_row(_when(event.timestamp), _event_label(event), event.event_id)
        console.print(table)


@click.group()
def profiles() -> None:
    """Read and erase unified customer profiles."""


@profiles.command("get")
@connection_options
@DATASET_OPTION
@click.argument("profile", required=False)
@click.option("--identity", help="Find the profile by an identity, TYPE=VALUE.")
@click.option(
    "--view",
    type=click.Choice(["basic", "full"]),
    default="full",
    show_default=True,
    help="full adds aggregates, segments and recent events.",
)
@JSON_OPTION
def get_profile(
    address: str,
    dataset: str,
    profile: str | None,
    identity: str | None,
    view: str,
    as_json: bool,
) -> None:
    """Shows PROFILE (an id or a resource name), or the profile with --identity."""
    request = profile_service_pb2.GetProfileRequest(
        view=profile_pb2.PROFILE_VIEW_FULL if view == "full" else profile_pb2.PROFILE_VIEW_BASIC
    )
    if (profile is None) == (identity is None):
        raise click.UsageError("give a PROFILE or --identity, not both")
    if profile is not None:
        request.name = resource_name(profile, dataset, "profiles")
    else:
        kind, sep, value = (identity or "").partition("=")
        if not sep or not kind or not value:
            raise click.UsageError("--identity takes TYPE=VALUE, such as email=ada@example.com")
        request.dataset = dataset_name(dataset)
        request.identity.CopyFrom(common_pb2.Identity(type=kind, value=value))

    async def action(stub: profile_service_pb2_grpc.ProfileServiceStub) -> profile_pb2.Profile:
        response: profile_service_pb2.GetProfileResponse = await stub.GetProfile(
            request, timeout=30
        )
        return response.profile

    found = _call(address, action)
    if as_json:
        _print_json(found)
    else:
        _show_profile(found)


@profiles.command("erase")
@connection_options
@DATASET_OPTION
@click.argument("profile")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@JSON_OPTION
def erase_profile(address: str, dataset: str, profile: str, yes: bool, as_json: bool) -> None:
    """Erases PROFILE for good (GDPR): its history, identities and aggregates.

    Later events for its identities are suppressed until they are released.
    """
    name = resource_name(profile, dataset, "profiles")
    if not yes:
        click.confirm(f"Erase {name} and everything known about it?", abort=True)

    async def action(stub: profile_service_pb2_grpc.ProfileServiceStub) -> profile_pb2.Erasure:
        response: profile_service_pb2.EraseProfileResponse = await stub.EraseProfile(
            profile_service_pb2.EraseProfileRequest(name=name), timeout=60
        )
        return response.erasure

    erasure = _call(address, action)
    if as_json:
        _print_json(erasure)
        return
    Console().print(
        _facts(
            f"Erased {erasure.profile}",
            [
                ("at", _when(erasure.erase_time)),
                ("events deleted", f"{erasure.deleted_event_count:,}"),
                (
                    "identities suppressed",
                    ", ".join(f"{i.type}={i.value}" for i in erasure.identities),
                ),
            ],
        )
    )


@click.group()
def accounts() -> None:
    """Read unified account profiles."""


@accounts.command("get")
@connection_options
@DATASET_OPTION
@click.argument("account")
@click.option("--users", default=20, show_default=True, help="How many of its users to list.")
@JSON_OPTION
def get_account(address: str, dataset: str, account: str, users: int, as_json: bool) -> None:
    """Shows ACCOUNT (an id or a resource name) with its roll-ups and users."""
    name = resource_name(account, dataset, "accounts")

    async def action(
        stub: profile_service_pb2_grpc.ProfileServiceStub,
    ) -> tuple[profile_pb2.Account, list[profile_pb2.Profile]]:
        found = (
            await stub.GetAccount(profile_service_pb2.GetAccountRequest(name=name), timeout=30)
        ).account
        members: list[profile_pb2.Profile] = []
        if users > 0:
            listed = await stub.ListAccountProfiles(
                profile_service_pb2.ListAccountProfilesRequest(
                    parent=name, page_size=min(users, 1000)
                ),
                timeout=30,
            )
            members = list(listed.profiles)
        return found, members

    found, members = _call(address, action)
    if as_json:
        _print_json(found)
        return
    console = Console()
    console.print(
        _facts(
            found.name,
            [
                ("users", f"{found.user_count:,}"),
                ("orders", f"{found.order_count:,}"),
                ("lifetime value", f"{found.lifetime_value:,.2f}"),
                ("first seen", _when(found.first_seen_time)),
                ("last seen", _when(found.last_seen_time)),
                ("segments", ", ".join(found.segments) or "—"),
                ("sequence", str(found.sequence)),
            ],
        )
    )
    if found.attributes:
        console.print(_attributes(found.attributes.items()))
    if members:
        table = Table(title="Users", title_justify="left")
        table.add_column("profile")
        table.add_column("last seen")
        table.add_column("orders", justify="right")
        table.add_column("lifetime value", justify="right")
        for member in members:
            table.add_row(
                member.name.rpartition("/")[2],
                _when(member.last_seen_time),
                f"{member.order_count:,}",
                f"{member.lifetime_value:,.2f}",
            )
        console.print(table)
