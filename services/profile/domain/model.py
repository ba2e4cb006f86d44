"""The state of a profile and of an account, as the domain changes it.

Times are microseconds since the Unix epoch, the instants of ``audience.rules``. The visit
(``profile_pb2.Session``), the last context (``event_pb2.Context``) and carts are the
event contract's own value messages: the rules package reads them in that form
(``facts_from_event`` takes the previous cart), so the domain keeps them as they are rather
than copying each into a twin class on the hot path. It never touches gRPC, the bus or the
database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from audience.rules.aggregates import BucketState
from audience.rules.values import AttrValue
from audience.v1 import event_pb2, profile_pb2

__all__ = [
    "ANONYMOUS_ID",
    "USER_ID",
    "AccountKey",
    "AccountState",
    "AggregateSeries",
    "ChangeType",
    "Identity",
    "IdentityKey",
    "ProfileKey",
    "ProfileState",
    "Touch",
    "account_size",
    "encoded_context",
    "normalize_identity",
    "profile_size",
]

USER_ID = "user_id"
ANONYMOUS_ID = "anonymous_id"

Identity = tuple[str, str]
"""``(type, value)``, such as ``("email", "ada@example.com")``."""

IdentityKey = tuple[str, str, str]
"""``(dataset, type, value)``."""

ProfileKey = tuple[str, str]
"""``(dataset, profile_id)``."""

AccountKey = tuple[str, str]
"""``(dataset, account_id)``."""


def normalize_identity(kind: str, value: str) -> Identity:
    """The identity as it is stored and compared: emails in lower case (common.proto)."""
    return (kind, value.lower() if kind == "email" else value)


class ChangeType(Enum):
    """What happened to a subject, as the published change says."""

    UPDATED = 1
    ERASED = 2
    MERGED = 3


class AggregateSeries:
    """One aggregate's non-empty buckets for one profile, by bucket start.

    ``encoded`` and ``pieces`` are memos for the view encoder (the whole series, and each
    bucket by start, as protobuf), ``document`` and ``texts`` the same for the row's
    ``aggregates`` column (as JSON). They stay valid until the buckets change, and every
    change goes through :meth:`put` or :meth:`drop`, which clear what it makes stale.
    """

    __slots__ = ("buckets", "document", "encoded", "pieces", "texts")

    def __init__(self, buckets: dict[int, BucketState] | None = None) -> None:
        self.buckets: dict[int, BucketState] = buckets if buckets is not None else {}
        self.encoded: bytes | None = None
        self.pieces: dict[int, bytes] | None = None
        self.document: str | None = None
        self.texts: dict[int, str] | None = None

    def put(self, bucket: BucketState) -> None:
        self.buckets[bucket.start] = bucket
        self.encoded = self.document = None
        if self.pieces:
            self.pieces.pop(bucket.start, None)
        if self.texts:
            self.texts.pop(bucket.start, None)

    def drop(self, start: int) -> None:
        del self.buckets[start]
        self.encoded = self.document = None
        if self.pieces:
            self.pieces.pop(start, None)
        if self.texts:
            self.texts.pop(start, None)

    def ordered(self) -> list[BucketState]:
        return [self.buckets[start] for start in sorted(self.buckets)]


@dataclass(slots=True, eq=False)
class Touch:
    """What one unit of work changed about one subject: what to write and to publish.

    Attributes:
        keys: the changed keys, in the vocabulary of ``ProfileChange.changed_keys``.
        event_ids: the ids of the events applied.
        aggregates: ids of the aggregates a bucket was added to or changed in.
        removed: ``(aggregate_id, bucket_start)`` of buckets dropped.
        row: whether the subject's row changed.
    """

    keys: set[str] = field(default_factory=set)
    event_ids: list[str] = field(default_factory=list)
    aggregates: set[str] = field(default_factory=set)
    removed: set[tuple[str, int]] = field(default_factory=set)
    row: bool = False

    def changed(self) -> bool:
        return self.row or bool(self.keys or self.aggregates or self.removed)


@dataclass(slots=True, eq=False)
class ProfileState:
    """The Unified Customer Profile of one person.

    Attributes:
        sequence: the last sequence number published for the profile.
        identities: every identity, ``user_id`` and ``anonymous_id`` ones included, in the
            order they were linked.
        session: the current (or most recent) visit.
        context: the context of the latest event, with the place, weather and device
            carried over from earlier events when the latest lacks them.
        merged_profiles: ids of the profiles merged into this one.
        aggregates: aggregate id → its non-empty buckets.
        expire: no bucket expires (passes its aggregate's retention) before this instant;
            ``None`` when none ever does. Never later than the first real expiry, so a
            unit or a sweep that finds it passed drops what expired and sets it again.
        attributes_encoded: a memo for the view encoder, cleared when attributes change.
        context_memo: ``context`` and its deterministic encoding (see
            :func:`encoded_context`), kept while ``context`` is that very message.
    """

    dataset: str
    profile_id: str
    sequence: int = 0
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    identities: list[Identity] = field(default_factory=list)
    account_id: str = ""
    session: profile_pb2.Session | None = None
    context: event_pb2.Context | None = None
    first_seen: int | None = None
    last_seen: int | None = None
    lifetime_value: float = 0.0
    order_count: int = 0
    visit_count: int = 0
    event_count: int = 0
    merged_profiles: list[str] = field(default_factory=list)
    aggregates: dict[str, AggregateSeries] = field(default_factory=dict)
    expire: int | None = None
    attributes_encoded: bytes | None = None
    context_memo: tuple[event_pb2.Context, bytes] | None = None

    @property
    def key(self) -> ProfileKey:
        return (self.dataset, self.profile_id)

    def expires_by(self, instant: int) -> None:
        """Notes a bucket that expires at ``instant``."""
        if self.expire is None or instant < self.expire:
            self.expire = instant

    @property
    def known(self) -> bool:
        """Whether the person is known: a ``user_id`` is among the identities."""
        return any(kind == USER_ID for kind, _ in self.identities)

    def add_identity(self, identity: Identity) -> bool:
        if identity in self.identities:
            return False
        self.identities.append(identity)
        return True


@dataclass(slots=True, eq=False)
class AccountState:
    """The Unified Account Profile of one company.

    ``user_count``, ``lifetime_value`` and ``order_count`` roll up the account's users;
    ``first_seen`` and ``last_seen`` cover the account's own updates and its users' events.
    """

    dataset: str
    account_id: str
    sequence: int = 0
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    user_count: int = 0
    first_seen: int | None = None
    last_seen: int | None = None
    lifetime_value: float = 0.0
    order_count: int = 0
    attributes_encoded: bytes | None = None

    @property
    def key(self) -> AccountKey:
        return (self.dataset, self.account_id)


def encoded_context(state: ProfileState) -> bytes | None:
    """The deterministic encoding of the profile's last context, computed once per context
    message (a new context is a new message: ``context`` is replaced, never changed)."""
    context = state.context
    if context is None:
        return None
    memo = state.context_memo
    if memo is None or memo[0] is not context:
        memo = state.context_memo = (context, context.SerializeToString(deterministic=True))
    return memo[1]


# What a state holds in memory once a unit has encoded it (its memos filled), in bytes,
# measured with tracemalloc: the profile's own objects with its visit and context, each
# attribute, each aggregate series with its memo dicts, and each bucket with its encodings.
_PROFILE_BYTES = 1_500
_ACCOUNT_BYTES = 300
_ATTRIBUTE_BYTES = 180
_SERIES_BYTES = 950
_BUCKET_BYTES = 460


def profile_size(state: ProfileState) -> int:
    """About how many bytes the profile takes in memory (what the cache budgets)."""
    aggregates = state.aggregates
    return (
        _PROFILE_BYTES
        + _ATTRIBUTE_BYTES * len(state.attributes)
        + _SERIES_BYTES * len(aggregates)
        + _BUCKET_BYTES * sum(len(series.buckets) for series in aggregates.values())
    )


def account_size(account: AccountState) -> int:
    """About how many bytes the account takes in memory."""
    return _ACCOUNT_BYTES + _ATTRIBUTE_BYTES * len(account.attributes)
