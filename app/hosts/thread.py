"""Thread hosting: a stage replica that lives in the calling thread's process, on the replica's own thread.

The engine calls every method from the replica's dedicated thread, so the model copy is created, used and freed
on one thread (Ultralytics and PaddleOCR predictors are not thread-safe).
"""

from __future__ import annotations

import threading

from stages.base import ImageItem, Stage

_SETUP_LOCK = threading.Lock()


class ThreadHost:
    """One stage replica run in this process; ``kill`` cannot end a call here (a thread cannot be stopped)."""

    def __init__(self, stage: Stage, device: str) -> None:
        self.stage = stage
        self.name = stage.name
        self.device = device

    def setup(self) -> None:
        """Load one in-thread replica at a time: transformers' lazy imports are not thread-safe (seed 004)."""
        with _SETUP_LOCK:
            self.stage.setup(self.device)

    def probe_batch_size(self, ceiling: int) -> int:
        return self.stage.probe_batch_size(self.device, ceiling)

    def warmup(self) -> None:
        self.stage.warmup()

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        return self.stage.process_batch(items)

    def teardown(self) -> None:
        self.stage.teardown()

    def kill(self) -> None:
        """Nothing to end: the thread finishes its call, and the process exit discards it."""
