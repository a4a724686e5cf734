"""Building a ready-to-run pipeline from configuration, shared by `once`, `eval`, `bench` and `run`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from app.config import BinnerConfig, ConfigError
from app.engine import Pipeline
from app.intake import finish_leftovers, scan, to_discovered
from app.ledger import Discovered, IntakeResult, Ledger, Outcome, Row
from app.metrics import Metrics
from app.wiring import build_stages, vision_enabled

log = structlog.get_logger("binner.runtime")


def prepare_dirs(config: BinnerConfig, need_output: bool = True) -> None:
    """Create input, output and state directories, with an error that names the key on failure."""
    wanted = [("input", config.input), ("state_dir", config.state_dir)]
    if need_output:
        wanted.append(("output", config.output))
    for key, path in wanted:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}: cannot create {path}: {error.strerror}; fix the path or its permissions") from None


def preflight_weights(config: BinnerConfig, fetch: bool = True) -> None:
    """Make sure every configured weight is here before loading anything.

    With internet, a first start fetches the missing public weights (with progress bars); offline, it
    stops at once listing every missing weight, the command that provides it, and the offline example.
    """
    if config.vision.backend != "models" or not vision_enabled(config):
        return
    from app.weights import can_download, fetch_weights, missing_weights

    v = config.vision
    wanted = (
        v.detector.weights if v.detector.enabled else None,
        v.captioner.model if v.captioner.enabled else None,
        v.clip.model if v.clip.enabled else None,
    )
    missing = missing_weights(*wanted)
    if missing and fetch and can_download(missing):
        log.info("fetching missing model weights (first start)", weights=[m.value for m in missing])
        fetch_weights(*wanted, progress=True)
        missing = missing_weights(*wanted)
    if missing:
        lines = ["model weights are missing and cannot be fetched here:"]
        lines += [f"  - {m}" for m in missing]
        lines.append("Provide them (with internet: `binner fetch-weights`), point the keys above at local copies, "
                     "or try the offline example: --config deploy/examples/offline-cpu.yaml")
        raise ConfigError("\n".join(lines))


@dataclass
class Runtime:
    config: BinnerConfig
    ledger: Ledger
    metrics: Metrics
    pipeline: Pipeline
    placer: Any | None


def build_runtime(config: BinnerConfig, *, dry_run: bool = False, metrics: Metrics | None = None,
                  on_finished: Callable[[Row, Outcome], None] | None = None) -> Runtime:
    """Everything but the model loading (``await runtime.pipeline.setup()`` does that)."""
    from app.placement import Placer

    prepare_dirs(config, need_output=not dry_run)
    ledger = Ledger(config.ledger_path)
    metrics = metrics or Metrics()
    placer = None if dry_run else Placer(config.output, config.placement)
    if placer is not None:
        swept = placer.sweep_temp_files()
        if swept:
            log.info("removed temporary files left by an interrupted placement", files=swept)
    stages = build_stages(config)
    if config.vision.backend == "models" and vision_enabled(config):
        from stages.ultralytics_env import prepare_ultralytics

        prepare_ultralytics(config.state_dir / "ultralytics")
    q = config.queues
    pipeline = Pipeline(
        ledger=ledger, metrics=metrics, stages=stages, thresholds=config.rules, placer=placer,
        queue_capacities={"load": q.load, "ocr": q.ocr, "vision": q.vision, "sink": q.sink},
        max_attempts=config.max_attempts, feeder_page_size=config.feeder_page_size,
        placement_mode=config.placement, on_finished=on_finished,
    )
    return Runtime(config, ledger, metrics, pipeline, placer)


def take_files(runtime: Runtime, discovered: Iterable[Discovered]) -> tuple[IntakeResult, int]:
    """Record complete files in the ledger and settle crash leftovers; returns the intake and how many
    leftovers went back to pending (already counted nowhere else)."""
    result = runtime.ledger.intake(discovered)
    _, requeued = finish_leftovers(
        runtime.ledger, result.already_finished, runtime.config.placement == "move",
        runtime.placer.remove_source if runtime.placer is not None else (lambda *args: False),
    )
    return result, requeued


def intake_all(runtime: Runtime) -> dict[str, int]:
    """Recover interrupted rows, scan the input and record every file in the ledger."""
    config = runtime.config
    recovered = runtime.ledger.recover_interrupted()
    observations = scan(config.input)
    result, requeued = take_files(runtime, (to_discovered(config.input, seen) for seen in observations))
    return {"seen": len(observations), "new": result.new, "requeued": result.requeued + requeued,
            "recovered": recovered}
