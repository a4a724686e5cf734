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


class _Arena:
    """The parent's shared-memory block, attached once per name (the parent makes a bigger one when needed).

    Once mapped here, the name is removed: the memory lives while the two processes map it, and nothing is left
    in /dev/shm even when the whole process group is SIGKILLed (systemd's final kill).
    """

    def __init__(self) -> None:
        self.block: SharedMemory | None = None
        self.name: str | None = None

    def view(self, name: str) -> memoryview:
        if self.block is None or self.name != name:
            self.close()
            self.block = SharedMemory(name=name)
            self.name = name
            self.block.unlink()
        return self.block.buf

    def close(self) -> None:
        if self.block is not None:
            self.block.close()
            self.block = None


def _rebuild(items: list[ImageItem], images: list[Any], arena: _Arena, name: str | None) -> None:
    from PIL import Image

    buffer = arena.view(name) if name else None
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


def _error_record(error: BaseException) -> tuple[Any, ...]:
    text = "".join(traceback.format_exception(error))
    try:
        payload: bytes | None = pickle.dumps(error)
        pickle.loads(payload)
    except Exception:
        payload = None
    return ("error", payload, type(error).__name__, str(error), is_out_of_memory(error), text)


def child_main(conn: Connection, stage: Stage, parent_pid: int, title: str, log_level: str) -> None:
    """Serve the parent's calls until it says teardown or the pipe closes; each call answers once."""
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
    arena = _Arena()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            command = message[0]
            try:
                if command == "setup":
                    stage.setup(message[1])
                    result: Any = None
                elif command == "probe":
                    result = stage.probe_batch_size(message[1], message[2])
                elif command == "warmup":
                    stage.warmup()
                    result = None
                elif command == "batch":
                    _, name, items, images = message
                    _rebuild(items, images, arena, name)
                    done = stage.process_batch(items)  # its length is checked by the engine's containment
                    result = [(i.signals, i.timings, i.failure, i.image is None) for i in done]
                    for item in items:
                        item.image = None
                elif command == "teardown":
                    stage.teardown()
                    channel.send(("ok", None))
                    return
                else:
                    raise RuntimeError(f"unknown command {command!r}")
            except BaseException as error:  # noqa: BLE001 - every failure goes back to the parent as a record
                channel.send(_error_record(error))
                continue
            channel.send(("ok", result))
    finally:
        arena.close()
        sys.stdout.flush()
