"""Suite-wide rules: the privileged end-to-end tier must run where it is required, and
every Hypothesis test runs under the profile ``HYPOTHESIS_PROFILE`` names (``fuzzing``).

With ``NODEAGENT_REQUIRE_PRIVILEGED=1`` (set by ``scripts/test.sh``, hence CI), a run in
which any ``privileged`` test was skipped, or none ran, fails: a skipped end-to-end tier
is a failure in disguise. (A strict xfail of a known bug ran: it is not a skip. A test
for one capture mode is generated only for it: ``redirect_modes`` in tests/e2e.)
"""

from __future__ import annotations

import os

import fuzzing  # noqa: F401  (registers and loads the Hypothesis profiles)
import pytest

_priv: dict[str, list[str]] = {"passed": [], "skipped": [], "failed": []}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "privileged" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _priv["passed"].append(report.nodeid)
    elif report.skipped and not hasattr(report, "wasxfail"):  # a known bug's xfail ran
        _priv["skipped"].append(report.nodeid)
    elif report.failed:
        _priv["failed"].append(report.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The image tier (``tests/e2e/test_image.py``: builds the agent's image, 2.5-8 min)
    runs only with ``NODEAGENT_IMAGE_TEST=1``; otherwise its tests are deselected, not
    skipped, so they never pass for a skipped privileged tier."""
    if os.environ.get("NODEAGENT_IMAGE_TEST", "") not in ("", "0"):
        return
    keep = [item for item in items if item.get_closest_marker("image") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(
            items=[item for item in items if item.get_closest_marker("image") is not None]
        )
        items[:] = keep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("NODEAGENT_REQUIRE_PRIVILEGED") != "1":
        return
    if session.config.option.collectonly or session.config.getoption("-k", default=""):
        return
    problem = ""
    if _priv["skipped"]:
        problem = f"{len(_priv['skipped'])} privileged test(s) were skipped"
    elif not _priv["passed"] and not _priv["failed"]:
        problem = "no privileged test ran"
    if problem:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = f"privileged tier required (NODEAGENT_REQUIRE_PRIVILEGED=1): {problem}"
        if tr is not None:
            tr.write_line(msg, red=True, bold=True)
        session.exitstatus = 1
