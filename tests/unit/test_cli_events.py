"""The JSON lines that ``audience events send`` reads."""

from __future__ import annotations

import pytest

from audience.cli.events import LineError, event_from_json
from audience.v1 import event_pb2


def test_a_line_reads_plain_json_properties_and_short_type_names() -> None:
    event = event_from_json(
        {
            "eventId": "e1",
            "type": "cart",
            "user_id": "u1",
            "properties": {"coupon": None, "tags": ["a", 1], "nested": {"ok": True}},
            "cart": {"items": [{"productId": "sku", "price": 9.5, "quantity": 2}]},
            "timestamp": "2026-01-02T03:04:05Z",
        }
    )
    assert event.type == event_pb2.EVENT_TYPE_CART_UPDATED
    assert event.user_id == "u1"
    assert event.properties["coupon"].WhichOneof("kind") == "null_value"
    assert [v.WhichOneof("kind") for v in event.properties["tags"].list_value.values] == [
        "string_value",
        "number_value",
    ]
    assert event.properties["nested"].map_value.fields["ok"].bool_value is True
    assert event.cart.items[0].quantity == 2
    assert event.timestamp.seconds == 1_767_323_045


def test_traits_go_to_the_payload_of_identify_and_account_events() -> None:
    identify = event_from_json({"type": "identify", "userId": "u", "traits": {"plan": "pro"}})
    account = event_from_json({"type": "EVENT_TYPE_ACCOUNT_UPDATE", "traits": {"seats": 3}})
    assert identify.identify.traits["plan"].string_value == "pro"
    assert account.account_update.traits["seats"].number_value == 3
    with pytest.raises(LineError):
        event_from_json({"type": "track", "traits": {"plan": "pro"}})


def test_a_line_without_an_id_gets_a_random_one() -> None:
    first = event_from_json({"name": "view", "userId": "u"})
    second = event_from_json({"name": "view", "userId": "u"})
    assert first.type == event_pb2.EVENT_TYPE_TRACK
    assert len(first.event_id) == 36
    assert first.event_id != second.event_id


@pytest.mark.parametrize(
    "line",
    [["not", "an", "object"], {"type": "teleport"}, {"unknownField": 1}, {"properties": [1]}],
)
def test_lines_that_are_not_events_are_refused(line: object) -> None:
    with pytest.raises(LineError):
        event_from_json(line)
