"""One dedicated OS thread per model copy: an asyncio worker awaits calls that run on it.

Model instances are never shared between threads (Ultralytics and PaddleOCR predictors are not
thread-safe), so each device's models are created, used and freed on the same thread. PyTorch, ONNX
Runtime and Pillow release the GIL in their heavy calls, which is what lets those threads overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")


class DedicatedThread:
    """Long-lived threads of their own (one unless asked for more); ``await run(fn, ...)`` runs ``fn`` on one of
    them without blocking the event loop."""

    def __init__(self, name: str, threads: int = 1) -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the thread. If the awaiting task is cancelled, the call still completes
        on the thread (a model call cannot be interrupted); its result is discarded."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)
