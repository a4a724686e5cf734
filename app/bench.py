"""`binner bench`: throughput, latency, stage utilisation and peak memory of the real engine.

Synthetic mode (default) runs the real loader, queues, ledger and writer with model stages that sleep
like a GPU call (sleep releases the GIL the way CUDA calls do), so the engine's own efficiency is
measured against the analytic limit. ``--config`` runs the real models of a configuration instead.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from app.metrics import Metrics


def _parse_ms(text: str) -> tuple[float, float]:
    base, per_item = (float(part) for part in text.split(","))
    return base, per_item


def make_images(directory: Path, count: int, size: int = 64, start: int = 0) -> None:
    """Small, distinct PNGs named ``img_NNNNNN.png`` (each colour differs, so each hash does)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        colour = (index % 251, (index * 7) % 253, (index * 13) % 241)
        Image.new("RGB", (size, size), colour).save(directory / f"img_{index:06d}.png", optimize=False)


def _stage_limit(base_ms: float, per_item_ms: float, batch: int, devices: int) -> float:
    return devices * batch / ((base_ms + per_item_ms * batch) / 1000.0)


def _counter_total(metrics: Metrics, name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                totals[sample.labels.get("stage", "")] = totals.get(sample.labels.get("stage", ""), 0.0) + sample.value
    return totals


def _quantile(metrics: Metrics, quantile: float) -> float | None:
    """From the end-to-end histogram buckets (upper bound of the bucket holding the quantile)."""
    buckets: list[tuple[float, float]] = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "binner_end_to_end_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    target = quantile * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= target)


def run_bench(*, images: int, ocr_ms: str, vision_ms: str, batch: int, queue: int, config_file: Path | None,
              source: Path | None, repeat: int, show_progress: bool) -> dict[str, Any]:
    import sys

    from app.cli import run_async, run_pipeline_once
    from app.config import load_config
    from app.logs import configure_logging
    from app.runtime import build_runtime, intake_all

    configure_logging("console", "error", sys.stderr)
    with tempfile.TemporaryDirectory(prefix="binner-bench-") as scratch:
        root = Path(scratch)
        inbox = root / "inbox"
        overrides: dict[str, Any] = {"input": inbox, "output": root / "bins", "state_dir": root / "state",
                                     "placement": "move", "http": {"enabled": False}}
        if config_file is None:
            ocr_cost, vision_cost = _parse_ms(ocr_ms), _parse_ms(vision_ms)
            make_images(inbox, images)
            overrides.update(
                ocr={"backend": "synthetic", "devices": ["cpu"], "batch_size": batch, "synthetic_ms": ocr_cost},
                vision={"backend": "synthetic", "devices": ["cpu"], "batch_size": batch, "synthetic_ms": vision_cost},
                queues={"ocr": queue, "vision": queue},
                rules={"short_circuit_text": False},
            )
            limit = min(_stage_limit(*ocr_cost, batch, 1), _stage_limit(*vision_cost, batch, 1))
        else:
            if source is None:
                raise SystemExit("--config needs --source DIR (images to repeat)")
            files = [p for p in sorted(source.rglob("*")) if p.is_file()]
            for copy in range(repeat):
                for path in files:
                    target = inbox / f"r{copy}" / path.relative_to(source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
            limit = None
        config = load_config(config_file, overrides)
        metrics = Metrics()
        runtime = build_runtime(config, metrics=metrics)
        intake_all(runtime)
        total, _ = runtime.ledger.backlog()
        started = time.monotonic()
        stats = run_async(run_pipeline_once, runtime, total, show_progress)
        elapsed = time.monotonic() - started
        busy = _counter_total(metrics, "binner_stage_busy_seconds_total")
        runtime.ledger.close()
        throughput = stats.finished / elapsed
        report: dict[str, Any] = {
            "mode": "synthetic" if config_file is None else f"models ({config_file})",
            "files": total,
            "finished": stats.finished,
            "seconds": round(elapsed, 2),
            "images_per_second": round(throughput, 2),
            "end_to_end_p50_s<=": _quantile(metrics, 0.5),
            "end_to_end_p95_s<=": _quantile(metrics, 0.95),
            "stage_utilisation": {stage: round(seconds / elapsed, 3) for stage, seconds in busy.items()},
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if limit is not None:
            report["analytic_limit_images_per_second"] = round(limit, 2)
            report["efficiency"] = round(throughput / limit, 3)
        return report
