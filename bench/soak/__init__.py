"""A bounded soak: steady load on 2 worker processes with periodic faults, for N minutes.

    python -m bench.soak --minutes 10 --out bench/results/soak

It starts its own nats-server (file storage, temporary store, free loopback port), two
`python -m taskframe worker bench.soak.app:app` processes and a producer in this process,
and while the producer keeps a steady mix of tasks and events going it injects faults:

    every --kill-every s    SIGKILL a victim worker, restart it at once
    every --term-every s    SIGTERM a victim worker (graceful drain), restart it when it exits
    every --server-every s  SIGKILL nats-server, restart it on the same port and store

Victims are worker slot 1 by default, so slot 0 lives through the whole run (seeing every
server restart and every redelivery of its peer's tasks): a leak needs a long lifetime to
show, and a process killed every minute would hide one.

Every 2 s it records each worker's RSS, open fds and threads from /proc, the in-process
probe's asyncio task count and gc object count, and the totals: tasks acknowledged by the
server, completed, pending, dead, enqueue failures. At the end it drains, has the fault
suite's ledger (tests/ledger.py) account for every acknowledged task (completed, or an
intended dead letter), and fits a line to RSS and task count over the last 2/3 of each
worker lifetime. Writes soak.md (tables and ASCII charts) and soak.json (raw samples).

    options.py     the command line          processes.py  nats-server and worker slots
    app.py         the workers' App          faults.py     the fault plan, injected
    load.py        the producer              books.py      the ledger, and events, ticks
    sampling.py    /proc, probes, totals     trends.py     growth per worker, log summary
    run.py         one run, start to end     report.py     soak.md
"""
