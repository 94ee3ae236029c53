"""Fixtures of the fault suite, and its summary: every recorded scenario's figures as a table.

With TASKFRAME_FAULT_SUMMARY=<path> the table is written there at the end of the session
(`./scripts/faults` writes docs/faults.md). The fixtures nats_server, namespace and client
come from the taskframe pytest plugin.
"""

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskframe._server import NatsServer
from tests.faultkit import Procs
from tests.ledger import RECORDED, summary_markdown, write_summary

_outcomes: dict[str, tuple[str, float]] = {}


@pytest.fixture
def procs(tmp_path: Path, namespace: str) -> Iterator[Procs]:
    """The test's subprocesses (killed at the end) and their journal, in its namespace."""
    with Procs(tmp_path, namespace) as running:
        yield running


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, to crash, freeze and restart; file store in tmp_path."""
    server = NatsServer(port=-1, store_dir=tmp_path / "store")
    try:
        yield server.start()
    finally:
        if server.process is not None:
            server.signal(signal.SIGCONT)  # a frozen server would ignore SIGTERM until killed
        server.stop()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    outcome, seconds = _outcomes.get(report.nodeid, ("passed", 0.0))
    if report.failed:
        outcome = "failed" if report.when == "call" else "error"
    _outcomes[report.nodeid] = (outcome, seconds + report.duration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RECORDED:
        terminalreporter.write_sep("-", "fault figures")
        terminalreporter.write(summary_markdown(RECORDED, _outcomes))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("TASKFRAME_FAULT_SUMMARY")
    if path and RECORDED:
        write_summary(path, RECORDED, _outcomes, int(exitstatus))
