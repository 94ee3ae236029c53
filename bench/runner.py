"""Plans and runs the steps for every system, one child process per step."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs, systems
from bench.child import StepSpec
from bench.model import MixedSpec, Status, StepResult, Workload
from bench.systems.base import BenchSystem

CHILD_GRACE_S = 60.0  # on top of the step's own timeout: start-up and teardown


@dataclass(frozen=True)
class RunConfig:
    systems: tuple[str, ...]
    workloads: frozenset[Workload]
    n_override: dict[str, int]
    quick_n: int | None  # set in --quick mode: tiny N for every system
    latency_samples: int
    repeats: int
    mixed: MixedSpec
    out: Path
    repo_root: Path


@dataclass(frozen=True)
class PlannedStep:
    workload: Workload
    variant: str
    repeat: int = 0
    record: bool = True  # False: a backlog fill whose enqueue rate is not reported
    slow_every: int = 0  # > 0: fill a mixed-workload backlog


@dataclass
class SystemOutcome:
    name: str
    status: Status
    n: int = 0
    setup: str = ""
    reason: str = ""
    results: list[StepResult] = field(default_factory=list)


def plan(
    system: type[BenchSystem], workloads: frozenset[Workload], repeats: int, slow_every: int
) -> list[PlannedStep]:
    """Steps for one system, repetitions interleaved (rep 0 of everything, then
    rep 1, ...) so slow drift of the machine hits all workloads alike.

    An enqueue step (its own process) leaves the backlog that the next process
    or mixed step drains, so every such run is preceded by one. Only the first
    plain fill of each repetition is reported as an enqueue figure, so every
    system gets ``repeats`` enqueue samples. Latency is measured once (it is
    already 1000 samples)."""
    steps: list[PlannedStep] = []
    report_enqueue = Workload.ENQUEUE in workloads
    # Backlogs are filled with the first enqueue variant (the system's main
    # producer API); further enqueue variants get reported steps of their own.
    fill_variant, *other_enqueues = system.variants_for(Workload.ENQUEUE)
    for rep in range(repeats):
        if report_enqueue:
            steps += [PlannedStep(Workload.ENQUEUE, v, rep) for v in other_enqueues]
        if Workload.PROCESS in workloads:
            for i, variant in enumerate(system.variants_for(Workload.PROCESS)):
                fill = PlannedStep(Workload.ENQUEUE, fill_variant, rep, report_enqueue and i == 0)
                steps += [fill, PlannedStep(Workload.PROCESS, variant, rep)]
        elif report_enqueue:
            steps.append(PlannedStep(Workload.ENQUEUE, fill_variant, rep))
        if rep == 0 and Workload.LATENCY in workloads:
            latency = system.variants_for(Workload.LATENCY)
            steps += [PlannedStep(Workload.LATENCY, v) for v in latency]
        if Workload.MIXED in workloads:
            for variant in system.variants_for(Workload.MIXED):
                fill = PlannedStep(Workload.ENQUEUE, fill_variant, rep, False, slow_every)
                steps += [fill, PlannedStep(Workload.MIXED, variant, rep)]
    return steps


def step_timeout_s(workload: Workload, n: int) -> float:
    """Generous but finite: anything slower than ~100 tasks/s is cut off."""
    if workload is Workload.ENQUEUE:
        return 60 + n / 200
    if workload is Workload.LATENCY:
        return 60 + n * 0.5
    return 60 + n / 100


class Runner:
    def __init__(self, cfg: RunConfig, nats_url: str, redis_url: str, workdir: Path) -> None:
        self.cfg = cfg
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.workdir = workdir
        self._counter = 0

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    async def run_system(self, name: str) -> SystemOutcome:
        try:
            system = systems.load(name)
        except systems.SystemUnavailable as exc:
            self.log(f"[{name}] not run: {exc}")
            return SystemOutcome(name, Status.NOT_RUN, reason=str(exc))
        n = self.cfg.quick_n or self.cfg.n_override.get(name, system.default_n)
        outcome = SystemOutcome(name, Status.OK, n=n, setup=system.setup)
        backlog_ok = True
        steps = plan(system, self.cfg.workloads, self.cfg.repeats, self.cfg.mixed.slow_every)
        for step in steps:
            if step.workload in (Workload.PROCESS, Workload.MIXED) and not backlog_ok:
                outcome.results.append(
                    StepResult(
                        name,
                        step.workload,
                        step.variant,
                        Status.ERROR,
                        step.repeat,
                        n=n,
                        error="backlog fill (enqueue step) failed",
                    )
                )
                continue
            count = self.cfg.latency_samples if step.workload is Workload.LATENCY else n
            result = await self.run_step(name, step, count)
            if step.workload is Workload.ENQUEUE:
                backlog_ok = result.status is Status.OK
                if not step.record and backlog_ok:
                    continue
            outcome.results.append(result)
        if outcome.results and all(r.status is not Status.OK for r in outcome.results):
            outcome.status = Status.ERROR
            outcome.reason = outcome.results[0].error
        return outcome

    async def run_step(self, name: str, step: PlannedStep, n: int) -> StepResult:
        self._counter += 1
        stepdir = self.workdir / (
            f"{self._counter:03d}-{name}-{step.workload}-{step.variant}-r{step.repeat}"
        )
        stepdir.mkdir(parents=True)
        timeout = step_timeout_s(step.workload, n)
        spec = StepSpec(
            system=name,
            workload=step.workload,
            variant=step.variant,
            n=n,
            timeout_s=timeout,
            nats_url=self.nats_url,
            redis_url=self.redis_url,
            workdir=str(stepdir),
            repo_root=str(self.cfg.repo_root),
            result_path=str(stepdir / "result.json"),
            mixed=self.cfg.mixed,
            slow_every=step.slow_every,
        )
        spec_path = stepdir / "spec.json"
        spec_path.write_text(json.dumps(spec.to_json(), indent=2))
        log_path = stepdir / "child.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self.cfg.repo_root), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        started = time.perf_counter()
        with log_path.open("wb") as log:
            proc = await procs.spawn(
                [sys.executable, "-m", "bench.child", str(spec_path)],
                env=env,
                cwd=self.cfg.repo_root,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                await asyncio.wait_for(proc.wait(), timeout + CHILD_GRACE_S)
                timed_out = False
            except TimeoutError:
                timed_out = True
            finally:
                await procs.terminate(proc, grace_s=15)
        result = self._read_result(name, step, n, stepdir, timed_out, timeout + CHILD_GRACE_S)
        result.repeat = step.repeat
        if not step.record and result.status is Status.OK:
            return result
        self._report(result, time.perf_counter() - started, log_path)
        return result

    def _read_result(
        self, name: str, step: PlannedStep, n: int, stepdir: Path, timed_out: bool, limit: float
    ) -> StepResult:
        result_path = stepdir / "result.json"
        if result_path.exists():
            return StepResult.from_json(json.loads(result_path.read_text()))
        reason = f"step killed after {limit:.0f}s" if timed_out else "step produced no result"
        tail = procs.tail(stepdir / "child.log", 400).strip().splitlines()
        if tail:
            reason += f": {tail[-1]}"
        return StepResult(name, step.workload, step.variant, Status.ERROR, n=n, error=reason)

    def _report(self, result: StepResult, took_s: float, log_path: Path) -> None:
        what = f"[{result.system}] {result.workload}/{result.variant}#{result.repeat} n={result.n}"
        if result.status is not Status.OK:
            self.log(f"{what}: ERROR {result.error} ({took_s:.1f}s)")
            keep = self.cfg.out / "logs"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(log_path, keep / f"{log_path.parent.name}.log")
            return
        if result.workload is Workload.LATENCY:
            figure = (
                f"p50 {result.p50_ms:.2f} / p95 {result.p95_ms:.2f} / p99 {result.p99_ms:.2f} ms"
            )
        else:
            figure = f"{result.rate:,.0f} tasks/s"
        if result.worker_peak_rss_mb is not None:
            figure += f", worker RSS {result.worker_peak_rss_mb:.0f} MB"
        if result.duplicates:
            figure += f", {result.duplicates} duplicates"
        self.log(f"{what}: {figure} ({took_s:.1f}s)")
