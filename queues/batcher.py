"""Micro-batching: up to ``max_size`` items, or whatever arrived ``max_wait_s`` after the first one."""

from __future__ import annotations

import time
from typing import TypeVar

from queues.bounded import BoundedQueue, EndOfStream, QueueEmpty

T = TypeVar("T")


async def next_batch(queue: BoundedQueue[T], max_size: int, max_wait_s: float) -> list[T]:
    """Wait for one item, then gather more until ``max_size`` or ``max_wait_s`` after that first item.

    Raises ``EndOfStream`` only when the queue is closed and nothing is left; a partial batch that meets
    the end of the stream is returned, and the next call raises.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    batch = [await queue.get()]
    deadline = time.monotonic() + max_wait_s
    while len(batch) < max_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except EndOfStream:
            break
        except QueueEmpty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(await queue.get(timeout=remaining))
        except (QueueEmpty, EndOfStream):
            break
    return batch
