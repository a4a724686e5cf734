"""The `models` scenario: the real models of a configuration, in the pipeline and each stage on its own.

The pipeline runs twice over the same images: computing only what each decision needs (``rules.signals: needed``,
the default) and computing every signal (``all``); the report gives both rates, whether every file got the same bin,
and the share of images that did not run each model.

The pipeline runs over ``--repeat`` copies of the ``--source`` images. Then, in the same process, each stage
runs alone, on its own thread, over the same images decoded once, at its configured batch size: its standalone
throughput. The pipeline cannot beat its slowest stage, so ``ratio_to_slowest_stage`` says how much of that
ceiling it reaches. On a CPU machine the model stages also compete for the same cores, so the CPU-bound
ceiling (``shared_cpu_limit_images_per_second``: every stage's time added up) is reported beside it.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from app.bench.common import BenchOptions, run_backlog

AUTO_BATCH = 8


def _copy_source(source: Path, repeat: int) -> Any:
    files = [path for path in sorted(source.rglob("*")) if path.is_file()]

    def fill(inbox: Path) -> None:
        for copy in range(repeat):
            for path in files:
                target = inbox / f"r{copy}" / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    return fill


def standalone_rates(config: Any, source: Path) -> dict[str, dict[str, Any]]:
    """Images/s of each stage alone on the source images (decoded once by the loader, outside the clock)."""
    from app.build import build_stages
    from stages.base import ImageItem

    stages = build_stages(config)
    loader, models = stages[0], stages[1:]
    files = [path for path in sorted(source.rglob("*")) if path.is_file()]
    loader.setup("cpu")
    started = time.monotonic()
    decoded = loader.process_batch([ImageItem(key=index, source=str(path)) for index, path in enumerate(files)])
    load_seconds = time.monotonic() - started
    images = [item for item in decoded if item.failure is None]
    rates: dict[str, dict[str, Any]] = {
        loader.name: {"images": len(files), "seconds": round(load_seconds, 3),
                      "images_per_second": round(len(files) / load_seconds, 2) if load_seconds > 0 else None},
    }
    for stage in models:
        device = stage.devices[0]
        stage.setup(device)
        try:
            batch = stage.batch_policy.max_batch_size or AUTO_BATCH
            stage.warmup()
            def fresh_items() -> list[ImageItem]:
                return [ImageItem(key=item.key, source=item.source, width=item.width, height=item.height,
                                  image=item.image) for item in images]

            stage.process_batch(fresh_items()[:batch])  # untimed: first real shapes (ONNX Runtime plans per shape)
            fresh = fresh_items()
            started = time.monotonic()
            for start in range(0, len(fresh), batch):
                stage.process_batch(fresh[start : start + batch])
            seconds = time.monotonic() - started
        finally:
            stage.teardown()
        rates[stage.name] = {"images": len(fresh), "batch": batch, "device": device, "seconds": round(seconds, 3),
                             "images_per_second": round(len(fresh) / seconds, 3) if seconds > 0 else None}
    return rates


def run_models(options: BenchOptions) -> dict[str, Any]:
    from app.config import load_config

    assert options.config_file is not None and options.source is not None
    source = options.source
    if not source.is_dir():
        raise ValueError(f"--source {source}: not a directory of images")
    with tempfile.TemporaryDirectory(prefix="binner-bench-models-") as scratch:
        # One state directory for both parts: Ultralytics keeps the settings folder it saw at its first import.
        state = Path(scratch) / "state"
        config = load_config(options.config_file, {"input": Path(scratch) / "unused-input",
                                                   "output": Path(scratch) / "unused-output", "state_dir": state})
        if config.vision.backend == "models":
            from stages.ultralytics_env import prepare_ultralytics

            prepare_ultralytics(state / "ultralytics")
        # Standalone first: the process's one-time costs (library start-up, first inference) then fall outside
        # both clocks rather than inside the pipeline's.
        rates = standalone_rates(config, source)
        run = run_backlog({"state_dir": state, "rules": {"signals": "needed"}}, _copy_source(source, options.repeat),
                          config_file=options.config_file)
        everything = run_backlog({"state_dir": state, "rules": {"signals": "all"}}, _copy_source(source, options.repeat),
                                 config_file=options.config_file)
        report = run.summary()
        report["config"] = str(options.config_file)
        report["bins"] = run.bins
        report["quarantined"] = run.quarantined
        same = sum(everything.file_bins.get(rel) == found for rel, found in run.file_bins.items())
        report["signals"] = {
            "needed_images_per_second": round(run.images_per_second, 2),
            "all_images_per_second": round(everything.images_per_second, 2),
            "speedup": round(run.images_per_second / everything.images_per_second, 3)
            if everything.images_per_second else None,
            "bins_identical": same, "files": len(run.file_bins),
            "skipped_share": {model: round(count / max(1, run.finished), 3) for model, count in run.skipped.items()},
        }
    report["standalone"] = rates
    model_rates = {name: figures["images_per_second"] for name, figures in rates.items()
                   if name != "load" and figures["images_per_second"]}
    if model_rates:
        slowest_name = min(model_rates, key=lambda name: model_rates[name])
        slowest = model_rates[slowest_name]
        report["slowest_stage"] = slowest_name
        report["ratio_to_slowest_stage"] = round(run.images_per_second / slowest, 3)
        shared = 1.0 / sum(1.0 / rate for rate in model_rates.values())
        report["shared_cpu_limit_images_per_second"] = round(shared, 3)
        report["ratio_to_shared_cpu_limit"] = round(run.images_per_second / shared, 3) if math.isfinite(shared) else None
    else:
        report["ratio_to_slowest_stage"] = None
    report["target"] = {"text": "report only (ratio to the slowest stage alone)", "met": None}
    return report
