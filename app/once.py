"""`binner once`: bin a directory to the end on either engine, and the local run-to-idle that `eval` and `bench`
share with it (progress bar, Ctrl-C drain). The CLI parses and prints; this module does the work."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import structlog
from rich.console import Console

from app.build import Runtime, StreamingIntake, build_runtime, build_stages, preflight_weights
from app.config import BinnerConfig
from app.engine import FINISHED, RunStats, first_error
from app.logs import lines_above
from app.progress import BinningProgress
from app.service import drain_message, run_async, stop_on_signals
from app.store import Outcome, Row, prune_empty_dirs

log = structlog.get_logger("binner.once")


@dataclass
class OnceSummary:
    """What `once` reports: the run's counts, how long it took, what is left, and what intake found."""

    stats: RunStats
    seconds: float
    not_finished: int
    intake: dict[str, int] = field(default_factory=dict)

    @property
    def already_done(self) -> int:
        return self.intake["seen"] - self.intake["new"] - self.intake["requeued"]

    @property
    def images_per_second(self) -> float:
        return self.stats.finished / max(self.seconds, 1e-9)


class RunStopped(Exception):
    """The engine stopped on an error it could not handle; the message names it and says how to resume."""


def bin_once(config: BinnerConfig, engine: Literal["local", "ray"], ray_address: str | None, show_progress: bool,
             console: Console | None = None) -> OnceSummary:
    """Take every file under the input, bin it on ``engine``, prune emptied folders (move mode); returns the summary.

    The scan records the tree chunk by chunk while the engine already works on what is recorded, so the first file
    is placed seconds after the start, whatever the size of the tree. Raises ``ConfigError``, ``StageSetupError``,
    ``RayEngineError``, ``RunStopped`` or ``ScanError`` with a message for the user.
    """
    preflight_weights(config)
    runtime = build_runtime(config, command="once", engine=engine)
    try:
        intake = StreamingIntake(runtime)
        started = time.monotonic()
        if engine == "ray":
            from app.ray_data import run_on_ray

            progress = BinningProgress(None, show_progress, console)  # what earlier runs left, then what the scan finds
            stats = scan_beside(intake, lambda more_coming: run_on_ray(
                runtime, ray_address, progress, build_stages, more_coming=more_coming), on_recorded=progress.add_total)
        else:
            stats = run_to_idle(runtime, None, show_progress, console, intake)
        seconds = time.monotonic() - started
        remaining, _ = runtime.ledger.backlog()
    finally:
        runtime.close()
    if config.placement == "move" and not remaining:
        prune_empty_dirs(config.input)  # a backfill leaves no empty folders behind in its input
    return OnceSummary(stats, seconds, remaining, intake.counts)


def scan_beside(intake: StreamingIntake, run_engine: Callable[[Callable[[], bool]], RunStats],
                on_recorded: Callable[[int], None] | None = None) -> RunStats:
    """``run_engine(more_coming)`` (the Ray driver) over what ``intake`` records on a thread of its own meanwhile.

    Interrupted rows are recovered before either starts. ``on_recorded(n)`` gets the rows to do: first those earlier
    runs left, then each chunk's, from the scan's thread. The scan stops as soon as the engine ends, for any reason;
    an error that ended the scan is raised once the engine has finished what was recorded (``ScanError``), so a run
    never reports success with part of the tree unrecorded.
    """
    intake.prepare()
    if on_recorded is not None:
        on_recorded(intake.runtime.ledger.backlog()[0])
    scanner = threading.Thread(target=intake.run, args=(on_recorded,), name="binner-scan", daemon=True)
    scanner.start()
    try:
        stats = run_engine(intake.more_coming)
    finally:
        intake.stop()  # a run that stopped early stops the scan before the ledger closes
        scanner.join()
    intake.raise_error()
    return stats


def run_to_idle(runtime: Runtime, total: int | None, show_progress: bool, console: Console | None = None,
                intake: StreamingIntake | None = None) -> RunStats:
    """The local engine over every pending row of ``runtime`` (and over what ``intake`` records meanwhile), on the
    event loop; returns the run's counts."""
    return run_async(_run_local, runtime, total, show_progress, console or Console(stderr=True), intake)


async def _run_local(runtime: Runtime, total: int | None, show_progress: bool, console: Console,
                     intake: StreamingIntake | None) -> RunStats:
    """Set the models up, run until every pending file is finished (or a drain ends), tear down.

    With ``intake``, interrupted rows are recovered before anything is claimed, and the scan stops as soon as the
    pipeline ends for any reason (an error, too: the scan would otherwise wait for a backlog that never falls).
    """
    pipeline = runtime.local
    if intake is not None:
        intake.prepare()
        total = runtime.ledger.backlog()[0]  # what earlier runs left; the scan adds to it as it records files
    progress = BinningProgress(total, show_progress, console)
    with progress.shown("loading models"), lines_above(console if show_progress else None):
        await pipeline.setup()
        progress.phase("binning" if intake is None else "binning (scanning the input)")
        previous = pipeline.on_finished

        def advance(row: Row, outcome: Outcome) -> None:
            if outcome.status in FINISHED:
                progress.advance(pipeline.stats.rate())
            if previous is not None:
                previous(row, outcome)

        def stop_scan() -> None:
            if intake is not None:
                intake.stop()

        def begin_drain(why: str) -> None:
            stop_scan()
            pipeline.request_stop()
            say(f"stopping: finishing the {pipeline.in_flight} file(s) in flight (up to "
                f"{runtime.config.drain_timeout_s:.0f} s); press Ctrl-C again to stop now")

        def say(message: str) -> None:
            if show_progress:
                progress.phase(f"draining ({pipeline.in_flight} in flight; Ctrl-C again: stop now)")
                console.print(message, highlight=False, markup=False, soft_wrap=True)
            else:  # no bar: a log event (warning, so `once`'s default level shows it; JSON under log.format json)
                log.warning(message, in_flight=pipeline.in_flight)

        def recorded(new: int) -> None:  # on the scan's thread
            anyio.from_thread.run_sync(lambda: (progress.add_total(new), pipeline.wake()))

        async def scan() -> None:
            assert intake is not None
            try:
                await anyio.to_thread.run_sync(intake.run, recorded)
            finally:
                pipeline.intake_open = False
                pipeline.wake()
                if not pipeline.stopping:
                    progress.phase("binning")

        pipeline.on_finished = advance
        pipeline.intake_open = intake is not None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_stop_on_signals, group.cancel_scope, runtime.config.drain_timeout_s, begin_drain,
                                 lambda left: say(drain_message(pipeline.in_flight, left)))
                if intake is not None:
                    group.start_soon(scan)
                try:
                    await pipeline.run(until_idle=True)
                finally:
                    stop_scan()  # before the task group waits for the scan's thread
                group.cancel_scope.cancel()
        except Exception as error:  # noqa: BLE001 - an ExceptionGroup from the task groups: one line for the user
            raise RunStopped(_stopped_message(runtime, error)) from error
        finally:
            stop_scan()
            with anyio.CancelScope(shield=True):
                await pipeline.teardown()
    if intake is not None:
        intake.raise_error()
    return pipeline.stats


def _stopped_message(runtime: Runtime, error: BaseException) -> str:
    """What stopped the run, in one line: the first error inside the task groups, where it happened, what to do."""
    error = first_error(error)
    log.debug("the run stopped on an error", exc_info=error)
    where = f" (the ledger {runtime.config.ledger_path})" if isinstance(error, sqlite3.Error) else ""
    return (f"the run stopped on an error{where}: {type(error).__name__}: {error}; files not finished stay in the "
            "ledger: run the same command again to resume them (log.level: debug shows the traceback)")


async def _stop_on_signals(scope: anyio.CancelScope, timeout_s: float, begin: Any, report: Any) -> None:
    await stop_on_signals(scope, timeout_s, begin, report=report)
