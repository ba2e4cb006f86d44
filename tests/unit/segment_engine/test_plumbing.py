"""Resume tokens, commit notifications, the membership cache, CSV uploads and the batches
of the change stream."""

from __future__ import annotations

import pytest

from audience.errors import AudienceError
from audience.v1 import membership_pb2
from services.segment_engine.domain.model import (
    ChangeKind,
    Kind,
    Membership,
    member_name,
    parse_member,
    parse_segment,
)
from services.segment_engine.domain.tokens import decode_token, encode_token
from services.segment_engine.grpc import _batches
from services.segment_engine.memberships import MemberPage, MembershipCache
from services.segment_engine.segments import _CsvIds
from services.segment_engine.store.log import LogRow
from services.segment_engine.store.state import notify_payload, parse_notify_payload
from services.segment_engine.watch import StreamedChange


def test_a_token_round_trips_and_is_opaque() -> None:
    token = encode_token("shop", 123_456, 1_700_000_000_000_000)
    assert "123456" not in token
    point = decode_token("shop", token)
    assert (point.sequence, point.time) == (123_456, 1_700_000_000_000_000)


@pytest.mark.parametrize("token", ["", "not a token", "AAAA", encode_token("other", 1, 1)])
def test_a_foreign_or_garbled_token_is_invalid_argument(token: str) -> None:
    with pytest.raises(AudienceError) as caught:
        decode_token("shop", token)
    assert caught.value.reason == "INVALID_RESUME_TOKEN"


def test_names_parse_and_print() -> None:
    assert parse_segment("datasets/shop/segments/vip-1") == ("shop", "vip-1")
    assert parse_member("datasets/shop/accounts/a/b") == ("shop", Kind.ACCOUNT, "a/b")
    assert member_name("shop", Kind.USER, "p1") == "datasets/shop/profiles/p1"
    for bad in ("datasets/shop/segments/Vip", "segments/x", "datasets/shop/segments/1a"):
        with pytest.raises(AudienceError):
            parse_segment(bad)
    with pytest.raises(AudienceError):
        parse_member("datasets/shop/people/p1")


def test_a_notification_names_the_changed_members_or_says_it_could_not() -> None:
    payload = notify_payload("me", "shop", [(1, "p1"), (2, "a:1"), (1, "p1")])
    assert parse_notify_payload(payload) == ("me", "shop", [(1, "p1"), (2, "a:1")])
    many = notify_payload("me", "shop", ((1, f"profile-{n}") for n in range(2000)))
    assert len(many.encode()) < 8000
    assert parse_notify_payload(many) == ("me", "shop", None)


def test_the_cache_keeps_an_answer_until_the_member_changes() -> None:
    cache = MembershipCache(10, 60.0)
    key = ("shop", 1, "p1")
    value = MemberPage((("vip", Membership(1, 5)),), False)
    cache.put(key, value, cache.epoch())
    assert cache.get(key) == value
    cache.invalidate([key])
    assert cache.get(key) is None


def test_a_read_racing_a_commit_is_not_cached() -> None:
    cache = MembershipCache(10, 60.0)
    key = ("shop", 1, "p1")
    epoch = cache.epoch()  # the read starts
    cache.invalidate([key])  # a commit changes the member meanwhile
    cache.put(key, MemberPage((), False), epoch)  # the read's (stale) answer arrives
    assert cache.get(key) is None
    fresh = cache.epoch()
    cache.put(key, MemberPage((), False), fresh)
    assert cache.get(key) == MemberPage((), False)


def test_the_cache_forgets_entries_past_their_time_and_size() -> None:
    now = [0.0]
    cache = MembershipCache(2, 1.0, clock=lambda: now[0])
    for n in range(3):
        cache.put(("shop", 1, f"p{n}"), MemberPage((), False), cache.epoch())
    assert cache.get(("shop", 1, "p0")) is None
    assert cache.get(("shop", 1, "p2")) is not None
    now[0] = 2.0
    assert cache.get(("shop", 1, "p2")) is None


def test_a_foreign_commit_without_members_clears_the_cache() -> None:
    cache = MembershipCache(10, 60.0)
    cache.put(("shop", 1, "p1"), MemberPage((), False), cache.epoch())
    cache.foreign_commit("shop", [(1, "p2")])
    assert cache.get(("shop", 1, "p1")) is not None
    cache.foreign_commit("shop", None)
    assert cache.get(("shop", 1, "p1")) is None


def test_csv_ids_come_from_the_profile_id_column_across_split_chunks() -> None:
    reader = _CsvIds()
    found: list[str] = []
    rejected = 0
    for chunk in (b"email,profile_id\na@x.com,p", b"1\nb@x.com,p2\nc@x.com,", b"\n", b"d,p4"):
        ids, bad = reader.feed(chunk)
        found += ids
        rejected += bad
    ids, bad = reader.finish()
    assert found + ids == ["p1", "p2", "p4"]
    assert rejected + bad == 1


def test_csv_without_a_header_reads_the_first_column() -> None:
    reader = _CsvIds()
    ids, bad = reader.feed(b'p1,x\n"p2",y\n' + b"z" * 300 + b"\n")
    assert ids == ["p1", "p2"]
    assert bad == 1


def _delivered(sizes: list[int]) -> list[tuple[StreamedChange, membership_pb2.MembershipChange]]:
    """Changes whose encodings take about ``sizes`` bytes each."""
    row = LogRow(1, Kind.USER, "p", "s", 1, ChangeKind.JOIN, 0, b"", None)
    return [
        (StreamedChange(row, f"t{n}"), membership_pb2.MembershipChange(member="m" * size))
        for n, size in enumerate(sizes)
    ]


def test_changes_are_batched_by_count_and_by_bytes_in_order() -> None:
    delivered = _delivered([10] * 7)
    assert [len(b) for b in _batches(delivered, 3)] == [3, 3, 1]
    assert [pair for batch in _batches(delivered, 3) for pair in batch] == delivered
    assert [len(b) for b in _batches(delivered, 1)] == [1] * 7

    big = _delivered([400, 400, 400, 2000, 10])
    # Cut before a change that would pass the budget; one over it alone goes by itself.
    assert [len(b) for b in _batches(big, 100, budget=1000)] == [2, 1, 1, 1]
