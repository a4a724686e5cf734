"""The `stream` scenario: the real daemon (`binner run` as a process) fed files at a fixed rate.

Files arrive at 50% and then 90% of the engine's measured capacity. Each file is staged outside the inbox,
touched (its mtime is its completion time) and renamed in, as a well-behaved uploader does. Per-file latency
runs from that rename ("complete on disk") to the ledger's ``finished_at`` ("placed"), for every file, so
p50/p95/p99 are real percentiles, not histogram buckets. The target is p95 under twice the sum of the stage
service times (the mean model-call time per stage, read from the daemon's own metrics) plus ``settle_ms``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from app.bench.common import BenchOptions, latency_summary, make_images, process_peak_rss_mib, synthetic_overrides

STREAM_SECONDS = 20.0
CAPACITY_IMAGES = 600
LOAD_LEVELS = (0.5, 0.9)
SETTLE_MS = 200
STREAM_MAX_WAIT_MS = 2.0
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """(sample name, stage) -> value for the stage counters and batch-time sums the scenario needs."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    values: dict[tuple[str, str], float] = {}
    if status != 200:
        return values
    wanted = {"binner_stage_busy_seconds_total", "binner_stage_batch_seconds_sum", "binner_stage_batch_seconds_count",
              "binner_queue_wait_seconds_sum", "binner_queue_wait_seconds_count"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                key = (sample.name, sample.labels.get("stage", sample.labels.get("queue", "")))
                values[key] = values.get(key, 0.0) + sample.value
    return values


def _finished(ledger: Path, names: set[str]) -> dict[str, tuple[float, float]]:
    """name -> (seen_at, finished_at) for the files of ``names`` the daemon has placed, read from its ledger."""
    if not ledger.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}
    try:
        rows = db.execute(
            "SELECT path, seen_at, finished_at FROM files"
            " WHERE status IN ('done', 'quarantined') AND finished_at IS NOT NULL"
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        db.close()
    done: dict[str, tuple[float, float]] = {}
    for path, seen_at, finished_at in rows:
        name = os.path.basename(path.decode(errors="replace") if isinstance(path, bytes) else path)
        if name in names:
            done[name] = (float(seen_at), float(finished_at))
    return done


def _deltas(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _level(root: Path, inbox: Path, port: int, level: float, capacity: float, seconds: float, start: int,
           ledger: Path) -> dict[str, Any]:
    """Feed ``level * capacity`` files/s for ``seconds``, wait until all are placed, measure each file."""
    rate = level * capacity
    count = max(8, int(rate * seconds))
    staging = root / f"staging-{level}"
    make_images(staging, count, start=start)
    names = sorted(path.name for path in staging.iterdir())
    before = _scrape(port)
    arrived: dict[str, float] = {}
    began = time.monotonic()
    for index, name in enumerate(names):
        delay = began + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        staged = staging / name
        os.utime(staged)  # written now: the settle clock starts here, as for a real upload
        os.rename(staged, inbox / name)
        arrived[name] = time.time()
    feeding = time.monotonic() - began
    wanted = set(names)
    deadline = time.monotonic() + max(60.0, seconds * 3)
    done: dict[str, tuple[float, float]] = {}
    while time.monotonic() < deadline:
        done = _finished(ledger, wanted)
        if len(done) == len(wanted):
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - began
    used = _deltas(before, _scrape(port))
    latencies = [done[name][1] - arrived[name] for name in names if name in done]
    intake = [done[name][0] - arrived[name] for name in names if name in done]  # complete -> taken (settle)
    pipeline = [done[name][1] - done[name][0] for name in names if name in done]  # taken -> placed
    service = {}
    for (metric, stage), value in used.items():
        if metric == "binner_stage_batch_seconds_sum":
            calls = used.get(("binner_stage_batch_seconds_count", stage), 0.0)
            service[stage] = round(value / calls, 4) if calls else 0.0
    waits = {}
    for (metric, queue), value in used.items():
        if metric == "binner_queue_wait_seconds_sum":
            gets = used.get(("binner_queue_wait_seconds_count", queue), 0.0)
            waits[queue] = round(value / gets, 4) if gets else 0.0
    target = 2 * sum(service.values()) + SETTLE_MS / 1000.0
    summary = latency_summary(latencies)
    return {
        "load": level,
        "arrival_rate": round(rate, 2),
        "files": count,
        "placed": len(done),
        "feeding_seconds": round(feeding, 2),
        **summary,
        "intake_p50_s": latency_summary(intake)["p50_s"],
        "intake_p95_s": latency_summary(intake)["p95_s"],
        "pipeline_p50_s": latency_summary(pipeline)["p50_s"],
        "pipeline_p95_s": latency_summary(pipeline)["p95_s"],
        "mean_batch_service_s": service,
        "mean_queue_wait_s": waits,
        "target_p95_s": round(target, 4),
        "target_met": summary["p95_s"] is not None and len(done) == count and summary["p95_s"] < target,
        "stage_utilisation": {stage: round(value / elapsed, 3) for (metric, stage), value in used.items()
                              if metric == "binner_stage_busy_seconds_total"},
    }


def run_stream(options: BenchOptions, engine: dict[str, Any] | None) -> dict[str, Any]:
    from app.bench.engine import run_engine

    if engine is None:
        engine = run_engine(options, options.count(CAPACITY_IMAGES))
    capacity = float(engine["images_per_second"])
    seconds = STREAM_SECONDS if options.stream_seconds is None else options.stream_seconds
    with tempfile.TemporaryDirectory(prefix="binner-bench-stream-") as scratch:
        root = Path(scratch)
        inbox, state = root / "inbox", root / "state"
        inbox.mkdir()
        port = _free_port()
        config = {
            "input": str(inbox), "output": str(root / "bins"), "state_dir": str(state), "placement": "move",
            "settle_ms": SETTLE_MS, "http": {"enabled": True, "host": "127.0.0.1", "port": port},
            "log": {"format": "json", "level": "warning"},
            **synthetic_overrides(options.ocr_ms, options.vision_ms, options.batch, options.queue),
        }
        for stage in ("ocr", "vision"):  # a stream wants latency: do not hold a batch open for companions
            config[stage]["max_wait_ms"] = STREAM_MAX_WAIT_MS
        config["loader"] = {"max_wait_ms": STREAM_MAX_WAIT_MS}
        config["ocr"]["synthetic_ms"] = list(options.ocr_ms)
        config["vision"]["synthetic_ms"] = list(options.vision_ms)
        config_file = root / "binner.yaml"
        config_file.write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        env = {key: value for key, value in env.items() if not key.startswith("BINNER_")}
        with (root / "daemon.log").open("wb") as daemon_log:
            daemon = subprocess.Popen([sys.executable, "-m", "app.cli", "run", "--config", str(config_file)],
                                      cwd=REPO, env=env, stdout=daemon_log, stderr=subprocess.STDOUT)
            try:
                _wait_ready(daemon, port, root / "daemon.log")
                levels = []
                start = 0
                for level in LOAD_LEVELS:
                    levels.append(_level(root, inbox, port, level, capacity, seconds, start, state / "ledger.sqlite3"))
                    start += levels[-1]["files"]
                rss = process_peak_rss_mib(daemon.pid)
            finally:
                _stop(daemon)
    heaviest = levels[-1]
    return {
        "images_per_second": heaviest["arrival_rate"],
        "p95_latency_s": heaviest["p95_s"],
        "p50_s": heaviest["p50_s"],
        "p95_s": heaviest["p95_s"],
        "p99_s": heaviest["p99_s"],
        "stage_utilisation": heaviest["stage_utilisation"],
        "peak_rss_mib": rss,
        "capacity_images_per_second": capacity,
        "settle_ms": SETTLE_MS,
        "levels": {f"{int(level['load'] * 100)}%": level for level in levels},
        "target": {"text": "p95 < 2 x stage service times + settle_ms, at 50% and 90% load",
                   "met": all(level["target_met"] for level in levels)},
    }


def _wait_ready(daemon: subprocess.Popen[bytes], port: int, log_file: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the daemon exited with {daemon.returncode} before it was ready:\n{tail}")
        if _get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)[0] == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the daemon was not ready within {timeout_s:.0f} s (log: {log_file})")


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            daemon.kill()
        daemon.wait(timeout=10)
