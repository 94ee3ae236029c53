"""Enqueue tasks and wait for their results. Needs a server and a worker running:

taskframe server &
taskframe worker examples.worker:app &
python -m examples.producer
"""

import asyncio

import taskframe
from examples.tasks import HashFile, SendEmail


async def main() -> None:
    async with taskframe.connect("nats://127.0.0.1:4222", namespace="quickstart") as tf:
        run = await tf.enqueue(HashFile(name="report.pdf", size_kb=512))
        digest = await run.result(timeout=30)  # typed: str
        print(f"report.pdf sha256 = {digest}")

        runs = await tf.enqueue_many(HashFile(name=f"photo-{i}.jpg") for i in range(100))
        digests = [await r.result(timeout=30) for r in runs]
        print(f"hashed {len(digests)} photos")

        welcome = await tf.enqueue(
            SendEmail(to="ada@example.com", subject="Welcome"), key="welcome/ada"
        )
        await welcome.result(timeout=30)
        print("welcome email sent (at most once per key within the duplicate window)")


if __name__ == "__main__":
    asyncio.run(main())
