"""The models `binner rebin --infer` needs, run as the engine runs them: the configured stages on every configured
device (one replica each, in threads or child processes as configured), their batch caps (configured, or probed),
micro-batching and failure containment, through the engine's own ``StageRunner``s and bounded queues.

The runners live on one event loop for the whole rebin (an anyio blocking portal, so that ``rebin`` calls the models
like a function, a chunk of rows at a time). Each item visits only the stages it still needs under the current rules
(``engine.next_stage``, as in the engine), and each stage computes only the signals the item lacks: OCR is not run
again for a missing caption, and the vision stage does not detect again for an item that carries its detections, so
the stored detections are the ones its caption check reads.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import ExitStack
from typing import Any

import anyio
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from app.build import build_hosted_stages
from app.config import BinnerConfig
from app.engine import StageRunner, next_stage, set_up_runners
from app.metrics import Metrics
from app.store import Row, merged_signals
from queues import BoundedQueue, QueueClosed
from stages.base import ImageItem

log = structlog.get_logger("binner.rebin")

ROWS_PER_CALL = 256  # at least: enough rows per call to keep every replica's batches full between calls
STORED_ONLY = ("not_computed", "vision_skipped")  # keys of a stored record that are not signals


class MissingSignals:
    """Callable over rows: (row, complete signals) for each row whose file could be read and run."""

    def __init__(self, config: BinnerConfig) -> None:
        self.rules = config.rules.model_copy(update={"signals": "needed"})
        self.stages, self.hosting = build_hosted_stages(config)
        self.capacities = config.queues.model_dump()
        self.metrics = Metrics()
        self.drain_timeout_s = config.drain_timeout_s
        self.queues: list[BoundedQueue[ImageItem]] = []
        self.runners: list[StageRunner] = []
        self._running: list[Future[None]] = []
        self._open = 0
        self._all_back: anyio.Event | None = None
        self._broken: BaseException | None = None
        self._exit = ExitStack()
        self._portal: BlockingPortal = self._exit.enter_context(start_blocking_portal())
        try:
            self._portal.call(self._start)
        except BaseException:
            self.close()
            raise
        self._running = [self._portal.start_task_soon(self._run_then_close, runner, index)
                         for index, runner in enumerate(self.runners)]
        biggest = max((sum(replica.batch_cap for replica in runner.replicas) for runner in self.runners), default=1)
        self.rows_per_call = max(ROWS_PER_CALL, 4 * biggest)

    # --- on the portal's event loop --------------------------------------------------------------------------
    async def _start(self) -> None:
        self.queues = [BoundedQueue(stage.name, int(self.capacities.get(stage.name, 32))) for stage in self.stages]
        self.runners = [StageRunner(stage, self.queues[index], self._router(index), self.metrics,
                                    hosting=self.hosting.get(stage.name)) for index, stage in enumerate(self.stages)]
        await set_up_runners(self.runners)

    async def _run_then_close(self, runner: StageRunner, index: int) -> None:
        try:
            await runner.run()
        except BaseException as error:  # a runner that stops early would leave a call waiting for its items
            self._broken = self._broken or error  # the first: the others stopped because it did
            if self._all_back is not None:
                self._all_back.set()
            await self.queues[index].close()  # and whoever still hands it items is refused, not left blocked
            raise
        finally:
            if index + 1 < len(self.queues):
                await self.queues[index + 1].close()

    def _router(self, index: int) -> Callable[[ImageItem], Awaitable[None]]:
        """After stage ``index`` (-1: before the first): on to the next stage the item needs, or back to the caller."""

        async def route(item: ImageItem) -> None:
            following = next_stage(self.stages, index, item, self.rules)
            if following is None:
                self._open -= 1
                if self._open == 0 and self._all_back is not None:
                    self._all_back.set()
                return
            await self.queues[following].put(item)

        return route

    async def _run(self, items: list[ImageItem]) -> None:
        self._open = len(items)
        self._all_back = anyio.Event()
        entry = self._router(-1)
        try:
            for item in items:
                if self._broken is not None:
                    break
                await entry(item)
            if self._broken is None:
                await self._all_back.wait()
        except QueueClosed:  # the stage it went to had stopped
            pass
        if self._broken is not None:
            raise RuntimeError(f"a model stage stopped: {self._broken}") from self._broken

    async def _stop(self) -> None:
        if self.queues:
            await self.queues[0].close()

    async def _teardown(self) -> None:
        for runner in self.runners:
            await runner.teardown()

    # --- called by rebin ----------------------------------------------------------------------------------
    def __call__(self, rows: list[Row]) -> list[tuple[Row, dict[str, Any]]]:
        items: list[tuple[Row, ImageItem]] = []
        for row in rows:
            known = {key: value for key, value in (row.signals or {}).items() if key not in STORED_ONLY}
            items.append((row, ImageItem(key=row.id, source=row.output_path or row.path, signals=known,
                                         rules=self.rules)))
        if items:
            self._portal.call(self._run, [item for _row, item in items])
        done: list[tuple[Row, dict[str, Any]]] = []
        for row, item in items:
            if item.failure is not None:
                log.warning("rebin could not run the models on a placed file; it stays where it is",
                            file=row.output_path, reason=item.failure.reason, detail=item.failure.message)
                continue
            stored = row.signals or {}
            computed = {key: value for key, value in item.signals.items() if key not in stored}
            done.append((row, merged_signals(stored, computed, item.not_computed.items())))
        return done

    def close(self) -> None:
        """Drain the runners, free the models and end the event loop. A runner that does not end within the drain
        time is cancelled; an interruption here (a second Ctrl-C) cancels whatever still runs on the loop."""
        try:
            self._portal.call(self._stop)
            for running in self._running:
                try:
                    running.exception(timeout=self.drain_timeout_s)  # its error, if any, reached the call that saw it
                except concurrent.futures.TimeoutError:
                    log.warning("a model stage did not finish its work in time; stopping it", timeout_s=self.drain_timeout_s)
                    running.cancel()
            self._portal.call(self._teardown)
        except BaseException as error:
            self._exit.__exit__(type(error), error, error.__traceback__)  # stops the loop, cancelling what runs on it
            raise
        self._exit.close()
