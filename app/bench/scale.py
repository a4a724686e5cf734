"""The `scale` scenario: `binner once` over N/10 and then N small files with zero-time stages, each as a process of
its own, so that memory and start are measured as a user would meet them at an archive's size, and the two sizes
are compared in one run on one machine.

For each size it reports the peak RSS of `once` (VmHWM, polled), the seconds from start to the first placed file,
images/s, the time and peak RSS of `rebin --dry-run` over the resulting ledger, and the ledger's bytes per row.
Flat memory means the peak at N stays within ``RSS_RATIO_TARGET`` of the peak at N/10, for both commands. The files
are one 64x64 PNG written N times into folders of 1,000 (distinct paths, one decode each).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from app.bench.common import BenchOptions, process_peak_rss_mib

SCALE_FILES = 1_000_000
PER_FOLDER = 1000
RSS_RATIO_TARGET = 1.2
REPO = Path(__file__).resolve().parents[2]
FIRST_FILE_TARGET_S = 10.0


def make_tree(root: Path, count: int, padding: int = 0) -> None:
    """``count`` copies of one small PNG under ``root``, ``PER_FOLDER`` per folder. ``padding`` (at most 200)
    lengthens each folder name and each file name by that many characters and nests the files one folder deeper,
    as an archive's long, dated names do: what a program keeps per path then shows at fewer files."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 150)).save(buffer, format="PNG")
    data = buffer.getvalue()
    tail = f" {'p' * padding}" if padding else ""
    for index in range(count):
        folder = root / f"d{index // PER_FOLDER:05d}{tail}"
        if padding:
            folder = folder / f"s{tail}"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:08d}{tail}.png").write_bytes(data)


def _placed_any(ledger: Path) -> bool:
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=0.2)
    except sqlite3.Error:
        return False
    try:
        return db.execute("SELECT 1 FROM files WHERE status = 'done' LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        db.close()


def _watched(command: list[str], env: dict[str, str], ledger: Path | None = None) -> dict[str, Any]:
    """Run ``command`` to its end, polling its peak RSS (and, with ``ledger``, when the first file is placed)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    first: float | None = None
    while process.poll() is None:
        peak = max(peak, process_peak_rss_mib(process.pid) or 0.0)
        if ledger is not None and first is None and _placed_any(ledger):
            first = time.monotonic() - started
        time.sleep(0.05)
    stderr = process.stderr.read() if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[2:4])} failed ({process.returncode}): {stderr[-2000:]}")
    return {"seconds": time.monotonic() - started, "peak_rss_mib": round(peak, 1), "first_placed_s": first}


def measure_size(count: int) -> dict[str, Any]:
    """``once`` and then ``rebin --dry-run`` over a fresh tree of ``count`` files, each as its own process."""
    with tempfile.TemporaryDirectory(prefix="binner-bench-scale-") as scratch:
        root = Path(scratch)
        inbox, output, state = root / "inbox", root / "bins", root / "state"
        make_tree(inbox, count)
        config = root / "binner.yaml"
        config.write_text(yaml.safe_dump({
            "input": str(inbox), "output": str(output), "state_dir": str(state), "http": {"enabled": False},
            "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
            "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
            "log": {"format": "json", "level": "error"},
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
        binner = [sys.executable, "-m", "app.cli"]
        ledger = state / "ledger.sqlite3"
        once = _watched([*binner, "once", str(inbox), "--output", str(output), "--config", str(config), "--no-progress"],
                        env, ledger)
        rebin = _watched([*binner, "rebin", "--dry-run", "--config", str(config)], env)
        db = sqlite3.connect(ledger)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = db.execute("SELECT count(*) FROM files").fetchone()[0]
        db.close()
        size = ledger.stat().st_size
    first = once["first_placed_s"]
    return {
        "files": count, "images_per_second": round(count / once["seconds"], 1), "peak_rss_mib": once["peak_rss_mib"],
        "first_placed_s": round(first, 2) if first is not None else None, "once_seconds": round(once["seconds"], 1),
        "rebin_dry_run_s": round(rebin["seconds"], 2), "rebin_peak_rss_mib": rebin["peak_rss_mib"],
        "ledger_bytes_per_row": round(size / rows) if rows else None, "ledger_rows": rows,
    }


def _ratio(large: float | None, small: float | None) -> float | None:
    return round(large / small, 3) if large and small else None


def run_scale(options: BenchOptions) -> dict[str, Any]:
    """N/10 then N files (N: ``--files``, default ``SCALE_FILES``); the top-level figures are N's."""
    count = options.count(SCALE_FILES)
    small = measure_size(max(1, count // 10))
    large = measure_size(count)
    rss_ratio = _ratio(large["peak_rss_mib"], small["peak_rss_mib"])
    rebin_ratio = _ratio(large["rebin_peak_rss_mib"], small["rebin_peak_rss_mib"])
    first = large["first_placed_s"]
    met = (first is not None and first <= FIRST_FILE_TARGET_S and rss_ratio is not None and rebin_ratio is not None
           and rss_ratio <= RSS_RATIO_TARGET and rebin_ratio <= RSS_RATIO_TARGET)
    return {
        **large, "sizes": [small, large], "rss_ratio": rss_ratio, "rebin_rss_ratio": rebin_ratio,
        "p95_latency_s": None, "stage_utilisation": {},
        "target": {"text": f"first file placed within {FIRST_FILE_TARGET_S:g} s at {count:,} files; peak RSS of once "
                           f"and of rebin --dry-run at {count:,} within {RSS_RATIO_TARGET:g}x of "
                           f"{small['files']:,}", "met": met},
    }
