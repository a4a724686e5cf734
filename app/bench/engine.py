"""The `engine` and `sequential` scenarios: binner's engine against its analytic limit and against the seeds' loop.

Both use the same synthetic GIL-releasing model stages (sleeps that stand in for GPU calls) and the real
loader, on the same generated PNGs, in the same process.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from app.bench.common import (
    BenchOptions,
    PeakRss,
    finite_or_none,
    latency_summary,
    make_images,
    run_backlog,
    stage_limit,
    synthetic_overrides,
)

ENGINE_IMAGES = 2000
SEQUENTIAL_IMAGES = 300


def analytic_limit(options: BenchOptions) -> float:
    """The best any pipeline can do: the slowest model stage running full batches back to back."""
    return min(stage_limit(options.ocr_ms, options.batch), stage_limit(options.vision_ms, options.batch))


def sequential_limit(options: BenchOptions) -> float:
    """The seeds' loop at best: one image through OCR then vision, batch 1, models only."""
    seconds = (sum(options.ocr_ms) + sum(options.vision_ms)) / 1000.0
    return math.inf if seconds <= 0 else 1.0 / seconds


def run_engine(options: BenchOptions, count: int | None = None) -> dict[str, Any]:
    count = options.count(ENGINE_IMAGES) if count is None else count
    run = run_backlog(synthetic_overrides(options.ocr_ms, options.vision_ms, options.batch, options.queue),
                      lambda inbox: make_images(inbox, count))
    limit = analytic_limit(options)
    report = run.summary()
    report["analytic_limit_images_per_second"] = finite_or_none(round(limit, 2))
    report["efficiency"] = round(run.images_per_second / limit, 3) if math.isfinite(limit) else None
    efficiency = report["efficiency"]
    report["target"] = {"text": "efficiency >= 0.98", "met": None if efficiency is None else efficiency >= 0.98}
    report["costs_ms"] = {"ocr": list(options.ocr_ms), "vision": list(options.vision_ms), "batch": options.batch,
                          "queue": options.queue}
    return report


def run_sequential_loop(options: BenchOptions, count: int) -> dict[str, Any]:
    """Seed 000's baseline: ``for image in images: load; ocr; vision; decide`` with the same stage classes.

    It only appends each decision to a list (the seed's ``bins[bin].append``): no ledger, no placement, so
    it does less work per file than binner, which keeps the comparison in the loop's favour.
    """
    from app.build import build_stages
    from app.config import load_config
    from stages.base import ImageItem
    from stages.rules import decide

    with tempfile.TemporaryDirectory(prefix="binner-bench-seq-") as scratch:
        inbox = Path(scratch) / "inbox"
        make_images(inbox, count)
        config = load_config(None, {"input": inbox, "output": Path(scratch) / "bins", "state_dir": Path(scratch) / "s",
                                    **synthetic_overrides(options.ocr_ms, options.vision_ms, options.batch, 1)})
        stages = build_stages(config)
        for stage in stages:
            stage.setup("cpu")
            stage.warmup()
        bins: dict[str, list[str]] = {"A": [], "B": [], "C": []}
        latencies: list[float] = []
        busy = {stage.name: 0.0 for stage in stages}
        peak = PeakRss()
        started = time.monotonic()
        for index, path in enumerate(sorted(inbox.iterdir())):
            taken = time.monotonic()
            item = ImageItem(key=index, source=str(path))
            for stage in stages:
                stage_started = time.monotonic()
                stage.process_batch([item])
                busy[stage.name] += time.monotonic() - stage_started
            if item.failure is None:
                bins[decide(item.signals, config.rules).bin].append(str(path))
            latencies.append(time.monotonic() - taken)
        elapsed = time.monotonic() - started
        for stage in stages:
            stage.teardown()
    lat = latency_summary(latencies)
    return {
        "images_per_second": round(count / elapsed, 2),
        "p50_latency_s": lat["p50_s"],
        "p95_latency_s": lat["p95_s"],
        "p99_latency_s": lat["p99_s"],
        "stage_utilisation": {name: round(seconds / elapsed, 3) for name, seconds in busy.items()},
        "peak_rss_mib": peak.mib(),
        "files": count,
        "finished": sum(len(paths) for paths in bins.values()),
        "seconds": round(elapsed, 3),
    }


def run_sequential(options: BenchOptions, engine: dict[str, Any] | None) -> dict[str, Any]:
    """The seeds' loop, and binner's speedup over it next to the theoretical one.

    ``engine`` is this run's `engine` scenario when it ran; otherwise the engine is measured here too.
    """
    count = options.count(SEQUENTIAL_IMAGES)
    loop = run_sequential_loop(options, count)
    if engine is None:
        engine = run_engine(options)
    theoretical = analytic_limit(options) / sequential_limit(options)
    speedup = engine["images_per_second"] / loop["images_per_second"] if loop["images_per_second"] else None
    report = dict(loop)
    report["binner_images_per_second"] = engine["images_per_second"]
    report["speedup"] = None if speedup is None else round(speedup, 2)
    report["theoretical_speedup"] = finite_or_none(round(theoretical, 2))
    usable = speedup is not None and math.isfinite(theoretical) and theoretical > 0
    report["speedup_vs_theoretical"] = round(speedup / theoretical, 3) if usable else None
    ratio = report["speedup_vs_theoretical"]
    report["target"] = {"text": "speedup >= 0.95 x theoretical", "met": None if ratio is None else ratio >= 0.95}
    report["sequential_limit_images_per_second"] = finite_or_none(round(sequential_limit(options), 2))
    return report
