"""The errors (taskframe.errors): the tree its docstring draws is the tree of its classes,
errors carry what they are about as attributes, and no error is defined anywhere else."""

import ast
import builtins
import inspect
import re
from pathlib import Path

import pytest

import taskframe
from taskframe import errors
from taskframe.errors import (
    AttemptTimeoutError,
    ConfigError,
    ConnectError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishError,
    Reject,
    ResultTimeoutError,
    Retry,
    StoreFullError,
    StreamMissingError,
    TaskFailed,
    TaskframeError,
    UnreachableError,
)

CLASSES = {
    name: cls
    for name, cls in vars(errors).items()
    if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__
}


def drawn_tree() -> dict[str, str | None]:
    """Each class the module docstring draws, and the one it is drawn under (None at the top)."""
    drawn: dict[str, str | None] = {}
    above: list[tuple[int, str]] = []  # (indent, name) of the entries the next one may be under
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"( {4,})([A-Z]\w*)\b", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while above and above[-1][0] >= indent:
            above.pop()
        drawn[name] = above[-1][1] if above else None
        above.append((indent, name))
    return drawn


def test_the_docstring_draws_every_error_class_under_its_base() -> None:
    drawn = drawn_tree()
    assert set(drawn) == set(CLASSES), "classes missing from the tree, or drawn but not defined"
    for name, parent in drawn.items():
        cls = CLASSES[name]
        if parent is None:
            assert cls is TaskframeError or not issubclass(cls, TaskframeError), name
        else:
            assert CLASSES[parent] in cls.__bases__, f"{name} is drawn under {parent}"


def test_every_error_is_public_and_named_as_an_error() -> None:
    assert set(CLASSES) <= set(taskframe.__all__)
    assert {name for name in CLASSES if not name.endswith("Error")} == {
        "Retry",  # signals a handler raises, not errors
        "Reject",
        "TaskFailed",  # the one error named otherwise
    }
    assert not set(CLASSES) & set(dir(builtins))


def test_signals_are_not_errors_so_except_taskframe_error_cannot_swallow_them() -> None:
    for signal in (Retry, Reject):
        assert not issubclass(signal, TaskframeError)
        assert issubclass(signal, Exception)
    assert issubclass(ResultTimeoutError, TimeoutError)  # `except TimeoutError` catches both
    assert issubclass(AttemptTimeoutError, TimeoutError)
    assert issubclass(UnreachableError, ConnectError)
    assert all(issubclass(e, PublishError) for e in (StoreFullError, StreamMissingError))


def test_errors_carry_their_attributes_and_say_them() -> None:
    denied = PermissionDeniedError("create stream TF_shop_q", "run `taskframe provision` first")
    assert (denied.operation, denied.detail) == ("create stream TF_shop_q", denied.detail)
    assert str(denied) == (
        "permission denied for create stream TF_shop_q: run `taskframe provision` first"
    )

    big = PayloadTooLargeError("shop.tasks.q.T", 2_000_000, 1_048_576)
    assert (big.subject, big.size, big.max_payload) == ("shop.tasks.q.T", 2_000_000, 1_048_576)
    assert "2000000 bytes" in str(big)
    assert "max_payload of 1048576 bytes" in str(big)

    failed = TaskFailed("id-1", "RuntimeError", "boom", 3, "dead")
    assert (failed.task_id, failed.error_type, failed.message) == ("id-1", "RuntimeError", "boom")
    assert (failed.attempts, failed.state) == (3, "dead")
    assert str(failed) == "task id-1 dead after 3 attempt(s): RuntimeError: boom"

    assert Retry().delay is None
    assert Retry(2.5).delay == 2.5
    assert str(Retry(2.5)) == "retry requested (delay=2.5)"
    assert Reject("no such user").reason == "no such user"
    assert str(Reject("no such user")) == "no such user"


@pytest.mark.parametrize(
    ("err_code", "why"),
    [
        (StoreFullError.SERVER_FULL, "the server's JetStream store is full"),
        (StoreFullError.ACCOUNT_FULL, "the account's JetStream storage limit is reached"),
        (StoreFullError.STREAM_FULL, "stream TF_shop_q is at its limit"),
    ],
)
def test_a_store_full_error_says_whose_store_and_which_tasks(err_code: int, why: str) -> None:
    full = StoreFullError("shop.tasks.q.T", "insufficient resources", 503, err_code, "TF_shop_q")
    assert (full.subject, full.description, full.code) == (
        "shop.tasks.q.T",
        "insufficient resources",
        503,
    )
    assert (full.err_code, full.stream, full.task_ids) == (err_code, "TF_shop_q", ())
    assert str(full) == (
        f"no room to store a message on shop.tasks.q.T: {why} "
        f"(server: 'insufficient resources', code 503, err_code {err_code})"
    )
    named = full.for_tasks(("a", "b"))
    assert isinstance(named, StoreFullError)
    assert (named.err_code, named.stream, named.task_ids) == (err_code, "TF_shop_q", ("a", "b"))
    assert str(named).endswith("; 2 task(s) not stored: ['a', 'b']")


def test_no_exception_class_is_defined_outside_errors_py() -> None:
    package = Path(taskframe.__file__).parent
    elsewhere = []
    for path in package.glob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.endswith(("Error", "Exception", "Failed", "Timeout")) for b in bases):
                    elsewhere.append(f"{path.name}: {node.name}")
    assert not elsewhere


def test_config_and_connect_errors_are_plain_messages() -> None:
    for cls in (ConfigError, ConnectError, UnreachableError, PublishError, StreamMissingError):
        error = cls("what went wrong, and what to do")
        assert isinstance(error, TaskframeError)
        assert str(error) == "what went wrong, and what to do"
