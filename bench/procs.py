"""Subprocess plumbing shared by the orchestrator and the per-step child processes.

Every process we start goes through :func:`spawn`, which

* starts it in its own session, so a whole worker tree can be signalled without
  signalling ourselves;
* sets ``PR_SET_PDEATHSIG`` so the kernel kills it if *we* die without running
  any cleanup (SIGKILL, OOM) -- atexit handlers cannot cover that case;
* registers it so an ``atexit`` hook kills whatever is still alive.

Processes can fork further (celery/dramatiq pools), so termination and memory
accounting work on the full descendant tree found in ``/proc``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
_live: dict[int, asyncio.subprocess.Process] = {}


def _die_with_parent() -> None:
    """``preexec_fn``: ask the kernel to SIGKILL the child when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (not including it), from a /proc scan."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # raced with the process exiting
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def peak_rss_kb(pid: int) -> int | None:
    """``VmHWM`` (peak resident set size) of one process, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tree_peak_rss_mb(pid: int) -> tuple[float, int]:
    """Sum of VmHWM over ``pid`` and its descendants, and the process count.

    Peaks of different processes need not coincide, so for multi-process pools
    the sum is an upper bound of the tree's simultaneous peak.
    """
    total_kb = 0
    count = 0
    for member in [pid, *descendants(pid)]:
        kb = peak_rss_kb(member)
        if kb is not None:
            total_kb += kb
            count += 1
    return total_kb / 1024.0, count


def _signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _kill_leftovers() -> None:
    for pid in list(_live):
        _signal_all([*descendants(pid), pid], signal.SIGKILL)


atexit.register(_kill_leftovers)


async def spawn(
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> asyncio.subprocess.Process:
    """Start a tracked subprocess (own session, dies with us)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    _live[proc.pid] = proc
    return proc


async def terminate(proc: asyncio.subprocess.Process, grace_s: float = 10.0) -> None:
    """SIGTERM the process, wait (bounded) for it, then SIGKILL its whole tree.

    The tree is snapshotted before signalling, because pool children get
    re-parented to init once their parent exits and would be lost otherwise.
    """
    tree = descendants(proc.pid)
    try:
        if proc.returncode is None:
            _signal_all([proc.pid], signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                _signal_all([proc.pid], signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), grace_s)
    finally:
        _signal_all([*tree, *descendants(proc.pid)], signal.SIGKILL)
        _live.pop(proc.pid, None)


def tail(path: Path, max_chars: int = 2000) -> str:
    """Last characters of a log file, for error messages."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-max_chars:].decode(errors="replace")
