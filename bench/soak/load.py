"""The soak's load: a steady mix of tasks and events, offered at a fixed rate whatever the
broker is going through, every confirmation entered in the books."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from bench.soak import app as soak_app
from bench.soak.books import Books
from taskframe import Client, Task, TaskframeError, TaskRun

# Share of the task rate per kind; Doomed is the only task meant to end as a dead letter.
MIX = {"noop": 0.60, "sleepy": 0.25, "doubler": 0.10, "flaky": 0.045, "doomed": 0.005}
TICK = 0.1  # seconds between batches
MAX_UNCONFIRMED = 50  # batches (5 s of load) in flight before a tick is skipped


class Producer:
    """Enqueues the mix at `rate` tasks and publishes `event_rate` events per second."""

    def __init__(self, books: Books, rate: float, event_rate: float, seed: int) -> None:
        self.books = books
        self.rate = rate
        self.event_rate = event_rate
        self.rng = random.Random(seed)
        self.batches: set[asyncio.Task[None]] = set()
        self.waiters: set[asyncio.Task[None]] = set()
        """Result read-backs still waiting (a sample of Doubler tasks)."""

    async def run(self, tf: Client, keep_going: Callable[[], bool]) -> None:
        """Offer the load in 100 ms ticks while `keep_going()`, never awaiting the broker inline.

        Each tick's batch runs as its own task, so a server restart delays confirmations
        without slowing the offered rate; once 50 batches (5 s) are unconfirmed the tick
        is skipped instead, so the backlog of coroutines stays bounded.
        """
        credit = dict.fromkeys([*MIX, "event"], 0.0)
        start = time.monotonic()
        n = 0
        while keep_going():
            n += 1
            delay = start + n * TICK - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:  # the loop fell behind: drop the missed ticks, don't burst
                self.books.skipped_ticks += int(-delay / TICK)
                start = time.monotonic() - n * TICK
            if len(self.batches) >= MAX_UNCONFIRMED:
                self.books.skipped_ticks += 1
                continue
            items: list[tuple[str, Task[Any]]] = []
            for kind, share in MIX.items():
                credit[kind] += self.rate * share * TICK
                while credit[kind] >= 1:
                    credit[kind] -= 1
                    items.append((kind, self._make(kind)))
            credit["event"] += self.event_rate * TICK
            events = int(credit["event"])
            credit["event"] -= events
            batch = asyncio.create_task(self._send(tf, items, events))
            self.batches.add(batch)
            batch.add_done_callback(self.batches.discard)
        if self.batches:
            await asyncio.wait(set(self.batches))

    def _make(self, kind: str) -> Task[Any]:
        if kind == "noop":
            return soak_app.Noop()
        if kind == "sleepy":
            return soak_app.Sleepy(ms=self.rng.randint(10, 50))
        if kind == "doubler":
            return soak_app.Doubler(n=self.rng.randint(0, 1_000_000))
        if kind == "flaky":
            return soak_app.Flaky()
        return soak_app.Doomed()

    async def _send(self, tf: Client, items: list[tuple[str, Task[Any]]], events: int) -> None:
        ledger = self.books.ledger  # records what raised; the books note what was confirmed
        runs = await asyncio.gather(
            *(ledger.enqueue(tf, t) for _, t in items), return_exceptions=True
        )
        now = time.time()
        for (kind, task), run in zip(items, runs, strict=True):
            if isinstance(run, BaseException):
                continue
            self.books.confirmed(run.id, kind, now)
            if (
                isinstance(task, soak_app.Doubler)
                and len(self.waiters) < 100
                and self.rng.random() < 0.1
            ):
                waiter = asyncio.create_task(self._check_result(run, task.n * 2))
                self.waiters.add(waiter)
                waiter.add_done_callback(self.waiters.discard)
        ids = await asyncio.gather(
            *(tf.publish(soak_app.Ping(n=i)) for i in range(events)), return_exceptions=True
        )
        for event_id in ids:
            if isinstance(event_id, BaseException):
                self.books.publish_failed += 1
            else:
                self.books.published(event_id, now)

    async def _check_result(self, run: TaskRun[Any], expected: int) -> None:
        try:
            value = await run.result(timeout=60)
        except TaskframeError:
            self.books.results_timeout += 1
            return
        if value == expected:
            self.books.results_ok += 1
        else:
            self.books.results_bad += 1
