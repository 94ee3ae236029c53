"""What the one-run comparisons (`bench.hooks_cost`, `bench.flows`) share: waiting for a
queue to drain, and their command line (`--n`, `--rounds`, a Markdown table printed)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from taskframe import Client
from taskframe import _topology as topology

T = TypeVar("T")


async def drained(client: Client, namespace: str, queue: str) -> None:
    """Return once the queue's consumer has nothing pending and nothing unacked."""
    stream = topology.queue_stream(namespace, queue)
    subject = topology.consumer_info_subject(stream, topology.WORKERS)
    while True:
        state = json.loads((await client.nc.request(subject, b"", timeout=5)).data)
        if "error" not in state and state["num_pending"] + state["num_ack_pending"] == 0:
            return
        await asyncio.sleep(0.005)


def main(
    doc: str,
    default_n: int,
    run: Callable[[int, int], Awaitable[T]],
    report: Callable[[int, int, T], str],
) -> None:
    """Parse `--n` and `--rounds`, run every round, print the report."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--n", type=int, default=default_n)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(args.n, args.rounds, asyncio.run(run(args.n, args.rounds))))
