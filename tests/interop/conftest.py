"""Fixtures for the interop tests: real peers per test, stopped by the test, logs on failure."""

from __future__ import annotations

import os

import pytest

from .harness import ENABLE_HINT, Federation, Mode, missing_peers, stop_all_peers

_federations_key = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def require_peers(request):
    """Skip (or, with CI=true, fail) when Prosody or ejabberd is not installed."""
    missing = missing_peers()
    if missing:
        reason = f"interop peers not installed ({', '.join(missing)}): {ENABLE_HINT}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def federation(request, tmp_path):
    """A factory: `federation(mode)` -> a `Federation` under this test's tmp_path.

    Every peer started through it is stopped when the test ends, pass or fail.
    """
    created: list[Federation] = []
    request.node.stash[_federations_key] = created

    def make(mode: Mode, name: str | None = None) -> Federation:
        fed = Federation(tmp_path / (name or f"{mode.name}-{len(created)}"), mode)
        created.append(fed)
        return fed

    yield make
    for fed in created:
        fed.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach every peer's log tail to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        for fed in item.stash.get(_federations_key, []):
            report.sections.append((f"interop peer logs ({fed.workdir.name})", fed.logs()))


def pytest_sessionfinish(session, exitstatus):
    stop_all_peers()
