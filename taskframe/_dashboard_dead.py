"""The dashboard's dead-letters page and its actions: replay or delete one letter, or every
letter that matches the page's filters.

Everything reads the dead-letter stream a page at a time: a page stops after `SCAN`
letters read even if few matched (the reason and task id are matched here, not by the
server), and a bulk action works through the stream in pages, up to the last letter
stored when it began (a replayed task that dies again is not replayed again).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from nats.js.errors import NotFoundError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from taskframe import _deadletters as deadletters
from taskframe import _topology as topology
from taskframe._dashboard_common import client_of, number, render
from taskframe._dashboard_security import checked_form
from taskframe._inbound import TOKEN
from taskframe._retry import answered
from taskframe.client import Client

PAGE = 50
SCAN = 1000
REASONS = ("failed", "rejected", "invalid", "unknown-task", "lost")
FILTERS = ("queue", "task", "reason", "task_id")
# A bulk action stops after this long and says how far it got; pressing again goes on.
BULK_SECONDS = 20.0
_DONE = {"replay-all": "replayed", "delete-all": "deleted"}


def _filters(fields: Any) -> dict[str, str | None]:
    """The filters given; a queue or task name that is not one is an HTTP 400."""
    found = {k: (fields.get(k) or "").strip() or None for k in FILTERS}
    for key in ("queue", "task"):
        name = found[key]
        if name is not None and not TOKEN.fullmatch(name):
            raise HTTPException(400, f"{name!r} is not a {key} name")
    return found


async def dead(request: Request) -> Response:
    """A page of dead letters matching the query's filters, after sequence `after`."""
    q = request.query_params
    filters = _filters(q)
    after, limit = number(q.get("after"), 0), min(number(q.get("limit"), PAGE), 500) or 1
    client = await client_of(request)
    letters, last = await deadletters.dead_letter_page(
        client.js, client.namespace, **filters, after=after, limit=limit, scan=SCAN
    )
    shown: dict[str, Any] = {k: v for k, v in filters.items() if v}
    if limit != PAGE:
        shown["limit"] = limit
    done = q.get("done")
    return render(
        request, "dead.html", letters=letters, filters=shown, reasons=REASONS, after=after,
        next_after=last, done=number(q.get("count"), 0) if done in _DONE.values() else None,
        done_verb=done, unfinished=q.get("unfinished") == "1",
    )  # fmt: skip


async def _letter(client: Client, seq: int) -> deadletters.DeadLetter:
    found = await client.dead_letters(after=seq - 1, limit=1)
    if not found or found[0].seq != seq:
        raise HTTPException(404, f"no dead letter {seq} (replayed or removed already?)")
    return found[0]


async def replay(request: Request) -> Response:
    """Replay one dead letter, then show its task."""
    await checked_form(request)
    client = await client_of(request)
    letter = await _letter(client, request.path_params["seq"])
    await client.replay(letter)
    return RedirectResponse(str(request.url_for("task", task_id=letter.task_id)), 303)


async def delete(request: Request) -> Response:
    """Delete one dead letter, then show the dead letters (with the filters it was under)."""
    fields = await checked_form(request)
    client = await client_of(request)
    seq = request.path_params["seq"]
    if not await deadletters.delete(client.js, client.namespace, seq):
        raise HTTPException(404, f"no dead letter {seq} (replayed or removed already?)")
    return _back(request, _filters(fields), "deleted", 1, unfinished=False)


async def bulk(request: Request) -> Response:
    """Replay or delete every dead letter matching the form's filters, a page at a time."""
    fields = await checked_form(request)
    action = request.path_params["action"]
    if action not in _DONE:
        raise HTTPException(404, f"no action {action!r} on dead letters")
    client = await client_of(request)
    filters = _filters(fields)
    try:
        info = await answered("the dead letters", client.js.stream_info, _stream(client))
    except NotFoundError:
        return _back(request, filters, _DONE[action], 0, unfinished=False)
    upto, after, count = info.state.last_seq, 0, 0
    deadline = time.monotonic() + BULK_SECONDS
    while time.monotonic() < deadline:
        letters, after = await deadletters.dead_letter_page(
            client.js, client.namespace, **filters, after=after, limit=100, scan=SCAN
        )
        for letter in letters:
            if letter.seq > upto:
                break
            if action == "replay-all":
                await client.replay(letter)
                count += 1
            elif await deadletters.delete(client.js, client.namespace, letter.seq):
                count += 1
        if after == 0 or after >= upto:
            return _back(request, filters, _DONE[action], count, unfinished=False)
    return _back(request, filters, _DONE[action], count, unfinished=True)


def _stream(client: Client) -> str:
    return topology.dead_stream(client.namespace)


def _back(
    request: Request, filters: dict[str, str | None], verb: str, count: int, *, unfinished: bool
) -> Response:
    query = {k: v for k, v in filters.items() if v}
    query.update(done=verb, count=str(count))
    if unfinished:
        query["unfinished"] = "1"
    return RedirectResponse(f"{request.url_for('dead')}?{urlencode(query)}", status_code=303)
