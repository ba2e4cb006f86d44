"""Options of the fault test: ``--faults-long`` (``make faults``) and ``--faults-seed``.

Without them the test runs its short form (``make test``) from a random seed, which the
report and every failure print, so a run can be replayed with ``--faults-seed``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

_REPORTS = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "fault injection (tests/faults)")
    group.addoption(
        "--faults-long",
        action="store_true",
        default=False,
        help="run the long form of the fault test (more users, events, faults and floods)",
    )
    group.addoption(
        "--faults-seed",
        type=int,
        default=None,
        help="the seed of the fault test's workload and faults (random by default)",
    )


def _long(config: pytest.Config) -> bool:
    # The option is registered only when pytest loads this file early (pytest tests/faults
    # ...); a run of the whole suite reads the default.
    return bool(config.getoption("--faults-long", default=False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.timeout(3600 if _long(config) else 600))


@pytest.fixture
def faults_long(pytestconfig: pytest.Config) -> bool:
    return _long(pytestconfig)


@pytest.fixture
def faults_seed(pytestconfig: pytest.Config) -> int:
    seed = pytestconfig.getoption("--faults-seed", default=None)
    return int(seed) if seed is not None else random.randrange(2**32)


@pytest.fixture
def faults_report(pytestconfig: pytest.Config) -> list[dict[str, Any]]:
    """Where the test leaves its report, printed last in the terminal summary."""
    return pytestconfig.stash.setdefault(_REPORTS, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for report in config.stash.get(_REPORTS, []):
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(json.dumps(report))
