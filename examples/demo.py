"""The main job, end to end on one machine: an embedded nats-server, worker processes and a
producer doing real work, with live progress. Run it with `scripts/demo`, or:

    python -m examples.demo [--tasks 2000] [--workers 2]

It uses only what a user has: the `taskframe` command and the public API.
"""

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import taskframe
from examples.tasks import HashFile, SendEmail
from taskframe import TaskState

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "quickstart"
TASKFRAME = [sys.executable, "-m", "taskframe"]


def start_server(store: str) -> tuple[subprocess.Popen[str], str]:
    """`taskframe server` on a free port; its URL once it listens."""
    command = [*TASKFRAME, "server", "--port", "-1", "--store", store]
    server = subprocess.Popen(
        [*command, "--config", str(ROOT / "nats.conf")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    for line in server.stdout:  # the first line says where it listens, or it exits
        if found := re.search(r"listening on (nats://\S+)", line):
            return server, found.group(1)
    raise SystemExit(f"taskframe server exited with code {server.wait()}")


def start_workers(url: str, count: int) -> list[subprocess.Popen[bytes]]:
    command = [*TASKFRAME, "worker", "examples.worker:app"]
    command += ["--url", url, "--concurrency", "32", "--log-level", "error"]
    return [subprocess.Popen(command, cwd=ROOT) for _ in range(count)]


async def produce_and_watch(url: str, tasks: int) -> int:
    emails = max(2, tasks // 5)
    files = tasks - emails
    async with taskframe.connect(url, namespace=NAMESPACE) as tf:
        started = time.monotonic()
        file_runs = await tf.enqueue_many(
            HashFile(name=f"scan-{i:05}.tif", size_kb=12288) for i in range(files)
        )
        mail = [
            SendEmail(to=f"user{i}@example.com", subject="Your scans are ready")
            for i in range(emails - 2)
        ]
        mail += [SendEmail(to="bounce@example.com", subject=f"Undeliverable {i}") for i in range(2)]
        mail_runs = await tf.enqueue_many(mail)
        print(
            f"enqueued {files} HashFile and {emails} SendEmail tasks "
            f"in {time.monotonic() - started:.2f}s; 2 emails go to a mailbox that bounces"
        )

        total = len(file_runs) + len(mail_runs)
        live = sys.stdout.isatty()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            queues = await tf.queues()  # what the server holds: waiting, in flight, dead
            waiting = sum(q.waiting for q in queues)
            held = sum(q.in_flight for q in queues)
            retrying = sum(q.redelivered for q in queues)
            dead = sum(q.dead for q in queues)
            done = total - waiting - held
            elapsed = time.monotonic() - started
            line = (
                f"[{elapsed:5.1f}s] done {done:>5}/{total}"
                f"  waiting {waiting:>5}  in flight {held:>3}"
                f"  redelivered {retrying:>3}  dead {dead}"
                f"  ({done / elapsed:,.0f} tasks/s)"
            )
            print(f"\r{line}  " if live else line, end="" if live else "\n", flush=True)
            if done == total:
                break
            await asyncio.sleep(0.2 if live else 1.0)  # display refresh, not synchronisation
        if live:
            print()

        sample = await file_runs[0].result(timeout=5)
        print(f"scan-00000.tif sha256 = {sample}")
        statuses = await asyncio.gather(*(run.status() for run in [*file_runs, *mail_runs]))
        counts = Counter(status.state for status in statuses)
        letters = await tf.dead_letters()
        print(f"dead-letter stream holds {len(letters)} task(s) (see `taskframe dead`):")
        for letter in letters:
            print(
                f"  {letter.subject.rsplit('.', 1)[-1]} {letter.task_id} after {letter.attempts} "
                f"attempts ({letter.reason}): {letter.error_type}: {letter.error}"
            )
        print("final states: " + ", ".join(f"{n} {state.value}" for state, n in counts.items()))
        ok = counts[TaskState.SUCCEEDED] == total - 2 and counts[TaskState.DEAD] == 2
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="taskframe-demo-") as store:
        server, url = start_server(store)
        try:
            print(f"nats-server (JetStream, file storage) on {url}: taskframe server")
            workers = start_workers(url, args.workers)
            print(f"started {args.workers} worker processes: taskframe worker examples.worker:app")
            try:
                code = asyncio.run(produce_and_watch(url, args.tasks))
            finally:
                for worker in workers:
                    worker.send_signal(signal.SIGTERM)
                exits = [worker.wait(timeout=60) for worker in workers]
            print(f"workers drained and exited with codes {exits}")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        return code or max(exits)


if __name__ == "__main__":
    sys.exit(main())
