"""The Python and SQL predicates agree, on real PostgreSQL, for generated rules and profiles.

Each example inserts a handful of profiles (with their aggregates) under a dataset of its
own, then reads every profile's result for the whole rule and for each of its conditions in
one statement, and compares them with the Python evaluation. The session
runs in a time zone with a 45-minute offset, so that nothing may depend on it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.unit.rules.strategies as gen
from audience.rules import (
    EVALUATION_COLUMNS,
    CompiledRule,
    ImportedMembers,
    View,
    compile_rule,
    evaluation_row,
    evaluation_schema_ddl,
    format_rule,
)
from audience.rules.sql import SqlContext, SqlSegment
from audience.v1 import rule_pb2

pytestmark = pytest.mark.integration

_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
USER_RULES = gen.user_rules([gen.SEGMENT_USER, gen.SEGMENT_IMPORTED])
ACCOUNT_RULES = gen.account_rules([gen.SEGMENT_USER], [gen.SEGMENT_ACCOUNT])
SMALL_USER_RULES = gen.trees(gen.user_leaves(), max_leaves=2)
SMALL_ACCOUNT_RULES = gen.trees(
    st.one_of(gen.attribute_conditions(), gen.lifetime_conditions()), max_leaves=2
)
USER_IDS = ["p0", "p1", "p2", "p3", "o'hara\"); DROP TABLE x; --", "ünï"]
ACCOUNT_IDS = ["a0", "a'1", "a2"]


@dataclass(frozen=True)
class Database:
    connection: asyncpg.Connection
    schema: str


@pytest.fixture(scope="module")
async def database(postgres_dsn: str) -> AsyncIterator[Database]:
    connection = await asyncpg.connect(
        postgres_dsn, server_settings={"TimeZone": "Pacific/Chatham"}
    )
    schema = f"rules_{uuid.uuid4().hex[:10]}"
    await connection.execute(f'CREATE SCHEMA "{schema}"')
    await connection.execute(evaluation_schema_ddl(schema))
    try:
        yield Database(connection, schema)
    finally:
        await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await connection.close()


async def _insert(db: Database, dataset: str, kind: str, views: Sequence[View]) -> None:
    columns = ", ".join(EVALUATION_COLUMNS)
    placeholders = ", ".join(
        f"${index + 4}::jsonb" if name in ("attributes", "aggregates") else f"${index + 4}"
        for index, name in enumerate(EVALUATION_COLUMNS)
    )
    await db.connection.executemany(
        f"INSERT INTO {db.schema}.profiles (dataset, kind, profile_id, {columns})"
        f" VALUES ($1, $2, $3, {placeholders})",
        [(dataset, kind, view.subject_id, *evaluation_row(view).values()) for view in views],
    )


def _conditions(rule: rule_pb2.Rule) -> list[rule_pb2.Rule]:
    """The rule's conditions (its leaves), each as a rule of its own."""
    kind = rule.WhichOneof("node")
    if kind in ("all", "any"):
        return [leaf for child in getattr(rule, kind).rules for leaf in _conditions(child)]
    if kind == "negation":
        return _conditions(rule.negation)
    return [rule]


async def _sql_results(
    db: Database,
    dataset: str,
    kind: str,
    rules: Sequence[CompiledRule],
    now: int,
    segments: Mapping[str, SqlSegment | ImportedMembers],
) -> dict[str, tuple[bool, ...]]:
    ctx = SqlContext(db.schema, now, segments)
    dataset_param = ctx.bind(dataset, "text")
    kind_param = ctx.bind(kind, "text")
    columns = ", ".join(rule.predicate_sql(ctx, "p") for rule in rules)
    rows = await db.connection.fetch(
        f"SELECT p.profile_id, {columns} FROM {ctx.table('profiles')} AS p"
        f" WHERE p.dataset = {dataset_param} AND p.kind = {kind_param}",
        *ctx.params,
    )
    return {row[0]: tuple(row[1:]) for row in rows}


def _describe(rule: CompiledRule, views: Sequence[View], now: int) -> str:
    lines = [f"rule: {rule.text}", f"now: {now}"]
    lines += [repr(view) for view in views]
    return "\n".join(lines)


@given(data=st.data())
@_SETTINGS
async def test_python_and_sql_agree_on_user_rules(database: Database, data: st.DataObject) -> None:
    rule = data.draw(USER_RULES, label="rule")
    loyal_rule = data.draw(SMALL_USER_RULES, label="loyal")
    now = data.draw(st.sampled_from(gen.NOWS), label="now")
    compiled = compile_rule(rule)
    loyal = compile_rule(loyal_rule)
    conditions = [compile_rule(leaf) for leaf in _conditions(rule)]
    specs = [*compiled.aggregates, *loyal.aggregates]
    points = gen.boundaries(rule, now) + gen.boundaries(loyal_rule, now)
    views = [data.draw(gen.views(subject, specs, points), label=subject) for subject in USER_IDS]
    imported = data.draw(st.lists(st.sampled_from(USER_IDS), unique=True), label="imported")

    dataset = uuid.uuid4().hex
    await _insert(database, dataset, "user", views)
    sql = await _sql_results(
        database,
        dataset,
        "user",
        [compiled, *conditions],
        now,
        {gen.SEGMENT_USER: loyal, gen.SEGMENT_IMPORTED: ImportedMembers(imported)},
    )

    for view in views:
        segments = {name for name in (gen.SEGMENT_IMPORTED,) if view.subject_id in imported}
        if loyal.matches(view, now):
            segments.add(gen.SEGMENT_USER)
        python = tuple(rule.matches(view, now, segments) for rule in [compiled, *conditions])
        assert sql[view.subject_id] == python, (
            f"{view.subject_id}: SQL {sql[view.subject_id]} != Python {python}\n"
            + "\n".join(f"  {c.text}" for c in [compiled, *conditions])
            + "\n"
            + _describe(compiled, [view], now)
        )


@given(data=st.data())
@_SETTINGS
async def test_python_and_sql_agree_on_account_rules(
    database: Database, data: st.DataObject
) -> None:
    rule = data.draw(ACCOUNT_RULES, label="rule")
    loyal_rule = data.draw(SMALL_USER_RULES, label="loyal")
    big_rule = data.draw(SMALL_ACCOUNT_RULES, label="big")
    now = data.draw(st.sampled_from(gen.NOWS), label="now")
    compiled = compile_rule(rule, gen.ACCOUNT)
    loyal = compile_rule(loyal_rule)
    big = compile_rule(big_rule, gen.ACCOUNT)
    specs = [spec for rollup in compiled.rollups for spec in rollup.predicate.aggregates]
    specs += loyal.aggregates
    points = gen.boundaries(rule, now) + gen.boundaries(loyal_rule, now)
    accounts = [data.draw(gen.views(subject, [], points), label=subject) for subject in ACCOUNT_IDS]
    users = [
        data.draw(gen.views(subject, specs, points, ACCOUNT_IDS), label=subject)
        for subject in USER_IDS
    ]

    dataset = uuid.uuid4().hex
    await _insert(database, dataset, "account", accounts)
    await _insert(database, dataset, "user", users)
    sql = await _sql_results(
        database,
        dataset,
        "account",
        [compiled],
        now,
        {gen.SEGMENT_USER: loyal, gen.SEGMENT_ACCOUNT: big},
    )

    user_segments = {
        user.subject_id: {gen.SEGMENT_USER} if loyal.matches(user, now) else set() for user in users
    }
    for account in accounts:
        counts = {
            rollup.key: sum(
                1
                for user in users
                if user.account_id == account.subject_id
                and rollup.predicate.matches(user, now, user_segments[user.subject_id])
            )
            for rollup in compiled.rollups
        }
        segments = {gen.SEGMENT_ACCOUNT} if big.matches(account, now) else set()
        python = compiled.matches(account, now, segments, counts)
        assert sql[account.subject_id] == (python,), (
            f"{account.subject_id}: SQL {sql[account.subject_id]} != Python {python}; "
            f"roll-up counts {counts}\n{_describe(compiled, [account, *users], now)}"
        )


async def test_backfill_query_selects_the_members(database: Database) -> None:
    dataset = uuid.uuid4().hex
    from audience.rules import parse_rule

    rule = compile_rule(parse_rule('cart.value < 100 and location.country = "US"'))
    views = [
        View(subject_id="cheap-us", cart_value=99.5, country="US"),
        View(subject_id="dear-us", cart_value=100.0, country="US"),
        View(subject_id="cheap-fr", cart_value=5.0, country="FR"),
        View(subject_id="no-visit", country="US"),
    ]
    await _insert(database, dataset, "user", views)
    query = rule.select_sql(gen.BASE_NOW, schema=database.schema, dataset=dataset)
    rows = await database.connection.fetch(query.text, *query.params)
    assert {row["profile_id"] for row in rows} == {"cheap-us"}
    assert format_rule(rule.rule) == 'cart.value < 100 and location.country = "US"'
