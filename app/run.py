"""Running a built pipeline to the end, with Ctrl-C drain: shared by `once`, `eval`, `bench` and `run`.

The CLI only parses and prints; `app.runtime` builds from configuration; this module drives what was built.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import anyio
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from app.logs import lines_above

DRAIN_REPORT_EVERY_S = 2.0
log = structlog.get_logger("binner.run")


def run_async(fn: Any, *args: Any) -> Any:
    """Run on asyncio, on uvloop where it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, *args, backend="asyncio", backend_options=options)


def drain_message(in_flight: int, remaining_s: float) -> str:
    """What a drain says while it waits: how much is left, how long at most, and how to stop at once."""
    return (f"draining: {in_flight} file(s) in flight, up to {max(remaining_s, 0):.0f} s more; "
            "press Ctrl-C again to stop now (interrupted files resume at the next start)")


async def watch_interrupts(pipeline: Any, scope: anyio.CancelScope, drain_timeout_s: float,
                           report: Callable[[str], None] | None = None) -> None:
    """First Ctrl-C/SIGTERM drains (stop intake, finish in flight); a second, or the timeout, stops at once.

    While draining, ``report`` receives :func:`drain_message` every couple of seconds, so a long drain
    never looks like a hang.
    """
    report = report or (lambda message: None)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if getattr(pipeline, "_stopping", False):
                scope.cancel()
                return
            pipeline.request_stop()
            until = anyio.current_time() + drain_timeout_s
            report(f"stopping: finishing the {pipeline.in_flight} file(s) in flight (up to {drain_timeout_s:.0f} s); "
                   "press Ctrl-C again to stop now")

            async def progress() -> None:
                while anyio.current_time() < until:
                    await anyio.sleep(DRAIN_REPORT_EVERY_S)
                    report(drain_message(pipeline.in_flight, until - anyio.current_time()))
                scope.cancel()

            async with anyio.create_task_group() as group:
                group.start_soon(progress)
                async for _ in signals:
                    scope.cancel()
                    return


async def run_pipeline_once(runtime: Any, progress_total: int | None, show_progress: bool,
                            console: Console | None = None) -> Any:
    """Set the models up, run until every pending file is finished (or a drain ends), tear down; returns stats."""
    pipeline = runtime.pipeline
    console = console or Console(stderr=True)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not show_progress)
    with progress, lines_above(console if show_progress else None):
        task = progress.add_task("loading models", total=progress_total, rate=0.0)
        await pipeline.setup()
        progress.update(task, description="binning")
        previous = pipeline.on_finished

        def advance(row: Any, outcome: Any) -> None:
            if outcome.status in ("done", "quarantined", "vanished"):
                progress.update(task, advance=1, rate=pipeline.stats.rate())
            if previous is not None:
                previous(row, outcome)

        def report(message: str) -> None:
            if show_progress:
                progress.update(task, description=f"draining ({pipeline.in_flight} in flight; Ctrl-C again: stop now)")
                console.print(message, highlight=False, markup=False, soft_wrap=True)
            else:  # no bar: a log event (warning, so `once`'s default level shows it; JSON under log.format json)
                log.warning(message, in_flight=pipeline.in_flight)

        pipeline.on_finished = advance
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch_interrupts, pipeline, group.cancel_scope, runtime.config.drain_timeout_s,
                                 report)
                await pipeline.run(until_idle=True)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await pipeline.teardown()
    return pipeline.stats
