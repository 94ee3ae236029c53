"""The soak's books: the fault suite's ledger for its tasks, and what only the soak has.

Tasks are accounted for by `tests.ledger.Ledger` exactly as in the fault suite (every
acknowledged task executed, an intended dead letter, or lost), read from the same handlers'
journal (`tests.journal`). On top of it the soak keeps what the fault suite has no use for:
which kind each task was, events and the groups that have not seen them yet, schedule
ticks, result read-backs, and a running count of what is still pending, for its samples.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak.app import GROUPS
from taskframe import Client
from tests.journal import Journal
from tests.ledger import Ledger

LOST_AFTER = 60.0  # an acked task not completed after this long counts as lost so far


@dataclass
class Books:
    """What the producer had confirmed, and what the workers' journal says became of it."""

    journal: Journal
    ledger: Ledger = field(init=False)
    kinds: dict[str, str] = field(default_factory=dict)  # task id -> its kind in the mix
    pending_since: dict[str, float] = field(default_factory=dict)  # open tasks: id -> acked at
    events: dict[str, set[str]] = field(default_factory=dict)  # event id -> groups missing
    event_since: dict[str, float] = field(default_factory=dict)
    event_seen: Counter[str] = field(default_factory=Counter)  # "group id" -> deliveries
    done: set[str] = field(default_factory=set)
    ticks: list[float] = field(default_factory=list)
    fails: int = 0
    publish_failed: int = 0
    skipped_ticks: int = 0
    results_ok: int = 0
    results_bad: int = 0
    results_timeout: int = 0
    _read: int = 0

    def __post_init__(self) -> None:
        self.ledger = Ledger("soak", self.journal)

    @classmethod
    def in_directory(cls, directory: Path) -> Books:
        """The books of the journal the soak's workers write in `directory`."""
        return cls(Journal(directory / "journal.txt"))

    @property
    def enqueue_failed(self) -> int:
        """Enqueues that raised, as the ledger counted them (refused, no room, or else)."""
        return len(self.ledger.raised) + self.ledger.refused + self.ledger.no_room

    def confirmed(self, task_id: str, kind: str, at: float) -> None:
        """Note the kind of a task the ledger's `enqueue` recorded as acknowledged."""
        self.kinds[task_id] = kind
        if kind != "doomed" and task_id not in self.done:
            self.pending_since[task_id] = at

    def published(self, event_id: str, at: float) -> None:
        """Note an event the server confirmed storing."""
        # A fast subscriber may have been read before this confirmation came back.
        missing = {g for g in GROUPS if not self.event_seen[f"{g} {event_id}"]}
        self.events[event_id] = missing
        if missing:
            self.event_since[event_id] = at

    def read(self) -> None:
        """Take in the journal lines written since the last call."""
        entries = self.journal.entries()
        for e in entries[self._read :]:
            if e.kind in ("done", "reject"):
                self.done.add(e.task_id)
                self.pending_since.pop(e.task_id, None)
            elif e.kind == "fail":
                self.fails += 1
            elif e.kind == "tick":
                self.ticks.append(e.at)
            elif e.kind in GROUPS:
                self.event_seen[f"{e.kind} {e.task_id}"] += 1
                missing = self.events.get(e.task_id)
                if missing is not None:
                    missing.discard(e.kind)
                    if not missing:
                        self.event_since.pop(e.task_id, None)
        self._read = len(entries)

    def pending(self) -> int:
        """Tasks and events acknowledged and not yet accounted for."""
        return len(self.pending_since) + len(self.event_since)

    def overdue(self, now: float) -> int:
        """Pending for longer than LOST_AFTER: lost so far."""
        late = sum(1 for t in self.pending_since.values() if now - t > LOST_AFTER)
        return late + sum(1 for t in self.event_since.values() if now - t > LOST_AFTER)

    async def checks(self, client: Client, drained_s: float, interrupted: bool) -> dict[str, Any]:
        """The verdict: the ledger's figures for the tasks, and the soak's own counts."""
        self.read()
        doomed = {i for i, kind in self.kinds.items() if kind == "doomed"}
        figures = await self.ledger.figures(client)
        try:
            figures.check(expect_dead=dict.fromkeys(doomed, "rejected"))
            problems = "none"
        except AssertionError as exc:  # what it says goes in the report
            problems = str(exc).splitlines()[0]
        unexpected = Counter(
            reason
            for task_id, reasons in {**figures.dead_reasons, **figures.stray_dead}.items()
            if task_id not in doomed
            for reason in reasons
        )
        lost_events = [f"{g} {e}" for e, missing in self.events.items() for g in sorted(missing)]
        gaps = [b - a for a, b in itertools.pairwise(sorted(self.ticks))]
        checks: dict[str, Any] = {
            "acked_tasks": figures.acknowledged,
            "acked_by_kind": dict(Counter(self.kinds.values())),
            "completed": figures.executed,
            "completed_twice_or_more": len(figures.completions),
            "completed_not_acked": len(self.done - self.kinds.keys()),
            "lost": figures.lost,
            "lost_ids": figures.lost_ids[:20],
            "acked_events": len(self.events),
            "event_deliveries_lost": len(lost_events),
            "event_deliveries_lost_ids": lost_events[:20],
            "event_deliveries_repeated": sum(1 for n in self.event_seen.values() if n > 1),
            "dead_letters": figures.dead + sum(len(r) for r in figures.stray_dead.values()),
            "doomed_dead": sum(1 for i in doomed if figures.dead_reasons.get(i) == ["rejected"]),
            "doomed_missing": sum(1 for i in doomed if i not in figures.dead_reasons),
            "unexpected_dead": dict(unexpected),
            "ledger": figures.summary(),
            "ledger_problems": problems,
            "first_attempt_failures": self.fails,
            "enqueue_failed": self.enqueue_failed,
            "publish_failed": self.publish_failed,
            "skipped_ticks": self.skipped_ticks,
            "results_ok": self.results_ok,
            "results_bad": self.results_bad,
            "results_timeout": self.results_timeout,
            "schedule_ticks": len(self.ticks),
            "schedule_max_gap_s": round(max(gaps), 2) if gaps else None,
            "drain_s": round(drained_s, 1),
        }
        checks["passed"] = (
            problems == "none" and not lost_events and self.results_bad == 0 and not interrupted
        )
        return checks
