"""`python -m bench.soak`: run a soak (or re-render its report) and write soak.md and soak.json."""

from __future__ import annotations

import asyncio
import json
import shutil

from bench.soak.options import parse_args
from bench.soak.report import render
from bench.soak.run import Soak


def main(argv: list[str] | None = None) -> int:
    """Run the soak the command line asks for; 0 if its ledger passed."""
    opts = parse_args(argv)
    if opts.render is not None:
        result = json.loads(opts.render.read_text())
        (opts.render.parent / "soak.md").write_text(render(result))
        return 0
    soak = Soak(opts)
    result = asyncio.run(soak.run())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "soak.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    (opts.out / "soak.md").write_text(render(result))
    shutil.rmtree(soak.processes.store, ignore_errors=True)  # keep logs and journal, not the store
    checks = result["checks"]
    verdicts = [(t["slot"], t["pid"], t["rss_mb_per_min"], t["verdict"]) for t in result["trends"]]
    print(
        f"soak {'PASSED' if checks['passed'] else 'FAILED'}: acked={checks['acked_tasks']} "
        f"lost={checks['lost']} events_lost={checks['event_deliveries_lost']} "
        f"faults={len(result['faults'])}; verdicts {verdicts}"
        f"\nwrote {opts.out}/soak.md and soak.json; logs in {soak.tmp}",
        flush=True,
    )
    return 0 if checks["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
