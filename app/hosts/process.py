"""Process isolation: a stage replica that lives in a spawned child process, driven from the engine's threads.

``ProcessHost`` adapts a stage (it is not one) and offers the calls the engine makes on any host (``setup``,
``probe_batch_size``, ``warmup``, ``process_batch``, ``teardown``, ``kill``); each call runs in the child
(``app.hosts.child``), which owns the model copy and its device and runs batches through ``PhasedReplica``. Up to
``concurrency`` batches may be in the child at once, so its host phases overlap its device calls there too;
Python-heavy post-processing no longer shares the daemon's GIL, a native crash kills only the child, and a stuck
call can be ended by killing it (which frees its GPU memory too).

- Pixels go through shared memory, one block per in-flight slot, grown when a batch needs more; the pipe carries
  only the items' small records, the signals that come back, log events and phase timings.
- One reader thread per child takes every message. A child that dies (segfault, abort, ``os._exit``, OOM killer,
  SIGKILL) is seen at once, in a call or between calls: every call in flight raises ``WorkerCrashed``, a new child
  is started, set up and warmed, and ``on_restart`` is told why; the next calls wait for it.
- A call that runs past ``stall_timeout_s`` gets its child killed and replaced, and raises ``WorkerStuck``.
- The stage classes do not know any of this: whether a stage runs in a thread or a child is ``app.build``'s call
  (``isolation``, resolved by ``app.devices``).
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import queue
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

from app.hosts.phased import PhaseObserver, _Unobserved, concurrency_of
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
    for host in list(_LIVE):
        host.kill()


class _Call:
    """One request to the child, answered once (a result, an error, or the child's loss)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


@dataclasses.dataclass
class _Child:
    """One spawned child and what belongs to it; a new child is a new generation."""

    process: Any
    conn: Connection
    generation: int
    calls: dict[int, _Call] = dataclasses.field(default_factory=dict)
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    arenas: dict[int, SharedMemory] = dataclasses.field(default_factory=dict)  # one block per in-flight slot
    lost: bool = False


class ProcessHost:
    """One stage replica in a spawned child; each call blocks its calling thread until the child answers."""

    def __init__(self, stage: Stage, device: str, stall_timeout_s: float = 300.0, log_level: str = "info",
                 teardown_timeout_s: float = 30.0, on_restart: Callable[[str], None] | None = None,
                 observer: PhaseObserver | None = None) -> None:
        self.stage = stage
        self.name = stage.name
        self.device = device
        self.stall_timeout_s = stall_timeout_s
        self.log_level = log_level
        self.teardown_timeout_s = teardown_timeout_s
        self.on_restart = on_restart  # the engine counts restarts by cause
        self.observer: PhaseObserver = observer or _Unobserved()
        self.concurrency = concurrency_of(stage)
        self._child: _Child | None = None
        self._generations = itertools.count(1)
        self._ids = itertools.count(1)
        self._state = threading.Lock()  # guards _child and its calls
        self._restarting = threading.Lock()  # one (re)start at a time
        self._usable = threading.Event()  # a child is up and set up (cleared while one is being replaced)
        self._ready = False  # the first setup succeeded: from then on a lost child is replaced
        self._replacing = False  # a lost child's replacement is under way on its own thread
        self._warm = False
        self._closed = False
        # A call holds an in-flight slot (and its child's shared-memory block) until the child has answered.
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.concurrency):
            self._slots.put(slot)
        self._arena_lock = threading.Lock()
        # Children are spawned on this one long-lived thread: the kernel's parent-death signal follows the thread
        # that forked, and a driver thread may end before the child should.
        self._keeper: ThreadPoolExecutor | None = None

    @property
    def pid(self) -> int | None:
        child = self._child
        return None if child is None else child.process.pid

    # --- the host calls -------------------------------------------------------------------------
    def setup(self) -> None:
        with self._restarting:
            self._start_child()
            self._call(("setup", self.device), None, wait_usable=False)
            self._ready = True
            self._usable.set()

    def probe_batch_size(self, ceiling: int) -> int:
        return int(self._call(("probe", self.device, ceiling), None))

    def warmup(self) -> None:
        self._call(("warmup",), None)
        self._warm = True

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        slot = self._slots.get()
        try:
            child = self._current_child()
            name, images = self._pack(child, slot, items)  # into this child's block: a new child gets new ones
            records = [dataclasses.replace(item, image=None) for item in items]
            results = self._call(("batch", slot, name, records, images), self.stall_timeout_s, child=child)
        finally:
            self._slots.put(slot)
        done: list[ImageItem] = []  # as many as came back: the caller checks the count
        for item, (signals, not_computed, timings, failure, dropped) in zip(items, results):
            item.signals, item.not_computed, item.timings, item.failure = signals, not_computed, timings, failure
            if dropped or failure is not None:
                item.image = None
            done.append(item)
        return done

    def teardown(self) -> None:
        """Ask the child to free its models; kill it if it does not answer within ``teardown_timeout_s``."""
        self._closed = True
        try:
            if self._child is not None and not self._child.lost:
                self._call(("teardown",), self.teardown_timeout_s, wait_usable=False)
        except WorkerCrashed:
            pass
        finally:
            self._end_child()
            if self._keeper is not None:
                self._keeper.shutdown(wait=False)

    def kill(self) -> None:
        """End the child now, from any thread, and replace it no more (teardown of a replica stuck in a call)."""
        self._closed = True
        child = self._child
        if child is not None:
            try:
                os.kill(child.process.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    # --- the pipe -------------------------------------------------------------------------------
    def _current_child(self) -> _Child:
        """The child to send to, once it is up (waiting while a lost one is replaced)."""
        self._await_child()
        child = self._child
        if child is None or child.lost:
            raise WorkerCrashed(f"{self.name} worker process on {self.device} is not running")
        return child

    def _call(self, message: tuple[Any, ...], timeout_s: float | None, wait_usable: bool = True,
              child: _Child | None = None) -> Any:
        if child is None and wait_usable:
            child = self._current_child()
        with self._state:
            child = child or self._child
            if child is None or child.lost:
                raise WorkerCrashed(f"{self.name} worker process on {self.device} is not running")
            call_id = next(self._ids)
            call = child.calls[call_id] = _Call(str(message[0]))
        try:
            with child.send_lock:
                child.conn.send((message[0], call_id, *message[1:]))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            self._lose(child, "crashed", "died before the call")
        if not call.done.wait(timeout_s):
            self._lose(child, "stuck", f"was killed after {timeout_s:g} s stuck in {message[0]} (stall_timeout_s)",
                       stuck=call_id)
            call.done.wait(10.0)
        if call.error is not None:
            raise call.error
        return call.result

    def _await_child(self) -> None:
        """Wait while a lost child is being replaced; start one here when an earlier replacement failed."""
        while not self._usable.wait(1.0):
            if self._closed:
                raise WorkerCrashed(f"{self.name} worker process on {self.device} is shut down")
            if self._ready and not self._replacing and not self._restarting.locked():
                self._restart("crashed")
                return

    def _read(self, child: _Child) -> None:
        """The child's messages, until it is gone: replies, forwarded log events, phase timings."""
        bound = log.bind(stage=self.name, device=self.device, pid=child.process.pid)
        sentinel = child.process.sentinel
        while True:
            try:
                ready = wait([child.conn, sentinel])
            except OSError:
                break
            if child.conn not in ready and not child.conn.poll():
                break  # only the sentinel: the child is gone and sent nothing more
            try:
                reply = child.conn.recv()
            except (EOFError, OSError):
                break
            kind = reply[0]
            if kind == "log":
                _, method, event, fields = reply
                getattr(bound, method, bound.info)(event, **{k: v for k, v in fields.items() if k != "pid"})
            elif kind == "phase":
                self._phase(reply)
            else:
                with self._state:
                    call = child.calls.pop(reply[1], None)
                if call is not None:
                    call.answer(reply[2]) if kind == "ok" else call.answer(error=_rebuild_error(reply))
        if not self._closed or child.calls:
            kinds = sorted({call.kind for call in child.calls.values()})
            self._lose(child, "crashed", f"died during {', '.join(kinds)}" if kinds else "died while idle")

    def _phase(self, reply: tuple[Any, ...]) -> None:
        _, phase, event, seconds = reply
        if phase == "device":
            if event == "start":
                self.observer.device_started()
            else:
                self.observer.device_finished(seconds)
        else:
            self.observer.host_finished(phase, seconds)

    # --- child lifecycle ------------------------------------------------------------------------
    def _lose(self, child: _Child, cause: str, what: str, stuck: int | None = None) -> None:
        """The child is gone (or killed here): every call in flight fails, and a new child is started."""
        with self._state:
            if child.lost:
                return
            child.lost = True
            calls, child.calls = child.calls, {}
            if self._child is child:
                self._usable.clear()
        process = child.process
        if cause == "stuck" and process.is_alive():
            process.kill()
        process.join(5)
        self._free_arenas(child)
        what = f"{what} ({describe_exit(process.exitcode)})"
        if not self._closed:
            log.error("stage worker process lost", stage=self.name, device=self.device, pid=process.pid, cause=cause,
                      detail=what)
        replace = self._ready and not self._closed
        if replace and self.on_restart is not None:
            self.on_restart(cause)  # counted before any caller hears of the loss
        for call_id, call in calls.items():
            kind = WorkerStuck if call_id == stuck else WorkerCrashed
            call.answer(error=kind(f"{self.name} worker process on {self.device} {what}"))
        if replace:
            self._replacing = True
            threading.Thread(target=self._replace, args=(cause,), daemon=True,
                             name=f"{self.name}@{self.device}-replace").start()

    def _replace(self, cause: str) -> None:
        try:
            self._restart(cause)
        except RuntimeError as error:  # the next call tries again
            log.error("stage worker left down until the next batch", stage=self.name, device=self.device,
                      error=str(error))
        finally:
            self._replacing = False

    def _restart(self, cause: str) -> None:
        """A new child, set up and warmed like the old one; a few tries, because loading may fail transiently
        (``cause`` was counted when the child was lost)."""
        with self._restarting:
            if self._usable.is_set() or self._closed:
                return  # replaced meanwhile by another thread
            delay = 1.0
            for attempt in range(1, RESTART_TRIES + 1):
                self._end_child()
                try:
                    self._start_child()
                    self._call(("setup", self.device), None, wait_usable=False)
                    if self._warm:
                        self._call(("warmup",), None, wait_usable=False)
                    self._usable.set()
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

    def _start_child(self) -> None:
        if self._keeper is None:
            self._keeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-spawner")
        self._keeper.submit(self._spawn).result()

    def _spawn(self) -> None:
        title = f"{self.name}@{self.device}"
        ours, theirs = _SPAWN.Pipe(duplex=True)
        from app.hosts.child import child_main

        process = _SPAWN.Process(target=child_main, args=(theirs, self.stage, os.getpid(), title, self.log_level,
                                                          self.concurrency), name=f"binner-{title}", daemon=True)
        process.start()
        theirs.close()
        child = _Child(process, ours, next(self._generations))
        with self._state:
            self._child = child
        _LIVE.add(self)
        threading.Thread(target=self._read, args=(child,), daemon=True, name=f"{title}-reader").start()
        log.info("stage worker process started", stage=self.name, device=self.device, pid=process.pid)

    def _end_child(self) -> None:
        """Kill (if needed), reap and forget the current child."""
        with self._state:
            child, self._child = self._child, None
            self._usable.clear()
        if child is None:
            return
        child.lost = True
        if child.process.is_alive():
            child.process.kill()
        child.process.join(10)
        child.conn.close()
        for call in child.calls.values():
            call.answer(error=WorkerCrashed(f"{self.name} worker process on {self.device} was ended"))
        self._free_arenas(child)
        child.process.close()

    # --- shared memory --------------------------------------------------------------------------
    def _pack(self, child: _Child, slot: int, items: list[ImageItem]) -> tuple[str | None, list[Any]]:
        """Copy the items' pixels into the slot's shared block; returns its name and where each image lies."""
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
        arena = self._arena(child, slot, offset)
        for start, data in blobs:
            arena.buf[start : start + len(data)] = data
        return arena.name, specs

    def _arena(self, child: _Child, slot: int, size: int) -> SharedMemory:
        with self._arena_lock:
            arena = child.arenas.get(slot)
            if arena is None or arena.size < size:
                old = 0 if arena is None else arena.size
                if arena is not None:
                    _release(arena)
                arena = child.arenas[slot] = SharedMemory(create=True, size=max(size, 2 * old, _MIN_ARENA))
            return arena

    def _free_arenas(self, child: _Child) -> None:
        """A lost or ended child's blocks (a new child cannot map them: their names are gone, see child._Arenas)."""
        with self._arena_lock:
            arenas, child.arenas = child.arenas, {}
        for arena in arenas.values():
            _release(arena)


def _release(arena: SharedMemory) -> None:
    arena.close()
    try:
        arena.unlink()
    except FileNotFoundError:  # the child removed the name once it had mapped the block (the usual case)
        pass


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _rebuild_error(reply: tuple[Any, ...]) -> BaseException:
    """The child's exception as itself where it unpickles, else a RuntimeError naming its type (OOM kept as OOM)."""
    _, _, payload, type_name, text, out_of_memory, trace = reply
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
