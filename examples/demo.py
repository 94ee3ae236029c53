"""The main job, end to end on one machine: an embedded nats-server, worker processes and a
producer doing real work, with live progress. Run it with `scripts/demo`, or:

    python -m examples.demo [--tasks 2000] [--workers 2]
"""

import argparse
import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from nats.js.errors import NotFoundError

import taskframe
from examples.tasks import HashFile, SendEmail
from taskframe import TaskState
from taskframe._deadletters import dead_letters
from taskframe._results import parse_record
from taskframe._server import NatsServer
from taskframe._topology import WORKERS, queue_stream, results_bucket

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "quickstart"


def start_workers(url: str, count: int) -> list[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", "taskframe", "worker", "examples.worker:app"]
    command += ["--url", url, "--concurrency", "32", "--log-level", "error"]
    return [subprocess.Popen(command, cwd=ROOT) for _ in range(count)]


async def in_flight(tf: taskframe.Client) -> int:
    """Tasks the workers hold right now (delivered, not yet acknowledged), from the server."""
    held = 0
    for queue in ("files", "email"):
        try:
            info = await tf.js.consumer_info(queue_stream(NAMESPACE, queue), WORKERS)
        except NotFoundError:  # the workers have not created it yet
            continue
        held += info.num_ack_pending or 0
    return held


async def produce_and_watch(url: str, tasks: int) -> int:
    emails = max(2, tasks // 5)
    files = tasks - emails
    async with taskframe.connect(url, namespace=NAMESPACE) as tf:
        states: dict[str, TaskState] = {}
        retries = 0

        async def on_status(msg: object) -> None:
            nonlocal retries
            record = parse_record(msg.data)  # type: ignore[attr-defined]
            retries += record.state is TaskState.FAILED
            if record.id not in states or not states[record.id].final:
                states[record.id] = record.state

        # Final records are the bucket's keys; running and failed ones are stored beside them.
        watcher = await tf.nc.subscribe(f"$KV.{results_bucket(NAMESPACE)}.>", cb=on_status)
        progress = await tf.nc.subscribe(f"{NAMESPACE}.progress.>", cb=on_status)
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

        ids = {r.id for r in file_runs} | {r.id for r in mail_runs}
        live = sys.stdout.isatty()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            counts = Counter(states.get(i, TaskState.QUEUED) for i in ids)
            done = counts[TaskState.SUCCEEDED] + counts[TaskState.DEAD]
            elapsed = time.monotonic() - started
            held = await in_flight(tf)
            line = (
                f"[{elapsed:5.1f}s] done {done:>5}/{len(ids)}"
                f"  waiting {len(ids) - done - held:>5}  in flight {held:>3}"
                f"  retries {retries:>3}  dead {counts[TaskState.DEAD]}"
                f"  ({done / elapsed:,.0f} tasks/s)"
            )
            print(f"\r{line}  " if live else line, end="" if live else "\n", flush=True)
            if done == len(ids):
                break
            await asyncio.sleep(0.2 if live else 1.0)  # display refresh, not synchronisation
        if live:
            print()
        await watcher.unsubscribe()
        await progress.unsubscribe()

        sample = await file_runs[0].result(timeout=5)
        print(f"scan-00000.tif sha256 = {sample}")
        letters = await dead_letters(tf.js, NAMESPACE)
        print(f"dead-letter stream holds {len(letters)} task(s) (see `taskframe dead`):")
        for letter in letters:
            print(
                f"  {letter.subject.rsplit('.', 1)[-1]} {letter.task_id} after {letter.attempts} "
                f"attempts ({letter.reason}): {letter.error_type}: {letter.error}"
            )
        ok = counts[TaskState.SUCCEEDED] == len(ids) - 2 and counts[TaskState.DEAD] == 2
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="taskframe-demo-") as store,
        NatsServer(port=-1, store_dir=store, config=ROOT / "nats.conf") as server,
    ):
        print(f"nats-server (JetStream, file storage) on {server.url}")
        workers = start_workers(server.url, args.workers)
        print(f"started {args.workers} worker processes: taskframe worker examples.worker:app")
        try:
            code = asyncio.run(produce_and_watch(server.url, args.tasks))
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            exits = [worker.wait(timeout=60) for worker in workers]
        print(f"workers drained and exited with codes {exits}")
        return code or max(exits)


if __name__ == "__main__":
    sys.exit(main())
