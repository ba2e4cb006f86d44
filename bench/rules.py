"""Compiled rule predicates against the same rules written by hand as Python lambdas.

``python -m bench.rules [--views N] [--rounds R] [--quick]`` builds N evaluation views with
realistic attributes, visits, places and aggregate buckets (filled through
``compile_aggregate`` and ``accumulate``, as the profile service fills them), compiles a mix
of realistic rules, and times every rule over every view: first the compiled predicates,
then hand-written lambdas of the same rules, in the same run. It checks that both find the
same members, and prints one JSON object as its last line: ``evals_per_s``,
``baseline_evals_per_s`` and ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

from audience.rules import (
    DAY,
    HOUR,
    SECOND,
    BucketState,
    Fact,
    Series,
    View,
    accumulate,
    compile_aggregate,
    compile_rule,
    parse_rule,
    random_bucket,
    series_from_buckets,
)
from audience.rules.values import AttrValue, Instant
from bench._suite import parse_options

NOW = 1_700_000_000_000_000
CHURNED = "datasets/shop/segments/churned"

Lambda = Callable[[View, int, Container[str], Mapping[str, int]], bool]

RULES = [
    'cart.value < 100 and location.country = "US"'
    ' and count(event "product_view" where category = "shoes", last 30 days) >= 3',
    'attributes.plan in ["pro", "enterprise"] and days_since(last_seen) <= 7',
    'session.utm_source = "newsletter" or session.is_new_visitor = true',
    'sum(revenue, event "order_completed", last 90 days) > 500 and lifetime.order_count >= 2',
    'count(event "checkout_started", last 1 hour) >= 1'
    ' and count(event "order_completed", last 1 hour) = 0',
    'device.type = "mobile" and weather.condition = "rain" and location.city = "Seattle"',
    f'attributes.age between 18 and 34 and not in segment "{CHURNED}"',
    "campaign(email, opened, last 14 days) and not campaign(email, clicked, last 14 days) >= 1",
    'attributes.tags contains "vip" or lifetime.value > 1000',
    'random_bucket("exp-7") between 0 and 49 and cart.item_count >= 1',
]


# --- The hand-written versions, as a developer would write them against the view. ---


def _count(series: Series | None, low: int, high: int) -> int:
    if series is None:
        return 0
    starts = series.starts
    return sum(series.counts[bisect_left(starts, low) : bisect_right(starts, high)])


def _sum(series: Series | None, low: int, high: int) -> float:
    if series is None:
        return 0.0
    starts = series.starts
    total = 0.0
    for value in series.sums[bisect_left(starts, low) : bisect_right(starts, high)]:
        total += value
    return total


def _since(now: int, duration: int, width: int) -> int:
    back = now - duration
    return back - back % width


def _is_number(value: object) -> bool:
    return type(value) is float or type(value) is int


def baselines(ids: Sequence[str]) -> list[Lambda]:
    """The rules of ``RULES``, by hand; ``ids`` are their aggregate ids, in rule order."""
    shoes, revenue, checkout, ordered, opened, clicked = ids
    return [
        lambda v, now, segs, rollups: (
            v.cart_value is not None
            and v.cart_value < 100
            and v.country == "US"
            and _count(v.aggregates.get(shoes), _since(now, 30 * DAY, HOUR), now) >= 3
        ),
        lambda v, now, segs, rollups: (
            v.attributes.get("plan") in ("pro", "enterprise")
            and v.last_seen is not None
            and (now - v.last_seen) // DAY <= 7
        ),
        lambda v, now, segs, rollups: v.utm_source == "newsletter" or v.is_new_visitor is True,
        lambda v, now, segs, rollups: (
            _sum(v.aggregates.get(revenue), _since(now, 90 * DAY, HOUR), now) > 500
            and v.order_count >= 2
        ),
        lambda v, now, segs, rollups: (
            _count(v.aggregates.get(checkout), _since(now, HOUR, SECOND), now) >= 1
            and _count(v.aggregates.get(ordered), _since(now, HOUR, SECOND), now) == 0
        ),
        lambda v, now, segs, rollups: (
            v.device_type == "mobile" and v.weather_condition == "rain" and v.city == "Seattle"
        ),
        lambda v, now, segs, rollups: (
            _is_number(age := v.attributes.get("age")) and 18 <= age <= 34 and CHURNED not in segs
        ),
        lambda v, now, segs, rollups: (
            _count(v.aggregates.get(opened), _since(now, 14 * DAY, HOUR), now) >= 1
            and not _count(v.aggregates.get(clicked), _since(now, 14 * DAY, HOUR), now) >= 1
        ),
        lambda v, now, segs, rollups: (
            ("vip" in tags if type(tags := v.attributes.get("tags")) is list else False)
            or v.lifetime_value > 1000
        ),
        lambda v, now, segs, rollups: (
            random_bucket("exp-7", v.subject_id) <= 49
            and v.cart_item_count is not None
            and v.cart_item_count >= 1
        ),
    ]


# --- Data. ---


def _facts(rng: random.Random) -> list[Fact]:
    facts = []
    for _ in range(rng.randint(0, 25)):
        moment = NOW - rng.randint(0, 120 * DAY)
        kind = rng.random()
        if kind < 0.5:
            category = rng.choice(["shoes", "hats", "bags"])
            facts.append(Fact("product_view", moment, {"category": category}))
        elif kind < 0.6:
            facts.append(Fact("order_completed", moment, {"revenue": rng.uniform(5, 400)}))
        elif kind < 0.7:
            facts.append(Fact("checkout_started", NOW - rng.randint(0, 3 * HOUR)))
        else:
            action = rng.choice(["received", "opened", "clicked"])
            facts.append(
                Fact("campaign_interaction", moment, {"channel": "email", "action": action})
            )
    return facts


def make_views(count: int, specs: Sequence[Any], seed: int = 7) -> list[View]:
    rng = random.Random(seed)
    matchers = [compile_aggregate(spec) for spec in specs]
    views = []
    for index in range(count):
        aggregates: dict[str, dict[int, BucketState]] = {}
        for fact in _facts(rng):
            for matcher in matchers:
                observation = matcher.observe(fact)
                if observation is None:
                    continue
                buckets = aggregates.setdefault(matcher.aggregate_id, {})
                start = observation.bucket_start
                buckets[start] = accumulate(buckets.get(start), observation)
        visiting = rng.random() < 0.7
        tags: list[AttrValue] = list(
            rng.sample(["vip", "beta", "newsletter", "b2b"], rng.randint(0, 2))
        )
        views.append(
            View(
                subject_id=f"user-{index}",
                attributes={
                    "plan": rng.choice(["free", "pro", "enterprise"]),
                    "age": float(rng.randint(14, 80)),
                    "tags": tags,
                    "signup": Instant(NOW - rng.randint(0, 900 * DAY)),
                },
                session_start=NOW - rng.randint(0, 2 * HOUR) if visiting else None,
                cart_value=rng.uniform(0, 300) if visiting else None,
                cart_item_count=rng.randint(0, 6) if visiting else None,
                utm_source=rng.choice([None, "newsletter", "google"]) if visiting else None,
                is_new_visitor=rng.random() < 0.3 if visiting else None,
                visit_count=rng.randint(1, 40),
                country=rng.choice(["US", "US", "FR", "DE"]),
                city=rng.choice(["Seattle", "Paris", "Austin"]),
                weather_condition=rng.choice(["rain", "clear"]),
                device_type=rng.choice(["mobile", "desktop"]),
                first_seen=NOW - rng.randint(30 * DAY, 900 * DAY),
                last_seen=NOW - rng.randint(0, 30 * DAY),
                lifetime_value=rng.uniform(0, 3000),
                order_count=rng.randint(0, 12),
                aggregates={
                    aggregate: series_from_buckets(buckets.values())
                    for aggregate, buckets in aggregates.items()
                },
            )
        )
    return views


# --- Timing. ---


def _time(
    predicates: Sequence[Lambda], views: Sequence[View], segments: list[frozenset[str]]
) -> float:
    started = time.perf_counter()
    for predicate in predicates:
        for view, segs in zip(views, segments, strict=True):
            predicate(view, NOW, segs, {})
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rules", description=__doc__)
    parser.add_argument("--views", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parse_options(parser, {"views": 5_000}, argv)

    compiled = [compile_rule(parse_rule(text)) for text in RULES]
    ids = [spec.aggregate_id for rule in compiled for spec in rule.aggregates]
    specs = [spec for rule in compiled for spec in rule.aggregates]
    hand = baselines(ids)
    views = make_views(args.views, specs)
    rng = random.Random(11)
    segments = [frozenset({CHURNED}) if rng.random() < 0.2 else frozenset() for _ in views]

    for rule, baseline in zip(compiled, hand, strict=True):
        mine = [rule.predicate(v, NOW, s, {}) for v, s in zip(views, segments, strict=True)]
        theirs = [baseline(v, NOW, s, {}) for v, s in zip(views, segments, strict=True)]
        if mine != theirs:
            raise SystemExit(f"the hand-written rule disagrees with the compiled one: {rule.text}")
        print(f"{sum(mine):6d} of {len(views)} match  {rule.text}", file=sys.stderr)

    predicates = [rule.predicate for rule in compiled]
    evaluations = len(predicates) * len(views)
    best, best_baseline = float("inf"), float("inf")
    for _ in range(args.rounds):
        best = min(best, _time(predicates, views, segments))
        best_baseline = min(best_baseline, _time(hand, views, segments))
    result = {
        "bench": "rules",
        "rules": len(RULES),
        "views": len(views),
        "evals_per_s": round(evaluations / best),
        "baseline_evals_per_s": round(evaluations / best_baseline),
        "ratio": round(best_baseline / best, 3),
    }
    print(
        f"compiled {result['evals_per_s']:,} evals/s, hand-written "
        f"{result['baseline_evals_per_s']:,} evals/s (best of {args.rounds} rounds)",
        file=sys.stderr,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
