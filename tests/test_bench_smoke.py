"""The benchmark harness runs end to end (tiny N: a smoke run, not a timed check)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_run_measures_taskframe_beside_raw_nats(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--systems",
            "raw,taskframe",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    measured = {(r["system"], r["workload"], r["variant"]) for r in report["results"]}
    for variant in ("single", "many"):
        assert ("taskframe", "enqueue", variant) in measured
    for variant in ("noresults", "results", "2proc"):
        assert ("taskframe", "process", variant) in measured
    assert ("taskframe", "latency", "inproc") in measured
    assert ("taskframe", "mixed", "default") in measured
    assert report["ratios_to_raw"]["taskframe"], "ratios to raw nats-py are computed"
    assert (tmp_path / "results.md").read_text().count("taskframe") > 3


def test_backlog_bench_drains_with_the_cli_worker_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.backlog", "--n", "300", "--waiters", "50"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| after the drain: results kept / results stream | 300 /" in done.stdout
    assert "50 `run.result()` waiters" in done.stdout
