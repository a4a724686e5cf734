"""Process isolation: a stage replica that lives in a spawned child process, driven from the replica's thread.

``ProcessHost`` adapts a stage (it is not one) and offers the calls the engine makes on any host (``setup``,
``probe_batch_size``, ``warmup``, ``process_batch``, ``teardown``, ``kill``); each call runs in the child
(``app.hosts.child``), which owns the model copy and its device. The engine keeps one worker thread per
device; in this mode that thread only waits on the pipe, so Python-heavy post-processing no longer shares
the daemon's GIL, a native crash kills only the child, and a stuck call can be ended by killing it (which
frees its GPU memory too).

- Pixels go through one shared-memory block per replica, grown when a batch needs more; the pipe carries
  only the items' small records and the signals that come back.
- A child that dies (segfault, abort, ``os._exit``, OOM killer, SIGKILL) is seen at once: during a call
  (pipe EOF or the process sentinel), the call raises ``WorkerCrashed``; between calls, a watcher thread on
  the sentinel notices. Either way a new child is started, set up and warmed, and ``on_restart`` is told why.
- A call that runs past ``stall_timeout_s`` gets its child killed and replaced, and raises ``WorkerStuck``.
- The stage classes do not know any of this: whether a stage runs in a thread or a child is the wiring's call.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import structlog

from stages.base import ImageItem, OutOfDeviceMemory, Stage, WorkerCrashed, WorkerStuck

log = structlog.get_logger("binner.worker")

_SPAWN = multiprocessing.get_context("spawn")
_LIVE: weakref.WeakSet[ProcessHost] = weakref.WeakSet()
_MIN_ARENA = 1 << 20
RESTART_TRIES = 3


class RemoteStageError(RuntimeError):
    """A stage call failed in its child with an exception that could not be sent back as itself."""


def describe_exit(code: int | None) -> str:
    """``-9`` -> "killed by SIGKILL", ``70`` -> "exited with status 70"."""
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


@atexit.register
def _kill_children_at_exit() -> None:
    """Children ignore SIGTERM (the daemon drains them), so multiprocessing's own exit hook, which sends SIGTERM
    and then waits, would wait forever for one that was not torn down: end them first (atexit runs this earlier)."""
    for stage in list(_LIVE):
        stage.kill()


class ProcessHost:
    """One stage replica in a spawned child; the calls block the calling (worker) thread until the child answers."""

    def __init__(self, stage: Stage, device: str, stall_timeout_s: float = 300.0, log_level: str = "info",
                 teardown_timeout_s: float = 30.0, on_restart: Callable[[str], None] | None = None) -> None:
        self.stage = stage
        self.name = stage.name
        self.device = device
        self.stall_timeout_s = stall_timeout_s
        self.log_level = log_level
        self.teardown_timeout_s = teardown_timeout_s
        self.on_restart = on_restart  # the engine counts restarts by cause
        self._process: Any = None
        self._conn: Connection | None = None
        self._arena: SharedMemory | None = None
        self._ready = False  # the first setup succeeded: from then on a lost child is replaced
        self._warm = False
        self._closed = False
        self._restarting = False
        # One call at a time: the worker thread's calls, and a watcher replacing a child that died between calls.
        self._lock = threading.Lock()
        # Children are spawned on this one long-lived thread: the kernel's parent-death signal follows the thread
        # that forked, and a worker or watcher thread may end before the child should.
        self._keeper: ThreadPoolExecutor | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return None if process is None else process.pid

    def _spawn(self) -> None:
        if self._keeper is None:
            self._keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-spawner")
        self._keeper.submit(self._start).result()

    # --- the stage calls ------------------------------------------------------------------------
    def setup(self) -> None:
        with self._lock:
            self._spawn()
            self._call(("setup", self.device), None)
            self._ready = True

    def probe_batch_size(self, ceiling: int) -> int:
        with self._lock:
            return int(self._call(("probe", self.device, ceiling), None))

    def warmup(self) -> None:
        with self._lock:
            self._call(("warmup",), None)
            self._warm = True

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        with self._lock:
            return self._process_batch(items)

    def _process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        if self._conn is None:  # an earlier restart failed: try again
            self._restart("crashed")
        name, images = self._pack(items)
        records = [dataclasses.replace(item, image=None) for item in items]
        results = self._call(("batch", name, records, images), self.stall_timeout_s)
        done: list[ImageItem] = []  # as many as came back: the caller checks the count
        for item, (signals, timings, failure, dropped) in zip(items, results):
            item.signals, item.timings, item.failure = signals, timings, failure
            if dropped or failure is not None:
                item.image = None
            done.append(item)
        return done

    def teardown(self) -> None:
        """Ask the child to free its models; kill it if it does not answer within ``teardown_timeout_s``."""
        self._closed = True
        try:
            with self._lock:
                self._teardown()
        finally:
            if self._keeper is not None:
                self._keeper.shutdown(wait=False)

    def _teardown(self) -> None:
        try:
            if self._conn is not None:
                self._call(("teardown",), self.teardown_timeout_s)
        except WorkerCrashed:
            pass
        finally:
            self._end_child()
            self._free_arena()

    def kill(self) -> None:
        """End the child now, from any thread, and replace it no more (teardown of a replica stuck in a call)."""
        self._closed = True
        process = self._process
        if process is not None:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    def _end_child(self) -> None:
        """Kill (if needed), reap and forget the current child (the lock is held)."""
        self._free_arena()  # a new child cannot map the old block: its name is gone (see process_child._Arena)
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join(10)
            process.close()

    def _watch(self, process: Any, sentinel: int) -> None:
        """Notice a child that dies between calls at once, and replace it (a call in progress sees it itself)."""
        try:
            wait([sentinel])
        finally:
            os.close(sentinel)
        if self._closed:
            return
        with self._lock:
            if self._process is process and not self._closed:  # not already handled by a call that saw it die
                try:
                    self._lost("crashed", "died while idle")
                except Exception as error:  # never let the watcher die with an exception nobody reads
                    log.error("stage worker could not be replaced", stage=self.name, device=self.device, error=str(error))

    # --- child lifecycle ------------------------------------------------------------------------
    def _start(self) -> None:
        title = f"{self.name}@{self.device}"
        ours, theirs = _SPAWN.Pipe(duplex=True)
        from app.hosts.child import child_main

        process = _SPAWN.Process(target=child_main, args=(theirs, self.stage, os.getpid(), title, self.log_level),
                                 name=f"binner-{title}", daemon=True)
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        _LIVE.add(self)
        threading.Thread(target=self._watch, args=(process, os.dup(process.sentinel)), daemon=True,
                         name=f"{title}-watch").start()
        log.info("stage worker process started", stage=self.name, device=self.device, pid=process.pid)

    def _restart(self, cause: str) -> None:
        """A new child, set up and warmed like the old one; a few tries, because loading may fail transiently."""
        if self.on_restart is not None:
            self.on_restart(cause)
        delay = 1.0
        self._restarting = True
        try:
            for attempt in range(1, RESTART_TRIES + 1):
                self._end_child()
                try:
                    self._spawn()
                    self._call(("setup", self.device), None)
                    if self._warm:
                        self._call(("warmup",), None)
                    return
                except Exception as error:
                    log.error("stage worker could not be restarted", stage=self.name, device=self.device,
                              attempt=attempt, error=f"{type(error).__name__}: {error}")
                    if attempt == RESTART_TRIES:
                        self._end_child()
                        raise RuntimeError(f"{self.name} on {self.device}: the worker process could not be restarted "
                                           f"after {attempt} tries: {error}") from error
                    time.sleep(delay)
                    delay *= 2
        finally:
            self._restarting = False

    def _lost(self, cause: str, what: str) -> WorkerCrashed:
        """The child is gone (or killed here): record why, replace it, and say so in the exception."""
        process = self._process
        pid = None if process is None else process.pid
        if process is not None and cause == "stuck":
            process.kill()
        if process is not None:
            process.join(5)
            what = f"{what} ({describe_exit(process.exitcode)})"
        log.error("stage worker process lost", stage=self.name, device=self.device, pid=pid, cause=cause, detail=what)
        self._end_child()
        error = (WorkerStuck if cause == "stuck" else WorkerCrashed)(f"{self.name} worker process on {self.device} {what}")
        if self._ready and not self._closed and not self._restarting:
            try:
                self._restart(cause)
            except RuntimeError as restart_error:  # the next call tries again
                log.error("stage worker left down until the next batch", stage=self.name, device=self.device,
                          error=str(restart_error))
        return error

    # --- the pipe -------------------------------------------------------------------------------
    def _call(self, message: tuple[Any, ...], timeout_s: float | None) -> Any:
        conn, process = self._conn, self._process
        if conn is None or process is None:
            raise WorkerCrashed(f"{self.name} worker process on {self.device} is not running")
        try:
            conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._lost("crashed", "died before the call") from None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bound = log.bind(stage=self.name, device=self.device, pid=process.pid)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([conn, process.sentinel], remaining)
            if conn in ready or conn.poll():
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    raise self._lost("crashed", f"died during {message[0]}") from None
                kind = reply[0]
                if kind == "log":
                    _, method, event, fields = reply
                    getattr(bound, method, bound.info)(event, **{k: v for k, v in fields.items() if k != "pid"})
                    continue
                if kind == "ok":
                    return reply[1]
                raise _rebuild_error(reply)
            if ready:  # only the sentinel: the child is gone and sent nothing more
                raise self._lost("crashed", f"died during {message[0]}")
            raise self._lost("stuck", f"was killed after {timeout_s:g} s stuck in {message[0]} (stall_timeout_s)")

    def _pack(self, items: list[ImageItem]) -> tuple[str | None, list[Any]]:
        """Copy the items' pixels into the shared block; returns its name and where each image lies."""
        from PIL import Image

        blobs: list[tuple[int, Any]] = []
        specs: list[Any] = []
        offset = 0
        for item in items:
            image = item.image
            if isinstance(image, Image.Image):
                data = image.tobytes()
                specs.append(("pil", offset, len(data), image.mode, list(image.size)))
            elif _is_array(image):
                import numpy as np

                array = np.ascontiguousarray(image)
                data = memoryview(array).cast("B")
                specs.append(("array", offset, array.nbytes, array.dtype.str, list(array.shape)))
            else:
                specs.append(None if image is None else ("object", image))
                continue
            blobs.append((offset, data))
            offset += len(data)
        if not blobs:
            return None, specs
        arena = self._ensure_arena(offset)
        for start, data in blobs:
            arena.buf[start : start + len(data)] = data
        return arena.name, specs

    def _ensure_arena(self, size: int) -> SharedMemory:
        if self._arena is None or self._arena.size < size:
            old = 0 if self._arena is None else self._arena.size
            self._free_arena()
            self._arena = SharedMemory(create=True, size=max(size, 2 * old, _MIN_ARENA))
        return self._arena

    def _free_arena(self) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()
            try:
                arena.unlink()
            except FileNotFoundError:  # the child removed the name once it had mapped the block (the usual case)
                pass


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _rebuild_error(reply: tuple[Any, ...]) -> BaseException:
    """The child's exception as itself where it unpickles, else a RuntimeError naming its type (OOM kept as OOM)."""
    _, payload, type_name, text, out_of_memory, trace = reply
    log.debug("stage call failed in the worker process", error_type=type_name, traceback=trace)
    if payload is not None:
        try:
            error = pickle.loads(payload)
            if isinstance(error, BaseException):
                return error
        except Exception:
            pass
    if out_of_memory:
        return OutOfDeviceMemory(f"{type_name}: {text}")
    return RemoteStageError(f"{type_name}: {text}")
