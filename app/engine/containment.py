"""Failure containment for one stage call: the one implementation both engines use.

A batch call may fail as a whole. The failure is brought down to the items that cause it, so that the rest of
the batch goes on:

- out of device memory: the replica's batch cap is halved and the same items run again, in chunks of the new cap;
  a single image that does not fit fails alone (``out_of_memory``, retryable);
- the hosting process was lost (crash, or killed when stuck): the batch runs again in halves on the new process;
  a single image that takes it down fails alone (``crashed_repeatedly``, retryable, so the attempt is charged);
- any other exception: the batch is bisected until the one item that raises fails alone (``<stage>_error``).

Items that were inside a model call when the whole process died before (``is_suspect``) run alone, after the
rest, so a culprit cannot take its batch with it again. Each attempt adds its duration to every item's
``<stage>_batch`` timing, failed attempts included, so a file's timings say what it cost.

The local engine runs this on the replica's own thread, the Ray engine inside its actor; it blocks, and it knows
nothing of queues, ledgers or Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from app.store import shown
from stages.base import ImageItem, Stage, WorkerCrashed, is_out_of_memory

log = structlog.get_logger("binner.engine")

BatchCall = Callable[[list[ImageItem]], list[ImageItem]]


@dataclass
class BatchCap:
    """A replica's largest batch; out-of-memory errors lower it, and it stays lowered for the next batches."""

    value: int


AUTO_BATCH_CEILING = 64  # how far a batch-size probe goes for a stage that names no ceiling of its own


def probe_ceiling(stage: Stage) -> int:
    return stage.max_auto_batch or AUTO_BATCH_CEILING


def starting_batch_cap(stage: Stage, probe: Callable[[int], int]) -> BatchCap:
    """A replica's first cap, the same on every host: the configured batch size, else what ``probe`` finds on the
    replica's device up to ``probe_ceiling``."""
    cap = stage.batch_policy.max_batch_size
    if cap is None:
        cap = probe(probe_ceiling(stage))
    return BatchCap(max(1, int(cap)))


class CallObserver(Protocol):
    """What an engine counts about the calls (metrics); every method is optional in effect (see ``NO_OBSERVER``)."""

    def call_finished(self, size: int, seconds: float) -> None: ...

    def out_of_memory(self, new_cap: int) -> None: ...


class _Unobserved:
    def call_finished(self, size: int, seconds: float) -> None:
        pass

    def out_of_memory(self, new_cap: int) -> None:
        pass


NO_OBSERVER: CallObserver = _Unobserved()


def contain(call: BatchCall, items: list[ImageItem], *, stage: str, device: str, cap: BatchCap,
            is_suspect: Callable[[ImageItem], bool] | None = None,
            observer: CallObserver = NO_OBSERVER) -> list[ImageItem]:
    """Run ``items`` through ``call``; returns the same items in the same order, failures set on the culprits."""
    return _Containment(call, stage, device, cap, is_suspect, observer).run(items)


class _Containment:
    def __init__(self, call: BatchCall, stage: str, device: str, cap: BatchCap,
                 is_suspect: Callable[[ImageItem], bool] | None, observer: CallObserver) -> None:
        self.call, self.stage, self.device, self.cap = call, stage, device, cap
        self.is_suspect, self.observer = is_suspect, observer

    def run(self, items: list[ImageItem]) -> list[ImageItem]:
        if len(items) > 1 and self.is_suspect is not None and any(self.is_suspect(item) for item in items):
            # Items that were in a call when the process died run alone: a culprit cannot take its batch with it.
            suspects = [item for item in items if self.is_suspect(item)]
            others = [item for item in items if not self.is_suspect(item)]
            done = self._chunked(others) if others else []
            for suspect in suspects:
                done.extend(self._attempt([suspect]))
            by_identity = {id(item): item for item in done}
            return [by_identity[id(item)] for item in items]
        return self._chunked(items)

    def _chunked(self, items: list[ImageItem]) -> list[ImageItem]:
        if len(items) <= self.cap.value:
            return self._attempt(items)
        chunk = self.cap.value  # fixed here: a chunk's out-of-memory error may lower the cap again
        done: list[ImageItem] = []
        for start in range(0, len(items), chunk):
            done.extend(self._chunked(items[start:start + chunk]))
        return done

    def _attempt(self, items: list[ImageItem]) -> list[ImageItem]:
        name, device = self.stage, self.device
        started = time.monotonic()
        error: Exception | None = None
        try:
            result = self.call(items)
            if len(result) != len(items):
                raise RuntimeError(f"stage {name} returned {len(result)} items for a batch of {len(items)}")
        except Exception as caught:
            error = caught
        finally:
            elapsed = time.monotonic() - started
            self.observer.call_finished(len(items), elapsed)
            for item in items:
                item.timings[f"{name}_batch"] = item.timings.get(f"{name}_batch", 0.0) + elapsed
        if error is None:
            return result
        # Retries run outside the ``except`` block: an error raised by a retry must not carry this one as its
        # ``__context__``, or ``is_out_of_memory`` (which follows the chain) would read a later failure as OOM.
        if isinstance(error, WorkerCrashed):  # the hosting process died or hung in this call and was replaced
            if len(items) == 1:
                log.warning("worker process lost on a single item", stage=name, device=device,
                            file=shown(items[0].source), error=str(error))
                items[0].fail("crashed_repeatedly", f"{name} on {device}: {error} while processing this file alone",
                              name, True)
                return items
            log.warning("worker process lost mid-batch: retrying the batch in halves", stage=name, device=device,
                        batch=len(items), error=str(error))
            return self._halves(items)
        if is_out_of_memory(error):
            if len(items) == 1:
                self.observer.out_of_memory(self.cap.value)
                items[0].fail("out_of_memory", f"{name} on {device}: out of memory for a single image", name, True)
                return items
            self.cap.value = max(1, min(self.cap.value, len(items)) // 2)
            self.observer.out_of_memory(self.cap.value)
            log.warning("out of device memory: halving batch cap", stage=name, device=device, batch=len(items),
                        new_cap=self.cap.value)
            return self._chunked(items)
        if len(items) == 1:
            log.warning("stage failed on an item", stage=name, device=device, file=shown(items[0].source),
                        error=f"{type(error).__name__}: {error}")
            items[0].fail(f"{name}_error", f"{name} on {device}: {type(error).__name__}: {error}", name, True)
            return items
        return self._halves(items)

    def _halves(self, items: list[ImageItem]) -> list[ImageItem]:
        middle = len(items) // 2
        return self._chunked(items[:middle]) + self._chunked(items[middle:])
