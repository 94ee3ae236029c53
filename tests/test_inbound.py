"""The rules of what a delivered message may carry (taskframe._inbound), without a server.

The properties check the promise the worker relies on: whatever a message carries, what
`inbound` hands on goes into a subject, a KV key and a header value without nats-py
refusing it, and a dead letter built from the message is one nats-py will send.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import _HEADER_KEY_RE, _validate_subject
from nats.aio.msg import Msg
from nats.js.kv import _is_key_valid

from taskframe import _inbound as inbound
from taskframe import _topology as topology
from taskframe import _wire as wire
from taskframe._deadletters import dead_letter_headers
from taskframe._inbound import INVALID
from taskframe._results import ErrorInfo
from taskframe._tolerant import TolerantClient

NS, QUEUE = "shop", "email"
PREFIX = f"{NS}.tasks.{QUEUE}."
REPLY = "$JS.ACK.TF_shop_email.workers.1.17.9.1764300000000000000.0"
FALLBACK = "email-17"
# Every character class the rules treat differently, bytes that were not UTF-8 included.
ANY_TEXT = st.text(
    st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + "_-=/.:*> \t\x0b\x00"),
        st.characters(),
        st.sampled_from(["\udcff", "\udc80", "\u00e9", "\u2028"]),
    ),
    max_size=12,
) | st.sampled_from(["", "a" * 256, "a" * 257, "Send Email", "order 42", "a..b", ".a", "a."])


def check(tail: str, **headers: str) -> inbound.Arrival:
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return inbound.task(PREFIX + tail, named, FALLBACK)


def test_a_plain_task_is_accepted_with_its_own_id() -> None:
    assert check("SendEmail") == inbound.Arrival("SendEmail", FALLBACK)
    assert check("SendEmail.urgent", Nats_Msg_Id="k1") == inbound.Arrival("SendEmail", "k1")
    assert check("X", Tf_Task="SendEmail", Tf_Id="a.b", Nats_Msg_Id="k") == inbound.Arrival(
        "SendEmail", "a.b"
    )


@pytest.mark.parametrize(
    "task_id", ["0190-abcd", "order_42", "b64+pad=="[4:], "a/b", "a.b.c", "x" * 256]
)
def test_ids_that_are_kv_keys_are_accepted(task_id: str) -> None:
    assert check("SendEmail", Tf_Id=task_id) == inbound.Arrival("SendEmail", task_id)


@pytest.mark.parametrize(
    "task_id", ["order 42", "a:b", "a..b", ".a", "a.", "*", ">", "caf\u00e9", "x" * 257]
)
def test_ids_that_are_not_kv_keys_are_invalid_and_replaced(task_id: str) -> None:
    arrival = check("SendEmail", Nats_Msg_Id=task_id)
    assert (arrival.name, arrival.task_id) == (INVALID, FALLBACK)
    assert "(from Nats-Msg-Id)" in arrival.problem
    assert f"(the message is named {FALLBACK} instead)" in arrival.problem


def test_an_invalid_name_keeps_a_usable_id() -> None:
    arrival = check("SendEmail", Tf_Task="Send Email", Tf_Id="order-42")
    assert (arrival.name, arrival.task_id) == (INVALID, "order-42")
    assert arrival.problem == (
        "task name 'Send Email' (from Tf-Task) must be 1 to 256 of [A-Za-z0-9_-]"
    )


@pytest.mark.parametrize(
    ("tail", "shown"),
    [
        ("\udcff\udcfe", r"\xff\xfe"),  # bytes that were not UTF-8
        ("a\x0bb", r"a\x0bb"),
        ("*", "*"),
        (">", ">"),
        ("Send.Email.now", "Send.Email.now"),  # a lane has one token
        ("x" * 257, "x" * (200 - len(PREFIX)) + "'..."),
    ],
)
def test_subject_tails_that_are_not_name_and_lane_are_invalid(tail: str, shown: str) -> None:
    arrival = check(tail)
    assert arrival.name == INVALID
    assert arrival.problem.startswith(f"subject '{PREFIX}")
    assert shown in arrival.problem
    assert "must end in <TaskName> or <TaskName>.<lane>" in arrival.problem


def test_every_problem_is_reported() -> None:
    arrival = check("*", Tf_Task="a b", Tf_Id="c d")
    assert arrival.problem.count("; ") == 2


def test_events_take_dotted_names() -> None:
    ok = inbound.event(f"{NS}.events.image.resized", None, "event-3")
    assert ok == inbound.Arrival("image.resized", "event-3")
    assert inbound.event(f"{NS}.events.x", {wire.EVENT: "a.b"}, "e").name == "a.b"
    bad = inbound.event(f"{NS}.events.x", {wire.EVENT: "a..b"}, "e")
    assert bad.name == INVALID
    assert "event name 'a..b' (from Tf-Event)" in bad.problem
    assert inbound.event(f"{NS}.events.\udcff", None, "e").name == INVALID


def test_printable_escapes_all_but_printable_ascii() -> None:
    assert inbound.printable("shop.tasks.q.Send Email") == "shop.tasks.q.Send Email"
    assert inbound.printable("a\udcffb\x00\n\u00e9\u20ac\U0001f600") == (
        r"a\xffb\x00\x0a\xe9\u20ac\U0001f600"
    )


async def test_a_dead_letter_keeps_only_headers_it_can_carry() -> None:
    headers = {
        "Nats-Msg-Id": "order 42",
        "Nats-Expected-Stream": "TF_shop_email",  # the dead-letter stream would refuse it
        "nats-rollup": "all",
        "A(b": "c",  # parsed by nats-py, but not a name it will send
        "Tf-Traceback": "stale",  # an earlier dead letter's, replaced or dropped
        "X-Note": "caf\u00e9\ufffd",
        "traceparent": "00-abc-def-01",
    }
    msg = Msg(TolerantClient(), subject=PREFIX + "\udcff", reply=REPLY, headers=headers)
    error = ErrorInfo(type="InvalidMessage", message="why")
    letter = dead_letter_headers(msg, FALLBACK, 1, "invalid", error)
    assert letter[wire.ORIGINAL_SUBJECT] == PREFIX + r"\xff"
    assert letter["X-Note"] == r"caf\xe9\ufffd"
    assert letter["traceparent"] == "00-abc-def-01"
    assert letter[wire.MSG_ID].startswith(f"{FALLBACK}:17")
    assert not {"Nats-Expected-Stream", "nats-rollup", "A(b", wire.TRACEBACK} & set(letter)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    tail=st.lists(ANY_TEXT, min_size=1, max_size=3).map(".".join),
    headers=st.dictionaries(
        st.sampled_from([wire.TASK, wire.ID, wire.MSG_ID, "X-Other"]), ANY_TEXT, max_size=4
    ),
)
def test_whatever_arrives_what_is_handed_on_fits_subjects_keys_and_headers(
    tail: str, headers: dict[str, str]
) -> None:
    arrival = inbound.task(PREFIX + tail, headers, FALLBACK)
    assert _is_key_valid(arrival.task_id)
    _validate_subject(topology.result_subject(NS, arrival.task_id), strict=True)
    _validate_subject(wire.dead_subject(NS, QUEUE, arrival.name), strict=True)
    assert arrival.name == INVALID or inbound.TOKEN.fullmatch(arrival.name)
    assert arrival.problem.isascii()
    assert arrival.problem.isprintable()
    assert (arrival.name == INVALID) == bool(arrival.problem)

    msg = Msg(TolerantClient(), subject=PREFIX + tail, reply=REPLY, headers=headers)
    error = ErrorInfo(type="InvalidMessage", message=arrival.problem or "-")
    letter = dead_letter_headers(msg, arrival.task_id, 1, "invalid", error)
    for name, value in letter.items():  # what nats-py checks before it sends a header
        assert _HEADER_KEY_RE.fullmatch(name)
        assert value.encode("ascii").decode().isprintable()


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(
    name=st.from_regex(inbound.TOKEN, fullmatch=True).filter(lambda s: len(s) <= 256),
    lane=st.none() | st.from_regex(inbound.TOKEN, fullmatch=True).filter(lambda s: len(s) < 99),
    task_id=st.from_regex(inbound.TASK_ID, fullmatch=True).filter(lambda s: len(s) <= 256),
)
def test_every_well_formed_task_is_accepted(name: str, lane: str | None, task_id: str) -> None:
    subject = wire.task_subject(NS, QUEUE, name, lane)
    assert inbound.task(subject, {wire.MSG_ID: task_id}, FALLBACK) == inbound.Arrival(name, task_id)


def test_subjects_checked_once_stay_bounded_and_never_vouch_for_a_bad_name() -> None:
    for i in range(inbound._SUBJECTS_KEPT + 10):  # a producer inventing subjects
        inbound.task(f"{PREFIX}T{i}", None, FALLBACK)
    assert len(inbound._task_subjects) <= inbound._SUBJECTS_KEPT
    assert check("SendEmail") == inbound.Arrival("SendEmail", FALLBACK)
    seen = PREFIX + "SendEmail"
    assert check("SendEmail", Tf_Task=seen).problem  # a subject seen is not a name
    assert check("Bad name").problem
    assert check("Bad name").problem  # and again, from the cache
