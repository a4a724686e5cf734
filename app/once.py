"""`binner once`: bin a directory to the end on either engine, and the local run-to-idle that `eval` and `bench`
share with it (progress bar, Ctrl-C drain). The CLI parses and prints; this module does the work."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import structlog
from rich.console import Console

from app.build import Runtime, build_runtime, build_stages, intake_all, preflight_weights
from app.config import BinnerConfig
from app.engine import FINISHED, RunStats
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


def bin_once(config: BinnerConfig, engine: Literal["local", "ray"], ray_address: str | None, show_progress: bool,
             console: Console | None = None) -> OnceSummary:
    """Take every file under the input, bin it on ``engine``, prune emptied folders (move mode); returns the summary.

    Raises ``ConfigError``, ``StageSetupError`` or ``RayEngineError`` with a message for the user.
    """
    preflight_weights(config)
    runtime = build_runtime(config, command="once", engine=engine)
    try:
        intake = intake_all(runtime)
        backlog, _ = runtime.ledger.backlog()
        started = time.monotonic()
        if engine == "ray":
            from app.ray_data import run_on_ray

            stats = run_on_ray(runtime, ray_address, backlog, show_progress, build_stages)
        else:
            stats = run_to_idle(runtime, backlog, show_progress, console)
        seconds = time.monotonic() - started
        remaining, _ = runtime.ledger.backlog()
    finally:
        runtime.close()
    if config.placement == "move" and not remaining:
        prune_empty_dirs(config.input)  # a backfill leaves no empty folders behind in its input
    return OnceSummary(stats, seconds, remaining, intake)


def run_to_idle(runtime: Runtime, total: int | None, show_progress: bool, console: Console | None = None) -> RunStats:
    """The local engine over every pending row of ``runtime``, on the event loop; returns the run's counts."""
    return run_async(_run_local, runtime, total, show_progress, console or Console(stderr=True))


async def _run_local(runtime: Runtime, total: int | None, show_progress: bool, console: Console) -> RunStats:
    """Set the models up, run until every pending file is finished (or a drain ends), tear down."""
    pipeline = runtime.local
    progress = BinningProgress(total, show_progress, console)
    with progress.shown("loading models"), lines_above(console if show_progress else None):
        await pipeline.setup()
        progress.phase("binning")
        previous = pipeline.on_finished

        def advance(row: Row, outcome: Outcome) -> None:
            if outcome.status in FINISHED:
                progress.advance(pipeline.stats.rate())
            if previous is not None:
                previous(row, outcome)

        def begin_drain(why: str) -> None:
            pipeline.request_stop()
            say(f"stopping: finishing the {pipeline.in_flight} file(s) in flight (up to "
                f"{runtime.config.drain_timeout_s:.0f} s); press Ctrl-C again to stop now")

        def say(message: str) -> None:
            if show_progress:
                progress.phase(f"draining ({pipeline.in_flight} in flight; Ctrl-C again: stop now)")
                console.print(message, highlight=False, markup=False, soft_wrap=True)
            else:  # no bar: a log event (warning, so `once`'s default level shows it; JSON under log.format json)
                log.warning(message, in_flight=pipeline.in_flight)

        pipeline.on_finished = advance
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_stop_on_signals, group.cancel_scope, runtime.config.drain_timeout_s, begin_drain,
                                 lambda left: say(drain_message(pipeline.in_flight, left)))
                await pipeline.run(until_idle=True)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await pipeline.teardown()
    return pipeline.stats


async def _stop_on_signals(scope: anyio.CancelScope, timeout_s: float, begin: Any, report: Any) -> None:
    await stop_on_signals(scope, timeout_s, begin, report=report)
