"""The dashboard's pages, fragments and actions. Every handler reads the server through the
app's `Broker`; lists are read a page at a time (dead letters by sequence, the rest by
offset), so no page loads a whole stream."""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from taskframe import _dashboard_dead as dead
from taskframe._dashboard_common import client_of, number, render
from taskframe._dashboard_errors import View, bounded
from taskframe._dashboard_security import checked_form
from taskframe._groups import group_infos
from taskframe._inbound import TASK_ID
from taskframe._queues import queue_infos, queue_streams
from taskframe.errors import TaskframeError
from taskframe.flows import flow_named
from taskframe.schedules import stored_schedules

PAGE = 50


def _offset(request: Request) -> int:
    return number(request.query_params.get("offset"), 0)


async def overview(request: Request) -> Response:
    return render(request, "overview.html", **await _overview(request))


async def overview_fragment(request: Request) -> Response:
    return render(request, "_overview.html", **await _overview(request))


async def _overview(request: Request) -> dict[str, Any]:
    client = await client_of(request)
    js, rates = client.js, request.app.state.rates
    streams = await queue_streams(js, client.namespace)
    throughput = {
        queue: rates.observe(info.config.name or queue, info.state.last_seq, info.state.messages)
        for _, queue, info in streams
    }
    return {
        "queues": await queue_infos(js, client.namespace, streams),
        "rates": throughput,
        "groups": await group_infos(js, client.namespace),
        "workers": len(await client.workers()),
    }


async def queues_json(request: Request) -> Response:
    client = await client_of(request)
    return JSONResponse([dataclasses.asdict(q) for q in await client.queues()])


async def workers(request: Request) -> Response:
    offset = _offset(request)
    found = await (await client_of(request)).workers()
    return render(
        request, "workers.html", workers=found[offset : offset + PAGE], offset=offset, page=PAGE,
        more=len(found) > offset + PAGE,
    )  # fmt: skip


async def task_lookup(request: Request) -> Response:
    task_id = request.query_params.get("id", "").strip()
    if not task_id:
        return render(request, "lookup.html")
    return RedirectResponse(str(request.url_for("task", task_id=task_id)), status_code=303)


async def task(request: Request) -> Response:
    return render(request, "task.html", **await _task(request))


async def task_fragment(request: Request) -> Response:
    return render(request, "_task.html", **await _task(request))


def _task_id(request: Request) -> str:
    task_id: str = request.path_params["task_id"]
    if not TASK_ID.fullmatch(task_id):
        raise HTTPException(400, f"{task_id!r} is not a task id")
    return task_id


async def _task(request: Request) -> dict[str, Any]:
    client = await client_of(request)
    task_id = _task_id(request)
    status = await client.status(task_id)
    run = await flow_named(client, task_id, status)  # a flow's id: its steps are the page
    flow = await run.status() if run is not None else None
    progress = await client.progress(task_id)
    return {"task_id": task_id, "status": status, "progress": progress, "flow": flow}


async def schedules(request: Request) -> Response:
    client = await client_of(request)
    offset = _offset(request)
    found = await stored_schedules(client.js, client.namespace, offset=offset, limit=PAGE + 1)
    return render(
        request, "schedules.html", schedules=found[:PAGE], offset=offset, page=PAGE,
        more=len(found) > PAGE,
    )  # fmt: skip


async def pause(request: Request) -> Response:
    await checked_form(request)
    client = await client_of(request)
    queue, action = request.path_params["queue"], request.path_params["action"]
    if action not in ("pause", "resume"):
        raise HTTPException(404, f"no action {action!r} on a queue")
    if action == "pause":
        await _act(request, client.pause(queue))
    else:
        await _act(request, client.resume(queue))
    return RedirectResponse(str(request.url_for("overview")), status_code=303)


async def cancel(request: Request) -> Response:
    await checked_form(request)
    task_id = _task_id(request)
    client = await client_of(request)
    run = await flow_named(client, task_id, await client.status(task_id))
    cancelled = run.cancel() if run is not None else client.cancel(task_id)
    if not await _act(request, cancelled):
        raise HTTPException(409, f"task {task_id} is finished or not known: nothing to cancel")
    return RedirectResponse(str(request.url_for("task", task_id=task_id)), status_code=303)


async def _act(request: Request, action: Any) -> Any:
    """Await an action; a `TaskframeError` (an unknown queue, ...) is an HTTP 400."""
    try:
        return await action
    except TaskframeError as exc:
        raise HTTPException(400, str(exc)) from exc


def routes() -> list[Route]:
    """The dashboard's routes, relative to wherever it is mounted."""
    pages: list[tuple[str, View, str, list[str] | None]] = [
        ("/", overview, "overview", None),
        ("/fragments/overview", overview_fragment, "overview_fragment", None),
        ("/api/queues", queues_json, "queues_json", None),
        ("/workers", workers, "workers", None),
        ("/tasks", task_lookup, "lookup", None),
        ("/tasks/{task_id}", task, "task", None),
        ("/fragments/tasks/{task_id}", task_fragment, "task_fragment", None),
        ("/tasks/{task_id}/cancel", cancel, "cancel", ["POST"]),
        ("/dead", dead.dead, "dead", None),
        ("/dead/{seq:int}/replay", dead.replay, "replay", ["POST"]),
        ("/dead/{seq:int}/delete", dead.delete, "delete", ["POST"]),
        ("/dead/{action:str}", dead.bulk, "dead_bulk", ["POST"]),
        ("/schedules", schedules, "schedules", None),
        ("/queues/{queue}/{action:str}", pause, "queue_action", ["POST"]),
    ]
    return [
        Route(path, bounded(view), methods=methods, name=name)
        for path, view, name, methods in pages
    ]
