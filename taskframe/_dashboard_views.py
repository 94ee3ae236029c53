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

from taskframe._dashboard_security import checked_form
from taskframe.client import Client
from taskframe.errors import TaskframeError
from taskframe.schedules import stored_schedules

PAGE = 50
REASONS = ("failed", "rejected", "invalid", "unknown-task", "lost")


async def _client(request: Request) -> Client:
    client: Client = await request.app.state.broker.client()
    return client


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    context.setdefault("csrf", request.app.state.csrf)
    response: Response = request.app.state.templates.TemplateResponse(
        request, name, context, status_code=status_code
    )
    return response


def _offset(request: Request) -> int:
    return _number(request.query_params.get("offset"), 0)


async def overview(request: Request) -> Response:
    return _render(request, "overview.html", **await _overview(request))


async def overview_fragment(request: Request) -> Response:
    return _render(request, "_overview.html", **await _overview(request))


async def _overview(request: Request) -> dict[str, Any]:
    client = await _client(request)
    return {"queues": await client.queues(), "workers": len(await client.workers())}


async def queues_json(request: Request) -> Response:
    client = await _client(request)
    return JSONResponse([dataclasses.asdict(q) for q in await client.queues()])


async def workers(request: Request) -> Response:
    offset = _offset(request)
    found = await (await _client(request)).workers()
    return _render(
        request, "workers.html", workers=found[offset : offset + PAGE], offset=offset, page=PAGE,
        more=len(found) > offset + PAGE,
    )  # fmt: skip


async def task_lookup(request: Request) -> Response:
    task_id = request.query_params.get("id", "").strip()
    if not task_id:
        return _render(request, "lookup.html")
    return RedirectResponse(str(request.url_for("task", task_id=task_id)), status_code=303)


async def task(request: Request) -> Response:
    return _render(request, "task.html", **await _task(request))


async def task_fragment(request: Request) -> Response:
    return _render(request, "_task.html", **await _task(request))


async def _task(request: Request) -> dict[str, Any]:
    client = await _client(request)
    task_id = request.path_params["task_id"]
    return {
        "task_id": task_id,
        "status": await client.status(task_id),
        "progress": await client.progress(task_id),
    }


async def dead(request: Request) -> Response:
    q = request.query_params
    filters = {k: q.get(k) or None for k in ("queue", "task", "reason", "task_id")}
    after, limit = _number(q.get("after"), 0), min(_number(q.get("limit"), PAGE), 500) or 1
    letters = await (await _client(request)).dead_letters(**filters, after=after, limit=limit)
    shown: dict[str, Any] = {k: v for k, v in filters.items() if v}
    if limit != PAGE:
        shown["limit"] = limit
    return _render(
        request, "dead.html", letters=letters, filters=shown, reasons=REASONS, after=after,
        more=len(letters) == limit,
    )  # fmt: skip


def _number(text: str | None, default: int) -> int:
    try:
        return max(0, int(text)) if text else default
    except ValueError:
        return default


async def schedules(request: Request) -> Response:
    client = await _client(request)
    offset = _offset(request)
    found = await stored_schedules(client.js, client.namespace)
    return _render(
        request, "schedules.html", schedules=found[offset : offset + PAGE], offset=offset,
        page=PAGE, more=len(found) > offset + PAGE,
    )  # fmt: skip


async def pause(request: Request) -> Response:
    await checked_form(request)
    client = await _client(request)
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
    task_id = request.path_params["task_id"]
    if not await _act(request, (await _client(request)).cancel(task_id)):
        raise HTTPException(409, f"task {task_id} is finished or not known: nothing to cancel")
    return RedirectResponse(str(request.url_for("task", task_id=task_id)), status_code=303)


async def replay(request: Request) -> Response:
    await checked_form(request)
    client = await _client(request)
    seq = request.path_params["seq"]
    found = await client.dead_letters(after=seq - 1, limit=1)
    if not found or found[0].seq != seq:
        raise HTTPException(404, f"no dead letter {seq} (replayed or removed already?)")
    await _act(request, client.replay(found[0]))
    return RedirectResponse(str(request.url_for("task", task_id=found[0].task_id)), 303)


async def _act(request: Request, action: Any) -> Any:
    """Await an action; a `TaskframeError` (an unknown queue, ...) is an HTTP 400."""
    try:
        return await action
    except TaskframeError as exc:
        raise HTTPException(400, str(exc)) from exc


def routes() -> list[Route]:
    """The dashboard's routes, relative to wherever it is mounted."""
    return [
        Route("/", overview, name="overview"),
        Route("/fragments/overview", overview_fragment, name="overview_fragment"),
        Route("/api/queues", queues_json, name="queues_json"),
        Route("/workers", workers, name="workers"),
        Route("/tasks", task_lookup, name="lookup"),
        Route("/tasks/{task_id}", task, name="task"),
        Route("/fragments/tasks/{task_id}", task_fragment, name="task_fragment"),
        Route("/tasks/{task_id}/cancel", cancel, methods=["POST"], name="cancel"),
        Route("/dead", dead, name="dead"),
        Route("/dead/{seq:int}/replay", replay, methods=["POST"], name="replay"),
        Route("/schedules", schedules, name="schedules"),
        Route("/queues/{queue}/{action:str}", pause, methods=["POST"], name="queue_action"),
    ]
