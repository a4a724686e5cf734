"""Engine plumbing: bounded queue, micro-batcher and dedicated threads, with no models involved."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from queues import BoundedQueue, DedicatedThread, EndOfStream, QueueClosed, next_batch
from queues.bounded import QueueEmpty


class Recorder:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.waits: list[float] = []
        self.blocked: list[float] = []

    def on_depth(self, queue: str, depth: int) -> None:
        self.depths.append(depth)

    def on_wait(self, queue: str, seconds: float) -> None:
        self.waits.append(seconds)

    def on_blocked(self, queue: str, seconds: float) -> None:
        self.blocked.append(seconds)


def test_fast_producer_slow_consumer_never_exceeds_capacity_and_blocks() -> None:
    recorder = Recorder()

    async def main() -> list[int]:
        queue: BoundedQueue[int] = BoundedQueue("q", 4, recorder)
        received: list[int] = []

        async def produce() -> None:
            for i in range(40):
                await queue.put(i)
                assert queue.depth <= queue.capacity
            await queue.close()

        async def consume() -> None:
            while True:
                try:
                    received.append(await queue.get())
                except EndOfStream:
                    return
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            group.start_soon(consume)
        assert queue.max_depth_seen == 4
        return received

    received = anyio.run(main)
    assert received == list(range(40))
    assert max(recorder.depths) <= 4
    assert sum(recorder.blocked) > 0.01, "the producer should have been held back by the full queue"
    assert len(recorder.waits) == 40


def test_close_drains_then_ends_and_refuses_puts() -> None:
    async def main() -> None:
        queue: BoundedQueue[str] = BoundedQueue("q", 8)
        for item in "abc":
            await queue.put(item)
        await queue.close()
        with pytest.raises(QueueClosed):
            await queue.put("d")
        assert [await queue.get() for _ in range(3)] == ["a", "b", "c"]
        with pytest.raises(EndOfStream):
            await queue.get()

    anyio.run(main)


def test_close_wakes_blocked_producer_and_waiting_consumer() -> None:
    async def main() -> None:
        full: BoundedQueue[int] = BoundedQueue("full", 1)
        await full.put(1)
        empty: BoundedQueue[int] = BoundedQueue("empty", 1)
        outcomes: list[str] = []

        async def blocked_put() -> None:
            with pytest.raises(QueueClosed):
                await full.put(2)
            outcomes.append("put")

        async def waiting_get() -> None:
            with pytest.raises(EndOfStream):
                await empty.get()
            outcomes.append("get")

        with anyio.fail_after(2):
            async with anyio.create_task_group() as group:
                group.start_soon(blocked_put)
                group.start_soon(waiting_get)
                await anyio.sleep(0.05)
                await full.close()
                await empty.close()
        assert sorted(outcomes) == ["get", "put"]

    anyio.run(main)


def test_batches_respect_size_and_wait() -> None:
    async def main() -> None:
        queue: BoundedQueue[int] = BoundedQueue("q", 64)
        for i in range(10):
            await queue.put(i)
        assert await next_batch(queue, 4, 1.0) == [0, 1, 2, 3]
        assert await next_batch(queue, 4, 1.0) == [4, 5, 6, 7]
        started = time.monotonic()
        assert await next_batch(queue, 4, 0.1) == [8, 9]  # partial batch after max_wait
        waited = time.monotonic() - started
        assert 0.08 <= waited < 1.0

        async def trickle() -> None:
            for i in range(3):
                await anyio.sleep(0.01)
                await queue.put(100 + i)

        async with anyio.create_task_group() as group:
            group.start_soon(trickle)
            batch = await next_batch(queue, 8, 0.3)
        assert batch == [100, 101, 102]
        await queue.close()
        with pytest.raises(EndOfStream):
            await next_batch(queue, 4, 0.1)

    anyio.run(main)


def test_timeouts_and_cancellation_never_lose_items() -> None:
    async def main() -> list[int]:
        queue: BoundedQueue[int] = BoundedQueue("q", 2)
        got: list[int] = []

        async def produce() -> None:
            for i in range(200):
                await queue.put(i)
                if i % 7 == 0:
                    await anyio.sleep(0.001)
            await queue.close()

        async def consume() -> None:
            while True:
                try:
                    got.append(await queue.get(timeout=0.0005))
                except QueueEmpty:
                    continue
                except EndOfStream:
                    return

        async def consume_with_cancels() -> None:
            while True:
                with anyio.move_on_after(0.0003):
                    try:
                        got.append(await queue.get())
                    except EndOfStream:
                        return

        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            group.start_soon(consume)
            group.start_soon(consume_with_cancels)
        return got

    got = anyio.run(main)
    assert sorted(got) == list(range(200))


def test_dedicated_thread_runs_every_call_on_one_thread_off_the_loop() -> None:
    async def main() -> set[int]:
        thread = DedicatedThread("model")
        loop_thread = threading.get_ident()
        idents = {await thread.run(threading.get_ident) for _ in range(20)}
        assert loop_thread not in idents
        # a blocking call on the thread leaves the event loop free
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as group:
            group.start_soon(tick)
            await thread.run(time.sleep, 0.1)
            group.cancel_scope.cancel()
        assert ticks >= 5
        thread.shutdown()
        return idents

    assert len(anyio.run(main)) == 1


def test_nowait_calls_with_nobody_waiting_schedule_no_waker_tasks() -> None:
    """A put/get_nowait with no task waiting on the other side must not create a task per item."""
    import asyncio

    async def main() -> None:
        queue: BoundedQueue[int] = BoundedQueue("q", 64)
        before = len(asyncio.all_tasks())
        for i in range(50):
            await queue.put(i)
        assert [queue.get_nowait() for _ in range(50)] == list(range(50))
        assert len(asyncio.all_tasks()) == before

        # ...but a waiting consumer is still woken by put, and a blocked producer by get_nowait
        got: list[int] = []

        async def consume() -> None:
            got.append(await queue.get())

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await anyio.sleep(0.01)
            await queue.put(7)
        assert got == [7]
        small: BoundedQueue[int] = BoundedQueue("small", 1)
        await small.put(1)
        with anyio.fail_after(2):
            async with anyio.create_task_group() as group:
                group.start_soon(small.put, 2)
                await anyio.sleep(0.01)
                assert small.get_nowait() == 1
        assert small.get_nowait() == 2

    asyncio.run(main())
