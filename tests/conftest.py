"""The suite's fixtures, defined once, and the fault summary: every scenario's figures as a table.

The fixtures nats_server, namespace and client come from the taskframe pytest plugin
(taskframe/testing.py); these are the ones only this suite needs. With
TASKFRAME_FAULT_SUMMARY=<path> the fault table is written there at the end of the session
(`./scripts/faults` writes docs/faults.md).
"""

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from taskframe import App, Worker, connect
from taskframe.testing import NatsServer, running_worker
from tests.faultkit import Procs
from tests.ledger import RECORDED, summary_markdown, write_summary
from tests.postgres import PostgresServer, running_postgres

Workers = Callable[..., AbstractAsyncContextManager[list[Worker]]]

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (initdb + pg_ctl in a temporary directory)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The SQLAlchemy URL of a fresh PostgreSQL database of the test's own."""
    return postgres.new_database()


@pytest.fixture
def workers(nats_server: NatsServer) -> Workers:
    """`async with workers(app, 3, **options) as running:` three in-process workers of `app`.

    Each has a connection of its own (ack_wait 2 s), as separate processes would; `options`
    go to every `Worker`.
    """

    @asynccontextmanager
    async def start(app: App, count: int, **options: Any) -> AsyncIterator[list[Worker]]:
        async with AsyncExitStack() as stack:
            started = []
            for _ in range(count):
                client = await stack.enter_async_context(
                    connect(nats_server.url, namespace=app.namespace, ack_wait=2.0)
                )
                worker = running_worker(app, client, **options)
                started.append(await stack.enter_async_context(worker))
            yield started

    return start


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
