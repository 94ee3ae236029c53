"""The public surface and the shape of the package.

`taskframe.__all__` is exactly the list below, so adding or removing a name is a deliberate
act; every public name is documented; a user's mypy type-checks handlers against the
installed package (py.typed); and the package keeps its layout: no import cycle, small
modules, a test file per public module.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import taskframe

PACKAGE = Path(taskframe.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

PUBLIC = [
    # Defining tasks and handlers
    "App",
    "Backoff",
    "Context",
    "Event",
    "Periodic",
    "Task",
    # Producing, reading results, operating
    "Client",
    "DeadLetter",
    "ErrorInfo",
    "Progress",
    "QueueInfo",
    "TaskRun",
    "TaskState",
    "TaskStatus",
    "WorkerInfo",
    "connect",
    # Flows
    "Flow",
    "FlowRun",
    "FlowStatus",
    "StepStatus",
    "chain",
    "chord",
    "group",
    # Running
    "AttemptInfo",
    "EnqueueInfo",
    "Hook",
    "Settings",
    "Worker",
    "WorkerStats",
    "provision",
    # Contracts for producers in other languages
    "asyncapi_document",
    "json_schemas",
    "write_schemas",
    # Errors and signals
    "AttemptTimeoutError",
    "ConfigError",
    "ConnectError",
    "FlowFailedError",
    "PayloadError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "Reject",
    "ResultTimeoutError",
    "Retry",
    "StoreFullError",
    "StreamMissingError",
    "TaskCancelledError",
    "TaskFailed",
    "TaskframeError",
    "UnreachableError",
]

PUBLIC_MODULES = [
    "app",
    "asgi",
    "cli",
    "client",
    "context",
    "dashboard",
    "errors",
    "flows",
    "hooks",
    "metrics",
    "models",
    "outbox",
    "provision",
    "schedules",
    "schema",
    "settings",
    "settle",
    "sync",
    "testing",
    "tracing",
    "worker",
]


def public_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE)]) if m.name[0] != "_")


# The surface ----------------------------------------------------------------------------


def test_all_is_exactly_the_public_surface() -> None:
    assert taskframe.__all__ == PUBLIC
    assert len(set(PUBLIC)) == len(PUBLIC)
    exposed = {
        name
        for name, value in vars(taskframe).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert exposed == set(PUBLIC), "a name exported without being in __all__, or missing"


def test_the_public_modules_are_these_and_every_other_module_is_private() -> None:
    assert public_modules() == PUBLIC_MODULES


def test_the_readme_uses_only_the_public_surface() -> None:
    """Every Python example in the README imports from `taskframe` (its __all__) and
    `taskframe.testing`, `taskframe.metrics`, `taskframe.tracing`, `taskframe.dashboard`,
    `taskframe.sync`, `taskframe.asgi` and `taskframe.outbox` (the optional extras' modules,
    each its __all__) only, and uses no other `taskframe.<name>`."""
    from taskframe import asgi, dashboard, metrics, outbox, sync, testing, tracing

    allowed = {"taskframe": set(PUBLIC)} | {
        f"taskframe.{m.__name__.rsplit('.', 1)[1]}": set(m.__all__)
        for m in (testing, metrics, tracing, dashboard, sync, asgi, outbox)
    }
    readme = (PACKAGE.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 5
    used = []
    for number, block in enumerate(blocks, 1):
        flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        tree = compile(block, f"README block {number}", "exec", flags=flags)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taskframe"):
                used += [(node.module or "", a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                used += [(a.name, "") for a in node.names if a.name.startswith("taskframe")]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "taskframe"
            ):
                used.append(("taskframe", node.attr))
    outside = [(m, n) for m, n in used if m not in allowed or (n and n not in allowed[m])]
    assert used
    assert not outside, f"the README uses names outside the public surface: {outside}"


def _undocumented_members(cls: type) -> list[str]:
    missing = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        member = value.__func__ if isinstance(value, staticmethod | classmethod) else value
        if (inspect.isfunction(member) or isinstance(member, property)) and not member.__doc__:
            missing.append(f"{cls.__name__}.{attr}")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for name in PUBLIC:
        obj = getattr(taskframe, name)
        doc = obj.__doc__ or ""
        if not doc.strip() or (inspect.isclass(obj) and doc.startswith(f"{name}(")):
            missing.append(name)  # a dataclass without one gets its signature as __doc__
        if inspect.isclass(obj):
            missing += _undocumented_members(obj)
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(f"taskframe.{module_name}")
        if not (module.__doc__ or "").strip():
            missing.append(f"taskframe.{module_name}")
        for attr, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if (
                attr.isidentifier()  # pydantic files parametrized generics here as "Task[Any]"
                and not attr.startswith("_")
                and (inspect.isfunction(value) or inspect.isclass(value))
                and defined_here
                and not value.__doc__
            ):
                missing.append(f"taskframe.{module_name}.{attr}")
    assert not missing, f"undocumented: {missing}"


# py.typed: what a user's mypy sees ------------------------------------------------------

USER_APP = """
from taskframe import App, Context, Task


class Resize(Task[str], queue="images"):
    url: str


class Crop(Task[str], queue="images"):
    box: tuple[int, int, int, int]


app = App("shop")


@app.handle(Resize)
async def resize(job: Resize, ctx: Context) -> str:
    return job.url
"""

WRONG_MODEL = """
@app.handle(Crop)
async def crop(job: Resize, ctx: Context) -> str:  # takes the wrong model
    return job.url
"""


def test_mypy_checks_a_users_handlers_against_the_installed_package(tmp_path: Path) -> None:
    """mypy --strict on a user's app outside the package tree: the package is found as an
    installed one, which mypy reads only if it ships py.typed."""
    assert (PACKAGE / "py.typed").is_file()
    bad = textwrap.dedent(USER_APP + WRONG_MODEL)
    (tmp_path / "good.py").write_text(textwrap.dedent(USER_APP))
    (tmp_path / "bad.py").write_text(bad)
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")}
    # The interpreter's path entries count as installed packages (py.typed required), like
    # site-packages; this one puts the package under test first, where an editable install
    # of this checkout would be.
    env["PYTHONPATH"] = str(PACKAGE.parent)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    checked = subprocess.run(
        [*mypy, "--no-error-summary", "good.py", "bad.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = checked.stdout.splitlines()
    assert checked.returncode == 1, checked.stdout + checked.stderr  # good.py passes, bad.py:
    line = bad.splitlines().index("@app.handle(Crop)") + 1
    assert errors == [
        f'bad.py:{line}: error: Argument 1 has incompatible type "Callable[[Resize, Context], '
        'Coroutine[Any, Any, str]]"; expected "Callable[[Crop, Context], Coroutine[Any, Any, '
        'str]]"  [arg-type]'
    ]


# The layout -----------------------------------------------------------------------------


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The nodes under `if TYPE_CHECKING:`: imports for annotations, never executed."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(sub) for sub in ast.walk(child))
    return skip


def _imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (at any depth in its
    code: an import inside a function is how a cycle hides)."""
    modules = {
        "taskframe" + ("" if p.stem == "__init__" else f".{p.stem}"): p
        for p in PACKAGE.glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = "taskframe" if node.level else (node.module or "")
                if node.level and node.module:
                    base = f"taskframe.{node.module}"
                if base not in modules:
                    continue
                # `from taskframe import _wire` imports that module; `from taskframe import
                # App` runs the package's __init__, which imports everything.
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (a path that comes back to where it started), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for dep in sorted(graph.get(module, ())):
            if dep != "taskframe" or module == "taskframe":
                found = visit(dep, [*path, module])
            else:
                found = [module, "taskframe", "(every module it exports from)"]
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        if module != "taskframe" and (found := visit(module, [])):
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"taskframe": {"a"}, "a": {"taskframe"}}) is not None


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _imports()
    assert {"taskframe.worker", "taskframe._wire", "taskframe"} <= set(graph)
    assert "taskframe._topology" in graph["taskframe.provision"]  # the walk sees imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_modules_stay_small() -> None:
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    too_long = {name: n for name, n in lengths.items() if n > 450}
    assert not too_long, f"modules over 450 lines (two concepts?): {too_long}"
    assert lengths["worker.py"] < 350


def test_every_public_module_has_a_test_file_of_its_own() -> None:
    missing = [m for m in public_modules() if not (TESTS / f"test_{m}.py").is_file()]
    assert not missing, f"no tests/test_<module>.py for {missing}"
