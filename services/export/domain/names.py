"""Resource names of the export service and of the segments and members it reads."""

from __future__ import annotations

import re

from audience.errors import FieldViolation, invalid_argument

__all__ = [
    "DESTINATIONS",
    "EXPORT_JOBS",
    "SCHEDULES",
    "WEBHOOK_SUBSCRIPTIONS",
    "check_new_id",
    "child_name",
    "dataset_name",
    "delivery_name",
    "member_prefixes",
    "parse_child",
    "parse_dataset",
    "parse_delivery",
    "parse_segment",
    "segment_name",
]

DESTINATIONS = "destinations"
EXPORT_JOBS = "exportJobs"
SCHEDULES = "schedules"
WEBHOOK_SUBSCRIPTIONS = "webhookSubscriptions"

# Ids minted by other services (datasets, segments) are read leniently: anything without a
# slash that is safe in a file name. Ids minted here follow the documented rule.
_FOREIGN_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_OWN_ID = re.compile(r"[a-z][a-z0-9-]{0,62}")
_DATASET = re.compile(rf"datasets/(?P<dataset>{_FOREIGN_ID})")
_SEGMENT = re.compile(rf"datasets/(?P<dataset>{_FOREIGN_ID})/segments/(?P<id>{_FOREIGN_ID})")
_CHILD = re.compile(rf"datasets/(?P<dataset>{_FOREIGN_ID})/(?P<collection>[A-Za-z]+)/(?P<id>[^/]+)")
_DELIVERY = re.compile(
    rf"datasets/(?P<dataset>{_FOREIGN_ID})/webhookSubscriptions/(?P<sub>[^/]+)/deliveries/(?P<id>[0-9a-f]{{32}})"
)


def _bad(field: str, description: str) -> Exception:
    return invalid_argument(f"{field}: {description}", FieldViolation(field, description))


def dataset_name(dataset: str) -> str:
    return f"datasets/{dataset}"


def segment_name(dataset: str, segment_id: str) -> str:
    return f"datasets/{dataset}/segments/{segment_id}"


def child_name(dataset: str, collection: str, resource_id: str) -> str:
    return f"datasets/{dataset}/{collection}/{resource_id}"


def delivery_name(dataset: str, subscription_id: str, delivery_id: str) -> str:
    return f"datasets/{dataset}/webhookSubscriptions/{subscription_id}/deliveries/{delivery_id}"


def member_prefixes(dataset: str) -> tuple[str, str]:
    """The two prefixes of member names; both are the same length, so ids are sliced at it."""
    return f"datasets/{dataset}/profiles/", f"datasets/{dataset}/accounts/"


def parse_dataset(name: str, field: str = "parent") -> str:
    if not name:
        raise _bad(field, "required")
    match = _DATASET.fullmatch(name)
    if match is None:
        raise _bad(field, f"expected datasets/{{dataset}}, got {name!r}")
    return match["dataset"]


def parse_segment(name: str, field: str, dataset: str | None = None) -> tuple[str, str]:
    """Returns ``(dataset, segment_id)``; with ``dataset``, the segment must belong to it."""
    match = _SEGMENT.fullmatch(name)
    if match is None:
        raise _bad(field, f"expected datasets/{{dataset}}/segments/{{segment}}, got {name!r}")
    if dataset is not None and match["dataset"] != dataset:
        raise _bad(field, f"the segment must be of dataset {dataset!r}, got {name!r}")
    return match["dataset"], match["id"]


def parse_child(
    name: str, collection: str, field: str = "name", dataset: str | None = None
) -> tuple[str, str]:
    """Returns ``(dataset, id)`` of ``datasets/{dataset}/{collection}/{id}``."""
    if not name:
        raise _bad(field, "required")
    match = _CHILD.fullmatch(name)
    if match is None or match["collection"] != collection or not _OWN_ID.fullmatch(match["id"]):
        raise _bad(field, f"expected datasets/{{dataset}}/{collection}/{{id}}, got {name!r}")
    if dataset is not None and match["dataset"] != dataset:
        raise _bad(field, f"must be of dataset {dataset!r}, got {name!r}")
    return match["dataset"], match["id"]


def parse_delivery(name: str, field: str) -> tuple[str, str, str]:
    """Returns ``(dataset, subscription_id, delivery_id)``."""
    match = _DELIVERY.fullmatch(name)
    if match is None or not _OWN_ID.fullmatch(match["sub"]):
        raise _bad(
            field,
            "expected datasets/{dataset}/webhookSubscriptions/{subscription}/deliveries/"
            f"{{delivery}}, got {name!r}",
        )
    return match["dataset"], match["sub"], match["id"]


def check_new_id(value: str, field: str) -> str:
    if not _OWN_ID.fullmatch(value):
        raise _bad(
            field,
            "must be 1-63 characters of lower-case letters, digits and '-', starting with a "
            f"letter; got {value!r}",
        )
    return value
