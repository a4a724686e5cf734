"""Building a ready-to-run pipeline from configuration, shared by `once`, `eval`, `bench` and `run`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from app.config import BinnerConfig, ConfigError
from app.engine import Pipeline
from app.instance_lock import InstanceLock
from app.intake import finish_leftovers, scan, to_discovered
from app.ledger import Discovered, IntakeResult, Ledger, Outcome, Row
from app.metrics import Metrics
from app.wiring import build_stages, vision_enabled

log = structlog.get_logger("binner.runtime")


def prepare_dirs(config: BinnerConfig, need_output: bool = True) -> None:
    """Check the input and create the output and state directories, with errors that name the key.

    A missing input is refused (a typo would otherwise watch an empty folder forever) unless
    ``create_input`` is set or the input is the built-in default ``./inbox``.
    """
    if not config.input.is_dir():
        if config.input.exists() or config.input.is_symlink():
            raise ConfigError(f"input: {config.input} is not a directory; point input (--input, BINNER_INPUT) at a folder")
        if not config.creates_input:
            raise ConfigError(
                f"input: {config.input} does not exist; create it, fix the path (--input, input, BINNER_INPUT), "
                "or set create_input: true to have binner create it"
            )
    wanted = [("input", config.input), ("state_dir", config.state_dir)]
    if need_output:
        wanted.append(("output", config.output))
    for key, path in wanted:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}: cannot create {path}: {error.strerror}; fix the path or its permissions") from None


def open_ledger(config: BinnerConfig, *, read_only: bool = False) -> Ledger:
    """Open the ledger of ``config.state_dir``; any failure becomes one line naming the file and what to do."""
    path = config.ledger_path
    try:
        return Ledger(path, read_only=True) if read_only else Ledger(path)
    except (RuntimeError, sqlite3.Error, OSError) as error:
        cause = error.__cause__ if isinstance(error.__cause__, (sqlite3.Error, OSError)) else error
        if cause is error and not isinstance(error, OSError) and str(path) in str(error):
            raise ConfigError(f"state_dir: {' '.join(str(error).split())}") from None  # already names file and fix
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).split(". ")[0]
        if "not a database" in reason or "malformed" in reason or "corrupt" in reason:
            advice = (f"the file is damaged: move it aside (mv {path} {path}.broken) and start again for a new "
                      "ledger (files already placed stay placed)")
        else:
            advice = f"make {config.state_dir} and its files writable by this user, or point state_dir (--state) elsewhere"
        raise ConfigError(f"state_dir: cannot open the ledger {path}: {reason}; {advice}") from None


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
    lock: InstanceLock | None = field(default=None)

    def close(self) -> None:
        """Close the ledger, then let another process have the state directory."""
        self.ledger.close()
        if self.lock is not None:
            self.lock.release()


def build_runtime(config: BinnerConfig, *, dry_run: bool = False, metrics: Metrics | None = None,
                  on_finished: Callable[[Row, Outcome], None] | None = None, command: str = "run") -> Runtime:
    """Everything but the model loading (``await runtime.pipeline.setup()`` does that).

    Takes the state directory's instance lock first: a second writer is refused before it touches the ledger.
    """
    prepare_dirs(config, need_output=not dry_run)
    lock = InstanceLock(config.state_dir).acquire(command)
    ledger: Ledger | None = None
    try:
        ledger = open_ledger(config)
        return _assemble(config, ledger, lock, dry_run, metrics or Metrics(), on_finished)
    except BaseException:
        if ledger is not None:
            ledger.close()
        lock.release()
        raise


def _assemble(config: BinnerConfig, ledger: Ledger, lock: InstanceLock, dry_run: bool, metrics: Metrics,
              on_finished: Callable[[Row, Outcome], None] | None) -> Runtime:
    from app.placement import Placer

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
    return Runtime(config, ledger, metrics, pipeline, placer, lock)


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
