"""The `ray` scenario: the same stage classes as Ray Data ``map_batches`` actor pools, against binner's engine.

Ray Data is what a user would pick instead of binner for a backfill. Each stage (the real loader, the synthetic
OCR and vision stages) becomes a callable class run by an actor pool of one actor, with binner's batch size,
on a local Ray started here (usage statistics off). Ray runs twice: as configured by default, and tuned
(order not preserved, pools fixed at one actor, two tasks in flight per actor, blocks of one batch).

Timing follows the issue's rule: the items are counted from execution start (the first ``iter_batches``), so
Ray's actor start-up is included, as binner's model loading is not: binner's clock starts with its stages
warm. Per-item latency is from the moment the loader touched the item to the moment the driver received it
(binner: claimed by the feeder -> placed). Ray does no ledger and no placement here, binner does both.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.bench.common import BenchOptions, latency_summary, make_images
from app.bench.engine import analytic_limit, run_engine
from stages.base import BatchPolicy, ImageItem

RAY_IMAGES = 1500


class _RayStage:
    """A binner stage inside a Ray actor: rows in, the same ``process_batch`` call, rows out."""

    def __init__(self, kind: str, ocr_ms: tuple[float, float], vision_ms: tuple[float, float], batch: int) -> None:
        from stages.loader import LoaderOptions, LoaderStage
        from stages.synthetic import SyntheticOcrStage, SyntheticVisionStage

        policy = BatchPolicy(batch, 0.0)
        if kind == "load":
            self.stage: Any = LoaderStage(LoaderOptions(max_file_bytes=256 * 1024 * 1024, max_pixels=120_000_000,
                                                        max_side=1600), ["cpu"], policy)
        elif kind == "ocr":
            self.stage = SyntheticOcrStage(*ocr_ms, ["cpu"], policy)
        else:
            self.stage = SyntheticVisionStage(*vision_ms, ["cpu"], policy)
        self.kind = kind
        self.stage.setup("cpu")
        self.stage.warmup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        if self.kind == "load":
            entered = time.time()
            items = [ImageItem(key=index, source=str(path)) for index, path in enumerate(batch["path"])]
            self.stage.process_batch(items)
            pixels = [np.asarray(item.image) if item.image is not None else np.zeros((1, 1, 3), np.uint8)
                      for item in items]
            return {"path": batch["path"], "entered": np.full(len(items), entered),
                    "ok": np.array([item.failure is None for item in items]), "pixels": _stack(pixels)}
        items = [ImageItem(key=index, source=str(path), image=Image.fromarray(np.asarray(pixels)) if ok else None)
                 for index, (path, ok, pixels) in enumerate(zip(batch["path"], batch["ok"], batch["pixels"]))]
        self.stage.process_batch(items)
        out = dict(batch)
        if self.kind == "vision":
            out.pop("pixels")  # the last model stage: only the decision inputs go on to the driver
        return out


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """One tensor column when every image has the same shape, else an object column."""
    if len({array.shape for array in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def _run_ray_pipeline(paths: list[str], options: BenchOptions, tuned: bool) -> dict[str, Any]:
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False if tuned else context.execution_options.preserve_order
    rows = [{"path": path} for path in paths]
    dataset = (ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / options.batch))
               if tuned else ray.data.from_items(rows))
    for kind in ("load", "ocr", "vision"):
        pool = ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=2) if tuned else ActorPoolStrategy(size=1)
        dataset = dataset.map_batches(
            _RayStage, batch_size=options.batch, num_cpus=0.5, batch_format="numpy", compute=pool,
            fn_constructor_args=(kind, options.ocr_ms, options.vision_ms, options.batch),
        )
    latencies: list[float] = []
    arrivals: list[float] = []
    started = time.monotonic()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        now_wall, now = time.time(), time.monotonic()
        for entered in batch["entered"]:
            latencies.append(now_wall - float(entered))
            arrivals.append(now - started)
    elapsed = max(arrivals, default=time.monotonic() - started)
    lat = latency_summary(latencies)
    report: dict[str, Any] = {
        "images_per_second": round(len(arrivals) / elapsed, 2) if elapsed > 0 else None,
        "p50_latency_s": lat["p50_s"],
        "p95_latency_s": lat["p95_s"],
        "p99_latency_s": lat["p99_s"],
        "finished": len(arrivals),
        "seconds": round(elapsed, 3),
        "first_item_s": round(min(arrivals), 3) if arrivals else None,
        "steady_images_per_second": _steady_rate(arrivals),
    }
    return report


def _steady_rate(arrivals: list[float]) -> float | None:
    """Items/s between the 10th and the 90th percent of the output: Ray's rate once its pipeline is full."""
    if len(arrivals) < 10:
        return None
    ordered = sorted(arrivals)
    low, high = ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10]
    return round((len(ordered) * 8 // 10) / (high - low), 2) if high > low else None


def run_ray(options: BenchOptions) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    count = options.count(RAY_IMAGES)
    binner = run_engine(options, count)
    limit = analytic_limit(options)
    report: dict[str, Any] = dict(binner)
    report["analytic_limit_images_per_second"] = round(limit, 2) if math.isfinite(limit) else None
    with tempfile.TemporaryDirectory(prefix="binner-bench-ray-") as scratch:
        inbox = Path(scratch) / "inbox"
        make_images(inbox, count)
        paths = [str(path) for path in sorted(inbox.iterdir())]
        repo = str(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": python_path,
                                                                   "RAY_USAGE_STATS_ENABLED": "0"}})
        try:
            for variant in ("default", "tuned"):
                figures = _run_ray_pipeline(paths, options, tuned=variant == "tuned")
                ray_rate, ray_p95 = figures["images_per_second"], figures["p95_latency_s"]
                figures["throughput_ratio"] = round(binner["images_per_second"] / ray_rate, 3) if ray_rate else None
                figures["p95_ratio"] = (round(binner["p95_latency_s"] / ray_p95, 3)
                                        if ray_p95 and binner["p95_latency_s"] is not None else None)
                if ray_rate and math.isfinite(limit):
                    figures["fraction_of_limit"] = round(ray_rate / limit, 3)
                    if figures["steady_images_per_second"]:
                        figures["steady_fraction_of_limit"] = round(figures["steady_images_per_second"] / limit, 3)
                report[variant] = figures
        finally:
            ray.shutdown()
    default, tuned = report["default"], report["tuned"]

    def at_least(value: float | None, floor: float) -> bool | None:
        return None if value is None else value >= floor

    def at_most(value: float | None, ceiling: float) -> bool | None:
        return None if value is None else value <= ceiling

    checks = [at_least(default["throughput_ratio"], 1.3), at_least(tuned["throughput_ratio"], 1.15),
              at_most(default["p95_ratio"], 1 / 3), at_most(tuned["p95_ratio"], 1 / 3)]
    report["target"] = {"text": ">= 1.3x default and >= 1.15x tuned Ray; p95 <= 1/3 of Ray's",
                        "met": None if None in checks else all(checks)}
    return report
