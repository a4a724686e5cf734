"""The `framework` scenario: what binner itself costs per file, with models that do nothing, against the limit of
the disk it runs on.

The full path runs for real: files on disk -> ledger -> loader (read, hash, decode) -> no-op OCR and vision
stages -> rules -> placement (move, atomic, fsynced) -> ledger. Once on small PNGs (the per-file overhead of
the framework) and once on 12-megapixel JPEGs (where decoding dominates).

An absolute rate means little across machines: one development machine's disk wrote a 2 kB file in 470 us and
fsynced it in 160 more, another's in a fraction of that. So the same run also measures the limit: a plain
single-threaded loop doing only the durable work each file needs (read, sha256, write a temporary file, fsync,
rename, remove the input, one ledger row per file committed every 100 rows, the ledger as durable as binner's),
on the same kind of files on the same disk. The framework is reported as a ratio to that loop (goal >= 0.8),
beside the absolute figure and the disk's own write and fsync times.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from app.bench.common import BenchOptions, make_images, make_photos, run_backlog, synthetic_overrides

FRAMEWORK_IMAGES = 3000
FRAMEWORK_LARGE_IMAGES = 300
TARGET_RATIO_TO_LIMIT = 0.8
COMMIT_EVERY = 100


def _framework_run(options: BenchOptions, fill: Any) -> dict[str, Any]:
    run = run_backlog(synthetic_overrides((0.0, 0.0), (0.0, 0.0), options.batch, options.queue), fill)
    report = run.summary()
    rate = run.images_per_second
    report["overhead_us_per_file"] = round(1e6 / rate, 1) if rate else None
    # Where the time goes: each stage's busy time per file (the rest is hand-offs between threads and queues).
    report["busy_us_per_file"] = {stage: round(1e6 * busy / run.finished, 1) if run.finished else None
                                  for stage, busy in run.busy.items()}
    return report


def durable_loop(root: Path, fill: Any) -> dict[str, Any]:
    """The limit: ``fill(inbox)``'s files through only the durable work each needs, one file after another."""
    inbox, out = root / "inbox", root / "out"
    inbox.mkdir()
    out.mkdir()
    fill(inbox)
    files = sorted(path for path in inbox.rglob("*") if path.is_file())
    db = sqlite3.connect(root / "ledger.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # as binner's ledger: a commit that precedes removing inputs is durable
    db.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT, sha256 TEXT, output TEXT)")
    started = time.perf_counter()
    db.execute("BEGIN")
    for index, path in enumerate(files, 1):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        target = out / path.name
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=out)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, target)
        db.execute("INSERT INTO files (path, sha256, output) VALUES (?, ?, ?)", (str(path), digest, str(target)))
        if index % COMMIT_EVERY == 0:
            db.execute("COMMIT")
            db.execute("BEGIN")
        path.unlink()
    db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    return {"files": len(files), "seconds": round(seconds, 3),
            "images_per_second": round(len(files) / seconds, 2) if seconds > 0 else None}


def disk_figures(root: Path, count: int = 200, size: int = 2048) -> dict[str, float]:
    """Microseconds to write (and close) a ``size``-byte file, and the fsync that makes it durable, on this disk."""
    payload = os.urandom(size)
    write_s = fsync_s = 0.0
    for index in range(count):
        path = root / f"probe-{index}"
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        written = time.perf_counter()
        os.fsync(fd)
        synced = time.perf_counter()
        os.close(fd)
        write_s += written - started
        fsync_s += synced - written
        path.unlink()
    return {"write_2kb_us": round(1e6 * write_s / count, 1), "fsync_us": round(1e6 * fsync_s / count, 1)}


def run_framework(options: BenchOptions) -> dict[str, Any]:
    count = options.count(FRAMEWORK_IMAGES)
    large = FRAMEWORK_LARGE_IMAGES if options.large_images is None else options.large_images
    small = lambda inbox: make_images(inbox, count)  # noqa: E731
    report = _framework_run(options, small)
    report["small_png"] = {"files": count, "size": "64x64"}
    with tempfile.TemporaryDirectory(prefix="binner-bench-limit-") as scratch:
        limit = durable_loop(Path(scratch), small)
        report["disk"] = disk_figures(Path(scratch))
    rate, limit_rate = report["images_per_second"], limit["images_per_second"]
    report["limit_images_per_second"] = limit_rate
    report["ratio_to_limit"] = round(rate / limit_rate, 3) if rate and limit_rate else None
    report["limit"] = {"what": "one thread: read, sha256, temp file, fsync, rename, unlink, a ledger row "
                               f"(WAL, synchronous=FULL, commit every {COMMIT_EVERY})", **limit}
    if large:
        report["large_jpeg"] = {"size": "4000x3000", **_framework_run(options, lambda inbox: make_photos(inbox, large))}
    ratio = report["ratio_to_limit"]
    report["target"] = {"text": f">= {TARGET_RATIO_TO_LIMIT} of the durable-work loop on this disk",
                        "met": bool(ratio and ratio >= TARGET_RATIO_TO_LIMIT)}
    return report
