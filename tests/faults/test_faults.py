"""Fault injection with an oracle (issue 8): the suite loses nothing and stays exact while
its processes are killed, its servers crash, its connections are cut and it is flooded.

``make test`` runs the short form; ``make faults`` the long one (``--faults-long``). The
seed is random unless ``--faults-seed`` is given; a failure names it. The report's JSON is
the last line of the run's summary; the progress of the run is printed as it goes in the
long form (and shown with the failure in the short one).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.faults.run import run_faults
from tests.faults.workload import LONG, SHORT

pytestmark = pytest.mark.e2e

# Ingest keeps well under this during a flood (tens of MB over its baseline); a leak or an
# unbounded queue would not.
_RSS_BOUND_MB = 1024


async def test_faults_lose_no_event_and_leave_memberships_as_the_oracle_says(
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
    faults_long: bool,
    faults_seed: int,
    faults_report: list[dict[str, Any]],
) -> None:
    scale = LONG if faults_long else SHORT
    if faults_long:
        with capsys.disabled():
            report = await run_faults(faults_seed, scale, tmp_path, say=print)
    else:
        report = await run_faults(faults_seed, scale, tmp_path, say=print)
    faults_report.append(report)
    print(json.dumps(report))
    replay = f"replay with: pytest tests/faults --faults-seed {faults_seed}" + (
        " --faults-long" if faults_long else ""
    )
    verdict = {
        key: report[key]
        for key in (
            "lost",
            "mismatches",
            "gaps",
            "order_violations",
            "double_applied",
            "erasure_leaks",
            "sql_disagreements",
            "failed_events",
            "rejected",
            "unexpected_errors",
            "service_exits",
        )
    }
    assert not any(verdict.values()), f"seed {faults_seed}: {verdict}; {replay}"
    assert report["flood"]["resource_exhausted"] > 0, f"seed {faults_seed}: no backpressure"
    assert report["peak_rss_mb"] < _RSS_BOUND_MB, f"seed {faults_seed}: {report['peak_rss_mb']}"
