"""Rescan cost with a large input: peak memory and event-loop lag of the daemon's own ``Daemon._rescan``.

Not a unit test: a measurement for docs/benchmarks.md. It builds an input of ``--files`` tiny files (1,000 per
directory), a ledger in which ``--finished`` of them are already ``done`` (with realistic decision and signals
JSON), then, in a fresh process so that peak RSS belongs to the rescan alone, runs the daemon's rescan twice
while a probe task measures how late the event loop wakes up:

- rescan 1: the unfinished files are new to the ledger and are taken;
- rescan 2: every file is known (the steady state of a long-running service).

Run it against any checkout (``--repo``) to compare versions:

    .venv/bin/python scripts/bench_rescan.py --files 200000 --finished 100000 --mode copy
    .venv/bin/python scripts/bench_rescan.py --repo /path/to/older/checkout ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DECISION = {"bin": "B", "rule": "default_b", "reason": "no strong text or people signal", "values": {"x": 0.1} }
SIGNALS = {"ocr": {"text_area_ratio": 0.01, "boxes": [[1, 2, 3, 4]] * 8, "text": "lorem ipsum " * 20},
           "vision": {"person": 0.02, "caption": "a photo of something", "clip": [0.01] * 32}}


def build(work: Path, files: int, finished: int, repo: Path) -> None:
    """The input tree and a ledger (made by ``repo``'s own Ledger) with ``finished`` rows done."""
    inbox = work / "inbox"
    old = time.time() - 3600
    for index in range(files):
        directory = inbox / f"d{index // 1000:04d}"
        if index % 1000 == 0:
            directory.mkdir(parents=True)
        path = directory / f"f{index:07d}.png"
        with open(path, "wb") as handle:
            handle.write(b"x")
        os.utime(path, (old, old))
    code = f"""
import json, sqlite3, sys
from pathlib import Path
from app.store import scan, to_discovered
from app.store import Ledger
inbox = Path({str(inbox)!r})
ledger = Ledger(Path({str(work / "state" / "ledger.sqlite3")!r}))
seen = [s for s in scan(inbox)]
finished = {finished}
ledger.intake(to_discovered(inbox, s) for s in seen[:finished])
ledger.close()
db = sqlite3.connect({str(work / "state" / "ledger.sqlite3")!r})
db.execute("UPDATE files SET status='done', bin='B', rule='default_b', sha256=?, decision=?, signals=?,"
           " output_path = 'OUT/' || rel_path, finished_at = updated_at",
           ("ab" * 32, {json.dumps(DECISION)!r}, {json.dumps(SIGNALS)!r}))
db.commit()
db.close()
"""
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, env={**os.environ, "PYTHONPATH": str(repo)})


MEASURE = """
import json, os, resource, sys, time
from pathlib import Path
import anyio
from app.config import load_config
from app.service import Daemon
from app.build import build_runtime

work, mode = Path(sys.argv[1]), sys.argv[2]
synthetic = {"backend": "synthetic", "devices": ["cpu"]}
config = load_config(None, {"input": work / "inbox", "output": work / "out", "state_dir": work / "state",
                            "placement": mode, "ocr": synthetic, "vision": synthetic})

def rss_mib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024

async def main():
    daemon = Daemon(config, None)
    daemon.runtime = build_runtime(config)
    results = []
    for label in ("rescan 1 (new files taken)", "rescan 2 (all known)"):
        lags = []
        done = anyio.Event()

        async def probe():
            while not done.is_set():
                start = time.monotonic()
                await anyio.sleep(0.005)
                lags.append(time.monotonic() - start - 0.005)

        before = rss_mib("VmRSS:")
        async with anyio.create_task_group() as group:
            group.start_soon(probe)
            started = time.monotonic()
            await daemon._rescan()
            elapsed = time.monotonic() - started
            done.set()
        lags.sort()
        results.append({"rescan": label, "seconds": round(elapsed, 2), "rss_before_mib": round(before),
                        "peak_rss_mib": round(rss_mib("VmHWM:")), "loop_lag_max_ms": round(lags[-1] * 1000, 1),
                        "loop_lag_p99_ms": round(lags[int(len(lags) * 0.99)] * 1000, 1), "probes": len(lags)})
    counts = daemon.runtime.ledger.counts()["status"]
    print(json.dumps({"results": results, "ledger": counts}))

anyio.run(main)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--finished", type=int, default=100_000)
    parser.add_argument("--mode", choices=["move", "copy", "hardlink"], default="copy")
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout whose code is measured")
    parser.add_argument("--work", type=Path, default=None, help="reuse this directory (kept)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="binner-rescan-"))
    if not (work / "inbox").exists():
        started = time.monotonic()
        build(work, args.files, args.finished, args.repo)
        print(f"built {args.files} files, {args.finished} finished, in {time.monotonic() - started:.0f} s: {work}",
              file=sys.stderr)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(work), args.mode], cwd=args.repo, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(args.repo), "BINNER_LOG_LEVEL": "warning"})
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report.update({"files": args.files, "finished": args.finished, "mode": args.mode, "repo": str(args.repo)})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
