"""The examples, run as a user runs them: the demo end to end (`taskframe server`, CLI
workers, a producer), and the quickstart's modules against the public API only."""

import ast
import subprocess
import sys
from pathlib import Path

import taskframe

# public modules of the optional extras, imported as `import taskframe.<module>`
EXTRAS = {"taskframe.asgi", "taskframe.sync", "taskframe.outbox"}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_demo_runs_end_to_end_and_accounts_for_every_task() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--tasks", "120", "--workers", "1"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "final states: 118 succeeded, 2 dead" in done.stdout
    assert "dead-letter stream holds 2 task(s)" in done.stdout
    assert "workers drained and exited with codes [0]" in done.stdout


def test_examples_import_only_the_public_api() -> None:
    public = set(taskframe.__all__)
    for path in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taskframe"):
                assert node.module == "taskframe", f"{path.name} imports {node.module}"
                assert {a.name for a in node.names} <= public, path.name
            elif isinstance(node, ast.Import):
                modules = {a.name for a in node.names if a.name.startswith("taskframe.")}
                assert modules <= EXTRAS, f"{path.name} imports {modules - EXTRAS}"
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "taskframe"
            ):
                assert node.attr in public | {m.split(".")[1] for m in EXTRAS}, path.name
