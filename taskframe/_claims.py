"""Exactly-once claims: a task runs on one worker at a time, and never again once it completed.

Each claim is one key in the KV bucket `TF_<ns>_claims`, written only with compare-and-set
(`Nats-Expected-Last-Subject-Sequence`), so two workers can never both hold it:

    absent ──claim──▶ running (TTL = lease) ──complete──▶ done (TTL = claim_ttl)
                         │  ▲ renew (the worker's heartbeat)
                         └──┴─release (attempt failed) ──▶ released (short TTL)

A running claim carries a per-message TTL of a few `ack_wait`s, renewed by the worker's
heartbeat; if the worker dies the server deletes the key when the TTL runs out, and the
redelivered task can be claimed again. Expiry is the server's clock, not the workers'.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from enum import StrEnum

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe.settings import Settings

log = logging.getLogger("taskframe._claims")

_WRONG_LAST_SEQUENCE = 10071
_LEASES = 3  # a running claim outlives this many ack_waits without renewal


class Outcome(StrEnum):
    """What a claim attempt found."""

    CLAIMED = "claimed"
    DONE = "done"
    BUSY = "busy"


@dataclass(slots=True)
class Claim:
    """A claim this worker holds (or tried to): its key and the revision it last wrote."""

    task_id: str
    outcome: Outcome
    revision: int = 0
    lost: bool = False
    record: bytes | None = None  # a done claim's final status record, if its task keeps one


class Claims:
    """The claims bucket of one namespace."""

    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self._js = js
        self._settings = settings
        self._stream = topology.claims_stream(settings.namespace)
        self._lease = max(1, math.ceil(settings.ack_wait * _LEASES))
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    def _subject(self, task_id: str) -> str:
        return topology.claim_subject(self._settings.namespace, task_id)

    async def _write(
        self, task_id: str, state: str, last: int, ttl: float, record: bytes | None = None
    ) -> int | None:
        """Compare-and-set one claim; the new revision, or None if someone else wrote first."""
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(last),
            "Nats-TTL": f"{max(1, math.ceil(ttl))}s",
        }
        claim = {"state": state, "owner": self._owner, "at": wire.now_rfc3339()}
        if record is not None:
            claim["record"] = record.decode()
        body = wire.dumps(claim)
        try:
            ack = await self._js.publish(
                self._subject(task_id),
                body,
                timeout=self._settings.publish_timeout,
                headers=headers,
            )
        except APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return None
            raise
        return ack.seq

    async def claim(self, task_id: str) -> Claim:
        """Try to take `task_id`: CLAIMED (run it), DONE (it completed: ack it) or BUSY."""
        try:
            last = await self._js.get_last_msg(self._stream, self._subject(task_id))
        except NotFoundError:
            seq, state = 0, ""
        else:
            seq = last.seq or 0
            stored = json.loads(last.data) if last.data else {}
            state = stored.get("state", "")
            if state == "done":
                record = stored.get("record")
                return Claim(task_id, Outcome.DONE, seq, record=record.encode() if record else None)
        if state == "running":
            return Claim(task_id, Outcome.BUSY, seq)
        revision = await self._write(task_id, "running", seq, self._lease)
        if revision is None:
            return Claim(task_id, Outcome.BUSY, seq)
        return Claim(task_id, Outcome.CLAIMED, revision)

    async def renew(self, claim: Claim) -> bool:
        """Extend a held claim's lease; False (and `lost`) if another worker took it over."""
        try:
            return await self._advance(claim, "running", self._lease)
        except (APIError, nats.errors.Error) as exc:
            log.debug("claim %s not renewed now: %r", claim.task_id, exc)
            return True  # transient; the TTL still covers a few more attempts

    async def complete(self, claim: Claim, record: bytes | None) -> bool:
        """Mark the task done for `claim_ttl`; False if the claim was lost meanwhile.

        `record` (the task's final status, with its result) is kept with the claim, so a
        redelivery that finds the task done can store it again if storing it failed.
        """
        return await self._advance(claim, "done", self._settings.claim_ttl, record)

    async def _advance(
        self, claim: Claim, state: str, ttl: float, record: bytes | None = None
    ) -> bool:
        """Move a held claim to `state`; False (and `lost`) if another worker wrote first."""
        if claim.lost:
            return False
        revision = await self._write(claim.task_id, state, claim.revision, ttl, record)
        if revision is None:
            claim.lost = True
            return False
        claim.revision = revision
        return True

    async def release(self, claim: Claim) -> None:
        """Give a claim back after a failed attempt, so the next attempt can take it at once."""
        if claim.lost:
            return
        try:
            await self._write(claim.task_id, "released", claim.revision, 1)
        except (APIError, nats.errors.Error) as exc:  # the lease TTL will free it anyway
            log.debug("claim %s not released: %r", claim.task_id, exc)
