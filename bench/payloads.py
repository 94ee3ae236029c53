"""Bodies: bytes on disk and throughput with and without compression, and one large body.

    python -m bench.payloads [--n 5000] [--rounds 3] [--large-mib 64]

Each round, rows interleaved and rotated, on one nats-server (file storage):

* ``raw nats-py``: `publish_async` of N order documents (realistic JSON of about 10 KB,
  `Nats-Msg-Id` set) to a WorkQueue stream, then a `fetch(100)` consumer that parses each
  body and acks it;
* ``raw nats-py + zstd``: the same, the producer compressing each body with zstandard
  (level 3) and the consumer decompressing it: what compression costs by itself;
* ``taskframe``: `enqueue_many` of N `Order` tasks, then an in-process `Worker` whose
  handler sums the order (its result kept);
* ``taskframe zstd``: the same with `compress_over=1024` (bodies sent zstd-compressed);
* ``taskframe s2``: the queue declared `compression=True` (the stream stored s2 on disk);
* ``taskframe zstd + s2``: both.

Bytes on disk: the stream's directory in the server's store once the N tasks are stored
(`du`, block files included), beside the stream's own count of the bytes it holds. Rates:
N / seconds from the first publish to the last PubAck, and from the worker's start until
the consumer has nothing pending or unacked.

Large: one body of `--large-mib` MiB (random bytes as hex: it does not compress) as a
nats-py Object Store put then get (into a BytesIO, as taskframe reads), beside a taskframe
enqueue then `result()` of a task carrying it (stored in the payloads bucket, read by the
worker, deleted after its ack); and nats-py's plain `get()`, which appends every chunk to
a bytes object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import zstandard
from nats.js import api as js_api

from taskframe import App, Client, Context, Task, Worker, connect, provision
from taskframe import _topology as topology
from taskframe._server import NatsServer

QUEUE = "orders"
WORDS = [
    "steel",
    "oak",
    "linen",
    "brass",
    "walnut",
    "copper",
    "glass",
    "cotton",
    "wool",
    "marble",
    "slate",
    "cedar",
]
THINGS = ["chair", "table", "lamp", "rug", "shelf"]
CITIES = [
    "Paris",
    "Lyon",
    "Berlin",
    "Madrid",
    "Lisbon",
    "Oslo",
    "Vienna",
    "Prague",
    "Dublin",
    "Milan",
]


class Order(Task[float], queue=QUEUE):
    """An order document: the realistic body."""

    order_id: str
    customer: dict[str, str]
    lines: list[dict[str, Any]]
    notes: str


class Blob(Task[int], queue="blobs"):
    """A large body."""

    data: str


def orders(n: int, seed: int = 7) -> list[Order]:
    """N order documents of about 10 KB each, varied as real ones are."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        lines = [
            {
                "sku": f"{rng.choice(WORDS)[:3].upper()}-{rng.randrange(16**6):06x}",
                "name": f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(THINGS)}",
                "qty": rng.randint(1, 9),
                "unit_price": round(rng.uniform(3, 900), 2),
                "warehouse": rng.choice(CITIES),
                "ships": f"2026-12-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:00:00Z",
            }
            for _ in range(75)
        ]
        made.append(
            Order(
                order_id=f"A-{i:07d}",
                customer={
                    "name": f"Customer {rng.randrange(10**6)}",
                    "email": f"c{rng.randrange(10**6)}@example.com",
                    "city": rng.choice(CITIES),
                },
                lines=lines,
                notes=" ".join(rng.choice(WORDS) for _ in range(40)),
            )
        )
    return made


def build_app(namespace: str, s2: bool) -> App:
    app = App(namespace)
    app.queue(QUEUE, compression=s2)

    @app.handle(Order)
    async def total(job: Order, ctx: Context) -> float:
        return float(sum(line["qty"] * line["unit_price"] for line in job.lines))

    @app.handle(Blob)
    async def size(job: Blob, ctx: Context) -> int:
        return len(job.data)

    return app


def disk_bytes(store: Path, stream: str) -> int:
    """Bytes the stream's files take in the server's store."""
    found = list(store.glob(f"jetstream/*/streams/{stream}"))
    return sum(f.stat().st_blocks * 512 for d in found for f in d.rglob("*") if f.is_file())


async def _drained(client: Client, stream: str, consumer: str) -> None:
    while True:
        info = await client.js.consumer_info(stream, consumer)
        if info.num_pending + info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.005)


async def raw_row(
    url: str, store: Path, docs: list[bytes], tag: str, zstd: bool
) -> dict[str, float]:
    """Raw nats-py: publish_async the bodies, then fetch, parse and ack them."""
    nc = await nats.connect(url, allow_reconnect=False)
    js = nc.jetstream(publish_async_max_pending=4000)
    stream, subject = f"RAW_{tag}", f"raw.{tag}"
    await js.add_stream(
        js_api.StreamConfig(
            name=stream, subjects=[subject], retention=js_api.RetentionPolicy.WORK_QUEUE
        )
    )
    sub = await js.pull_subscribe(subject, "raw")
    packer, unpacker = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    began = time.perf_counter()
    futures = []
    for i, doc in enumerate(docs):
        body = packer.compress(doc) if zstd else doc
        futures.append(await js.publish_async(subject, body, headers={"Nats-Msg-Id": f"{tag}{i}"}))
    await asyncio.gather(*futures)
    enqueue = time.perf_counter() - began
    info = await js.stream_info(stream)
    found = {"logical": info.state.bytes, "disk": disk_bytes(store, stream)}
    began, left = time.perf_counter(), len(docs)
    while left:
        for msg in await sub.fetch(100, timeout=5):
            json.loads(unpacker.decompress(msg.data) if zstd else msg.data)
            await msg.ack()
            left -= 1
    process = time.perf_counter() - began
    await js.delete_stream(stream)
    await nc.close()
    return found | {"enqueue": len(docs) / enqueue, "process": len(docs) / process}


async def taskframe_row(
    url: str, store: Path, docs: list[Order], tag: str, zstd: bool, s2: bool
) -> dict[str, float]:
    """taskframe: enqueue_many the orders, then drain them with one in-process worker."""
    namespace = f"pl{tag}"
    app = build_app(namespace, s2)
    async with connect(url, namespace=namespace, compress_over=1024 if zstd else 0) as client:
        await provision(app, client, queues=[QUEUE])
        stream = topology.queue_stream(namespace, QUEUE)
        began = time.perf_counter()
        await client.enqueue_many(docs)
        enqueue = time.perf_counter() - began
        info = await client.js.stream_info(stream)
        found = {"logical": info.state.bytes, "disk": disk_bytes(store, stream)}
        worker = Worker(app, client, queues=[QUEUE])
        began = time.perf_counter()
        running = asyncio.create_task(worker.run())
        await _drained(client, stream, topology.WORKERS)
        process = time.perf_counter() - began
        worker.stop()
        await running
        await _delete(client, namespace)
    return found | {"enqueue": len(docs) / enqueue, "process": len(docs) / process}


async def _delete(client: Client, namespace: str) -> None:
    for info in await client.js.streams_info():
        if info.config.name and namespace in info.config.name:
            await client.js.delete_stream(info.config.name)


async def large(url: str, mib: int, tag: str) -> dict[str, float]:
    """Seconds for one `mib` MiB body: nats-py object put + get, taskframe enqueue + result."""
    data = os.urandom(mib * 2**19).hex()
    nc = await nats.connect(url, allow_reconnect=False)
    js = nc.jetstream()
    store = await js.create_object_store(f"RAW_{tag}")
    began = time.perf_counter()
    await store.put("blob", data.encode())
    out = io.BytesIO()
    await store.get("blob", writeinto=out)
    raw = time.perf_counter() - began
    assert len(out.getvalue()) == len(data)
    began = time.perf_counter()
    got = await store.get("blob")  # nats-py's default: appends each chunk to bytes
    plain_get = time.perf_counter() - began
    assert len(got.data or b"") == len(data)
    await js.delete_object_store(f"RAW_{tag}")
    await nc.close()
    namespace = f"lg{tag}"
    app = build_app(namespace, False)
    async with connect(url, namespace=namespace) as client:
        async with _worker(app, client):
            began = time.perf_counter()
            run = await client.enqueue(Blob(data=data))
            assert await run.result(timeout=300) == len(data)
            ours = time.perf_counter() - began
        await _delete(client, namespace)
    return {"raw": raw, "taskframe": ours, "plain_get": plain_get}


class _worker:
    """An in-process worker of `app`'s blob queue, ready on entry, stopped on exit."""

    def __init__(self, app: App, client: Client) -> None:
        self.worker = Worker(app, client, queues=["blobs"])

    async def __aenter__(self) -> Worker:
        self.running = asyncio.create_task(self.worker.run())
        await self.worker.ready.wait()
        return self.worker

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop()
        await self.running


ROWS = {
    "raw nats-py": ("raw", False, False),
    "raw nats-py + zstd": ("raw", True, False),
    "taskframe": ("tf", False, False),
    "taskframe zstd": ("tf", True, False),
    "taskframe s2": ("tf", False, True),
    "taskframe zstd + s2": ("tf", True, True),
}


async def run(
    n: int, rounds: int, mib: int
) -> tuple[dict[str, list[dict[str, float]]], list[dict[str, float]]]:
    docs = orders(n)
    bodies = [doc.model_dump_json().encode() for doc in docs]
    found: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    bigs = []
    names = list(ROWS)
    with tempfile.TemporaryDirectory() as tmp, NatsServer(port=-1, store_dir=tmp) as server:
        store = Path(tmp)
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for position, row in enumerate(order):
                kind, zstd, s2 = ROWS[row]
                tag = f"{index}{position}"
                if kind == "raw":
                    found[row].append(await raw_row(server.url, store, bodies, tag, zstd))
                else:
                    found[row].append(await taskframe_row(server.url, store, docs, tag, zstd, s2))
            bigs.append(await large(server.url, mib, str(index)))
    return found, bigs


def report(
    n: int,
    rounds: int,
    mib: int,
    found: dict[str, list[dict[str, float]]],
    bigs: list[dict[str, float]],
    size: int,
) -> str:
    def med(row: str, key: str) -> float:
        return statistics.median(d[key] for d in found[row])

    base_e, base_p = med("raw nats-py", "enqueue"), med("raw nats-py", "process")
    lines = [
        f"`python -m bench.payloads --n {n} --rounds {rounds} --large-mib {mib}`: {n} orders of "
        f"{size / 1000:.1f} KB JSON each",
        "",
        "| row | on disk MB | stream bytes MB | enqueue/s | x raw | processed/s | x raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in ROWS:
        e, p = med(row, "enqueue"), med(row, "process")
        lines.append(
            f"| {row} | {med(row, 'disk') / 1e6:.1f} | {med(row, 'logical') / 1e6:.1f} | "
            f"{e:,.0f} | {e / base_e:.2f} | {p:,.0f} | {p / base_p:.2f} |"
        )
    raw = statistics.median(b["raw"] for b in bigs)
    ours = statistics.median(b["taskframe"] for b in bigs)
    plain = statistics.median(b["plain_get"] for b in bigs)
    lines += [
        "",
        f"| one {mib} MiB body | seconds | MiB/s | x raw |",
        "| --- | ---: | ---: | ---: |",
        f"| nats-py object put + get (writeinto a BytesIO) | {raw:.2f} | {mib / raw:.0f} | 1.00 |",
        f"| taskframe enqueue + result() | {ours:.2f} | {mib / ours:.0f} | {raw / ours:.2f} |",
        f"| (nats-py get alone, without writeinto) | {plain:.2f} | {mib / plain:.0f} | |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large-mib", type=int, default=64)
    args = parser.parse_args()
    found, bigs = asyncio.run(run(args.n, args.rounds, args.large_mib))
    size = len(orders(1)[0].model_dump_json())
    print(report(args.n, args.rounds, args.large_mib, found, bigs, size))


if __name__ == "__main__":
    main()
