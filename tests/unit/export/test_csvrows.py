"""CSV rows: RFC 4180 quoting, formula escaping, and the page encoder against the row one."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audience.errors import AudienceError
from services.export.domain.csvrows import (
    FORMULA_TRIGGERS,
    CsvLayout,
    DeltaRow,
    TimeFormatter,
    encode_row,
    escape_cell,
    escape_column,
    format_attribute,
    lookup_attribute,
    rfc3339,
    validate_columns,
)
from services.export.domain.model import (
    AttributeColumn,
    AttributeValue,
    ChangeKind,
    ExportField,
    ExportMode,
    FieldColumn,
    IdentityColumn,
    MemberPage,
    ProfileData,
)

# Any Unicode text that UTF-8 can carry (no lone surrogates), including the characters
# CSV and spreadsheets care about.
cells = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("=+-@\t\r\n\x00\",'; ")),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=30,
)


def read(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def shown(cell: str) -> str:
    """What a reader gets back: the cell, with ``'`` before a formula trigger."""
    return "'" + cell if cell and cell[0] in FORMULA_TRIGGERS else cell


@given(st.lists(cells, min_size=1, max_size=8))
def test_a_row_reads_back_as_its_cells_with_formulas_escaped(row: list[str]) -> None:
    encoded = encode_row(row)

    assert encoded.endswith("\r\n")
    assert read(encoded) == [[shown(cell) for cell in row]]


@given(st.lists(st.lists(cells, min_size=3, max_size=3), max_size=6))
def test_rows_read_back_one_record_each(rows: list[list[str]]) -> None:
    assert read("".join(encode_row(row) for row in rows)) == [
        [shown(cell) for cell in row] for row in rows
    ]


@pytest.mark.parametrize(
    ("cell", "escaped"),
    [
        ("=SUM(A1:A9)", "'=SUM(A1:A9)"),
        ("+33 1 23", "'+33 1 23"),
        ("-2+3", "'-2+3"),
        ("@cmd", "'@cmd"),
        ("\tx", "'\tx"),
        ("\rx", '"\'\rx"'),
        ("\x00x", "'\x00x"),
        ('=HYPERLINK("http://x","y")', '"\'=HYPERLINK(""http://x"",""y"")"'),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_cells_that_start_a_formula_are_prefixed_with_a_quote(cell: str, escaped: str) -> None:
    assert escape_cell(cell) == escaped


@given(st.lists(cells, max_size=20))
def test_escaping_a_column_is_escaping_each_cell(column: list[str]) -> None:
    assert list(escape_column(column)) == [escape_cell(cell) for cell in column]


def test_a_lone_empty_cell_is_written_so_that_the_record_is_not_lost() -> None:
    assert read(encode_row([""])) == [[""]]


member_ids = st.lists(cells.filter(bool), min_size=0, max_size=12, unique=True)
micros = st.integers(min_value=0, max_value=4_102_444_800_000_000)


@given(member_ids, st.data())
def test_a_page_encodes_as_its_rows_do_one_by_one(ids: list[str], data: st.DataObject) -> None:
    count = len(ids)
    versions = data.draw(st.lists(st.integers(1, 99), min_size=count, max_size=count))
    page = MemberPage(
        segment_id="vip,=buyers%s",
        member_ids=ids,
        versions=versions,
        join_micros=data.draw(st.lists(micros, min_size=count, max_size=count)),
    )
    columns = [
        FieldColumn(ExportField.PROFILE_ID, "id"),
        FieldColumn(ExportField.SEGMENT_ID, "segment"),
        FieldColumn(ExportField.JOIN_TIME, "joined"),
        FieldColumn(ExportField.SEGMENT_VERSION, "version"),
        FieldColumn(ExportField.CHANGE, "change"),
    ]
    layout = CsvLayout(columns, ExportMode.FULL)

    text, rows = layout.encode_members(page)

    times = TimeFormatter()
    expected = "".join(
        encode_row(
            [
                ids[i],
                page.segment_id,
                times.format(page.join_micros[i]),
                str(versions[i]),
                "join",
            ]
        )
        for i in range(count)
    )
    assert (text, rows) == (expected, count)


def test_join_times_are_rfc3339_in_utc_with_microseconds() -> None:
    moment = datetime(2024, 5, 1, 12, 30, 5, 123456, tzinfo=UTC)

    assert TimeFormatter().format(int(moment.timestamp()) * 1_000_000 + 123_456) == (
        "2024-05-01T12:30:05.123456Z"
    )
    assert rfc3339(moment) == "2024-05-01T12:30:05.123456Z"


def test_the_default_columns_are_profile_segment_and_join_time_plus_change_for_deltas() -> None:
    assert CsvLayout([], ExportMode.FULL).header() == "profile_id,segment_id,join_time\r\n"
    assert CsvLayout([], ExportMode.DELTA).header() == (
        "profile_id,segment_id,join_time,change,change_time\r\n"
    )


def test_members_without_a_profile_are_left_out_and_identity_columns_filled() -> None:
    layout = CsvLayout(
        [
            FieldColumn(ExportField.PROFILE_ID, "id"),
            IdentityColumn("email", "email"),
            AttributeColumn("address.city", "city"),
            AttributeColumn("plan", "plan"),
        ],
        ExportMode.FULL,
    )
    page = MemberPage("s", ["a", "b", "c"], [1, 1, 1], [0, 0, 0])
    profiles = {
        "a": ProfileData({"email": "a@x.io"}, {"address": {"city": "Paris"}, "plan": "=pro"}),
        "b": None,
        "c": ProfileData({}, {"address.city": "Lyon", "plan": 3.0}),
    }

    text, rows = layout.encode_members(page, profiles)

    assert rows == 2
    assert read(text) == [["a", "a@x.io", "Paris", "'=pro"], ["c", "", "Lyon", "3"]]


def test_delta_rows_carry_the_change_and_leave_no_join_time_for_leaves() -> None:
    moment = datetime(2024, 5, 1, 2, 0, tzinfo=UTC)
    layout = CsvLayout([], ExportMode.DELTA)

    text, rows = layout.encode_changes(
        [
            DeltaRow("p1", "s", 3, ChangeKind.JOIN, moment),
            DeltaRow("p2", "s", 3, ChangeKind.LEAVE, moment),
        ]
    )

    stamp = "2024-05-01T02:00:00.000000Z"
    assert rows == 2
    assert read(text) == [["p1", "s", stamp, "join", stamp], ["p2", "s", "", "leave", stamp]]


def test_delta_rows_of_erased_profiles_are_left_out() -> None:
    moment = datetime(2024, 5, 1, tzinfo=UTC)
    layout = CsvLayout([IdentityColumn("email", "email")], ExportMode.DELTA)
    rows = [
        DeltaRow("gone", "s", 1, ChangeKind.LEAVE, moment),
        DeltaRow("kept", "s", 1, ChangeKind.JOIN, moment),
    ]

    text, count = layout.encode_changes(rows, {"gone": None, "kept": ProfileData({}, {})})

    assert (text, count) == ('""\r\n', 1)


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (True, "true"),
        (False, "false"),
        (3.0, "3"),
        (-0.5, "-0.5"),
        (1e300, "1e+300"),
        ("text", "text"),
        (datetime(2024, 1, 2, tzinfo=UTC), "2024-01-02T00:00:00.000000Z"),
        ([1.0, "a"], '[1.0,"a"]'),
        ({"b": 1.0, "a": None}, '{"a":null,"b":1.0}'),
    ],
)
def test_attributes_are_written_as_plain_text(value: object, cell: str) -> None:
    assert format_attribute(value) == cell  # type: ignore[arg-type]


def test_attribute_paths_read_flat_keys_first_then_nested_maps() -> None:
    attributes: dict[str, AttributeValue] = {
        "a.b": "flat",
        "a": {"b": "nested", "c": {"d": 1.0}},
        "x": "y",
    }

    assert lookup_attribute(attributes, "a.b") == "flat"
    assert lookup_attribute(attributes, "a.c.d") == 1.0
    assert lookup_attribute(attributes, "x.y") is None
    assert lookup_attribute(attributes, "missing") is None


def test_bad_columns_are_refused_naming_each_field() -> None:
    with pytest.raises(AudienceError) as raised:
        validate_columns(
            [IdentityColumn("E-mail", "e"), AttributeColumn("a..b", "x"), IdentityColumn("ok", "")]
        )

    assert [v.field for v in raised.value.violations] == [
        "columns[0].identity_type",
        "columns[1].attribute_path",
    ]


def test_a_one_column_file_keeps_a_line_for_an_empty_cell() -> None:
    layout = CsvLayout([IdentityColumn("email", "email")], ExportMode.FULL)
    page = MemberPage("s", ["a", "b"], None, [0, 0])
    profiles = {"a": ProfileData({}, {}), "b": ProfileData({"email": "b@x.io"}, {})}

    text, rows = layout.encode_members(page, profiles)

    assert rows == 2
    assert read(layout.header() + text) == [["email"], [""], ["b@x.io"]]
