"""A bounded async queue with an explicit end: producers block when it is full (that is the backpressure),
``close()`` refuses further items, and consumers drain what is left before they see ``EndOfStream``.

Like anyio's memory object streams, but with the hooks the metrics need (depth, wait, blocked time) and
cancellation that never loses an item: an item is removed only by a ``get`` that then returns it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class EndOfStream(Exception):
    """The queue is closed and empty: no item will ever come."""


class QueueClosed(Exception):
    """``put`` on a closed queue."""


class QueueEmpty(Exception):
    """``get`` with a timeout found nothing in time (the queue is still open)."""


class QueueObserver(Protocol):
    def on_depth(self, queue: str, depth: int) -> None: ...

    def on_wait(self, queue: str, seconds: float) -> None: ...

    def on_blocked(self, queue: str, seconds: float) -> None: ...


class _NullObserver:
    def on_depth(self, queue: str, depth: int) -> None:
        pass

    def on_wait(self, queue: str, seconds: float) -> None:
        pass

    def on_blocked(self, queue: str, seconds: float) -> None:
        pass


class BoundedQueue(Generic[T]):
    """Bounded FIFO between pipeline stages; use from one event loop, any number of producers and consumers."""

    def __init__(self, name: str, capacity: int, observer: QueueObserver | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"queue {name!r}: capacity must be at least 1, got {capacity}")
        self.name = name
        self.capacity = capacity
        self._observer: QueueObserver = observer or _NullObserver()
        self._items: deque[tuple[T, float]] = deque()
        self._closed = False
        self._lock = asyncio.Lock()
        self._not_empty = asyncio.Condition(self._lock)
        self._not_full = asyncio.Condition(self._lock)
        self.max_depth_seen = 0
        self._wakers: set[asyncio.Task[None]] = set()  # held so the event loop cannot drop them
        # Tasks inside a wait loop: a put/get with nobody waiting on the other side wakes nobody (and, from the
        # lock-free ``*_nowait`` calls, schedules no waker task: one per item was most of the queue's cost).
        self._waiting_getters = 0
        self._waiting_putters = 0
        self._observer.on_depth(name, 0)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def free(self) -> int:
        return self.capacity - len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> None:
        """Append ``item``, waiting while the queue is full; ``QueueClosed`` once closed."""
        async with self._lock:
            if self._closed:
                raise QueueClosed(f"queue {self.name!r} is closed")
            if len(self._items) >= self.capacity:
                started = time.monotonic()
                self._waiting_putters += 1
                try:
                    while len(self._items) >= self.capacity and not self._closed:
                        await self._not_full.wait()
                finally:
                    self._waiting_putters -= 1
                    self._observer.on_blocked(self.name, time.monotonic() - started)
                if self._closed:
                    raise QueueClosed(f"queue {self.name!r} was closed while a producer waited")
            self._append(item)

    def _append(self, item: T) -> None:
        self._items.append((item, time.monotonic()))
        depth = len(self._items)
        self.max_depth_seen = max(self.max_depth_seen, depth)
        self._observer.on_depth(self.name, depth)
        if self._waiting_getters:
            self._notify(self._not_empty)

    def _notify(self, condition: asyncio.Condition) -> None:
        """Wake waiters now when we hold the lock (inside put/get), else from a task that takes it."""
        if self._lock.locked():
            condition.notify_all()
            return
        task = asyncio.get_running_loop().create_task(self._wake(condition))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _wake(self, condition: asyncio.Condition) -> None:
        async with self._lock:
            condition.notify_all()

    async def get(self, timeout: float | None = None) -> T:
        """Next item; ``EndOfStream`` when closed and drained; ``QueueEmpty`` if ``timeout`` passes first."""
        async with self._lock:
            if not self._items and not self._closed:
                self._waiting_getters += 1
                try:
                    async with asyncio.timeout(timeout):
                        while not self._items and not self._closed:
                            await self._not_empty.wait()
                except TimeoutError:
                    raise QueueEmpty(self.name) from None
                finally:
                    self._waiting_getters -= 1
            return self._pop()

    def get_nowait(self) -> T:
        if not self._items:
            if self._closed:
                raise EndOfStream(self.name)
            raise QueueEmpty(self.name)
        item = self._pop()
        return item

    def _pop(self) -> T:
        if not self._items:
            raise EndOfStream(self.name)
        item, enqueued = self._items.popleft()
        self._observer.on_wait(self.name, time.monotonic() - enqueued)
        self._observer.on_depth(self.name, len(self._items))
        if self._waiting_putters:
            self._notify(self._not_full)
        return item

    async def close(self) -> None:
        """No more items; waiting consumers drain what is queued, then see ``EndOfStream``."""
        async with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
