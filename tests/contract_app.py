"""The app the cross-language tests run in a `taskframe worker` subprocess
(`tests.contract_app:app`), in the namespace TEST_NAMESPACE names.

tests/node/producer.mjs enqueues its task and publishes its event by docs/wire-format.md
alone; the subscriber enqueues a follow-up under the key `after-<event id>`, so a producer
can read what its event caused by the key rule.
"""

import os

from taskframe import App, Context, Event, Task


class Greet(Task[str], queue="greetings"):
    name: str


class Greeted(Event, name="greeting.sent"):
    name: str


app = App(os.environ.get("TEST_NAMESPACE", "contracts"))
app.queue("greetings", priorities=["high", "default"])


@app.handle(Greet)
async def greet(task: Greet, ctx: Context) -> str:
    return f"hello {task.name}"


@app.subscribe(Greeted, group="audit")
async def audit(event: Greeted, ctx: Context) -> None:
    await ctx.enqueue(Greet(name=event.name), key=f"after-{ctx.task_id}")
