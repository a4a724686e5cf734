"""One stage replica whose model calls run on its own thread, in order, while callers do the host work.

Every model call of the replica (``setup``, the device call ``forward``, ``teardown``) runs on one dedicated thread,
which owns the model copy (Ultralytics and PaddleOCR predictors are not thread-safe). A batch's host phases,
``prepare`` before and ``finish`` after its device call, run on the thread that submitted the batch. With a few
submitters at once, batch N+1 is prepared and batch N-1 finished while batch N is on the device: that is the
overlap, and this class is its one implementation (the thread host, the process child and the Ray actor use it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from stages.base import OVERLAP_DEPTH, ImageItem, Stage

R = TypeVar("R")


class PhaseObserver(Protocol):
    """What the replica reports about its phases (the engine turns it into busy time and host seconds)."""

    def device_started(self) -> None: ...

    def device_finished(self, seconds: float) -> None: ...

    def host_finished(self, phase: str, seconds: float) -> None: ...


class _Unobserved:
    def device_started(self) -> None:
        pass

    def device_finished(self, seconds: float) -> None:
        pass

    def host_finished(self, phase: str, seconds: float) -> None:
        pass


def concurrency_of(stage: Stage) -> int:
    """How many batches a replica of ``stage`` takes at once: overlap needs host phases to overlap with."""
    return OVERLAP_DEPTH if stage.has_host_phases else 1


class PhasedReplica:
    """``stage`` on ``device``: model calls on the replica's thread, host phases on the callers' threads."""

    def __init__(self, stage: Stage, device: str, observer: PhaseObserver | None = None) -> None:
        self.stage = stage
        self.device = device
        self.observer: PhaseObserver = observer or _Unobserved()
        self.concurrency = concurrency_of(stage)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{stage.name}-{device}-model")
        self._torn_down = False

    def on_model_thread(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the replica's model thread and wait for it."""
        return self._model_thread.submit(fn, *args).result()

    def setup(self) -> None:
        self.on_model_thread(self.stage.setup, self.device)

    def probe_batch_size(self, ceiling: int) -> int:
        return self.on_model_thread(self.stage.probe_batch_size, self.device, ceiling)

    def warmup(self) -> None:
        self.on_model_thread(self.stage.warmup)

    def run(self, items: list[ImageItem]) -> list[ImageItem]:
        """One batch: ``prepare`` here, ``forward`` on the model thread (after the batches submitted before it),
        ``finish`` here."""
        started = time.monotonic()
        batch = self.stage.prepare(items)
        prepared = time.monotonic()
        self.observer.host_finished("prepare", prepared - started)
        outputs = self.on_model_thread(self._forward, batch)
        returned = time.monotonic()
        done = self.stage.finish(items, outputs)
        self.observer.host_finished("finish", time.monotonic() - returned)
        return done

    def _forward(self, batch: Any) -> Any:
        self.observer.device_started()
        started = time.monotonic()
        try:
            return self.stage.forward(batch)
        finally:
            self.observer.device_finished(time.monotonic() - started)

    def teardown(self, timeout_s: float | None = None) -> None:
        """Free the models on the model thread (waiting at most ``timeout_s``), then stop the thread. Twice is fine."""
        if self._torn_down:
            return
        self._torn_down = True
        try:
            self._model_thread.submit(self.stage.teardown).result(timeout_s)
        finally:
            self._model_thread.shutdown(wait=False)

    def abandon(self) -> None:
        """Stop taking calls without waiting for one that is stuck (the process exit discards the thread)."""
        self._model_thread.shutdown(wait=False, cancel_futures=True)
