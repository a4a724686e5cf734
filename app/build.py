"""Configuration -> a ready runtime: directories, the instance lock, the ledger, the weights, the stages and
(for the local engine) the pipeline. Shared by `run`, `once` (both engines), `eval`, `bench`, `config check`, and
`rebin --infer` (its stages), and by the read commands for the ledger and the recorded configuration.

Devices and isolation are resolved by ``app.devices``; what is built here is run by ``app.once`` (`once`),
``app.evaluate`` (`eval`), ``app.service`` (the daemon) and ``app.infer`` (`rebin --infer`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from app.config import BinnerConfig, ConfigError
from app.devices import isolation_of, resolve_devices
from app.engine import Hosting, Pipeline
from app.metrics import Metrics
from app.store import (
    Discovered,
    InstanceLock,
    IntakeResult,
    Ledger,
    Outcome,
    Placer,
    Row,
    finish_leftovers,
    is_disk_full,
    is_within,
    iter_scan,
    to_discovered,
)
from stages.base import BatchPolicy, Stage

log = structlog.get_logger("binner.runtime")
OFFLINE_EXAMPLE = "deploy/examples/offline-cpu.yaml"
# In the state directory: which configuration file the last writer (`binner run`, `once`) used, so that
# `status`, `explain`, `rebin` and `config show` without --config use the daemon's configuration.
CONFIG_RECORD = "config-source.json"


def record_config_source(config: BinnerConfig, command: str) -> None:
    """Write which configuration file this writer uses into its state directory (under the instance lock)."""
    record = {"config_file": str(config.source_file) if config.source_file else None, "command": f"binner {command}",
              "pid": os.getpid(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = config.state_dir / CONFIG_RECORD
    partial = path.with_name(f".{CONFIG_RECORD}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:  # only a convenience for the read commands: never stop a writer for it
        log.warning("cannot record the configuration file in the state directory", path=str(path), error=str(error))


def recorded_config_source(state_dir: Path) -> tuple[bool, Path | None, str]:
    """(found, config file or None for built-in defaults, which command wrote it) from ``state_dir``."""
    try:
        record = json.loads((state_dir / CONFIG_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, None, ""
    if not isinstance(record, dict):
        return False, None, ""
    given = record.get("config_file")
    return True, Path(given) if isinstance(given, str) and given else None, str(record.get("command") or "binner")


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
    check_disjoint(config)  # before anything is created: a state directory inside the input is not left behind
    wanted = [("input", config.input), ("state_dir", config.state_dir)]
    if need_output:
        wanted.append(("output", config.output))
    for key, path in wanted:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"{key}: cannot create {path}: {error.strerror}; fix the path or its permissions") from None


def check_disjoint(config: BinnerConfig) -> None:
    """Refuse an input inside the output (binner would place its own bins onto themselves and remove them),
    an output inside the input, and a state directory inside the input, however the paths are spelled or mounted
    (``app.store.is_within``); folders not created yet are judged where they will be created."""
    inp, out, state = config.input, config.output, config.state_dir
    if is_within(inp, out):
        raise ConfigError(f"input ({inp}) is inside output ({out}) (compared as real folders: {os.path.realpath(inp)} "
                          f"in {os.path.realpath(out)}): binner would sort its own bins and delete what it placed; "
                          "pick input and output folders side by side")
    if is_within(out, inp):
        raise ConfigError(f"output ({out}) is inside input ({inp}) (compared as real folders: {os.path.realpath(out)} "
                          f"in {os.path.realpath(inp)}): pick a sibling folder")
    if is_within(state, inp):
        raise ConfigError(f"state_dir ({state}) is inside input ({inp}) (compared as real folders): "
                          "pick a folder outside the watched input")


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


def preflight_weights(config: BinnerConfig, fetch: bool = True,
                      while_fetching: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
    """Make sure every configured weight is here before loading anything.

    With internet, a first start fetches the missing public weights (with progress bars, inside
    ``while_fetching()``: the daemon keeps systemd's start timeout extended meanwhile); offline, it stops at once
    listing every missing weight, the command that provides it, and the offline example.
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
        with while_fetching() if while_fetching is not None else nullcontext():
            fetch_weights(*wanted, progress=True)
        missing = missing_weights(*wanted)
    if missing:
        from app.weights import fetch_command

        lines = ["model weights are missing and cannot be fetched here:"]
        lines += [f"  - {m}" for m in missing]
        lines.append(f"Provide them (with internet: `{fetch_command()}`), point the keys above at local copies, "
                     f"or try the offline example: `make run CONFIG={OFFLINE_EXAMPLE}` "
                     f"(or --config {OFFLINE_EXAMPLE})")
        raise ConfigError("\n".join(lines))


@dataclass
class Runtime:
    """What a writing command holds: its configuration, the locked state directory's ledger, the writer, the
    metrics, and for the local engine the pipeline (None for `once --engine ray`, whose stages run on the cluster)."""

    config: BinnerConfig
    ledger: Ledger
    metrics: Metrics
    pipeline: Pipeline | None
    placer: Placer | None
    lock: InstanceLock | None = field(default=None)

    @property
    def local(self) -> Pipeline:
        """The local engine's pipeline (a runtime built for the Ray engine has none)."""
        if self.pipeline is None:
            raise RuntimeError("this runtime was built for the Ray engine: it has no local pipeline")
        return self.pipeline

    def close(self) -> None:
        """Close the ledger, then let another process have the state directory."""
        self.ledger.close()
        if self.lock is not None:
            self.lock.release()


def build_runtime(config: BinnerConfig, *, dry_run: bool = False, metrics: Metrics | None = None,
                  on_finished: Callable[[Row, Outcome], None] | None = None, command: str = "run",
                  engine: Literal["local", "ray"] = "local") -> Runtime:
    """Everything but the model loading (``await runtime.pipeline.setup()`` does that).

    Takes the state directory's instance lock first: a second writer is refused before it touches the ledger.
    For the Ray engine no stage is built here: the driver builds them once, for the cluster's GPUs.
    """
    prepare_dirs(config, need_output=not dry_run)
    lock = InstanceLock(config.state_dir).acquire(command)
    ledger: Ledger | None = None
    try:
        if command in ("run", "once"):
            record_config_source(config, command)
        ledger = open_ledger(config)
        placer = None if dry_run else Placer(config.output, config.placement)
        if placer is not None:
            swept = placer.sweep_temp_files()
            if swept:
                log.info("removed temporary files left by an interrupted placement", files=swept)
        metrics = metrics or Metrics()
        pipeline = build_pipeline(config, ledger, metrics, placer, on_finished) if engine == "local" else None
        return Runtime(config, ledger, metrics, pipeline, placer, lock)
    except BaseException:
        if ledger is not None:
            ledger.close()
        lock.release()
        raise


def build_pipeline(config: BinnerConfig, ledger: Ledger, metrics: Metrics, placer: Placer | None,
                   on_finished: Callable[[Row, Outcome], None] | None = None) -> Pipeline:
    """The local engine over ``ledger``: the configured stages, their hosting, queues and rules."""
    stages, hosting = build_hosted_stages(config)
    q = config.queues
    return Pipeline(
        ledger=ledger, metrics=metrics, stages=stages, thresholds=config.rules, placer=placer,
        queue_capacities={"load": q.load, "ocr": q.ocr, "vision": q.vision, "sink": q.sink},
        max_attempts=config.max_attempts, feeder_page_size=config.feeder_page_size,
        placement_mode=config.placement, on_finished=_log_each_file(on_finished), hosting=hosting,
    )


def build_hosted_stages(config: BinnerConfig) -> tuple[list[Stage], dict[str, Hosting]]:
    """The configured stages and how each is hosted (threads or child processes), as the local engine runs them."""
    stages = build_stages(config)
    if config.vision.backend == "models" and vision_enabled(config):
        from stages.ultralytics_env import prepare_ultralytics

        prepare_ultralytics(config.state_dir / "ultralytics")
    hosting = {stage.name: Hosting(isolation_of(config, stage.name, stage.devices), config.stall_timeout_s,
                                   config.log.level) for stage in stages}
    return stages, hosting


def _log_each_file(then: Callable[[Row, Outcome], None] | None) -> Callable[[Row, Outcome], None]:
    """One debug line per finished file (where it went and why), before ``then``."""

    def finished(row: Row, outcome: Outcome) -> None:
        log.debug("file finished", path=row.path, status=outcome.status, bin=outcome.bin, rule=outcome.rule,
                  reason=outcome.reason, output=outcome.output_path)
        if then is not None:
            then(row, outcome)

    return finished


def take_files(runtime: Runtime, discovered: Iterable[Discovered]) -> tuple[IntakeResult, int]:
    """Record complete files in the ledger and settle crash leftovers; returns the intake and how many
    leftovers went back to pending (already counted nowhere else)."""
    result = runtime.ledger.intake(discovered)
    _, requeued = finish_leftovers(
        runtime.ledger, result.already_finished, runtime.config.placement == "move",
        runtime.placer.remove_source if runtime.placer is not None else (lambda *args: False),
    )
    return result, requeued


# While this many rows wait, a streaming scan pauses: the ledger holds a bounded backlog ahead of the pipeline.
SCAN_AHEAD_ROWS = 20_000
SCAN_PAUSE_POLL_S = 0.2  # how often a paused scan looks at the backlog again


class ScanError(Exception):
    """The scan of the input stopped on an error (the state disk full, say): what it recorded is binned, the rest of
    the tree waits for the next run."""


class StreamingIntake:
    """The input tree recorded in the ledger chunk by chunk, while the pipeline works on what is recorded.

    Memory holds one chunk of the scan, never the tree; the scan pauses while ``ahead`` rows already wait (a slow
    pipeline slows the scan), and reads the next chunk only after the pause, so that what it records is what the
    disk holds now. A ``kill -9`` loses nothing: the next run scans again and takes what is not recorded.
    Both engines use it the same way: ``prepare()`` before anything claims a row, ``run()`` on a thread of its own
    while the engine works (``more_coming`` tells the engine the scan may record more), ``stop()`` once the engine
    ends for any reason, ``raise_error()`` after the engine: an error that ended the scan is raised as ``ScanError``.
    """

    ahead = SCAN_AHEAD_ROWS  # a class attribute, so that a test can lower it for every intake a command makes

    def __init__(self, runtime: Runtime, only: Callable[[str], bool] | None = None, ahead: int | None = None) -> None:
        self.runtime = runtime
        self.only = only
        if ahead is not None:
            self.ahead = ahead
        self.counts = {"seen": 0, "new": 0, "requeued": 0, "recovered": 0, "refused_again": 0}
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def prepare(self) -> int:
        """Rows an interrupted run left in flight go back to pending, and refused files get one more try; returns
        how many rows that made pending. Call it before the engine claims anything: a recovery that ran after the
        first claim would put this run's own rows back, and a file would be processed twice."""
        ledger = self.runtime.ledger
        self.counts["recovered"] = ledger.recover_interrupted()
        self.counts["refused_again"] = ledger.retry_refused()  # each start tries a refused file once more
        return self.counts["recovered"] + self.counts["refused_again"]

    def more_coming(self) -> bool:
        """Whether the scan may still record rows (then an empty claim is not the end of the run)."""
        return not self.done.is_set()

    def stop(self) -> None:
        """End the scan at the next chunk or pause (safe from any thread)."""
        self._stop.set()

    def run(self, on_recorded: Callable[[int], None] | None = None) -> dict[str, int]:
        """Scan and record (blocking; run it on a thread of its own); ``on_recorded(n)`` after each chunk with the
        rows it made pending. Returns the counts, also in ``counts``. An error ends the scan and is kept in
        ``error`` (a thread has nobody to raise it to): ``raise_error()`` hands it on."""
        config, counts, ledger = self.runtime.config, self.counts, self.runtime.ledger
        chunks = iter_scan(config.input)
        try:
            while True:
                while ledger.backlog()[0] > self.ahead and not self._stop.is_set():
                    self._stop.wait(SCAN_PAUSE_POLL_S)
                if self._stop.is_set():
                    break
                chunk = next(chunks, None)  # stat the files only now, after the pause: the pipeline moved on meanwhile
                if chunk is None:
                    break
                wanted = [observed for observed in chunk if self.only is None or self.only(observed.rel_path)]
                result, leftovers = take_files(self.runtime, (to_discovered(config.input, seen) for seen in wanted))
                counts["seen"] += len(wanted)
                counts["new"] += result.new
                counts["requeued"] += result.requeued + leftovers
                if on_recorded is not None and (result.new or result.requeued or leftovers):
                    on_recorded(result.new + result.requeued + leftovers)
        except Exception as error:  # noqa: BLE001 - kept for raise_error(), on the engine's side
            self.error = error
            log.debug("the scan of the input stopped on an error", input=str(config.input), exc_info=error)
        finally:
            chunks.close()  # a scan stopped early closes the folders it still had open now, not at garbage collection
            self.done.set()
        return counts

    def raise_error(self) -> None:
        """Raise the error that ended the scan, if one did, as a ``ScanError`` that says what to do."""
        if self.error is None:
            return
        config = self.runtime.config
        error = self.error
        if isinstance(error, sqlite3.Error) and is_disk_full(error):
            what = (f"the state disk is full (the ledger {config.ledger_path} cannot grow); free space on the disk "
                    "holding state_dir")
        else:
            what = f"{type(error).__name__}: {error}"
        raise ScanError(f"the scan of {config.input} stopped: {what}; what it had recorded was binned: run the same "
                        "command again to take the rest") from error


def intake_all(runtime: Runtime, only: Callable[[str], bool] | None = None) -> dict[str, int]:
    """Recover interrupted rows, then record every file under the input (or those whose relative path ``only``
    accepts, e.g. the labelled images of `eval`) before anything runs (what the benchmarks want: a backlog)."""
    intake = StreamingIntake(runtime, only, ahead=sys.maxsize)
    intake.prepare()
    intake.run()
    intake.raise_error()
    return intake.counts


# --- stages ------------------------------------------------------------------------------------------------
def vision_enabled(config: BinnerConfig) -> bool:
    v = config.vision
    return v.detector.enabled or v.captioner.enabled or v.clip.enabled


def _policy(batch_size: int | str, max_wait_ms: float) -> BatchPolicy:
    return BatchPolicy(max_batch_size=None if batch_size == "auto" else int(batch_size), max_wait_ms=max_wait_ms)


def build_stages(config: BinnerConfig, gpu_count: int | None = None, where: str = "this machine") -> list[Stage]:
    """The enabled stages in pipeline order (load, ocr, vision), their devices resolved against ``gpu_count`` GPUs
    (default: this machine's; the Ray driver passes the cluster's). Where each replica runs (thread or process) is
    decided by ``build_pipeline`` for the local engine; on Ray every actor is a process of its own."""
    from stages.loader import LoaderOptions, LoaderStage

    limits, loader = config.limits, config.loader
    stages: list[Stage] = [
        LoaderStage(
            LoaderOptions(max_file_bytes=limits.max_file_bytes, max_pixels=limits.max_pixels, max_side=limits.max_side),
            devices=["cpu"] * loader.workers,
            batch_policy=BatchPolicy(loader.batch_size, loader.max_wait_ms),
        )
    ]
    ocr = config.ocr
    if ocr.enabled:
        devices = resolve_devices(ocr.devices, "ocr", gpu_count, where)
        policy = _policy(ocr.batch_size, ocr.max_wait_ms)
        if ocr.backend == "synthetic":
            from stages.synthetic import SyntheticOcrStage

            stages.append(SyntheticOcrStage(ocr.synthetic_ms[0], ocr.synthetic_ms[1], devices, policy))
        else:
            from stages.ocr import OcrOptions, OcrStage
            from stages.ppocr_torch import OcrPrecision

            options = OcrOptions(backend=ocr.backend, min_confidence=ocr.min_confidence, max_side=ocr.max_side,
                                 paddle_model_dir=ocr.paddle_model_dir, runtime=ocr.runtime,
                                 precision=OcrPrecision(**ocr.precision.model_dump()))
            stages.append(OcrStage(options, devices, policy))
    if vision_enabled(config):
        v = config.vision
        devices = resolve_devices(v.devices, "vision", gpu_count, where)
        policy = _policy(v.batch_size, v.max_wait_ms)
        if v.backend == "synthetic":
            from stages.synthetic import SyntheticVisionStage

            stages.append(SyntheticVisionStage(v.synthetic_ms[0], v.synthetic_ms[1], devices, policy))
        else:
            from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage

            if v.clip.enabled and not v.captioner.enabled:
                raise ConfigError(
                    "vision.clip.enabled: CLIP scores the image against its BLIP caption, so it needs "
                    "vision.captioner.enabled: true (or set vision.clip.enabled: false)"
                )
            detector = (DetectorOptions(weights=v.detector.weights, confidence=v.detector.confidence,
                                        image_size=v.detector.image_size) if v.detector.enabled else None)
            captioner = (CaptionerOptions(model=v.captioner.model, max_new_tokens=v.captioner.max_new_tokens,
                                          prompt=v.captioner.prompt) if v.captioner.enabled else None)
            clip = ClipOptions(model=v.clip.model) if v.clip.enabled else None
            stages.append(VisionStage(detector, captioner, clip, v.precision, devices, policy,
                                      max_image_side=limits.max_side))
    return stages
