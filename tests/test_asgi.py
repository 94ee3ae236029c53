"""taskframe.asgi: one client per Starlette/FastAPI app, and the FastAPI example served
through httpx's ASGI transport against a real server and worker."""

import hashlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import taskframe.asgi
from examples.fastapi_service import create_app
from examples.tasks import HashFile
from examples.worker import hash_file
from taskframe import App, Client
from taskframe.testing import NatsServer, running_worker


async def test_the_fastapi_example_returns_a_tasks_result(
    nats_server: NatsServer, client: Client
) -> None:
    worker_app = App(client.namespace)
    worker_app.handle(HashFile)(hash_file)
    service = create_app(nats_server.url, namespace=client.namespace)
    transport = httpx.ASGITransport(app=service)
    async with (
        running_worker(worker_app, client),
        service.router.lifespan_context(service),
        httpx.AsyncClient(transport=transport, base_url="http://svc") as http,
    ):
        answer = await http.post("/hash", params={"name": "a.pdf", "size_kb": 2})
        assert answer.status_code == 200, answer.text
        block = hashlib.sha256(b"a.pdf").digest() * 32
        assert answer.json()["sha256"] == hashlib.sha256(block * 2).hexdigest()
        status = await http.get(f"/tasks/{answer.json()['id']}")
        assert status.json()["state"] == "succeeded"
        assert (await http.get("/tasks/nope")).status_code == 404
    assert not hasattr(service.state, "taskframe"), "the lifespan closed and dropped its client"


async def test_a_starlette_app_without_the_lifespan_gets_a_clear_error() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"ns": taskframe.asgi.get_client(request).namespace})

    app = Starlette(routes=[Route("/", endpoint)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        with pytest.raises(RuntimeError, match=r"taskframe\.asgi\.lifespan"):
            await http.get("/")
