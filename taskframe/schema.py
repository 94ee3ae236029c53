"""Contracts for programs in any language: JSON Schema of every body, and an AsyncAPI document.

`taskframe schema shop.worker:app --out contracts/` writes, for the app's namespace:

    tasks/<queue>/<TaskName>.json     the task model: what a producer publishes
    results/<queue>/<TaskName>.json   the handler's return value, as `result` in its record
    events/<EventName>.json           the event model
    status.json                       a status record in the results bucket
    asyncapi.json                     AsyncAPI 3.0: channels are subjects (lanes included),
                                      messages the models with their headers

The rules these do not capture (ids, keys, streams that must exist) are in
docs/wire-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from taskframe import _inbound as inbound
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._results import TaskStatus
from taskframe.app import App

__all__ = ["asyncapi_document", "json_schemas", "write_schemas"]

Schema = dict[str, Any]

_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_COMPONENT_REF = "#/components/schemas/{model}"
_ID = {"type": "string", "pattern": f"^{inbound.TASK_ID.pattern}$", "maxLength": 256}
_NAME = {"type": "string", "pattern": f"^{inbound.TOKEN.pattern}$", "maxLength": 256}
_EVENT_NAME = {"type": "string", "pattern": f"^{inbound.EVENT_NAME.pattern}$", "maxLength": 256}
_TRACEPARENT = {"type": "string", "description": "W3C trace context, passed on untouched."}
_ALWAYS_IN_RECORDS = ["id", "task", "state", "attempt", "updated_at", "error"]


def json_schemas(app: App) -> dict[str, Schema]:
    """The JSON Schema (draft 2020-12) of each body `app` exchanges, by relative file path.

    Paths as in the module docstring; each schema is self-contained (`$defs` inside).
    """
    found: dict[str, Schema] = {}
    for (queue, name), handler in sorted(app.handlers.items()):
        found[f"tasks/{queue}/{name}.json"] = _standalone(handler.model.model_json_schema())
        result = handler.result.json_schema(mode="serialization")
        found[f"results/{queue}/{name}.json"] = _standalone(result, f"{name} result")
    for name, model in sorted(_events(app).items()):
        found[f"events/{name}.json"] = _standalone(model.model_json_schema())
    found["status.json"] = _standalone(status_schema())
    return found


def status_schema(ref_template: str = "#/$defs/{model}") -> Schema:
    """A status record as workers write it: `result` only in `succeeded` records."""
    schema = TaskStatus.model_json_schema(ref_template=ref_template, mode="serialization")
    schema["required"] = _ALWAYS_IN_RECORDS
    schema["description"] = (
        "The latest status of one task, the value of key <id> in KV bucket TF_<namespace>_results."
        " `result` is present in succeeded records only."
    )
    return schema


def asyncapi_document(app: App, version: str = "1.0.0") -> Schema:
    """An AsyncAPI 3.0 document of `app`'s namespace, as seen from its workers.

    The workers receive task messages on one channel per queue, task and lane, and event
    messages on one channel per event; they send status records to the results bucket.
    `version` is the document's `info.version`.
    """
    ns = app.namespace
    doc: Schema = {
        "asyncapi": "3.0.0",
        "info": {
            "title": f"taskframe namespace {ns}",
            "version": version,
            "description": "Tasks, events and status records; rules in taskframe's "
            "docs/wire-format.md. Publish through JetStream and wait for the PubAck.",
        },
        "defaultContentType": "application/json",
        "channels": {},
        "operations": {},
        "components": {"schemas": {}, "messages": {}},
    }
    for (queue, name), handler in sorted(app.handlers.items()):
        message = f"task.{queue}.{name}"
        _add_message(doc, message, handler.model.model_json_schema(ref_template=_COMPONENT_REF))
        doc["components"]["messages"][message]["headers"] = _headers("task", wire.TASK, _NAME)
        for lane in app.options(queue).lanes:
            address = wire.task_subject(ns, queue, name, lane)
            channel = address.removeprefix(f"{ns}.")
            _add_channel(doc, channel, address, message, f"Task {name} of queue {queue}")
            _add_operation(doc, f"handle.{channel}", "receive", channel, message)
    for name, model in sorted(_events(app).items()):
        message = f"event.{name}"
        _add_message(doc, message, model.model_json_schema(ref_template=_COMPONENT_REF))
        doc["components"]["messages"][message]["headers"] = _headers(
            "event", wire.EVENT, _EVENT_NAME
        )
        address = wire.event_subject(ns, name)
        channel = address.removeprefix(f"{ns}.")
        _add_channel(doc, channel, address, message, f"Event {name}")
        _add_operation(doc, f"subscribe.{channel}", "receive", channel, message)
    _add_message(doc, "status", status_schema(_COMPONENT_REF))
    address = topology.result_subject(ns, "{taskId}")
    _add_channel(doc, "results", address, "status", "Final status records, one key per task")
    doc["channels"]["results"]["parameters"] = {
        "taskId": {"description": "The task id (docs/wire-format.md: idempotency keys)."}
    }
    _add_operation(doc, "record.results", "send", "results", "status")
    return doc


def write_schemas(app: App, out: Path, version: str = "1.0.0") -> list[Path]:
    """Write `json_schemas(app)` and `asyncapi.json` under `out`; return the files written."""
    files = {**json_schemas(app), "asyncapi.json": asyncapi_document(app, version)}
    written = []
    for relative, schema in files.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written


def _events(app: App) -> dict[str, Any]:
    return {handler.model.__tf_name__: handler.model for handler in app.subscribers.values()}


def _standalone(schema: Schema, title: str | None = None) -> Schema:
    out = {"$schema": _DIALECT, **schema}
    if title and "title" not in out:
        out["title"] = title
    return out


def _add_message(doc: Schema, name: str, schema: Schema) -> None:
    """Put `schema` (refs as `_COMPONENT_REF`) under components with its `$defs` hoisted."""
    schemas = doc["components"]["schemas"]
    schemas.update(schema.pop("$defs", {}))
    schemas[name] = schema
    doc["components"]["messages"][name] = {
        "name": name,
        "title": schema.get("title", name),
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{name}"},
    }


def _add_channel(doc: Schema, channel: str, address: str, message: str, about: str) -> None:
    doc["channels"][channel] = {
        "address": address,
        "description": about,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
    }


def _add_operation(doc: Schema, operation: str, action: str, channel: str, message: str) -> None:
    doc["operations"][operation] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
    }


def _headers(kind: str, name_header: str, name: Schema) -> Schema:
    """The headers a `kind` ("task" or "event") message may carry (docs/wire-format.md)."""
    return {
        "type": "object",
        "properties": {
            wire.MSG_ID: {**_ID, "description": f"The {kind} id; for a task, its key if any."},
            wire.ID: {**_ID, "description": f"A {kind} id other than Nats-Msg-Id."},
            name_header: {**name, "description": f"The {kind} name, if not the subject's."},
            "traceparent": _TRACEPARENT,
            wire.ENCODING: {
                "type": "string",
                "enum": ["zstd"],
                "description": "The body is a zstd frame of the JSON (optional on send).",
            },
            wire.PAYLOAD: {
                "type": "string",
                "description": "The body is this object in the bucket TF_<ns>_payloads; "
                "the message's own body is empty.",
            },
        },
    }
