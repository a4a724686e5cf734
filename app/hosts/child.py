"""The child side of a process-isolated stage: one spawned process that owns one stage replica and its device.

It never outlives the daemon: ``PR_SET_PDEATHSIG`` asks the kernel for SIGKILL when the parent dies (even by
``kill -9``), and a watcher thread checks the parent's PID once a second where that is not available. Pixels
arrive through shared memory (``app.hosts.process`` writes them); only small records go through the pipe.
Log events, structlog's and the standard library's, are sent to the parent, which logs them with the stage
and device attached.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import structlog

from stages.base import ImageItem, Stage, is_out_of_memory

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int | bytes) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the daemon dies; exit now if it already has (it died before prctl)."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os._exit(70)

    def watch() -> None:  # fallback where prctl is missing, or the spawning thread exits before the process
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Channel:
    """The pipe to the parent; a lock because log events may come from any thread of the child."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)


def _plain(value: Any) -> Any:
    """A log field the parent can unpickle without this child's classes."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _forward_logs(channel: _Channel, level: str) -> None:
    """structlog and stdlib logging in the child both end up as ("log", level, event, fields) on the pipe."""

    def send(_logger: Any, method: str, event_dict: dict[str, Any]) -> Any:
        event = str(event_dict.pop("event", ""))
        event_dict.pop("level", None)
        channel.send(("log", method, event, _plain(event_dict)))
        raise structlog.DropEvent

    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.format_exc_info, send],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                channel.send(("log", record.levelname.lower(), record.getMessage(), {"logger": record.name}))
            except Exception:  # never let logging break a model call
                pass

    root = logging.getLogger()
    root.handlers[:] = [Handler()]
    root.setLevel(max(numeric, logging.WARNING))


class _Arenas:
    """The parent's shared-memory blocks, one per in-flight slot, each attached once per name (the parent makes a
    bigger one when a batch needs it).

    Once mapped here, a name is removed: the memory lives while the two processes map it, and nothing is left in
    /dev/shm even when the whole process group is SIGKILLed (systemd's final kill).
    """

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[str, SharedMemory]] = {}
        self.lock = threading.Lock()

    def view(self, slot: int, name: str) -> memoryview:
        with self.lock:
            held = self.blocks.get(slot)
            if held is None or held[0] != name:
                if held is not None:
                    held[1].close()
                block = SharedMemory(name=name)
                block.unlink()
                self.blocks[slot] = held = (name, block)
            return held[1].buf

    def close(self) -> None:
        with self.lock:
            for _, block in self.blocks.values():
                block.close()
            self.blocks.clear()


def _rebuild(items: list[ImageItem], images: list[Any], arenas: _Arenas, slot: int, name: str | None) -> None:
    from PIL import Image

    buffer = arenas.view(slot, name) if name else None
    for item, spec in zip(items, images):
        if spec is None:
            item.image = None
        elif spec[0] == "pil":
            _, offset, length, mode, size = spec
            assert buffer is not None
            with buffer[offset : offset + length] as view:  # released at once: the block may be closed later
                item.image = Image.frombytes(mode, tuple(size), view)
        elif spec[0] == "array":
            import numpy as np

            _, offset, length, dtype, shape = spec
            assert buffer is not None
            with buffer[offset : offset + length] as view:
                item.image = np.frombuffer(view, dtype=dtype).reshape(shape).copy()
        else:
            item.image = spec[1]


def _error_record(call_id: int, error: BaseException) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(error))
    try:
        payload: bytes | None = pickle.dumps(error)
        pickle.loads(payload)
    except Exception:
        payload = None
    return ("error", call_id, payload, type(error).__name__, str(error), is_out_of_memory(error), text)


class _PhaseReports:
    """The replica's phase timings, sent to the parent (it counts busy time and host seconds)."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel

    def device_started(self) -> None:
        self.channel.send(("phase", "device", "start", 0.0))

    def device_finished(self, seconds: float) -> None:
        self.channel.send(("phase", "device", "end", seconds))

    def host_finished(self, phase: str, seconds: float) -> None:
        self.channel.send(("phase", phase, "end", seconds))


def child_main(conn: Connection, stage: Stage, parent_pid: int, title: str, log_level: str,
               concurrency: int = 1) -> None:
    """Serve the parent's calls until it says teardown or the pipe closes; each call answers once.

    Batches run on ``concurrency`` threads through ``PhasedReplica`` (host phases overlap device calls); setup,
    probe, warmup and teardown run in order as they arrive.
    """
    from app.hosts.phased import PhasedReplica

    die_with_parent(parent_pid)
    _prctl(PR_SET_NAME, title.encode()[:15])
    # Ctrl-C reaches the whole process group, and a `kill` of the group sends SIGTERM to all: the daemon
    # drains and then ends its children itself (SIGKILL still works, and the parent-death signal).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Model libraries print to stdout (Ultralytics: "Loading ..."); the parent's stdout may be a report
    # (`binner bench --json`), so the child's stdout goes where its stderr goes.
    sys.stdout.flush()
    os.dup2(2, 1)
    channel = _Channel(conn)
    _forward_logs(channel, log_level)
    arenas = _Arenas()
    replica: PhasedReplica | None = None
    batches = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="batch")

    def run_batch(call_id: int, slot: int, name: str | None, items: list[ImageItem], images: list[Any]) -> None:
        try:
            assert replica is not None, "a batch before setup"
            _rebuild(items, images, arenas, slot, name)
            done = replica.run(items)  # its length is checked by the engine's containment
            # Everything a stage may change on an item but its pixels: the signals, what it chose not to compute
            # (the vision stage's skips), timings, a failure, and whether it dropped the image.
            result = [(i.signals, i.not_computed, i.timings, i.failure, i.image is None) for i in done]
            for item in items:
                item.image = None
        except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent as a record
            channel.send(_error_record(call_id, error))
            return
        channel.send(("ok", call_id, result))

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            command, call_id = message[0], message[1]
            if command == "batch":
                batches.submit(run_batch, call_id, *message[2:])
                continue
            try:
                if command == "setup":
                    replica = PhasedReplica(stage, message[2], _PhaseReports(channel))
                    replica.setup()
                    result: Any = None
                elif command == "probe":
                    assert replica is not None, "probe before setup"
                    result = replica.probe_batch_size(message[3])
                elif command == "warmup":
                    assert replica is not None, "warmup before setup"
                    replica.warmup()
                    result = None
                elif command == "teardown":
                    batches.shutdown(wait=True)
                    if replica is not None:
                        replica.teardown()
                    channel.send(("ok", call_id, None))
                    return
                else:
                    raise RuntimeError(f"unknown command {command!r}")
            except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent as a record
                channel.send(_error_record(call_id, error))
                continue
            channel.send(("ok", call_id, result))
    finally:
        arenas.close()
        sys.stdout.flush()
