"""The ledger of a fault scenario: what the server acknowledged, and what became of it.

    ledger = Ledger("kill -9 mid-task", procs.journal)
    for task in tasks:
        await ledger.enqueue(client, task)         # records the ids the server confirmed
    ...inject the fault...
    await ledger.settle(client)                    # until every acknowledged task is accounted
    figures = await ledger.figures(client, recover_s=...)
    figures.record()                               # FAULT-FIGURES {json}, and the summary table
    figures.check(expect_dead={poison_id: "lost"}, exactly_once=True)

Every acknowledged task ends as exactly one of executed (a `done` line in the handlers'
journal, tests/journal.py, or a `succeeded` record in the results bucket), dead (a dead
letter carries its id) or lost (neither, once the system settled). An enqueue that raised
is unknown: the server may or may not have stored it. With a key its id is known, so if
the task turns up executed or dead it was stored after all and counts as acknowledged;
without a key it stays unknown. The soak (bench/soak/) keeps its books with this ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import subprocess
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from taskframe import Client, PayloadTooLargeError, StoreFullError, Task, TaskRun, TaskState
from taskframe import _wire as wire
from taskframe._server import server_binary
from taskframe.testing import eventually
from tests.journal import Journal

RECORDED: list[Figures] = []
"""Every scenario's figures in this session, in order; tests/conftest.py writes the table."""

_TABLE_FIELDS = ("acknowledged", "executed", "lost", "duplicated", "dead", "unknown")


@dataclass
class Figures:
    """What became of one scenario's tasks."""

    scenario: str
    acknowledged: int
    executed: int
    lost: int
    duplicated: int
    """Completions beyond the first, summed over tasks (at-least-once tasks may have some)."""
    dead: int
    unknown: int
    recover_s: float | None
    """Seconds from the fault (or the end of an outage) until affected work completed again."""
    note: str = ""
    test: str = ""
    lost_ids: list[str] = field(default_factory=list, repr=False)
    completions: dict[str, int] = field(default_factory=dict, repr=False)
    """Tasks that completed more than once, and how often."""
    dead_reasons: dict[str, list[str]] = field(default_factory=dict, repr=False)
    """Dead letters of acknowledged tasks: id to the reasons of its letters (one, normally)."""
    stray_dead: dict[str, list[str]] = field(default_factory=dict, repr=False)
    """Dead letters whose id was never acknowledged (nor raised) in this scenario."""
    overlapping: list[str] = field(default_factory=list, repr=False)
    """Tasks that ran twice at the same time (on two processes, or twice on one)."""

    def summary(self) -> dict[str, Any]:
        """The figures that go in the table and the FAULT-FIGURES line."""
        row = {k: getattr(self, k) for k in ("scenario", *_TABLE_FIELDS, "recover_s", "note")}
        if self.recover_s is not None:
            row["recover_s"] = round(self.recover_s, 2)
        return row

    def record(self) -> None:
        """Print the FAULT-FIGURES line and add these figures to the session's summary."""
        self.test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        RECORDED.append(self)
        print(f"FAULT-FIGURES {json.dumps(self.summary())}", flush=True)  # noqa: T201

    def check(
        self,
        *,
        expect_dead: Mapping[str, str] | Collection[str] = (),
        exactly_once: bool | Collection[str] = False,
    ) -> None:
        """Fail unless nothing was lost and the dead letters are exactly `expect_dead`.

        Args:
            expect_dead: the ids that must be dead (with their reason, given a mapping);
                every other acknowledged task must have executed, and no dead letter may
                name a task this scenario did not enqueue.
            exactly_once: True, or the ids of the exactly-once tasks: these must have
                completed at most once and never run twice at the same time.
        """
        problems = []
        if self.lost:
            problems.append(f"{self.lost} lost: {self.lost_ids[:10]}")
        want: dict[str, str | None] = (
            dict(expect_dead) if isinstance(expect_dead, Mapping) else dict.fromkeys(expect_dead)
        )
        if set(self.dead_reasons) != set(want):
            extra = sorted(set(self.dead_reasons) - set(want))
            missing = sorted(set(want) - set(self.dead_reasons))
            problems.append(f"dead letters differ: unexpected {extra[:10]}, missing {missing[:10]}")
        for task_id, reason in want.items():
            have = self.dead_reasons.get(task_id, [])
            if have and (len(have) > 1 or (reason is not None and have != [reason])):
                problems.append(f"{task_id} dead as {have}, expected [{reason!r}]")
        if self.stray_dead:
            problems.append(f"dead letters of tasks never enqueued here: {self.stray_dead}")
        if exactly_once:
            once = set(self.completions if exactly_once is True else exactly_once)
            twice = {i: n for i, n in self.completions.items() if i in once}
            if twice:
                problems.append(f"exactly-once tasks completed more than once: {twice}")
            concurrent = [i for i in self.overlapping if exactly_once is True or i in once]
            if concurrent:
                problems.append(f"exactly-once tasks ran concurrently: {concurrent}")
        if problems:
            raise AssertionError(
                f"{self.scenario}: " + "; ".join(problems) + f"\nfigures: {self.summary()}"
            )


class Ledger:
    """The tasks one scenario enqueued, checked against the journal, results and dead letters."""

    def __init__(self, scenario: str, journal: Journal) -> None:
        self.scenario = scenario
        self.journal = journal
        self.acknowledged: dict[str, None] = {}  # a dict keeps the order of enqueue
        self.raised: list[str | None] = []  # ids of enqueues that raised (None: no key)
        self.refused = 0  # rejected before anything was sent: known not stored
        self.no_room = 0  # refused by the server for lack of room: known not stored
        self.deaths: dict[int, float] = {}

    def __repr__(self) -> str:
        return (
            f"<Ledger {self.scenario!r} acknowledged={len(self.acknowledged)} "
            f"raised={len(self.raised)} refused={self.refused}>"
        )

    def acknowledge(self, *runs: TaskRun[Any] | str) -> None:
        """Record tasks the server confirmed storing (handles, or bare ids)."""
        for run in runs:
            self.acknowledged[run if isinstance(run, str) else run.id] = None

    async def enqueue(
        self, client: Client, task: Task[Any], *, key: str | None = None, **options: Any
    ) -> TaskRun[Any]:
        """`client.enqueue`, recording the outcome; errors are recorded, then raised."""
        try:
            run = await client.enqueue(task, key=key, **options)
        except PayloadTooLargeError:
            self.refused += 1
            raise
        except StoreFullError:
            self.no_room += 1
            raise
        except Exception:
            self.raised.append(key)
            raise
        self.acknowledge(run)
        return run

    async def publish_raw(
        self,
        js: JetStreamContext,
        subject: str,
        body: bytes,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Publish bytes as another language's producer would; return the id a worker gives it."""
        ack = await js.publish(subject, body, headers=headers)
        queue = subject.split(".")[2]
        task_id = wire.message_id(headers, f"{queue}-{ack.seq}")
        self.acknowledge(task_id)
        return task_id

    def died(self, pid: int, at: float | None = None) -> None:
        """Note that process `pid` was killed (now, by default): its unfinished runs end here."""
        self.deaths[pid] = time.time() if at is None else at

    def first_done_after(
        self, moment: float, ids: Collection[str] | None = None, *, started_after: bool = False
    ) -> float | None:
        """Seconds from `moment` (wall clock) to the first completion after it, of `ids`.

        With `started_after`, only runs that also started after `moment` count: work that
        was already under way when the fault hit says nothing about recovery.
        """
        times = [
            end
            for task_id, _, start, end in self.runs()
            if end is not None
            and end >= moment
            and (ids is None or task_id in ids)
            and (not started_after or start >= moment)
        ]
        return min(times) - moment if times else None

    def runs(self) -> list[tuple[str, int, float, float | None]]:
        """Every run in the journal: (task id, pid, start, end or None if it never finished).

        A `done` line closes the latest open start of its task, attempt and process. The
        same attempt number can start twice: a server that crashed before writing its
        consumer's state down delivers a message again as if for the first time.
        """
        open_runs: dict[tuple[str, int, int], float] = {}
        runs: list[tuple[str, int, float, float | None]] = []
        for e in self.journal.entries():
            key = (e.task_id, e.attempt, e.pid)
            if e.kind == "start":
                if key in open_runs:
                    runs.append((e.task_id, e.pid, open_runs[key], None))
                open_runs[key] = e.at
            elif e.kind == "done" and key in open_runs:
                runs.append((e.task_id, e.pid, open_runs.pop(key), e.at))
        runs += [(task_id, pid, at, None) for (task_id, _, pid), at in open_runs.items()]
        return runs

    async def settle(self, client: Client, timeout: float = 20.0) -> None:
        """Wait until every acknowledged task is executed or dead, or `timeout` passes.

        Does not fail: what is still unaccounted for then is lost, and `figures` says so.
        """
        executed: set[str] = set()

        async def accounted() -> bool:
            dead = await self._dead_letters(client)
            waiting = [i for i in self.acknowledged if i not in executed and i not in dead]
            executed.update(await self._executed(client, waiting))
            return all(i in executed or i in dead for i in waiting)

        with contextlib.suppress(AssertionError):
            await eventually(accounted, "every task accounted for", timeout=timeout, interval=0.1)

    async def close_books(
        self, client: Client, *, recover_s: float | None = None, note: str = ""
    ) -> Figures:
        """`settle`, then the `figures`, recorded and checked (nothing lost, no dead letter)."""
        await self.settle(client)
        figures = await self.figures(client, recover_s=recover_s, note=note)
        figures.record()
        figures.check()
        return figures

    async def figures(
        self, client: Client, *, recover_s: float | None = None, note: str = ""
    ) -> Figures:
        """Classify every acknowledged task as it stands now."""
        letters = await self._dead_letters(client)
        # A raised enqueue retried with the same key until confirmed is simply acknowledged.
        raised = [i for i in dict.fromkeys(self.raised) if i and i not in self.acknowledged]
        executed = await self._executed(client, [*self.acknowledged, *raised])
        found = [i for i in raised if i in executed or i in letters]
        unknown = self.raised.count(None) + len(raised) - len(found)
        ids = [*self.acknowledged, *found]
        done = Counter(e.task_id for e in self.journal.entries("done"))
        completions = {i: done[i] for i in ids if done[i] > 1}
        lost = [i for i in ids if i not in executed and i not in letters]
        notes = [note] if note else []
        if self.raised:
            notes.append(f"{len(self.raised)} enqueue(s) raised; {len(found)} found stored anyway")
        if self.refused:
            notes.append(f"{self.refused} refused before sending")
        if self.no_room:
            notes.append(f"{self.no_room} refused by the server: no room (StoreFullError)")
        return Figures(
            scenario=self.scenario,
            acknowledged=len(ids),
            executed=sum(1 for i in ids if i in executed and i not in letters),
            lost=len(lost),
            duplicated=sum(n - 1 for n in completions.values()),
            dead=sum(1 for i in ids if i in letters),
            unknown=unknown,
            recover_s=recover_s,
            note="; ".join(notes),
            lost_ids=lost,
            completions=completions,
            dead_reasons={i: letters[i] for i in ids if i in letters},
            stray_dead={i: r for i, r in letters.items() if i not in ids and i not in raised},
            overlapping=self._overlapping(ids),
        )

    async def _executed(self, client: Client, ids: Collection[str]) -> set[str]:
        """Which of `ids` completed: a journal `done` line, else a `succeeded` record."""
        done = {e.task_id for e in self.journal.entries("done")}
        executed = {i for i in ids if i in done}
        for task_id in ids:
            if task_id not in executed:
                status = await client.status(task_id)
                if status is not None and status.state is TaskState.SUCCEEDED:
                    executed.add(task_id)
        return executed

    @staticmethod
    async def _dead_letters(client: Client) -> dict[str, list[str]]:
        """Task id to the reasons of its dead letters."""
        reasons: dict[str, list[str]] = {}
        after = 0
        while letters := await client.dead_letters(after=after, limit=1000):
            for letter in letters:
                reasons.setdefault(letter.task_id or "?", []).append(letter.reason)
            after = letters[-1].seq
        return reasons

    def _overlapping(self, ids: Collection[str]) -> list[str]:
        """Tasks with two runs whose [start, end] intervals intersect.

        A run ends at its own `done` line; one that never wrote it ended when its process
        was killed (see `died`), or is taken to run on forever if nobody said so.
        """
        wanted = set(ids)
        spans_of: dict[str, list[tuple[float, float]]] = {}
        for task_id, pid, start, end in self.runs():
            if task_id in wanted:
                stop = end if end is not None else self.deaths.get(pid, math.inf)
                spans_of.setdefault(task_id, []).append((start, stop))
        overlapping = []
        for task_id, spans in spans_of.items():
            spans.sort()
            if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
                overlapping.append(task_id)
        return overlapping


def summary_markdown(figures: list[Figures], outcomes: Mapping[str, tuple[str, float]]) -> str:
    """The table docs/faults.md holds: one row per scenario, with its test's outcome and time."""
    lines = [
        "| scenario | acknowledged | executed | lost | duplicated | dead | unknown "
        "| recover s | test | test s | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for f in figures:
        outcome, seconds = outcomes.get(f.test, ("?", math.nan))
        recover = "n/a" if f.recover_s is None else f"{f.recover_s:.2f}"
        counts = " | ".join(str(getattr(f, k)) for k in _TABLE_FIELDS)
        note = f.note.replace("|", "\\|")
        lines.append(
            f"| {f.scenario} | {counts} | {recover} | {outcome} | {seconds:.1f} | {note} |"
        )
    return "\n".join(lines) + "\n"


_PREAMBLE = """\
# Fault suite: figures

Written by `./scripts/faults` (pytest with `TASKFRAME_FAULT_SUMMARY=docs/faults.md`).
Scenarios: {files}.

Each scenario enqueues a known set of tasks, injects its fault while work is under way,
lets the system settle, and classifies every task the server acknowledged
(`tests/ledger.py`):

- **executed**: its handler completed (the worker-side journal, or a `succeeded` record);
- **dead**: it is in the dead-letter stream (each scenario names the ones it intends);
- **lost**: neither, once the system settled: must be 0;
- **duplicated**: completions beyond the first (at-least-once tasks may have some, and the
  note says why; exactly-once tasks must have none);
- **unknown**: enqueues that raised and whose task was never found stored;
- **recover s**: seconds from the fault (for an outage: from the moment the server was
  back) until the affected work completed again; n/a where there was nothing to recover.

Run on {machine}, {date}; pytest exit status {status}.

"""


def write_summary(
    path: str, figures: list[Figures], outcomes: Mapping[str, tuple[str, float]], status: int
) -> None:
    """Write docs/faults.md: what the columns mean, where it ran, and the table."""
    version = subprocess.run(
        [server_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    machine = f"{os.cpu_count()} cores, Python {platform.python_version()}, {version}"
    files = ", ".join(f"`{name}`" for name in dict.fromkeys(f.test.split("::")[0] for f in figures))
    text = _PREAMBLE.format(
        files=files, machine=machine, date=datetime.now(UTC).strftime("%Y-%m-%d"), status=status
    )
    Path(path).write_text(text + summary_markdown(figures, outcomes))
