"""Per-call authentication and tenancy: API keys in call metadata, mapped to datasets and
scopes, enforced by one server interceptor.

A caller sends ``authorization: Bearer <key>``. The server keeps only the SHA-256 of each
key (``AUDIENCE_API_KEYS`` or ``AUDIENCE_API_KEYS_FILE``), with the datasets the key may use
and its scopes. :class:`AuthInterceptor` then, for every RPC:

1. lets health checks and reflection through (Kubernetes probes carry no key);
2. finds the key (``UNAUTHENTICATED`` when it is missing or unknown);
3. checks the scope the RPC needs (:data:`RPC_SCOPES`; ``PERMISSION_DENIED``);
4. reads every dataset the request names, from its resource-name fields
   (:data:`RESOURCE_FIELDS`, found at any depth: ``parent``, ``segment.name``, a rule's
   segment references, …), and refuses a dataset the key may not use
   (``PERMISSION_DENIED``). Every message of a client stream is checked before the handler
   sees it.

Errors carry an ``ErrorInfo`` reason (:data:`REASONS`) through :mod:`audience.errors`.
docs/security.md is the operator's guide; docs/adr/0008-authentication.md says why.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import grpc
import grpc.aio
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from audience import errors
from audience.config import ConfigError, Env
from audience.errors import AudienceError, Behavior, FieldViolation, wrap_handler

__all__ = [
    "API_KEYS_FILE_VARIABLE",
    "API_KEYS_VARIABLE",
    "AUTH_MODES",
    "DEV_KEY_FILE",
    "INTERNAL_KEY_VARIABLE",
    "OPEN_SERVICES",
    "REASONS",
    "RESOURCE_FIELDS",
    "RPC_SCOPES",
    "SCOPES",
    "ApiKey",
    "AuthConfig",
    "AuthInterceptor",
    "AuthMode",
    "KeyRing",
    "Scope",
    "generate_api_key",
    "hash_api_key",
    "load_or_create_dev_key",
    "parse_api_keys",
    "read_dev_key",
    "requested_datasets",
    "top_level_resource_fields",
]

_log = logging.getLogger(__name__)

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
AuthMode = Literal["enabled", "disabled"]
AUTH_MODES: tuple[AuthMode, ...] = ("enabled", "disabled")

API_KEYS_VARIABLE = "AUDIENCE_API_KEYS"
API_KEYS_FILE_VARIABLE = "AUDIENCE_API_KEYS_FILE"
INTERNAL_KEY_VARIABLE = "AUDIENCE_INTERNAL_API_KEY"
DEV_KEY_FILE = "dev-api-key"
"""The development key of ``audience up``, in the data directory."""

REASONS = (
    "API_KEY_MISSING",
    "API_KEY_INVALID",
    "SCOPE_MISSING",
    "DATASET_FORBIDDEN",
    "METHOD_NOT_ALLOWED",
    "INVALID_RESOURCE_NAME",
    "DATASET_REQUIRED",
)
"""Every ``ErrorInfo`` reason this module sends."""

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
"""Served to anyone: probes carry no credentials, and reflection describes only the API."""

# Reading is harmless to the data; writing adds or changes it; admin is what cannot be
# undone or reaches outside the dataset's data: erasure, merges, deletions, replays, and
# destinations (an SFTP destination names a secret of the export service's environment,
# so whoever edits destinations decides where those credentials are sent).
_SCOPES_BY_SERVICE: dict[str, dict[str, Scope]] = {
    "audience.v1.IngestService": {
        "SendEvent": "write",
        "SendEvents": "write",
        "StreamEvents": "write",
        "ListFailedEvents": "read",
        "ReplayFailedEvents": "admin",
    },
    "audience.v1.ProfileService": {
        "GetProfile": "read",
        "ListProfileEvents": "read",
        "GetAccount": "read",
        "ListAccountProfiles": "read",
        "MergeProfiles": "admin",
        "EraseProfile": "admin",
        "ReleaseErasedIdentities": "admin",
        "QueryProfiles": "read",
        "RegisterAggregates": "write",
        "ListAggregates": "read",
    },
    "audience.v1.SegmentService": {
        "CreateSegment": "write",
        "GetSegment": "read",
        "ListSegments": "read",
        "UpdateSegment": "write",
        "DeleteSegment": "admin",
        "ValidateRule": "read",
        "PreviewSegment": "read",
        "ImportSegmentMembers": "write",
        "GetSegmentStats": "read",
    },
    "audience.v1.MembershipService": {
        "ListMemberships": "read",
        "CheckMembership": "read",
        "ListSegmentMembers": "read",
        "StreamSegmentMembers": "read",
        "CountSegmentMembers": "read",
        "ExplainMembership": "read",
        "WatchMembershipChanges": "read",
    },
    "audience.v1.ExportService": {
        "ExportSegmentCsv": "read",
        "CreateDestination": "admin",
        "GetDestination": "read",
        "ListDestinations": "read",
        "UpdateDestination": "admin",
        "DeleteDestination": "admin",
        "CreateExportJob": "write",
        "GetExportJob": "read",
        "ListExportJobs": "read",
        "CancelExportJob": "write",
        "CreateSchedule": "write",
        "GetSchedule": "read",
        "ListSchedules": "read",
        "UpdateSchedule": "write",
        "DeleteSchedule": "admin",
        "RunSchedule": "write",
        "CreateWebhookSubscription": "write",
        "GetWebhookSubscription": "read",
        "ListWebhookSubscriptions": "read",
        "UpdateWebhookSubscription": "write",
        "DeleteWebhookSubscription": "admin",
        "ListWebhookDeliveries": "read",
        "ReplayWebhookDeliveries": "admin",
    },
}

RPC_SCOPES: Mapping[str, Scope] = {
    f"/{service}/{method}": scope
    for service, methods in _SCOPES_BY_SERVICE.items()
    for method, scope in methods.items()
}
"""The scope each RPC needs, by full method name (``/audience.v1.IngestService/SendEvent``).
A hosted RPC without an entry is refused."""

RESOURCE_FIELDS = frozenset(
    {
        # IngestService
        "audience.v1.SendEventRequest.parent",
        "audience.v1.SendEventsRequest.parent",
        "audience.v1.StreamEventsRequest.parent",
        "audience.v1.ListFailedEventsRequest.parent",
        "audience.v1.ReplayFailedEventsRequest.parent",
        "audience.v1.ReplayFailedEventsRequest.names",
        # ProfileService
        "audience.v1.GetProfileRequest.name",
        "audience.v1.GetProfileRequest.dataset",
        "audience.v1.ListProfileEventsRequest.parent",
        "audience.v1.GetAccountRequest.name",
        "audience.v1.ListAccountProfilesRequest.parent",
        "audience.v1.MergeProfilesRequest.target",
        "audience.v1.MergeProfilesRequest.sources",
        "audience.v1.EraseProfileRequest.name",
        "audience.v1.ReleaseErasedIdentitiesRequest.parent",
        "audience.v1.QueryProfilesRequest.parent",
        "audience.v1.ReferencedSegment.segment",
        "audience.v1.RegisterAggregatesRequest.parent",
        "audience.v1.ListAggregatesRequest.parent",
        # SegmentService
        "audience.v1.CreateSegmentRequest.parent",
        "audience.v1.GetSegmentRequest.name",
        "audience.v1.ListSegmentsRequest.parent",
        "audience.v1.DeleteSegmentRequest.name",
        "audience.v1.ValidateRuleRequest.parent",
        "audience.v1.PreviewSegmentRequest.parent",
        "audience.v1.ImportSegmentMembersRequest.segment",
        "audience.v1.GetSegmentStatsRequest.name",
        "audience.v1.Segment.name",
        # A rule's references to other segments, at any depth of the rule tree.
        "audience.v1.SegmentCondition.segment",
        # MembershipService
        "audience.v1.ListMembershipsRequest.parent",
        "audience.v1.CheckMembershipRequest.member",
        "audience.v1.CheckMembershipRequest.segment",
        "audience.v1.ListSegmentMembersRequest.parent",
        "audience.v1.StreamSegmentMembersRequest.parent",
        "audience.v1.CountSegmentMembersRequest.segment",
        "audience.v1.ExplainMembershipRequest.member",
        "audience.v1.ExplainMembershipRequest.segment",
        "audience.v1.WatchMembershipChangesRequest.parent",
        "audience.v1.WatchMembershipChangesRequest.segments",
        # ExportService
        "audience.v1.ExportSegmentCsvRequest.segments",
        "audience.v1.CreateDestinationRequest.parent",
        "audience.v1.GetDestinationRequest.name",
        "audience.v1.ListDestinationsRequest.parent",
        "audience.v1.DeleteDestinationRequest.name",
        "audience.v1.Destination.name",
        "audience.v1.CreateExportJobRequest.parent",
        "audience.v1.GetExportJobRequest.name",
        "audience.v1.ListExportJobsRequest.parent",
        "audience.v1.ListExportJobsRequest.schedule",
        "audience.v1.CancelExportJobRequest.name",
        "audience.v1.ExportJob.name",
        "audience.v1.ExportJob.segments",
        "audience.v1.ExportJob.destination",
        "audience.v1.ExportJob.schedule",
        "audience.v1.CreateScheduleRequest.parent",
        "audience.v1.GetScheduleRequest.name",
        "audience.v1.ListSchedulesRequest.parent",
        "audience.v1.DeleteScheduleRequest.name",
        "audience.v1.RunScheduleRequest.name",
        "audience.v1.Schedule.name",
        "audience.v1.Schedule.last_job",
        "audience.v1.CreateWebhookSubscriptionRequest.parent",
        "audience.v1.GetWebhookSubscriptionRequest.name",
        "audience.v1.ListWebhookSubscriptionsRequest.parent",
        "audience.v1.DeleteWebhookSubscriptionRequest.name",
        "audience.v1.ListWebhookDeliveriesRequest.parent",
        "audience.v1.ReplayWebhookDeliveriesRequest.parent",
        "audience.v1.ReplayWebhookDeliveriesRequest.names",
        "audience.v1.WebhookSubscription.name",
        "audience.v1.WebhookSubscription.segments",
    }
)
"""Fields that hold resource names (``datasets/{dataset}/…``), as ``package.Message.field``.

Wherever one of these messages appears in a request, at any depth, its fields listed here
name a dataset the caller must be allowed to use. Output-only names are listed too: a
request that carries another dataset's name anywhere is refused rather than trusted to be
ignored. Rule *text* is not read here; the rule validator confines a rule's segment
references to the segment's own dataset.
"""

# `datasets/{dataset}` then anything; the services read the dataset the same way (the first
# path segment after `datasets/`), so the interceptor and the handler never disagree.
_RESOURCE_NAME = re.compile(r"datasets/(?P<dataset>[^/]+)(?:/.*)?", re.DOTALL)
_DATASET_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(?P<key>\S{1,512})")
_KEY_PREFIX = "aud_"
_MIN_INTERNAL_KEY_LENGTH = 32


def hash_api_key(key: str) -> str:
    """Returns the hex SHA-256 of ``key``: what ``AUDIENCE_API_KEYS`` stores.

    Same as ``printf %s "$KEY" | sha256sum``.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def generate_api_key() -> str:
    """Returns a new key: ``aud_`` and 256 random bits, URL-safe base64.

    The prefix lets secret scanners recognise a leaked key.
    """
    return _KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """An accepted key: its hash, the datasets it may use and what it may do."""

    name: str
    """A label for logs and errors (``crm``, ``internal``); never the key."""
    sha256: str = field(repr=False)
    datasets: frozenset[str] | None
    """The datasets the key may use; ``None`` means every dataset (``["*"]``)."""
    scopes: frozenset[Scope]

    def may_use(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets

    def describe(self) -> str:
        datasets = "*" if self.datasets is None else ",".join(sorted(self.datasets))
        scopes = ",".join(scope for scope in SCOPES if scope in self.scopes)
        return f"{self.name} (datasets {datasets}; scopes {scopes})"


class KeyRing:
    """The accepted keys, found by the hash of a presented key.

    A dictionary lookup on the SHA-256 leaks nothing useful through timing: to steer it a
    caller would need keys with chosen hashes.
    """

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys: dict[str, ApiKey] = {}
        for key in keys:
            if key.sha256 in self._keys:
                raise ValueError(f"API keys {self._keys[key.sha256].name!r} and {key.name!r} match")
            self._keys[key.sha256] = key

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys.values())

    def find(self, presented: str) -> ApiKey | None:
        return self._keys.get(hash_api_key(presented))


def parse_api_keys(text: str, source: str) -> tuple[ApiKey, ...]:
    """Reads the JSON list of keys; every problem is a :class:`ConfigError` naming ``source``.

    The format, one object per key::

        [{"name": "crm", "sha256": "<64 hex digits>", "datasets": ["shop"],
          "scopes": ["read", "write"]}]

    ``datasets`` is ``["*"]`` for every dataset.
    """
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{source}: expected a JSON list of keys, got invalid JSON ({error})"
        ) from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected a non-empty JSON list of keys")
    keys: list[ApiKey] = []
    names: set[str] = set()
    hashes: dict[str, str] = {}
    for index, entry in enumerate(entries):
        key = _parse_key(entry, f"{source}: key {index}")
        if key.name in names:
            raise ConfigError(f"{source}: key {index}: the name {key.name!r} is used twice")
        if key.sha256 in hashes:
            raise ConfigError(
                f"{source}: key {index} ({key.name!r}) has the same sha256 as "
                f"{hashes[key.sha256]!r}"
            )
        names.add(key.name)
        hashes[key.sha256] = key.name
        keys.append(key)
    return tuple(keys)


def _parse_key(entry: object, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected an object with name, sha256, datasets, scopes")
    unknown = sorted(set(entry) - {"name", "sha256", "datasets", "scopes"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name must be 1-63 letters, digits and _ . @ - (starting with a letter "
            f"or digit), got {name!r}"
        )
    where = f"{where} ({name!r})"
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        # Never echo the value: it may be the key itself, pasted by mistake.
        raise ConfigError(
            f"{where}: sha256 must be the 64 hex digits of the key's SHA-256 "
            "(`audience keys hash`), not the key itself"
        )
    datasets = entry.get("datasets")
    if (
        not isinstance(datasets, list)
        or not datasets
        or not all(isinstance(dataset, str) for dataset in datasets)
    ):
        raise ConfigError(f'{where}: datasets must be a non-empty list of dataset ids, or ["*"]')
    allowed: frozenset[str] | None
    if "*" in datasets:
        if len(datasets) != 1:
            raise ConfigError(f'{where}: datasets is either ["*"] or a list of dataset ids')
        allowed = None
    else:
        for dataset in datasets:
            if not _DATASET_ID.fullmatch(dataset):
                raise ConfigError(
                    f"{where}: dataset ids are 1-63 lower-case letters, digits and - "
                    f"(starting with a letter or digit), got {dataset!r}"
                )
        allowed = frozenset(datasets)
    scopes = entry.get("scopes")
    if (
        not isinstance(scopes, list)
        or not scopes
        or not all(isinstance(scope, str) and scope in SCOPES for scope in scopes)
    ):
        raise ConfigError(f"{where}: scopes must be a non-empty list of read, write, admin")
    return ApiKey(
        name=name,
        sha256=digest.lower(),
        datasets=allowed,
        scopes=frozenset(scope for scope in SCOPES if scope in scopes),
    )


@dataclass(frozen=True)
class AuthConfig:
    """Authentication as configured in the environment, before any defaults are applied."""

    mode: AuthMode | None
    """``AUDIENCE_AUTH``; ``None`` when unset."""
    keys: tuple[ApiKey, ...]
    """From ``AUDIENCE_API_KEYS`` or ``AUDIENCE_API_KEYS_FILE``; empty when neither is set."""
    keys_source: str | None
    """Which of the two variables the keys came from."""
    internal_key: str | None = field(repr=False)
    """``AUDIENCE_INTERNAL_API_KEY``: what this process presents to the other services."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthConfig:
        env = Env(environ)
        mode_value = env.optional_string("AUDIENCE_AUTH")
        mode = env.choice("AUDIENCE_AUTH", AUTH_MODES, "enabled") if mode_value else None
        inline = env.optional_string(API_KEYS_VARIABLE)
        path = env.optional_string(API_KEYS_FILE_VARIABLE)
        keys: tuple[ApiKey, ...] = ()
        source: str | None = None
        if inline is not None and path is not None:
            raise ConfigError(
                f"{API_KEYS_VARIABLE} and {API_KEYS_FILE_VARIABLE} are both set; set one"
            )
        if inline is not None:
            source = API_KEYS_VARIABLE
            keys = parse_api_keys(inline, source)
        elif path is not None:
            source = API_KEYS_FILE_VARIABLE
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"{source}: cannot read {path!r}: {error}") from None
            keys = parse_api_keys(text, f"{source} ({path})")
        internal = env.optional_string(INTERNAL_KEY_VARIABLE)
        if internal is not None and len(internal) < _MIN_INTERNAL_KEY_LENGTH:
            raise ConfigError(
                f"{INTERNAL_KEY_VARIABLE}: expected a random key of at least "
                f"{_MIN_INTERNAL_KEY_LENGTH} characters (`audience keys create`)"
            )
        return cls(mode=mode, keys=keys, keys_source=source, internal_key=internal)

    def internal_entry(self) -> ApiKey:
        """Returns the accepted key that matches the internal key, checking that it may do
        what services ask of each other (read and write, in every dataset)."""
        if self.internal_key is None:
            raise ConfigError(
                f"{INTERNAL_KEY_VARIABLE}: required when authentication is enabled (the key "
                "this service presents to the others; its sha256 must be in "
                f'{API_KEYS_VARIABLE} with datasets ["*"] and scopes read and write)'
            )
        digest = hash_api_key(self.internal_key)
        for key in self.keys:
            if key.sha256 == digest:
                if key.datasets is not None or not {"read", "write"} <= key.scopes:
                    raise ConfigError(
                        f"{INTERNAL_KEY_VARIABLE}: its entry {key.name!r} in "
                        f'{self.keys_source} needs datasets ["*"] and scopes read and write'
                    )
                return key
        raise ConfigError(
            f"{INTERNAL_KEY_VARIABLE}: its sha256 is not among the keys of "
            f"{self.keys_source or API_KEYS_VARIABLE}"
        )


def read_dev_key(data_dir: Path) -> str | None:
    """Returns the development key that ``audience up`` keeps in ``data_dir``, if any."""
    try:
        key = (data_dir / DEV_KEY_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return key or None


def load_or_create_dev_key(data_dir: Path) -> tuple[str, bool]:
    """Returns the development key of ``data_dir`` and whether it was just created.

    The key is made once and kept in ``<data_dir>/dev-api-key``, readable by its owner only,
    so the suite and the CLI on the same machine agree on it across runs.
    """
    path = data_dir / DEV_KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    key = generate_api_key()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            _log.warning("%s was readable by others (mode %o); making it 0600", path, mode)
            path.chmod(0o600)
        existing = read_dev_key(data_dir)
        if existing is None:
            raise ConfigError(f"{path}: the development key file is empty; delete it") from None
        return existing, False
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key, True


# --- which datasets a request names ------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Where, in one message type, resource names can be found."""

    names: tuple[FieldDescriptor, ...]
    nested: tuple[FieldDescriptor, ...]
    """Message fields (singular, repeated or maps of messages) whose type can hold names."""


def _value_type(field_descriptor: FieldDescriptor) -> Descriptor | None:
    message_type: Descriptor | None = field_descriptor.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        return message_type.fields_by_name["value"].message_type
    return message_type


def _is_map(field_descriptor: FieldDescriptor) -> bool:
    message_type: Descriptor | None = field_descriptor.message_type
    return message_type is not None and bool(message_type.GetOptions().map_entry)


class _Plans:
    """Per message type, the fields to read; built once per type from its descriptor."""

    def __init__(self, resource_fields: frozenset[str]) -> None:
        self._resource_fields = resource_fields
        self._plans: dict[str, _Plan] = {}

    def _reaches(self, root: Descriptor) -> set[str]:
        """Returns the full names of the types under ``root`` that can hold a resource name."""
        types: dict[str, Descriptor] = {}
        stack = [root]
        while stack:
            message_type = stack.pop()
            if message_type.full_name in types:
                continue
            types[message_type.full_name] = message_type
            for field_descriptor in message_type.fields:
                value_type = _value_type(field_descriptor)
                if value_type is not None:
                    stack.append(value_type)
        reaching = {
            name
            for name, message_type in types.items()
            if any(f.full_name in self._resource_fields for f in message_type.fields)
        }
        changed = True
        while changed:
            changed = False
            for name, message_type in types.items():
                if name in reaching:
                    continue
                for field_descriptor in message_type.fields:
                    value_type = _value_type(field_descriptor)
                    if value_type is not None and value_type.full_name in reaching:
                        reaching.add(name)
                        changed = True
                        break
        for name, message_type in types.items():
            if name in self._plans:
                continue
            names = tuple(
                f
                for f in message_type.fields
                if f.full_name in self._resource_fields and f.type == FieldDescriptor.TYPE_STRING
            )
            nested = tuple(
                f
                for f in message_type.fields
                if (value_type := _value_type(f)) is not None and value_type.full_name in reaching
            )
            self._plans[name] = _Plan(names, nested)
        return reaching

    def plan(self, message_type: Descriptor) -> _Plan:
        found = self._plans.get(message_type.full_name)
        if found is None:
            self._reaches(message_type)
            found = self._plans[message_type.full_name]
        return found

    def names(self, message: Message, path: str = "") -> Iterator[tuple[str, str]]:
        """Yields ``(field path, value)`` for every non-empty resource name in ``message``."""
        plan = self.plan(cast(Descriptor, message.DESCRIPTOR))
        for field_descriptor in plan.names:
            value: Any = getattr(message, field_descriptor.name)
            where = path + field_descriptor.name
            if field_descriptor.is_repeated:
                for index, item in enumerate(value):
                    if item:
                        yield f"{where}[{index}]", item
            elif value:
                yield where, value
        for field_descriptor in plan.nested:
            where = path + field_descriptor.name
            if _is_map(field_descriptor):
                mapping: Mapping[Any, Message] = getattr(message, field_descriptor.name)
                for map_key, item in mapping.items():
                    yield from self.names(item, f"{where}[{map_key!r}].")
            elif field_descriptor.is_repeated:
                items: Iterable[Message] = getattr(message, field_descriptor.name)
                for index, item in enumerate(items):
                    yield from self.names(item, f"{where}[{index}].")
            elif message.HasField(field_descriptor.name):
                yield from self.names(getattr(message, field_descriptor.name), f"{where}.")


_PLANS = _Plans(RESOURCE_FIELDS)


def top_level_resource_fields(message: Message) -> list[str]:
    """The fields that name what a request is about: its own (``parent``, ``name``, …) or,
    for a request that wraps its resource (``UpdateSegmentRequest``), the resource's
    (``segment.name``)."""
    plan = _PLANS.plan(cast(Descriptor, message.DESCRIPTOR))
    if plan.names:
        return [f.name for f in plan.names]
    return [
        f"{wrapper.name}.{inner.name}"
        for wrapper in plan.nested
        if not wrapper.is_repeated and wrapper.message_type is not None
        for inner in _PLANS.plan(wrapper.message_type).names
        if inner.name == "name"
    ]


def requested_datasets(message: Message) -> list[tuple[str, str]]:
    """Returns ``(field path, dataset)`` for every resource name in ``message``.

    Raises:
        AudienceError: ``INVALID_ARGUMENT`` (reason ``INVALID_RESOURCE_NAME``) for a
            non-empty name that does not start with ``datasets/{dataset}``.
    """
    found: list[tuple[str, str]] = []
    bad: list[FieldViolation] = []
    for where, value in _PLANS.names(message):
        match = _RESOURCE_NAME.fullmatch(value)
        if match is None:
            bad.append(FieldViolation(where, "must be a resource name, datasets/{dataset}/..."))
        else:
            found.append((where, match["dataset"]))
    if bad:
        raise errors.invalid_argument(
            "The request names a resource outside any dataset.",
            *bad,
            reason="INVALID_RESOURCE_NAME",
        )
    return found


# --- the interceptor -----------------------------------------------------------------------


def _denied(key: ApiKey, message: str, reason: str, **metadata: str) -> AudienceError:
    return errors.permission_denied(message, reason=reason, metadata={"key": key.name, **metadata})


class _Check:
    """Checks the messages of one call against one key, and remembers a refusal."""

    def __init__(self, key: ApiKey, method: str) -> None:
        self.key = key
        self.method = method
        self.refusal: AudienceError | None = None
        self._named = False

    def __call__(self, request: Message) -> None:
        try:
            datasets = requested_datasets(request)
            for where, dataset in datasets:
                if not self.key.may_use(dataset):
                    _log.info(
                        "Refused %s to key %s: dataset %r (%s)",
                        self.method,
                        self.key.name,
                        dataset,
                        where,
                    )
                    raise _denied(
                        self.key,
                        f"The API key may not use dataset {dataset!r} ({where}).",
                        "DATASET_FORBIDDEN",
                        dataset=dataset,
                        field=where,
                    )
            if datasets:
                self._named = True
            elif not self._named:
                # Only a stream's later messages may leave out the dataset its first named.
                raise errors.invalid_argument(
                    "The request names no dataset.",
                    *(
                        FieldViolation(name, "required: a resource name, datasets/{dataset}/...")
                        for name in top_level_resource_fields(request)
                    ),
                    reason="DATASET_REQUIRED",
                )
        except AudienceError as error:
            self.refusal = error
            raise

    async def requests(self, requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
        async for request in requests:
            self(request)
            yield request

    def outcome(self, error: Exception) -> Exception:
        """What to raise when the handler failed: the refusal, when there was one, since the
        handler saw the refusal only as a failing request stream."""
        if self.refusal is not None and not isinstance(error, grpc.aio.AbortError):
            return self.refusal
        return error


def _refusing(behavior: Behavior, refusal: AudienceError) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise refusal
            yield  # an async generator, like the behaviour it stands for

        return refuse_stream

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise refusal

    return refuse


def _unread(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """The deserializer of a refused call: its request is never parsed, so a caller
    without the right key learns nothing of it (not even that it is malformed) and costs
    no parsing."""
    return _ignored


def _ignored(data: bytes) -> None:
    return None


def _checking(behavior: Behavior, streaming_requests: bool, check: _Check) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not streaming_requests:
                check(request)
            else:
                request = check.requests(request)
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as error:
                raise check.outcome(error) from None
            if check.refusal is not None:
                raise check.refusal

        return checked_stream

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not streaming_requests:
            check(request)
        else:
            request = check.requests(request)
        try:
            result = await behavior(request, context)
        except Exception as error:
            raise check.outcome(error) from None
        if check.refusal is not None:
            raise check.refusal
        return result

    return checked


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call and confines it to its key's datasets and scopes.

    Install it inside :class:`~audience.errors.ErrorInterceptor` (``Host(interceptors=…)``
    does), so its refusals reach the client as rich statuses.

    Args:
        keys: the accepted keys.
        scopes: the scope of each RPC, by full method name.
    """

    def __init__(self, keys: KeyRing, scopes: Mapping[str, Scope] = RPC_SCOPES) -> None:
        if not len(keys):
            raise ValueError("authentication needs at least one key")
        self._keys = keys
        self._scopes = scopes

    def require_policies(self, services: Iterable[str]) -> None:
        """Fails unless every RPC of ``services`` (full gRPC names) has a scope.

        Raises:
            ValueError: naming the RPCs without one, or a service unknown to protobuf.
        """
        pool = descriptor_pool.Default()
        missing: list[str] = []
        for service in services:
            if service in OPEN_SERVICES:
                continue
            try:
                descriptor = pool.FindServiceByName(service)
            except KeyError:
                raise ValueError(f"{service} is not a known gRPC service") from None
            missing.extend(
                f"/{service}/{method.name}"
                for method in descriptor.methods
                if f"/{service}/{method.name}" not in self._scopes
            )
        if missing:
            raise ValueError(f"no authorization scope for {', '.join(missing)}")

    def _authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> ApiKey:
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            raise errors.unauthenticated(
                "This call needs an API key: send the metadata `authorization: Bearer <key>`.",
                reason="API_KEY_MISSING",
            )
        value = values[0] if len(values) == 1 else None
        match = _BEARER.fullmatch(value) if isinstance(value, str) else None
        key = self._keys.find(match["key"]) if match is not None else None
        if key is None:
            raise errors.unauthenticated("The API key is not valid.", reason="API_KEY_INVALID")
        return key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        try:
            key = self._authenticate(handler_call_details.invocation_metadata)
        except AudienceError as error:
            unauthenticated = error
            _log.debug("Refused %s: %s", method, unauthenticated.reason)
            return wrap_handler(
                handler,
                lambda behavior: _refusing(behavior, unauthenticated),
                wrap_deserializer=_unread,
            )
        scope = self._scopes.get(method)
        refusal = None
        if scope is None:
            refusal = _denied(key, f"{method} is not open to API keys.", "METHOD_NOT_ALLOWED")
        elif scope not in key.scopes:
            refusal = _denied(
                key,
                f"The API key lacks the {scope!r} scope that {method} needs.",
                "SCOPE_MISSING",
                scope=scope,
            )
        if refusal is not None:
            _log.info("Refused %s to key %s: %s", method, key.name, refusal.reason)
            return wrap_handler(
                handler, lambda behavior: _refusing(behavior, refusal), wrap_deserializer=_unread
            )
        if key.datasets is None:
            return handler
        streaming = bool(handler.request_streaming)
        return wrap_handler(
            handler, lambda behavior: _checking(behavior, streaming, _Check(key, method))
        )
