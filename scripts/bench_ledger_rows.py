"""`status` and `explain` on a ledger of millions of rows: the time of each command, as a process of its own.

Not a unit test: a measurement for docs/benchmarks.md ("Archives of any size"). It builds, with binner's own
``Ledger`` for the schema (indexes, the counts kept by triggers), a ledger of ``--rows`` rows shaped like those of a
real run (paths in folders of 1,000, a name, signals and decision as binner stores them, 98% done across the bins,
1% quarantined, 1% pending), filling it with SQL in chunks (the build is not what is measured: it uses
``synchronous=OFF``). Then each command runs three times as a process of its own against that state directory:

- ``binner status`` and ``binner status --json``;
- ``binner explain`` by bare file name, by input path and by output path, and of a name that is not there.

    .venv/bin/python scripts/bench_ledger_rows.py --rows 10000000 --work /var/tmp/ledger10m
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

SIGNALS = ('{"ocr": {"text_area_ratio": 0.0123, "char_count": 14, "line_count": 2, "lines": ['
           '{"text": "OPEN 24H", "confidence": 0.97, "box": [[10, 12], [80, 12], [80, 30], [10, 30]]}, '
           '{"text": "EXIT", "confidence": 0.91, "box": [[200, 40], [240, 40], [240, 58], [200, 58]]}]}, '
           '"detections": [{"label": "person", "confidence": 0.8812, "box": [12.5, 30.25, 210.0, 400.5]}, '
           '{"label": "car", "confidence": 0.4401, "box": [300.0, 210.75, 520.5, 330.0]}], '
           '"caption": "a man standing next to a car on a street", "clip_similarity": 0.3121}')
TIMINGS = '{"load": 0.0031, "load_batch": 0.0422, "ocr": 0.0412, "ocr_batch": 0.3301, "vision": 0.0288, "vision_batch": 0.2301}'


def build(state: Path, rows: int, chunk: int = 250_000) -> float:
    from app.store import Ledger

    state.mkdir(parents=True, exist_ok=True)
    Ledger(state / "ledger.sqlite3").close()  # binner's own schema, indexes and triggers
    db = sqlite3.connect(state / "ledger.sqlite3")
    db.execute("PRAGMA synchronous=OFF")
    started = time.monotonic()
    for first in range(1, rows + 1, chunk):
        last = min(rows, first + chunk - 1)
        db.execute(
            "WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
            "INSERT INTO files(path, rel_path, name, size, mtime_ns, inode, ctime_ns, sha256, status, attempts, bin, rule,"
            " reason, decision, signals, output_path, timings, seen_at, updated_at, finished_at) "
            "SELECT '/archive/d' || (i / 1000) || '/IMG_' || i || '.jpg', 'd' || (i / 1000) || '/IMG_' || i || '.jpg',"
            " 'IMG_' || i || '.jpg', 183000 + i % 5000, 1700000000000000000 + i, i, 1700000000000000000 + i,"
            " printf('%064x', i),"
            " CASE WHEN i % 100 = 0 THEN 'quarantined' WHEN i % 100 = 1 THEN 'pending' ELSE 'done' END, 1,"
            " CASE WHEN i % 100 < 2 THEN NULL ELSE char(65 + i % 3) END,"
            " CASE WHEN i % 100 < 2 THEN NULL ELSE 'confident_detection' END,"
            " CASE WHEN i % 100 = 0 THEN 'decode_error' ELSE NULL END,"
            " CASE WHEN i % 100 < 2 THEN NULL ELSE '{\"reason\": \"little text and a confident detection (person 0.88)\"}' END,"
            " CASE WHEN i % 100 < 2 THEN NULL ELSE ? END,"
            " CASE WHEN i % 100 < 2 THEN NULL"
            "  ELSE '/bins/' || char(65 + i % 3) || '/d' || (i / 1000) || '/IMG_' || i || '.jpg' END,"
            " CASE WHEN i % 100 < 2 THEN NULL ELSE ? END, 1700000000.0 + i / 1000.0, 1700000000.0 + i / 1000.0,"
            " CASE WHEN i % 100 = 1 THEN NULL ELSE 1700000001.0 + i / 1000.0 END FROM n",
            (first, last, SIGNALS, TIMINGS))
        db.commit()
        print(f"  {last:,} rows, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - started


def timed(args: list[str]) -> dict[str, float | int]:
    """Wall time of one binner command as a process of its own."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=HERE, capture_output=True, text=True,
                          timeout=600)
    return {"seconds": round(time.monotonic() - started, 3), "rc": done.returncode,
            "stdout_lines": len(done.stdout.splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    state = options.work / "state"
    report: dict[str, object] = {"rows": options.rows}
    if not (state / "ledger.sqlite3").exists():
        report["build_s"] = round(build(state, options.rows), 1)
    report["ledger_bytes"] = (state / "ledger.sqlite3").stat().st_size
    config = options.work / "binner.yaml"
    config.write_text(f"input: {options.work / 'in'}\noutput: {options.work / 'out'}\nstate_dir: {state}\n")
    middle = options.rows // 2 + 7  # a done row (i % 100 == 7 + ...)
    commands = {
        "status": ["status"],
        "status_json": ["status", "--json"],
        "explain_name": ["explain", f"IMG_{middle}.jpg"],
        "explain_input_path": ["explain", f"/archive/d{middle // 1000}/IMG_{middle}.jpg"],
        "explain_output_path": ["explain", f"/bins/{chr(65 + middle % 3)}/d{middle // 1000}/IMG_{middle}.jpg"],
        "explain_absent": ["explain", "not-there.jpg"],
    }
    for key, args in commands.items():
        runs = [timed([*args, "--config", str(config), "--state", str(state)]) for _ in range(options.repeat)]
        report[key] = {"seconds": [run["seconds"] for run in runs], "rc": runs[0]["rc"],
                       "stdout_lines": runs[0]["stdout_lines"]}
    baseline = [timed(["--version"])["seconds"] for _ in range(options.repeat)]
    report["interpreter_start_s"] = baseline  # `binner --version`: the part of each time that is not the ledger
    print(json.dumps(report, indent=1))
    os.sync()


if __name__ == "__main__":
    main()
