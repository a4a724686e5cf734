"""The host contract (what the engine calls on a replica, wherever it lives) and the choice between the hosts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from app.hosts.phased import PhaseObserver
from app.hosts.process import ProcessHost
from app.hosts.thread import ThreadHost
from stages.base import ImageItem, Stage


class ReplicaHost(Protocol):
    """One model copy on one device, as the engine drives it. Every call blocks until it is done;
    ``process_batch`` may be called from ``concurrency`` threads at once (the host overlaps their phases)."""

    name: str
    device: str
    concurrency: int

    def setup(self) -> None: ...

    def probe_batch_size(self, ceiling: int) -> int: ...

    def warmup(self) -> None: ...

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]: ...

    def teardown(self) -> None: ...

    def kill(self) -> None: ...


def host_for(stage: Stage, device: str, isolation: Literal["thread", "process"], *, stall_timeout_s: float = 300.0,
             log_level: str = "info", on_restart: Callable[[str], None] | None = None,
             observer: PhaseObserver | None = None) -> ReplicaHost:
    """A host for one fresh replica of ``stage`` on ``device``."""
    replica = stage.replicate()
    if isolation == "process":
        return ProcessHost(replica, device, stall_timeout_s=stall_timeout_s, log_level=log_level, on_restart=on_restart,
                           observer=observer)
    return ThreadHost(replica, device, observer)
