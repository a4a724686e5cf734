"""The engine: feeder -> [load] -> loader -> [ocr] -> OCR -> [vision] -> vision -> [sink] -> rules + writer.

Every arrow is a bounded queue; a full queue blocks its producer, and that backpressure reaches the
feeder, which then stops claiming ledger rows. Each stage runs replicas (one per entry of its device list); a
replica's worker tasks gather micro-batches and hand them to its host, which runs the model calls on the replica's
own model thread (``app.hosts``: in this process, or in a child process), several batches at once when the stage
overlaps host and device work.

This module is the flow (``Pipeline``: feeder, router, sink); a stage's replicas are ``runner.py``, their failure
handling ``containment.py``, what happens to a finished item (rules, placement, outcome) ``finishing.py``.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from app.engine.accounting import FINISHED, RunStats, observe, say
from app.engine.admission import admit
from app.engine.finishing import Finisher, PlacementBlocked, PlacementPause, remove_inputs
from app.engine.routing import next_stage
from app.engine.runner import Hosting, StageRunner, set_up_runners
from app.metrics import Metrics
from app.store import Ledger, Outcome, Placer, Row, StateRoom, is_disk_full
from queues import BoundedQueue, DedicatedThread, EndOfStream, next_batch
from stages.base import ImageItem, Stage
from stages.rules import RuleThresholds

log = structlog.get_logger("binner.engine")

# The sink takes what is already queued: under a backlog its batches still fill (items pile up while the last
# batch is placed); waiting 50 ms for company only added latency to every file of a stream.
SINK_MAX_WAIT_S = 0.005
STATE_CHECK_S = 1.0  # while the state disk is full: how often the room on it is measured again


class MetricsObserver:
    """Feeds queue events into the Prometheus instruments."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # Labelled children looked up once per queue: ``labels()`` costs a lock and a dict lookup, and these
        # two run for every item at every queue (the event loop's largest share at a few thousand files/s).
        self._depth: dict[str, Any] = {}
        self._wait: dict[str, Any] = {}

    def on_depth(self, queue: str, depth: int) -> None:
        gauge = self._depth.get(queue)
        if gauge is None:
            gauge = self._depth[queue] = self.metrics.queue_depth.labels(queue=queue)
        gauge.set(depth)

    def on_wait(self, queue: str, seconds: float) -> None:
        histogram = self._wait.get(queue)
        if histogram is None:
            histogram = self._wait[queue] = self.metrics.queue_wait.labels(queue=queue)
        histogram.observe(seconds)

    def on_blocked(self, queue: str, seconds: float) -> None:
        self.metrics.backpressure.labels(queue=queue).inc(seconds)


class Pipeline:
    """The whole flow from ledger rows to placed files, with clean drain on stop."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        metrics: Metrics,
        stages: list[Stage],
        thresholds: RuleThresholds,
        placer: Placer | None,
        queue_capacities: dict[str, int],
        max_attempts: int,
        feeder_page_size: int = 64,
        placement_mode: str = "move",
        on_finished: Callable[[Row, Outcome], None] | None = None,
        hosting: dict[str, Hosting] | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.finisher = Finisher(placer, thresholds, max_attempts, metrics)
        self.page_size = feeder_page_size
        self.move_mode = placement_mode == "move"
        self.on_finished = on_finished
        self.stats = RunStats()
        observer = MetricsObserver(metrics)
        self.queues: dict[str, BoundedQueue[ImageItem]] = {}
        for stage in stages:
            capacity = queue_capacities.get(stage.name, 32)
            self.queues[stage.name] = BoundedQueue(stage.name, capacity, observer)
        self.sink_queue: BoundedQueue[ImageItem] = BoundedQueue("sink", queue_capacities.get("sink", 64), observer)
        for queue in [*self.queues.values(), self.sink_queue]:
            metrics.queue_capacity.labels(queue=queue.name).set(queue.capacity)
        self.stages = list(stages)
        self.runners = [
            StageRunner(stage, self.queues[stage.name], self._router(index), metrics, self._mark_call,
                        self._is_suspect, (hosting or {}).get(stage.name))
            for index, stage in enumerate(stages)
        ]
        self.ledger_thread = DedicatedThread("ledger")
        self.sink_thread = DedicatedThread("sink")
        self._in_flight: dict[int, Row] = {}
        self._stopping = False
        self._wake = anyio.Event()
        self.last_progress = time.monotonic()  # monotonic time of the last finished file (stall watchdog)
        self.placement_paused = False
        self.state_paused = False
        self._mark_failed_logged = False
        self.ready = False
        # A scan is still recording files (`once` starts on the first chunk): "nothing pending" is not idle yet.
        self.intake_open = False

    # The finisher owns the rules, the writer and the attempt limit; the pipeline reads and swaps them through it.
    @property
    def placer(self) -> Placer | None:
        return self.finisher.placer

    @placer.setter
    def placer(self, value: Placer | None) -> None:
        self.finisher.placer = value

    @property
    def max_attempts(self) -> int:
        return self.finisher.max_attempts

    @max_attempts.setter
    def max_attempts(self, value: int) -> None:
        self.finisher.max_attempts = value

    @property
    def thresholds(self) -> RuleThresholds:
        return self.finisher.thresholds

    @thresholds.setter
    def thresholds(self, value: RuleThresholds) -> None:
        """SIGHUP swaps the rules: the files admitted from now on are routed, skipped and decided with them. An item
        already admitted keeps the rules it was admitted under (``ImageItem.rules``) to the end, so that its bin is
        never decided on signals that were skipped under other thresholds (placed files are ``rebin``'s job)."""
        self.finisher.thresholds = value

    # --- lifecycle ------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Load and warm every model copy; a failure names the stage and device and what went wrong."""
        self.metrics.initialise_labels((runner.stage.name, device) for runner in self.runners
                                       for device in runner.stage.devices)
        self.metrics.busy_seconds.add_running_calls(self._running_calls)
        await set_up_runners(self.runners)
        self.ready = True

    def _running_calls(self) -> list[tuple[str, str, float]]:
        """Model calls in flight, for the busy-time counter (it counts a call while it runs)."""
        return [(runner.stage.name, replica.device, since) for runner in self.runners for replica in runner.replicas
                if (since := replica.busy_since) is not None]

    async def teardown(self, timeout_s: float = 15.0) -> None:
        """Free the models; bounded, because a model call stuck on its thread cannot be interrupted."""
        self.metrics.busy_seconds.remove_running_calls(self._running_calls)
        with anyio.move_on_after(timeout_s) as scope:
            for runner in self.runners:
                await runner.teardown()
        if scope.cancelled_caught:
            log.warning("teardown timed out: a model thread is still busy", timeout_s=timeout_s)
        self.ledger_thread.shutdown(wait=False)
        self.sink_thread.shutdown(wait=False)

    def request_stop(self) -> None:
        """Stop intake; what is in flight drains through the stages and the sink."""
        self._stopping = True
        self.wake()

    @property
    def stopping(self) -> bool:
        """A stop was requested: intake has ended and what is in flight drains."""
        return self._stopping

    def wake(self) -> None:
        """New pending rows may exist (intake, requeue): let the feeder look now."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stalled_for(self) -> float:
        now = time.monotonic()
        return max((runner.stalled_for(now) for runner in self.runners), default=0.0)

    # --- state disk -------------------------------------------------------------------------------
    def note_state_full(self, error: BaseException) -> None:
        """The ledger could not be written (state disk full): pause intake and placement, say so once.

        Safe from any thread (a stage thread's ``mark_in_call`` may be the first to find the disk full)."""
        if not self.state_paused:
            log.error("state disk full: the ledger cannot be written; intake and placement pause until there is "
                      "room again (free space on the disk holding state_dir)", ledger=str(self.ledger.path),
                      error=str(error), resumes_with_free_bytes=self.ledger.headroom_bytes)
        self.state_paused = True
        self.metrics.state_paused.set(1)

    def note_state_ok(self, room: StateRoom) -> None:
        if self.state_paused:
            log.info("state disk has room again: resuming intake and placement", ledger=str(self.ledger.path),
                     free_bytes=room.free_bytes, needed_bytes=room.needed_bytes, wal_bytes=room.wal_bytes)
            self.state_paused = False
            self.metrics.state_paused.set(0)
            self.wake()

    async def wait_for_state_room(self, give_up_on_stop: bool = True) -> None:
        """While the state disk is full: fold the WAL away and resume only once there is headroom, so that the
        first writes after space is freed do not fill the disk again (checked every STATE_CHECK_S)."""
        while self.state_paused and not (give_up_on_stop and self._stopping):
            room = await self.ledger_thread.run(self.ledger.reclaim_space)
            if room.enough:
                self.note_state_ok(room)
                return
            await anyio.sleep(STATE_CHECK_S)

    def _mark_call(self, keys: list[int], stage: str | None) -> None:
        """Runs on a stage thread around each model call; a failure to mark never fails the items."""
        try:
            self.ledger.mark_in_call(keys, stage)
        except sqlite3.Error as error:
            if is_disk_full(error):
                self.note_state_full(error)
            if not self._mark_failed_logged:
                log.warning("could not mark rows as inside a model call; a crash now would not be charged",
                            error=str(error))
                self._mark_failed_logged = True

    def _is_suspect(self, key: int) -> bool:
        row = self._in_flight.get(key)
        return row is not None and row.crashes > 0

    async def run(self, until_idle: bool) -> RunStats:
        """Run until stopped (daemon) or, with ``until_idle``, until no row is pending or in flight."""
        self.stats = RunStats()
        async with anyio.create_task_group() as group:
            group.start_soon(self._feed, until_idle)
            for index, runner in enumerate(self.runners):
                group.start_soon(self._run_then_close, runner, index)
            group.start_soon(self._sink)
        return self.stats

    async def _run_then_close(self, runner: StageRunner, index: int) -> None:
        try:
            await runner.run()
        finally:
            downstream = self.queues[self.stages[index + 1].name] if index + 1 < len(self.stages) else self.sink_queue
            await downstream.close()

    # --- routing --------------------------------------------------------------------------------
    def _router(self, index: int) -> Callable[[ImageItem], Awaitable[None]]:
        """After stage ``index``: on to the next stage the item still needs (``routing``), or to the sink."""

        async def route(item: ImageItem) -> None:
            following = next_stage(self.stages, index, item, item.rules if item.rules is not None else self.thresholds)
            queue = self.sink_queue if following is None else self.queues[self.stages[following].name]
            await queue.put(item)

        return route

    # --- feeder ---------------------------------------------------------------------------------
    async def _feed(self, until_idle: bool) -> None:
        first = self.queues[self.stages[0].name] if self.stages else self.sink_queue
        after_id = 0
        try:
            while not self._stopping:
                self._wake = anyio.Event()
                if self.state_paused:  # claims are writes: wait for room rather than spend it
                    await self.wait_for_state_room()
                    continue
                limit = max(1, min(self.page_size, first.free))
                try:
                    rows = await self.ledger_thread.run(self.ledger.claim_pending, limit, after_id)
                except sqlite3.OperationalError as error:
                    if not is_disk_full(error):
                        raise
                    self.note_state_full(error)
                    continue
                if rows:
                    after_id = rows[-1].id
                    for row in rows:
                        await self._admit(row, first)
                    continue
                if after_id:
                    after_id = 0  # requeued rows may sit behind the cursor
                    continue
                if until_idle and not self._in_flight and not self.intake_open:
                    if not await self.ledger_thread.run(self.ledger.has_pending):
                        return
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
        finally:
            await first.close()

    async def _admit(self, row: Row, first: BoundedQueue[ImageItem]) -> None:
        self._in_flight[row.id] = row
        item = admit(row, self.max_attempts)
        item.rules = self.thresholds  # the router, the stages and the sink all decide it by the rules of its admission
        await (self.sink_queue if item.failure is not None else first).put(item)

    # --- sink -----------------------------------------------------------------------------------
    async def _sink(self) -> None:
        pause = PlacementPause()
        while True:
            try:
                batch = await next_batch(self.sink_queue, 64, SINK_MAX_WAIT_S)
            except EndOfStream:
                return
            while batch:
                try:
                    finished, blocked = await self.sink_thread.run(self._finish_batch, batch)
                except sqlite3.OperationalError as error:
                    if not is_disk_full(error):
                        raise
                    # Nothing was recorded and no input removed; placing again finds the same outputs.
                    self.note_state_full(error)
                    await self.wait_for_state_room(give_up_on_stop=False)
                    continue
                for row, outcome in finished:
                    self._account(row, outcome)
                if blocked is None:
                    batch = []
                    if pause.placed():
                        self.placement_paused = False
                        self.metrics.placement_paused.set(0)
                    continue
                batch = blocked.remaining
                self.placement_paused = True
                self.metrics.placement_paused.set(1)
                code = errno.errorcode.get(blocked.error.errno or 0, "EIO")
                self.metrics.placement_errors.labels(error=code).inc()
                await anyio.sleep(pause.blocked(str(blocked.error), errno=code, waiting=len(batch)))

    def _finish_batch(self, items: list[ImageItem]) -> tuple[list[tuple[Row, Outcome]], PlacementBlocked | None]:
        """Place each item, record the batch durably (one fsynced commit), and only then remove inputs (move mode).

        Runs on the sink thread. Stops at the first refusal of the whole output and returns what is left; a
        refusal of one path fails that item only.
        """
        pairs = [(self._in_flight[item.key], item) for item in items]
        with self.placer.batch() if self.placer is not None else contextlib.nullcontext():
            finished, refusal, stopped = self.finisher.place_batch(pairs)
        blocked = PlacementBlocked(refusal, items[stopped:]) if refusal is not None else None
        self.ledger.record([outcome for _, outcome in finished])
        remove_inputs(self.placer, self.move_mode, ((row.path, outcome) for row, outcome in finished))
        return finished, blocked

    def _account(self, row: Row, outcome: Outcome) -> None:
        """Metrics, counters and the in-flight set for one finished item (on the event loop)."""
        self._in_flight.pop(row.id, None)
        if not self._in_flight:
            self.wake()  # `once` waits for the pipeline to be idle: tell the feeder now, not at its 1 s poll
        self.last_progress = time.monotonic()
        self.stats.count(outcome)
        say(row.path, outcome)
        observe(self.metrics, row, outcome)
        if outcome.status not in FINISHED:
            self.wake()  # back to pending: the feeder takes it again
        if self.on_finished is not None:
            self.on_finished(row, outcome)
