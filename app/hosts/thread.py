"""Thread hosting: a stage replica that lives in this process, its model calls on the replica's own model thread.

Callers (the engine's driver threads) may submit several batches at once; ``PhasedReplica`` runs their device calls
one at a time on the model thread and their host phases on the callers' threads.
"""

from __future__ import annotations

import threading

from app.hosts.phased import PhasedReplica, PhaseObserver
from stages.base import ImageItem, Stage

_SETUP_LOCK = threading.Lock()


class ThreadHost:
    """One stage replica run in this process; ``kill`` cannot end a call here (a thread cannot be stopped)."""

    def __init__(self, stage: Stage, device: str, observer: PhaseObserver | None = None) -> None:
        self.stage = stage
        self.name = stage.name
        self.device = device
        self.replica = PhasedReplica(stage, device, observer)
        self.concurrency = self.replica.concurrency

    def setup(self) -> None:
        """Load one in-thread replica at a time: transformers' lazy imports are not thread-safe (seed 004)."""
        with _SETUP_LOCK:
            self.replica.setup()

    def probe_batch_size(self, ceiling: int) -> int:
        return self.replica.probe_batch_size(ceiling)

    def warmup(self) -> None:
        self.replica.warmup()

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        return self.replica.run(items)

    def teardown(self) -> None:
        self.replica.teardown()

    def kill(self) -> None:
        """Nothing can end a running call here; stop taking new ones (the process exit discards the thread)."""
        self.replica.abandon()
