"""The segment rule language: parse, print, validate and compile rules (docs/rules.md).

The profile service maintains the aggregates rules read (``facts_from_event``,
``compile_aggregate``, ``accumulate``) and writes the evaluation schema
(``evaluation_schema_ddl``, ``evaluation_row``, ``aggregates_json``); the segment engine
compiles rules (``compile_rule``) and evaluates them over evaluation views
(``view_from_proto``), in Python on the hot path and in SQL for backfills.
"""

from __future__ import annotations

from audience.rules.aggregates import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    AggregateMatcher,
    BucketState,
    Observation,
    Series,
    WindowPlan,
    accumulate,
    aggregate_id,
    aggregates_json,
    bucket_from_json,
    bucket_json,
    bucket_start,
    canonical_spec,
    compile_aggregate,
    document_json,
    plan_window,
    series_from_buckets,
    series_from_proto,
    series_json,
)
from audience.rules.compiler import (
    EMPTY_ROLLUPS,
    NO_SEGMENTS,
    CompiledRule,
    Predicate,
    Rollup,
    Threshold,
    compile_rule,
    random_bucket,
    rollup_key,
)
from audience.rules.facts import Fact, facts_from_event
from audience.rules.sql import ImportedMembers, SqlQuery, evaluation_schema_ddl
from audience.rules.text import RuleSyntaxError, format_rule, parse_rule
from audience.rules.validate import SegmentInfo, SegmentResolver, rule_violations, validate_rule
from audience.rules.values import (
    AttrValue,
    Instant,
    attributes_json,
    datetime_from_micros,
    micros_from_datetime,
    micros_from_timestamp,
    timestamp_from_micros,
)
from audience.rules.view import (
    EVALUATION_COLUMNS,
    LazyView,
    View,
    evaluation_row,
    evaluation_row_from_parts,
    view_from_parts,
    view_from_proto,
)

__all__ = [
    "DAY",
    "EMPTY_ROLLUPS",
    "EVALUATION_COLUMNS",
    "HOUR",
    "MINUTE",
    "NO_SEGMENTS",
    "SECOND",
    "AggregateMatcher",
    "AttrValue",
    "BucketState",
    "CompiledRule",
    "Fact",
    "ImportedMembers",
    "Instant",
    "LazyView",
    "Observation",
    "Predicate",
    "Rollup",
    "RuleSyntaxError",
    "SegmentInfo",
    "SegmentResolver",
    "Series",
    "SqlQuery",
    "Threshold",
    "View",
    "WindowPlan",
    "accumulate",
    "aggregate_id",
    "aggregates_json",
    "attributes_json",
    "bucket_from_json",
    "bucket_json",
    "bucket_start",
    "canonical_spec",
    "compile_aggregate",
    "compile_rule",
    "datetime_from_micros",
    "document_json",
    "evaluation_row",
    "evaluation_row_from_parts",
    "evaluation_schema_ddl",
    "facts_from_event",
    "format_rule",
    "micros_from_datetime",
    "micros_from_timestamp",
    "parse_rule",
    "plan_window",
    "random_bucket",
    "rollup_key",
    "rule_violations",
    "series_from_buckets",
    "series_from_proto",
    "series_json",
    "timestamp_from_micros",
    "validate_rule",
    "view_from_parts",
    "view_from_proto",
]
