"""The engine: feeder -> [load] -> loader -> [ocr] -> OCR -> [vision] -> vision -> [sink] -> rules + writer.

Every arrow is a bounded queue; a full queue blocks its producer, and that backpressure reaches the
feeder, which then stops claiming ledger rows. Each stage runs one worker task and one dedicated thread
per device; the worker gathers micro-batches and runs the model call on its thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from app.ledger import Ledger, Outcome, Row, is_disk_full, shown
from app.metrics import Metrics
from app.placement import SourceError
from app.process_worker import ProcessStage
from queues import BoundedQueue, DedicatedThread, EndOfStream, next_batch
from stages.base import ImageItem, Stage, WorkerCrashed, is_out_of_memory
from stages.paths import lstat_no_symlinks
from stages.rules import RuleThresholds, decide, text_dominant

log = structlog.get_logger("binner.engine")

AUTO_BATCH_CEILING = 64
# The sink takes what is already queued: under a backlog its batches still fill (items pile up while the last
# batch is placed); waiting 50 ms for company only added latency to every file of a stream.
SINK_MAX_WAIT_S = 0.005
# Refusals that concern the whole output (every file would fail the same way): placement pauses and retries.
WHOLE_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# Refusals that usually concern one path (a protected directory, a link leading out of the output root): that
# file fails with a reason and the rest flows; they pause placement only when the output root itself refuses.
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
DISK_ERRNOS = WHOLE_OUTPUT_ERRNOS | PATH_ERRNOS  # kept for callers that test for any disk refusal
Identity = tuple[int, int, int, int]
CallMarker = Callable[[list[int], str | None], None]


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


@dataclass
class Replica:
    """One model copy on one device, owned by one thread."""

    stage: Stage
    device: str
    thread: DedicatedThread
    batch_cap: int
    busy_since: float | None = None


_SETUP_LOCK = threading.Lock()


def _set_up_serially(stage: Stage, device: str) -> None:
    """Load one in-thread replica at a time: transformers' lazy imports are not thread-safe (seed 004)."""
    with _SETUP_LOCK:
        stage.setup(device)


class StageRunner:
    """Runs one stage's replicas: micro-batches in, items routed out, failures contained to their item."""

    def __init__(
        self,
        stage: Stage,
        inbound: BoundedQueue[ImageItem],
        route: Callable[[ImageItem], Awaitable[None]],
        metrics: Metrics,
        mark_call: CallMarker | None = None,
        is_suspect: Callable[[int], bool] | None = None,
    ) -> None:
        self.stage = stage
        self.inbound = inbound
        self.route = route
        self.metrics = metrics
        self.mark_call = mark_call
        self.is_suspect = is_suspect
        self.replicas: list[Replica] = []

    async def setup(self) -> None:
        """Load one model copy per device, each on its own thread, all devices in parallel."""

        async def set_up(device: str, index: int) -> None:
            replica_stage = self.stage.replicate()
            thread = DedicatedThread(f"{self.stage.name}-{device}-{index}")
            if isinstance(replica_stage, ProcessStage):  # loads in its own process: no lock, and restarts counted
                replica_stage.on_restart = self._restart_counter(device)
                await thread.run(replica_stage.setup, device)
            else:
                await thread.run(_set_up_serially, replica_stage, device)
            policy = replica_stage.batch_policy
            cap = policy.max_batch_size
            if cap is None:
                cap = await thread.run(replica_stage.probe_batch_size, device, AUTO_BATCH_CEILING)
            await thread.run(replica_stage.warmup)
            replica = Replica(replica_stage, device, thread, max(1, int(cap)))
            self.metrics.batch_limit.labels(stage=self.stage.name, device=device).set(replica.batch_cap)
            self.replicas.append(replica)
            log.info("stage ready", stage=self.stage.name, replica=index, device=device, batch_cap=replica.batch_cap)

        async with anyio.create_task_group() as group:
            for index, device in enumerate(self.stage.devices):
                group.start_soon(set_up, device, index)

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            for replica in self.replicas:
                group.start_soon(self._work, replica)

    async def teardown(self) -> None:
        for replica in self.replicas:
            if replica.busy_since is not None:  # its thread is inside a model call that outlived the drain
                log.warning("model call still running at teardown; leaving its thread", stage=self.stage.name,
                            device=replica.device, running_s=round(time.monotonic() - replica.busy_since, 1))
                if isinstance(replica.stage, ProcessStage):  # a child can be ended, which frees its device
                    replica.stage.kill()
                replica.thread.shutdown(wait=False)
                continue
            try:
                await replica.thread.run(replica.stage.teardown)
            except Exception as error:  # teardown must not hide the real outcome
                log.warning("teardown failed", stage=self.stage.name, device=replica.device, error=str(error))
            replica.thread.shutdown(wait=False)

    def _restart_counter(self, device: str) -> Callable[[str], None]:
        counter = self.metrics.worker_restarts

        def count(cause: str) -> None:
            counter.labels(stage=self.stage.name, device=device, cause=cause).inc()

        return count

    def stalled_for(self, now: float) -> float:
        """Seconds the longest-running current model call has been going (0 when idle)."""
        return max((now - r.busy_since for r in self.replicas if r.busy_since is not None), default=0.0)

    async def _work(self, replica: Replica) -> None:
        wait_s = self.stage.batch_policy.max_wait_ms / 1000.0
        while True:
            try:
                batch = await next_batch(self.inbound, replica.batch_cap, wait_s)
            except EndOfStream:
                return
            done = await self._process(replica, batch)
            for item in done:
                outcome = "failed" if item.failure else "ok"
                self.metrics.items.labels(stage=self.stage.name, outcome=outcome).inc()
                await self.route(item)

    def _call_on_thread(self, replica: Replica, items: list[ImageItem]) -> list[ImageItem]:
        """The model call, marked busy by the thread itself: a cancelled waiter does not end the call.

        The ledger is told which rows are inside this call before it starts and after it returns, so that a
        process that dies here charges a crash to these rows only (and names this stage).
        """
        keys = [item.key for item in items]
        if self.mark_call is not None:
            self.mark_call(keys, self.stage.name)
        replica.busy_since = since = time.monotonic()
        try:
            return replica.stage.process_batch(items)
        finally:
            # Busy time is counted here, once per model call, and while the call runs by the metric's collector.
            busy = self.metrics.busy_seconds
            with busy.lock:
                busy.labels(stage=self.stage.name, device=replica.device).inc(time.monotonic() - since)
                replica.busy_since = None
            if self.mark_call is not None:
                self.mark_call(keys, None)

    async def _process(self, replica: Replica, items: list[ImageItem]) -> list[ImageItem]:
        """Run ``items``; OOM halves the cap and retries the same items, other errors bisect to the culprit."""
        name, device = self.stage.name, replica.device
        if len(items) > 1 and self.is_suspect is not None and any(self.is_suspect(item.key) for item in items):
            # Items that were in a call when the process died run alone: a culprit cannot take its batch with it.
            suspects = [item for item in items if self.is_suspect(item.key)]
            others = [item for item in items if not self.is_suspect(item.key)]
            out = await self._process(replica, others) if others else []
            for suspect in suspects:
                out.extend(await self._process(replica, [suspect]))
            by_key = {id(item): item for item in out}
            return [by_key[id(item)] for item in items]
        if len(items) > replica.batch_cap:
            chunk = replica.batch_cap  # fixed here: recursion below may shrink the cap again
            out: list[ImageItem] = []
            for start in range(0, len(items), chunk):
                out.extend(await self._process(replica, items[start : start + chunk]))
            return out
        started = time.monotonic()
        error: Exception | None = None
        try:
            result = await replica.thread.run(self._call_on_thread, replica, items)
            if len(result) != len(items):
                raise RuntimeError(f"stage {name} returned {len(result)} items for a batch of {len(items)}")
        except Exception as caught:
            error = caught
        finally:
            elapsed = time.monotonic() - started
            self.metrics.batch_seconds.labels(stage=name, device=device).observe(elapsed)
            self.metrics.batch_size.labels(stage=name).observe(len(items))
            for item in items:
                item.timings[f"{name}_batch"] = item.timings.get(f"{name}_batch", 0.0) + elapsed
        if error is None:
            return result
        # Retries run outside the ``except`` block: an error raised by a retry must not carry this one as its
        # ``__context__``, or ``is_out_of_memory`` (which follows the chain) would read a later failure as OOM.
        if isinstance(error, WorkerCrashed):  # the child died or hung in this call and has been replaced
            return await self._after_lost_worker(replica, items, error)
        if is_out_of_memory(error):
            self.metrics.oom.labels(stage=name, device=device).inc()
            if len(items) == 1:
                items[0].fail("out_of_memory", f"{name} on {device}: out of memory for a single image", name, True)
                return items
            replica.batch_cap = max(1, min(replica.batch_cap, len(items)) // 2)
            self.metrics.batch_limit.labels(stage=name, device=device).set(replica.batch_cap)
            log.warning("out of device memory: halving batch cap", stage=name, device=device,
                        batch=len(items), new_cap=replica.batch_cap)
            return await self._process(replica, items)
        if len(items) == 1:
            item = items[0]
            log.warning("stage failed on an item", stage=name, device=device, file=shown(item.source),
                        error=f"{type(error).__name__}: {error}")
            item.fail(f"{name}_error", f"{name} on {device}: {type(error).__name__}: {error}", name, True)
            return items
        middle = len(items) // 2
        return await self._process(replica, items[:middle]) + await self._process(replica, items[middle:])

    async def _after_lost_worker(self, replica: Replica, items: list[ImageItem], error: WorkerCrashed) -> list[ImageItem]:
        """A batch whose worker process died or hung runs again in halves on the new worker, so the rest of the
        batch is binned; an item that takes a worker down on its own is charged an attempt, and after
        ``max_attempts`` such calls the sink quarantines it as ``crashed_repeatedly``."""
        name, device = self.stage.name, replica.device
        if len(items) == 1:
            item = items[0]
            log.warning("worker process lost on a single item", stage=name, device=device, file=shown(item.source),
                        error=str(error))
            item.fail("crashed_repeatedly", f"{name} on {device}: {error} while processing this file alone", name, True)
            return items
        log.warning("worker process lost mid-batch: retrying the batch in halves", stage=name, device=device,
                    batch=len(items), error=str(error))
        middle = len(items) // 2
        return await self._process(replica, items[:middle]) + await self._process(replica, items[middle:])


def _same_identity(row: Row, current: Identity) -> bool:
    """Size and mtime, and inode and ctime where the row knows them (rows from older ledgers may not)."""
    stored = (row.size, row.mtime_ns, row.inode, row.ctime_ns)
    return all(known is None or known == now for known, now in zip(stored, current, strict=True))


class StageSetupError(Exception):
    """A stage could not load its models (missing weights, unknown device, bad configuration)."""


class PlacementBlocked(Exception):
    """The output disk refused a write (full, read-only, no permission): placement pauses and retries."""

    def __init__(self, error: OSError, remaining: list[ImageItem]) -> None:
        super().__init__(str(error))
        self.error = error
        self.remaining = remaining


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    finished: int = 0
    bins: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    vanished: int = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.finished / elapsed if elapsed > 0 else 0.0


class Pipeline:
    """The whole flow from ledger rows to placed files, with clean drain on stop."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        metrics: Metrics,
        stages: list[Stage],
        thresholds: RuleThresholds,
        placer: Any | None,
        queue_capacities: dict[str, int],
        max_attempts: int,
        feeder_page_size: int = 64,
        placement_mode: str = "move",
        on_finished: Callable[[Row, Outcome], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.thresholds = thresholds
        self.placer = placer
        self.max_attempts = max_attempts
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
        self.stage_order = [stage.name for stage in stages]
        self.runners = [
            StageRunner(stage, self.queues[stage.name], self._router(stage.name), metrics, self._mark_call,
                        self._is_suspect)
            for stage in stages
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

    # --- lifecycle ------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Load and warm every model copy; a failure names the stage and device and what went wrong."""
        self.metrics.initialise_labels((runner.stage.name, device) for runner in self.runners
                                       for device in runner.stage.devices)
        self.metrics.busy_seconds.add_running_calls(self._running_calls)
        for runner in self.runners:
            try:
                await runner.setup()
            except BaseExceptionGroup as group:
                first = group.exceptions[0]
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise StageSetupError(f"stage {runner.stage.name} could not start: {first}") from first
            except Exception as error:
                raise StageSetupError(f"stage {runner.stage.name} could not start: {error}") from error
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
        """The ledger could not be written (state disk full): pause intake and placement, say so once."""
        if not self.state_paused:
            log.error("state disk full: the ledger cannot be written; intake and placement pause until there is "
                      "space again (free space on the disk holding state_dir)", ledger=str(self.ledger.path),
                      error=str(error))
        self.state_paused = True
        self.metrics.state_paused.set(1)

    def note_state_ok(self) -> None:
        if self.state_paused:
            log.info("state disk writable again: resuming intake and placement", ledger=str(self.ledger.path))
            self.state_paused = False
            self.metrics.state_paused.set(0)

    def _mark_call(self, keys: list[int], stage: str | None) -> None:
        """Runs on a stage thread around each model call; a failure to mark never fails the items."""
        try:
            self.ledger.mark_in_call(keys, stage)
        except sqlite3.Error as error:
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
            names = self.stage_order
            downstream = self.queues[names[index + 1]] if index + 1 < len(names) else self.sink_queue
            await downstream.close()

    # --- routing --------------------------------------------------------------------------------
    def _next_queue(self, after: str, item: ImageItem) -> BoundedQueue[ImageItem]:
        if item.failure is not None:
            return self.sink_queue
        order = self.stage_order
        for name in order[order.index(after) + 1 :]:
            if name == "vision" and item.skip_vision:
                continue
            return self.queues[name]
        return self.sink_queue

    def _router(self, stage_name: str) -> Callable[[ImageItem], Awaitable[None]]:
        async def route(item: ImageItem) -> None:
            if stage_name == "ocr" and item.failure is None and self.thresholds.short_circuit_text:
                if text_dominant(item.signals, self.thresholds) is not None:
                    item.skip_vision = True
            await self._next_queue(stage_name, item).put(item)

        return route

    # --- feeder ---------------------------------------------------------------------------------
    async def _feed(self, until_idle: bool) -> None:
        first = self.queues[self.stage_order[0]] if self.stage_order else self.sink_queue
        after_id = 0
        try:
            while not self._stopping:
                self._wake = anyio.Event()
                limit = max(1, min(self.page_size, first.free))
                try:
                    rows = await self.ledger_thread.run(self.ledger.claim_pending, limit, after_id)
                except sqlite3.OperationalError as error:
                    if not is_disk_full(error):
                        raise
                    self.note_state_full(error)
                    with anyio.move_on_after(2.0):
                        await self._wake.wait()
                    continue
                if rows:
                    after_id = rows[-1].id
                    for row in rows:
                        await self._admit(row, first)
                    continue
                if after_id:
                    after_id = 0  # requeued rows may sit behind the cursor
                    continue
                if until_idle and not self._in_flight:
                    if not await self.ledger_thread.run(self.ledger.has_pending):
                        return
                with anyio.move_on_after(1.0):
                    await self._wake.wait()
        finally:
            await first.close()

    async def _admit(self, row: Row, first: BoundedQueue[ImageItem]) -> None:
        self._in_flight[row.id] = row
        item = ImageItem(key=row.id, source=row.path, seen_at=row.seen_at)
        if row.crashes >= self.max_attempts:
            item.fail("crashed_repeatedly",
                      f"the process died {row.crashes} times in a row while this file was inside the "
                      f"{row.crash_stage} model call")
            await self.sink_queue.put(item)
            return
        if row.attempts > self.max_attempts and row.last_error:
            item.fail("retries_exhausted", f"gave up after {row.attempts - 1} attempts: {row.last_error}")
            await self.sink_queue.put(item)
            return
        await first.put(item)

    # --- sink -----------------------------------------------------------------------------------
    async def _sink(self) -> None:
        backoff = 1.0
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
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                self.note_state_ok()
                for row, outcome in finished:
                    self._account(row, outcome)
                if blocked is None:
                    batch = []
                    if self.placement_paused:
                        log.info("placement resumed")
                        self.placement_paused = False
                        self.metrics.placement_paused.set(0)
                    backoff = 1.0
                    continue
                batch = blocked.remaining
                self.placement_paused = True
                self.metrics.placement_paused.set(1)
                code = errno.errorcode.get(blocked.error.errno or 0, "EIO")
                self.metrics.placement_errors.labels(error=code).inc()
                log.error("placement paused: the output directory refused a write; will retry",
                          error=str(blocked.error), errno=code, retry_in_s=backoff, waiting=len(batch))
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _finish_batch(self, items: list[ImageItem]) -> tuple[list[tuple[Row, Outcome]], PlacementBlocked | None]:
        """Place each item, record the batch durably (one fsynced commit), and only then remove inputs (move mode).

        Runs on the sink thread. Stops at the first refusal of the whole output and returns what is left; a
        refusal of one path fails that item only.
        """
        finished: list[tuple[Row, Outcome]] = []
        removable: list[tuple[str, str, str | None]] = []
        blocked: PlacementBlocked | None = None
        with self.placer.batch() if self.placer is not None else contextlib.nullcontext():
            for index, item in enumerate(items):
                row = self._in_flight[item.key]
                try:
                    outcome = self._finish_one(row, item)
                except SourceError as error:  # the input, not the output disk: retry this file alone
                    outcome = self._item_failed(row, item, "unreadable", f"reading the input failed: {error}")
                except OSError as error:
                    if self._refuses_whole_output(error):
                        blocked = PlacementBlocked(error, items[index:])
                        break
                    code = errno.errorcode.get(error.errno or 0, "error")
                    self.metrics.placement_errors.labels(error=code).inc()
                    log.warning("placement refused for one file; the others go on", file=row.shown_path,
                                error=shown(str(error)))
                    outcome = self._item_failed(row, item, "output_refused", f"placement failed: {error}")
                finished.append((row, outcome))
                if outcome.status in ("done", "quarantined") and self.move_mode and outcome.output_path:
                    removable.append((row.path, outcome.output_path, outcome.sha256))
        self.ledger.record([outcome for _, outcome in finished])
        for path, placed, digest in removable:
            try:
                self.placer.remove_source(Path(path), Path(placed), digest)
            except FileNotFoundError:
                pass
        return finished, blocked

    def _refuses_whole_output(self, error: OSError) -> bool:
        """ENOSPC, EDQUOT, EROFS, EIO; EACCES/EPERM only when the output root itself cannot be written."""
        if error.errno in WHOLE_OUTPUT_ERRNOS:
            return True
        if error.errno in PATH_ERRNOS and self.placer is not None:
            root = self.placer.output_root
            return not os.access(root, os.W_OK | os.X_OK)
        return False

    def _item_failed(self, row: Row, item: ImageItem, reason: str, message: str) -> Outcome:
        """One file could not be placed: retried while it has attempts, then quarantined under ``reason``.

        When even the quarantine cannot take it (the same refusal, or an input that cannot be read), the row
        is finished as quarantined without an output and the input stays where it is, so it cannot loop.
        """
        final = item.failure is not None and (not item.failure.retryable or row.attempts >= self.max_attempts)
        if not final and row.attempts < self.max_attempts:
            return Outcome(row.id, "pending", last_error=message)
        if item.failure is None:
            try:
                return self._quarantine(row, item, reason, message, dict(item.timings))
            except OSError as error:
                if self._refuses_whole_output(error):  # the output as a whole refuses now: try again later
                    return Outcome(row.id, "pending", last_error=f"{message}; quarantine failed too: {error}")
                message = f"{message}; quarantine failed too: {error}"
        log.error("cannot place or quarantine a file; it stays in the input", file=row.shown_path, reason=reason,
                  detail=shown(message))
        return Outcome(row.id, "quarantined", sha256=item.sha256, reason=item.failure.reason if item.failure else reason,
                       last_error=f"{message} (the input was left where it is)")

    def _finish_one(self, row: Row, item: ImageItem) -> Outcome:
        timings = dict(item.timings)
        failure = item.failure
        if failure is not None:
            if failure.reason == "vanished":
                return Outcome(row.id, "vanished", last_error=failure.message, timings=timings)
            if failure.retryable and row.attempts < self.max_attempts:
                return Outcome(row.id, "pending", last_error=failure.message, timings=timings)
            return self._quarantine(row, item, failure.reason, failure.message, timings)
        if item.skip_vision:
            item.signals["vision_skipped"] = "text_dominant"
        decision = decide(item.signals, self.thresholds)
        current = self._stat(row.path)
        if current is None:
            return Outcome(row.id, "vanished", last_error="the input file disappeared (or became a link) before it "
                           "could be placed")
        if row.size is not None and not _same_identity(row, current):
            return Outcome(row.id, "pending", size=current[0], mtime_ns=current[1], inode=current[2],
                           ctime_ns=current[3],
                           last_error="the input file changed while it was processed; it will be processed again")
        output = None
        if self.placer is not None:
            try:
                output = str(self.placer.place(Path(row.path), row.rel_path, decision.bin, item.sha256))
            except FileNotFoundError:
                return Outcome(row.id, "vanished", last_error="the input file disappeared before it could be placed")
            # Linking the input (move, hardlink) changes its ctime: remember the identity it has now, so that
            # the next scan sees the same file (and a crash leftover in move mode is recognised).
            current = self._stat(row.path) or current
        return Outcome(
            row.id, "done", sha256=item.sha256, bin=decision.bin, rule=decision.rule, decision=decision.to_dict(),
            signals=item.signals, output_path=output, timings=timings, size=current[0], mtime_ns=current[1],
            inode=current[2], ctime_ns=current[3],
        )

    def _quarantine(self, row: Row, item: ImageItem, reason: str, message: str, timings: dict[str, Any]) -> Outcome:
        output = None
        if self.placer is not None:
            try:
                output = str(self.placer.quarantine(Path(row.path), row.rel_path, reason, item.sha256))
            except FileNotFoundError:
                return Outcome(row.id, "vanished", last_error=message)
        log.warning("quarantined", file=row.shown_path, reason=reason, detail=shown(message))
        return Outcome(row.id, "quarantined", sha256=item.sha256, reason=reason, last_error=message,
                       output_path=output, signals=item.signals or None, timings=timings)

    @staticmethod
    def _stat(path: str) -> Identity | None:
        """The input's identity, reached without following links; None when it is no longer a regular file."""
        try:
            st = lstat_no_symlinks(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None
            raise SourceError(f"cannot stat the input {shown(path)}: {error}", error.errno) from None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns

    def _account(self, row: Row, outcome: Outcome) -> None:
        """Metrics, counters and the in-flight set for one finished item (on the event loop)."""
        self._in_flight.pop(row.id, None)
        if not self._in_flight:
            self.wake()  # `once` waits for the pipeline to be idle: tell the feeder now, not at its 1 s poll
        self.last_progress = time.monotonic()
        stats, m = self.stats, self.metrics
        if outcome.status == "done":
            stats.finished += 1
            stats.bins[outcome.bin or "?"] = stats.bins.get(outcome.bin or "?", 0) + 1
            m.binned.labels(bin=outcome.bin).inc()
            m.end_to_end.observe(max(0.0, time.time() - row.seen_at))
            m.items.labels(stage="sink", outcome="binned").inc()
        elif outcome.status == "quarantined":
            stats.finished += 1
            reason = outcome.reason or "unknown"
            stats.quarantined[reason] = stats.quarantined.get(reason, 0) + 1
            m.quarantined.labels(reason=reason).inc()
            m.end_to_end.observe(max(0.0, time.time() - row.seen_at))
            m.items.labels(stage="sink", outcome="quarantined").inc()
        elif outcome.status == "vanished":
            stats.vanished += 1
            m.items.labels(stage="sink", outcome="vanished").inc()
        else:
            stats.retried += 1
            m.items.labels(stage="sink", outcome="retry").inc()
            self.wake()
        if self.on_finished is not None:
            self.on_finished(row, outcome)


