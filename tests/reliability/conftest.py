"""Fixtures of the reliability suite: scaled counts, a tally written to JSON, one torch thread.

``DT_RELIABILITY_SCALE`` (default 1) multiplies the randomized loops' sizes (``nox -s reliability``
runs them larger); ``DT_RELIABILITY_REPORT=<file.json>`` makes the suite write what it counted
there (``report.py`` renders it into ``docs/reliability.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # `import rel_support` (pytest runs in importlib mode)

import rel_support  # noqa: E402


@pytest.fixture(scope="session")
def tally() -> rel_support.Tally:
    """Counts recorded by the tests (faults injected, calls checked, cases run, files rejected)."""
    counts = rel_support.Tally()
    yield counts
    counts.write()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded 2-core machine they cost 10x."""
    with rel_support.single_torch_thread():
        yield


_passed_cases: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count passed test cases per file (``cases.<file>``): the report's rows for suites whose every
    case is one attack (store, values, discovery, encode side effects)."""
    if report.when == "call" and report.passed:
        stem = Path(report.nodeid.split("::")[0]).stem
        _passed_cases[stem] = _passed_cases.get(stem, 0) + 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    counts = rel_support.Tally({f"cases.{stem}": n for stem, n in _passed_cases.items()})
    counts.write()
