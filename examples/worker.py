"""The handlers. Run them with:  taskframe worker examples.worker:app"""

import asyncio
import hashlib

from examples.tasks import HashFile, SendEmail
from taskframe import App, Backoff, Context

app = App("quickstart")


@app.handle(HashFile, timeout=30.0)
def hash_file(job: HashFile, ctx: Context) -> str:
    """CPU-bound work in a plain `def`: it runs in a thread, off the event loop."""
    digest = hashlib.sha256()
    block = hashlib.sha256(job.name.encode()).digest() * 32  # 1 KiB, derived from the name
    for _ in range(job.size_kb):
        digest.update(block)
    return digest.hexdigest()


class MailServerBusy(Exception):
    """The mail server asked us to come back later (SMTP 421)."""


@app.handle(SendEmail, max_attempts=4, backoff=Backoff(initial=0.2, maximum=2.0))
async def send_email(job: SendEmail, ctx: Context) -> None:
    """I/O-bound work in `async def`: it runs on the event loop, many at once."""
    await asyncio.sleep(0.02)  # the round trip to the mail server
    if job.to.startswith("bounce@"):
        raise ValueError(f"mailbox {job.to} does not exist")
    if ctx.attempt == 1 and sum(job.to.encode()) % 5 == 0:  # one in five, on first try
        raise MailServerBusy("421 service not available, try again later")
    ctx.log.info("sent %r to %s on attempt %d", job.subject, job.to, ctx.attempt)
