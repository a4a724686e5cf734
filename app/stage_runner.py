"""One stage's replicas: micro-batches in, model calls on each device's own thread (or child process), items out.

Failures stay with their item: an out-of-memory error halves the replica's batch cap and retries the same items,
any other error bisects the batch down to the item that causes it, and a lost worker process is replaced.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import structlog

from app.ledger import shown
from app.metrics import Metrics
from app.process_worker import ProcessStage
from queues import BoundedQueue, DedicatedThread, EndOfStream, next_batch
from stages.base import ImageItem, Stage, WorkerCrashed, is_out_of_memory

log = structlog.get_logger("binner.engine")

AUTO_BATCH_CEILING = 64
CallMarker = Callable[[list[int], str | None], None]


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


class StageSetupError(Exception):
    """A stage could not load its models (missing weights, unknown device, bad configuration)."""
