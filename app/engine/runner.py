"""One stage's replicas: micro-batches in, model calls on each device's host, items out.

Each replica is a host (``app.hosts``: the model in this process, or in a child process) driven by as many driver
threads as it takes batches at once (``host.concurrency``: three for a stage with host phases, so that one batch is
prepared and another finished while a third is on the device; one otherwise). A batch runs through ``contain``
(``app.engine.containment``) on its driver thread, so failures stay with their items exactly as on the Ray engine.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio
import structlog

from app.engine.containment import BatchCap, contain, starting_batch_cap
from app.hosts import ReplicaHost, host_for
from app.metrics import Metrics
from queues import BoundedQueue, DedicatedThread, EndOfStream, next_batch
from stages.base import ImageItem, Stage

log = structlog.get_logger("binner.engine")

CallMarker = Callable[[list[int], str | None], None]


@dataclass
class Replica:
    """One model copy on one device, hosted by ``host`` and driven from ``drivers``."""

    host: ReplicaHost
    device: str
    drivers: DedicatedThread
    cap: BatchCap
    busy_since: float | None = None  # monotonic start of the device call in progress (the stall watchdog reads it)

    @property
    def batch_cap(self) -> int:
        return self.cap.value


@dataclass(frozen=True)
class Hosting:
    """How a stage's replicas are hosted: in threads or child processes, and the children's limits."""

    isolation: Literal["thread", "process"] = "thread"
    stall_timeout_s: float = 300.0
    log_level: str = "info"


class _ReplicaMetrics:
    """The containment's observations of one replica, as Prometheus metrics."""

    def __init__(self, metrics: Metrics, stage: str, device: str) -> None:
        self.seconds = metrics.batch_seconds.labels(stage=stage, device=device)
        self.size = metrics.batch_size.labels(stage=stage)
        self.oom = metrics.oom.labels(stage=stage, device=device)
        self.limit = metrics.batch_limit.labels(stage=stage, device=device)

    def call_finished(self, size: int, seconds: float) -> None:
        self.seconds.observe(seconds)
        self.size.observe(size)

    def out_of_memory(self, new_cap: int) -> None:
        self.oom.inc()
        self.limit.set(new_cap)


class _ReplicaPhases:
    """A replica's phase reports: busy time while a device call runs, host seconds per phase."""

    def __init__(self, runner: StageRunner, device: str) -> None:
        self.runner, self.device = runner, device
        self.replica: Replica | None = None  # set once the replica exists (setup reports nothing)
        self.busy = runner.metrics.busy_seconds
        self.host = {phase: runner.metrics.host_seconds.labels(stage=runner.stage.name, device=device, phase=phase)
                     for phase in ("prepare", "finish")}

    def device_started(self) -> None:
        if self.replica is not None:
            self.replica.busy_since = time.monotonic()

    def device_finished(self, seconds: float) -> None:
        # Busy time is counted here, once per device call, and while the call runs by the metric's collector.
        with self.busy.lock:
            self.busy.labels(stage=self.runner.stage.name, device=self.device).inc(seconds)
            if self.replica is not None:
                self.replica.busy_since = None

    def host_finished(self, phase: str, seconds: float) -> None:
        counter = self.host.get(phase)
        if counter is not None:
            counter.inc(seconds)


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
        hosting: Hosting | None = None,
    ) -> None:
        self.stage = stage
        self.inbound = inbound
        self.route = route
        self.metrics = metrics
        self.mark_call = mark_call
        self.is_suspect = is_suspect
        self.hosting = hosting or Hosting()
        self.replicas: list[Replica] = []

    async def setup(self) -> None:
        """Load one model copy per device, each on its own thread, all devices in parallel."""
        hosting = self.hosting

        async def set_up(device: str, index: int) -> None:
            phases = _ReplicaPhases(self, device)
            host = host_for(self.stage, device, hosting.isolation, stall_timeout_s=hosting.stall_timeout_s,
                            log_level=hosting.log_level, on_restart=self._restart_counter(device), observer=phases)
            drivers = DedicatedThread(f"{self.stage.name}-{device}-{index}", threads=host.concurrency)
            await drivers.run(host.setup)
            cap = await drivers.run(starting_batch_cap, self.stage, host.probe_batch_size)
            await drivers.run(host.warmup)
            replica = phases.replica = Replica(host, device, drivers, cap)
            self.metrics.batch_limit.labels(stage=self.stage.name, device=device).set(replica.batch_cap)
            self.replicas.append(replica)
            log.info("stage ready", stage=self.stage.name, replica=index, device=device, batch_cap=replica.batch_cap,
                     isolation=hosting.isolation, batches_at_once=host.concurrency)

        async with anyio.create_task_group() as group:
            for index, device in enumerate(self.stage.devices):
                group.start_soon(set_up, device, index)

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            for replica in self.replicas:
                for _ in range(replica.host.concurrency):
                    group.start_soon(self._work, replica)

    async def teardown(self) -> None:
        for replica in self.replicas:
            if replica.busy_since is not None:  # its thread is inside a model call that outlived the drain
                log.warning("model call still running at teardown; leaving its thread", stage=self.stage.name,
                            device=replica.device, running_s=round(time.monotonic() - replica.busy_since, 1))
                replica.host.kill()  # a child process can be ended, which frees its device
                replica.drivers.shutdown(wait=False)
                continue
            try:
                await replica.drivers.run(replica.host.teardown)
            except Exception as error:  # teardown must not hide the real outcome
                log.warning("teardown failed", stage=self.stage.name, device=replica.device, error=str(error))
            replica.drivers.shutdown(wait=False)

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
            done = await replica.drivers.run(self._contained, replica, batch)
            for item in done:
                outcome = "failed" if item.failure else "ok"
                self.metrics.items.labels(stage=self.stage.name, outcome=outcome).inc()
                await self.route(item)

    def _contained(self, replica: Replica, items: list[ImageItem]) -> list[ImageItem]:
        """On a driver thread: the batch through the shared containment, each attempt a marked call."""
        suspect = None if self.is_suspect is None else (lambda item: self.is_suspect(item.key))  # type: ignore[misc]
        return contain(lambda batch: self._call(replica, batch), items, stage=self.stage.name, device=replica.device,
                       cap=replica.cap, is_suspect=suspect,
                       observer=_ReplicaMetrics(self.metrics, self.stage.name, replica.device))

    def _call(self, replica: Replica, items: list[ImageItem]) -> list[ImageItem]:
        """One attempt at a batch on its host (the host reports its device time as busy time).

        The ledger is told which rows are inside the stage before the call and after it returns, so that a process
        that dies meanwhile charges a crash to these rows only (and names this stage).
        """
        keys = [item.key for item in items]
        if self.mark_call is not None:
            self.mark_call(keys, self.stage.name)
        try:
            return replica.host.process_batch(items)
        finally:
            if self.mark_call is not None:
                self.mark_call(keys, None)


class StageSetupError(Exception):
    """A stage could not load its models (missing weights, unknown device, bad configuration)."""


def first_error(error: BaseException) -> BaseException:
    """The error a task group's exception group was raised for: its first, however deeply the groups nest."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def set_up_runners(runners: list[StageRunner]) -> None:
    """Load and warm every runner's model copies, stage after stage; a failure names the stage and what went wrong."""
    for runner in runners:
        try:
            await runner.setup()
        except BaseExceptionGroup as group:
            first = first_error(group)
            raise StageSetupError(f"stage {runner.stage.name} could not start: {first}") from first
        except Exception as error:
            raise StageSetupError(f"stage {runner.stage.name} could not start: {error}") from error
