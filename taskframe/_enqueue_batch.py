"""What the server said about a batch of enqueues (`Client.enqueue_many`): which tasks it
did not confirm, which queues had no stream, which it refused, and the error that says so."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.errors import NoStreamResponseError

from taskframe._publish import TRANSIENT, Ack
from taskframe.errors import PublishError, StoreFullError
from taskframe.models import Task


def unconfirmed(
    batch: list[Task[Any]], sent: list[int], futures: list[asyncio.Future[Ack]]
) -> tuple[list[int], set[str], list[tuple[int, PublishError]]]:
    """Which of `sent` were not confirmed, which queues had no stream, which were refused."""
    unconfirmed, missing, refused = [], set(), []
    for index, future in zip(sent, futures, strict=True):
        if not future.done():
            future.cancel()
            unconfirmed.append(index)
        elif (error := future.exception()) is not None:
            if isinstance(error, PublishError):
                refused.append((index, error))
                continue
            if isinstance(error, NoStreamResponseError):
                missing.add(type(batch[index]).__tf_queue__)
            elif not isinstance(error, TRANSIENT):
                raise PublishError(f"server refused a task: {error}") from error
            unconfirmed.append(index)
    return unconfirmed, missing, refused


def refused_batch(
    refused: list[tuple[int, PublishError]],
    unconfirmed: list[int],
    prepared: list[tuple[str, bytes, dict[str, str], str]],
) -> PublishError:
    """The error of a batch some of whose tasks the server refused: the first refusal's kind.

    It names the refused tasks and, apart, those not confirmed either way; every other task
    of the batch is stored.
    """
    ids = tuple(prepared[i][3] for i, _ in refused)
    first = refused[0][1]
    if isinstance(first, StoreFullError) and all(isinstance(e, StoreFullError) for _, e in refused):
        error: PublishError = first.for_tasks(ids)
    else:
        error = PublishError(f"{len(ids)} task(s) refused, ids {list(ids[:10])}: {first}")
    if unconfirmed:
        error.add_note(
            f"{len(unconfirmed)} more not confirmed (may or may not be stored): ids "
            f"{[prepared[i][3] for i in unconfirmed[:10]]}"
        )
    error.__cause__ = first
    return error
