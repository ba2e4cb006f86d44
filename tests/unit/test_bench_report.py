"""``python -m bench``'s report: reading a bench's output, the table's rows, the markdown
block and its place in ``bench/RESULTS.md``, and the ``--quick`` option every bench shares.
No benchmark runs here."""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys

import pytest

from bench.__main__ import (
    BEGIN,
    END,
    GOALS,
    Goal,
    Outcome,
    markdown,
    numbers,
    read_outcome,
    replace_block,
    rows,
)
from bench._suite import parse_options


def _ingest(events_per_s: float, ratio: float) -> Outcome:
    figures = {"events_per_s": events_per_s, "baseline_events_per_s": 500_000.0, "ratio": ratio}
    return Outcome("ingest", "python -m bench.ingest --quick", 12.4, figures, None)


def test_every_bench_module_has_goals() -> None:
    assert list(GOALS) == [
        "rules",
        "ingest",
        "profile",
        "profile_query",
        "e2e",
        "backfill",
        "memberships",
        "export",
    ]


def test_every_bench_module_takes_quick() -> None:
    # `python -m bench --quick` passes --quick to each; one without it fails the whole run.
    helps = {
        name: subprocess.Popen(
            [sys.executable, "-m", f"bench.{name}", "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in GOALS
    }
    for name, process in helps.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, (name, stderr)
        assert "--quick" in stdout, name


def test_goal_ratio_is_at_least_one_exactly_when_met() -> None:
    floor = Goal("events_per_s", 200_000, at_least=True)
    ceiling = Goal("p99_ms", 25, at_least=False)

    assert floor.ratio(50_000) == 0.25
    assert not floor.met(50_000)
    assert floor.ratio(400_000) == 2.0
    assert floor.met(400_000)
    assert ceiling.ratio(100) == 0.25
    assert not ceiling.met(100)
    assert ceiling.ratio(12.5) == 2.0
    assert ceiling.met(12.5)
    assert ceiling.ratio(0) == float("inf")


def test_numbers_flattens_nested_figures_and_drops_text() -> None:
    printed = {
        "bench": "export",
        "rows": 100,
        "ok": True,
        "cpu_seconds": {"export": 1.5, "client": 0},
        "rules": {"attribute": {"stream_seconds": 0.25, "name": "attr"}},
    }

    assert numbers(printed) == {
        "rows": 100.0,
        "cpu_seconds.export": 1.5,
        "cpu_seconds.client": 0.0,
        "rules.attribute.stream_seconds": 0.25,
    }


def test_read_outcome_takes_the_last_line_as_the_figures() -> None:
    stdout = "progress\n" + json.dumps({"events_per_s": 1234.5, "batch": 1000}) + "\n"

    outcome = read_outcome("ingest", "python -m bench.ingest", 3.0, 0, stdout, "")

    assert outcome.error is None
    assert outcome.figures == {"events_per_s": 1234.5, "batch": 1000.0}


@pytest.mark.parametrize(
    ("returncode", "stdout", "reason"),
    [
        (1, '{"events_per_s": 1}', "exit code 1"),
        (0, "", "printed nothing"),
        (0, "[1, 2]", "last line is not a JSON object"),
        (0, "Traceback", "Expecting value"),
    ],
)
def test_read_outcome_reports_why_a_bench_gave_no_figures(
    returncode: int, stdout: str, reason: str
) -> None:
    stderr = "\n".join(f"line {n}" for n in range(10))

    outcome = read_outcome("e2e", "python -m bench.e2e", 1.0, returncode, stdout, stderr)

    assert outcome.figures == {}
    assert outcome.error is not None
    assert outcome.error.splitlines()[0].startswith(reason)
    assert outcome.error.splitlines()[1:] == [f"line {n}" for n in range(5, 10)]


def test_rows_give_each_goal_its_ratio_and_verdict_then_the_baseline() -> None:
    assert rows(_ingest(50_000, 0.1)) == [
        ("ingest", "events_per_s", "50,000", "≥ 200,000", "0.25", "not met"),
        ("ingest", "ratio", "0.1", "≥ 0.2", "0.50", "not met"),
        ("ingest", "baseline_events_per_s", "500,000", "(baseline)", "", ""),
    ]
    assert [row[-1] for row in rows(_ingest(250_000, 0.5))] == ["met", "met", ""]


def test_rows_of_a_ceiling_goal_and_of_a_missing_figure() -> None:
    outcome = Outcome("e2e", "python -m bench.e2e", 30.0, {"p50_ms": 4.0, "p99_ms": 50.0}, None)

    assert rows(outcome) == [
        ("e2e", "events_per_s", "missing", "≥ 25,000", "—", "FAILED"),
        ("e2e", "p50_ms", "4", "≤ 5", "1.25", "met"),
        ("e2e", "p99_ms", "50", "≤ 25", "0.50", "not met"),
    ]


def test_rows_of_a_failed_bench_carry_the_first_line_of_its_error() -> None:
    failed = Outcome("backfill", "python -m bench.backfill", 2.0, {}, "exit code 1\nTraceback")

    assert rows(failed) == [("backfill", "—", "—", "—", "—", "FAILED: exit code 1")]


def test_markdown_is_one_marked_block_with_the_table_and_every_figure() -> None:
    block = markdown([_ingest(50_000, 0.1)], quick=True, today=datetime.date(2026, 12, 1))
    lines = block.splitlines()

    assert lines[0] == BEGIN
    assert lines[-1] == END
    assert lines[1] == "## Latest `make bench` --quick — 2026-12-01"
    assert "| bench | figure | value | goal | ratio | verdict |" in lines
    assert "| ingest | events_per_s | 50,000 | ≥ 200,000 | 0.25 | not met |" in lines
    assert "| ingest | baseline_events_per_s | 500,000 | (baseline) |  |  |" in lines
    figures = json.dumps(_ingest(50_000, 0.1).figures)
    assert f"- `python -m bench.ingest --quick` (12 s): `{figures}`" in lines
    assert any("--quick" in line and "indicative" in line for line in lines)


def test_markdown_of_a_full_run_does_not_call_itself_quick() -> None:
    block = markdown([_ingest(250_000, 0.5)], quick=False, today=datetime.date(2026, 12, 1))

    assert block.splitlines()[1] == "## Latest `make bench` — 2026-12-01"
    assert "indicative" not in block


def test_replace_block_keeps_the_writing_around_the_old_block() -> None:
    text = f"# Results\n\nIntro.\n\n{BEGIN}\nold table\n{END}\n\n## rules\n\nAnalysis.\n"

    replaced = replace_block(text, f"{BEGIN}\nnew table\n{END}")

    assert (
        replaced == f"# Results\n\nIntro.\n\n{BEGIN}\nnew table\n{END}\n\n## rules\n\nAnalysis.\n"
    )
    assert replace_block(replaced, f"{BEGIN}\nnew table\n{END}") == replaced


def test_replace_block_puts_a_first_block_before_the_first_section() -> None:
    text = "# Results\n\nIntro.\n\n## rules\n\nAnalysis.\n"

    replaced = replace_block(text, f"{BEGIN}\ntable\n{END}")

    assert replaced == f"# Results\n\nIntro.\n\n{BEGIN}\ntable\n{END}\n\n## rules\n\nAnalysis.\n"


def test_replace_block_appends_to_a_file_without_sections() -> None:
    assert replace_block("# Results\n", "BLOCK") == "# Results\n\nBLOCK\n"


@pytest.mark.parametrize(
    "text",
    [
        f"# Results\n\n{BEGIN}\ntable\n\n## rules\n",
        f"# Results\n\ntable\n{END}\n\n## rules\n",
        f"# Results\n\n{END}\ntable\n{BEGIN}\n\n## rules\n",
    ],
)
def test_replace_block_refuses_a_broken_block(text: str) -> None:
    with pytest.raises(ValueError, match="broken generated block"):
        replace_block(text, f"{BEGIN}\nnew\n{END}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.example")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--match", type=float, default=0.3)
    return parser


def test_quick_replaces_the_defaults_it_names() -> None:
    quick = {"events": 5_000, "seconds": 3.0}

    full = parse_options(_parser(), quick, [])
    short = parse_options(_parser(), quick, ["--quick"])

    assert (full.quick, full.events, full.seconds, full.match) == (False, 100_000, 20.0, 0.3)
    assert (short.quick, short.events, short.seconds, short.match) == (True, 5_000, 3.0, 0.3)


def test_options_given_explicitly_win_over_quick() -> None:
    options = parse_options(
        _parser(), {"events": 5_000, "seconds": 3.0}, ["--quick", "--events", "100000"]
    )

    assert (options.events, options.seconds) == (100_000, 3.0)


def test_quick_naming_an_option_the_bench_lacks_is_a_mistake() -> None:
    with pytest.raises(ValueError, match=r"\['users'\]"):
        parse_options(_parser(), {"users": 10}, [])
