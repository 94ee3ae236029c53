"""Interleaved A/B of the default path: the CLI worker of another checkout against this one.

    git worktree add --detach /tmp/base <rev>
    python -m bench.ab --base /tmp/base --n 20000 --rounds 5

Rows (each drains its own backlog of `--n` no-op tasks on one shared nats-server; each
round starts one row later): the CLI worker of `--base` and of this tree, result kept and
`results=False`, and the raw nats-py loops of `bench/default_path.py`. On a shared
machine the rates move with the load; the worker's CPU per task moves less, and its
minimum over the rounds is the best estimate of what the code costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench import default_path as dp
from taskframe.testing import NatsServer

REPO = Path(__file__).resolve().parent.parent
ROWS = ("base-kept", "this-kept", "base-off", "this-off", "raw-kv", "raw-pull")


def worker_argv(tree: Path) -> list[str]:
    """`taskframe worker bench.default_path_app:app`, importing taskframe from `tree`."""
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); from taskframe.cli import main; "
        "sys.argv = ['taskframe', 'worker', 'bench.default_path_app:app']; main()"
    )
    return [sys.executable, "-c", code]


async def drain(row: str, url: str, pid: int, tag: str, n: int, base: Path) -> dp.Drain:
    if row == "raw-kv":
        return await dp.raw_kv(url, tag, n, pid)
    if row == "raw-pull":
        return await dp.raw_pull(url, tag, n, pid)
    which, mode = row.split("-")
    tree = base if which == "base" else REPO
    argv = worker_argv(tree)
    return await dp.cli(url, tag, n, pid, results=mode == "kept", argv=argv, row=row)


async def measure(url: str, pid: int, n: int, rounds: int, base: Path) -> None:
    drains: dict[str, list[dp.Drain]] = {row: [] for row in ROWS}
    for number in range(rounds):
        shift = number % len(ROWS)
        for row in ROWS[shift:] + ROWS[:shift]:
            done = await drain(row, url, pid, f"{number}{row.replace('-', '')}", n, base)
            drains[row].append(done)
            print(f"round {number} {row:9s} {done.rate:9,.0f}/s  worker {done.worker_us:5.1f} us")
    print("row        tasks/s median (max)   worker us/task median (min)   server us/task")
    for row, done in drains.items():
        rates, cpu = [d.rate for d in done], [d.worker_us for d in done]
        server = statistics.median(d.server_us for d in done)
        print(
            f"{row:9s} {statistics.median(rates):9,.0f} ({max(rates):7,.0f})"
            f"   {statistics.median(cpu):5.1f} ({min(cpu):5.1f})   {server:5.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a checkout to compare with")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store, NatsServer(port=-1, store_dir=store) as server:
        assert server.process is not None
        asyncio.run(measure(server.url, server.process.pid, args.n, args.rounds, args.base))


if __name__ == "__main__":
    main()
