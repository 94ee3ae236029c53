"""Run one benchmark step in a fresh process: ``python -m bench.child SPEC.json``.

A fresh process per step keeps systems from influencing each other (imports,
event-loop state, leftover connections) and makes the process's own peak RSS
the in-process worker's footprint. The step's result is written as JSON to
``spec.result_path``; the orchestrator enforces an overall timeout.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import probe, systems
from bench.model import MixedSpec, Status, StepResult, Workload
from bench.systems.base import BenchSystem, Context


@dataclass(frozen=True)
class StepSpec:
    system: str
    workload: Workload
    variant: str
    n: int
    timeout_s: float
    nats_url: str
    redis_url: str
    workdir: str
    repo_root: str
    result_path: str
    mixed: MixedSpec
    slow_every: int = 0  # enqueue steps filling a mixed backlog

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workload"] = str(self.workload)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepSpec:
        fields = dict(data)
        fields["workload"] = Workload(fields["workload"])
        fields["mixed"] = MixedSpec(**fields["mixed"])
        return cls(**fields)


async def _run_workload(system: BenchSystem, spec: StepSpec) -> StepResult:
    if spec.workload is Workload.ENQUEUE:
        return await asyncio.wait_for(
            system.measure_enqueue(spec.n, spec.slow_every, spec.variant),
            spec.timeout_s,
        )
    if spec.workload is Workload.PROCESS:
        return await system.process_backlog(spec.n, spec.variant, spec.timeout_s)
    if spec.workload is Workload.LATENCY:
        # Each sample is individually bounded; this bounds the whole step too.
        return await asyncio.wait_for(system.latency(spec.n, spec.variant), spec.timeout_s)
    return await system.mixed(spec.n, spec.variant, spec.timeout_s)


async def run_step(spec: StepSpec) -> StepResult:
    workdir = Path(spec.workdir)  # created by the orchestrator
    recorder = probe.Recorder()
    probe.install_in_process(recorder)
    async with probe.fifo_source(recorder, workdir / "probe.fifo") as fifo:
        ctx = Context(
            nats_url=spec.nats_url,
            redis_url=spec.redis_url,
            workdir=workdir,
            repo_root=Path(spec.repo_root),
            recorder=recorder,
            probe_fifo=fifo,
            mixed=spec.mixed,
        )
        system = systems.load(spec.system)(ctx)
        await system.open()
        try:
            result = await _run_workload(system, spec)
        finally:
            await asyncio.wait_for(system.close(), 30)
    result.variant = spec.variant
    result.setup = "; ".join(part for part in (system.setup, result.setup) if part)
    return result


async def _main(spec: StepSpec) -> StepResult:
    # SIGTERM from the orchestrator (timeout) cancels us, so ``finally`` blocks
    # still stop worker subprocesses and close connections.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run_step(spec)
    except (Exception, asyncio.CancelledError) as exc:
        # CancelledError: our SIGTERM handler, or a library leaking one.
        traceback.print_exc()
        return StepResult(
            spec.system,
            spec.workload,
            variant=spec.variant,
            status=Status.ERROR,
            n=spec.n,
            error=f"{type(exc).__name__}: {exc}".strip()[:500],
        )


def main() -> int:
    spec = StepSpec.from_json(json.loads(Path(sys.argv[1]).read_text()))
    result = asyncio.run(_main(spec))
    Path(spec.result_path).write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.status is Status.OK else 1


if __name__ == "__main__":
    raise SystemExit(main())
