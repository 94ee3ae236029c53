"""A FastAPI service that enqueues tasks and answers with their results. Needs a server and
a worker running, and `pip install 'taskframe[asgi]' fastapi uvicorn`:

taskframe server &
taskframe worker examples.worker:app &
uvicorn examples.fastapi_service:app
curl -X POST 'http://127.0.0.1:8000/hash?name=report.pdf'
"""

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException

import taskframe.asgi
from examples.tasks import HashFile
from taskframe import Client, ResultTimeoutError

Broker = Annotated[Client, Depends(taskframe.asgi.get_client)]


def create_app(url: str | None = None, namespace: str = "quickstart") -> FastAPI:
    """The service, with one taskframe client opened by its lifespan."""
    service = FastAPI(lifespan=taskframe.asgi.lifespan(url, namespace=namespace))

    @service.post("/hash")
    async def hash_file(name: str, tf: Broker, size_kb: int = 256) -> dict[str, str]:
        run = await tf.enqueue(HashFile(name=name, size_kb=size_kb))
        try:
            digest = await run.result(timeout=10)
        except ResultTimeoutError:
            raise HTTPException(504, f"task {run.id} did not finish in time") from None
        return {"id": run.id, "sha256": digest}

    @service.get("/tasks/{task_id}")
    async def task_status(task_id: str, tf: Broker) -> dict[str, str]:
        status = await tf.status(task_id)
        if status is None:
            raise HTTPException(404, f"no status for task {task_id}")
        return {"id": task_id, "state": status.state.value}

    return service


app = create_app()
