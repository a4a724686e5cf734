"""Running on the event loop, and stopping on signals: the one drain helper of the daemon, `once` and `eval`.

A first SIGINT/SIGTERM drains (stop intake, finish what is in flight) within ``drain_timeout_s``; a second one,
or the timeout, stops at once. Interrupted files resume at the next start, from the ledger.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

DRAIN_REPORT_EVERY_S = 2.0


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


async def stop_on_signals(scope: anyio.CancelScope, drain_timeout_s: float, begin_drain: Callable[[str], None], *,
                          report: Callable[[float], None] | None = None, stop_now: Callable[[], None] | None = None,
                          task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve the stop signals for ``scope`` until it ends (SIGHUP is the daemon's own: ``Daemon.hold_signals``).

    The first SIGINT/SIGTERM calls ``begin_drain(signal name)`` and gives ``scope`` at most ``drain_timeout_s``
    more; while it drains, ``report(seconds left)`` runs every couple of seconds, so a long drain never looks like
    a hang. A second stop signal calls ``stop_now()`` and cancels ``scope``. Started with ``TaskGroup.start``, it
    returns to the starter once the handlers are installed: from then on no signal has its default action.
    """
    wanted = [signal.SIGTERM, signal.SIGINT]
    draining = False
    async with anyio.create_task_group() as reporters:
        with anyio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                if draining:
                    if stop_now is not None:
                        stop_now()
                    scope.cancel()
                    reporters.cancel_scope.cancel()
                    return
                draining = True
                begin_drain(signal.Signals(signum).name)
                until = anyio.current_time() + drain_timeout_s
                scope.deadline = min(scope.deadline, until)
                if report is not None:
                    reporters.start_soon(_report_until, until, report)


async def _report_until(until: float, report: Callable[[float], None]) -> None:
    while anyio.current_time() < until:
        await anyio.sleep(DRAIN_REPORT_EVERY_S)
        report(until - anyio.current_time())
