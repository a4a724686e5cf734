"""Structured logs: JSON lines under systemd/journald or when piped, readable console output in a terminal.

Under ``log.format: json`` every line binner's process writes must parse as JSON, models loaded or not. Three
kinds of writers would break that, and each is handled here:

- the standard library's ``logging`` and the ``warnings`` module (torchvision, transformers, ray): a handler
  on the root logger hands every record to structlog, so it is rendered like binner's own events;
- library banners and progress bars (Ultralytics' settings banner and "Loading ... for LiteRT inference",
  transformers' and huggingface_hub's progress bars): silenced through the switches those libraries read;
- native code and libraries that print to the file descriptors 1 and 2 themselves (TFLite's "Created ...
  XNNPACK delegate", Ultralytics' own stdout handler): :func:`capture_output` points fd 1 and 2 at pipes,
  and a thread re-emits each line that arrives there as a log event. binner's own output (results, progress
  bars, log lines) keeps writing to the original descriptors.

In a terminal (console format) the same capture keeps third-party lines from cutting through `once`'s and
`eval`'s progress bar: while a bar is shown (:func:`lines_above`), every line goes above it.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from stages.paths import shown

_real: dict[str, TextIO] = {}  # "stdout"/"stderr" -> a file on the original descriptor, once captured
_readers: list[threading.Thread] = []
_live_console: Any = None  # a rich Console showing a progress bar: log lines go above the bar
_state_lock = threading.Lock()
_json_lines = False
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
_NATIVE_INFO = re.compile(r"^(INFO|I\d{4}|Loading|Created)\b")


def wants_json(fmt: str, stream: TextIO) -> bool:
    if fmt != "auto":
        return fmt == "json"
    under_systemd = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    return under_systemd or not stream.isatty()


def fatal_json_line(message: str) -> str:
    """The error a command stops with, as one JSON log line (first line as the event, the rest as details)."""
    first, *rest = [shown(line) for line in message.splitlines()] or [""]
    return json.dumps({"level": "error", "event": first, "details": [line.strip() for line in rest] or None,
                       "fatal": True, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                      ensure_ascii=False)


def real_stream(name: str) -> TextIO:
    """The process's original stdout or stderr (``name``), also after :func:`capture_output` took fd 1 and 2."""
    return _real.get(name) or getattr(sys, name)


class _LineLogger:
    """structlog's output end: one rendered line to the original stream, or above a live progress bar."""

    def __init__(self, stream_name: str, fixed: TextIO | None) -> None:
        self._stream_name = stream_name
        self._fixed = fixed

    def msg(self, message: str) -> None:
        console = _live_console
        if console is not None and self._fixed is None:
            from rich.text import Text

            console.print(Text.from_ansi(message), soft_wrap=True, highlight=False, markup=False, emoji=False)
            return
        stream = self._fixed or real_stream(self._stream_name)
        with _state_lock:
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


class _ToStructlog(logging.Handler):
    """Every stdlib record (and, through ``captureWarnings``, every warning) becomes a structlog event."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.name == "py.warnings":
                message = _one_warning_line(message)
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            level = next((known for known in _LEVELS if record.levelno <= known), logging.CRITICAL)
            structlog.get_logger(record.name).log(level, message, **fields)
        except Exception:  # a log line must never take the pipeline down
            self.handleError(record)


def _one_warning_line(message: str) -> str:
    """'path:12: UserWarning: text\\n  source line' -> 'UserWarning: text (path:12)'."""
    first = message.strip().splitlines()[0] if message.strip() else message
    match = re.match(r"^(?P<where>.+?:\d+): (?P<what>.*)$", first)
    return f"{match['what']} ({match['where']})" if match else first


def quiet_libraries(json_lines: bool, level: int) -> None:
    """Switch off the banners and progress bars of the model libraries (read from the environment at import,
    so call this before they are imported; spawned model processes inherit it)."""
    if level > logging.DEBUG:
        os.environ.setdefault("YOLO_VERBOSE", "False")  # Ultralytics: settings banner, "Loading ... for LiteRT"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow/LiteRT native INFO and WARNING lines
    if json_lines:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        transformers_logging = sys.modules.get("transformers.utils.logging")
        if transformers_logging is not None:
            transformers_logging.disable_progress_bar()


# Ultralytics gives its logger a handler of its own on stdout and stops propagation at import; once imported, its
# lines are taken back to the root handler here (before import, the captured fd 1 turns them into events).
_SELF_HANDLED_LOGGERS = ("ultralytics",)


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Render binner's events, stdlib logging and warnings alike, as JSON or console lines on ``stream``
    (stdout by default; the CLI's one-shot commands pass stderr to keep stdout for their result)."""
    stream = stream or sys.stdout
    stream_name = "stderr" if stream in (sys.stderr, _real.get("stderr"), sys.__stderr__) else "stdout"
    fixed = None if stream in (sys.stdout, sys.stderr, *_real.values(), sys.__stdout__, sys.__stderr__) else stream
    numeric = getattr(logging, level.upper())
    json_lines = wants_json(fmt, stream)
    global _json_lines
    _json_lines = json_lines
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=False) if json_lines
                     else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            escape_names,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _LineLogger(stream_name, fixed),
        cache_logger_on_first_use=False,
    )
    quiet_libraries(json_lines, numeric)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    for name in _SELF_HANDLED_LOGGERS:  # libraries that print through their own handler once imported
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            library.removeHandler(handler)
        library.propagate = True
        library.setLevel(logging.NOTSET)  # its own level (ERROR when YOLO_VERBOSE=False) yields to the root's
    # Libraries (ultralytics, transformers, ray) are heard from at WARNING and above; binner's own at ``level``.
    root.setLevel(max(numeric, logging.WARNING))
    for own in ("app", "stages", "queues", "binner"):
        logging.getLogger(own).setLevel(numeric)
    # Re-installed on every call: after an earlier configuration (another command in the same process), the
    # warnings module's hook may have been swapped by someone else (a test runner's recorder, a library).
    logging.captureWarnings(False)
    logging.captureWarnings(True)


_MULTI_LINE_FIELDS = frozenset({"event", "exception", "stack"})  # messages and tracebacks keep their lines


def escape_names(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Every text of every event through ``shown``: a field that names a file (or an error message that does) can
    never put a terminal escape, a forged line or bytes that are not UTF-8 into the log, whoever logged it.
    Messages and tracebacks keep their lines (each line escaped); field values are one line."""
    for key, value in event.items():
        event[key] = _escaped(value, key in _MULTI_LINE_FIELDS)
    return event


def _escaped(value: Any, lines: bool = False, depth: int = 0) -> Any:
    if isinstance(value, str):
        return shown(value, lines=lines)
    if depth < 4 and isinstance(value, dict):
        return {_escaped(key, depth=depth + 1): _escaped(item, depth=depth + 1) for key, item in value.items()}
    if depth < 4 and isinstance(value, (list, tuple)):
        return [_escaped(item, depth=depth + 1) for item in value]
    return value


# Terminal colour and cursor sequences that libraries print natively (a coloured "INFO"): decoration, dropped from
# the lines relayed as events rather than shown as escapes.
_ANSI_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def capture_output() -> bool:
    """Point fd 1 and 2 at pipes whose lines come back as log events; binner keeps the original streams.

    Returns False (and changes nothing) where the streams are not real files, e.g. under a test runner.
    Idempotent; undone at exit, after the last captured lines are emitted.
    """
    if _real:
        return True
    try:
        targets = {"stdout": sys.stdout.fileno(), "stderr": sys.stderr.fileno()}
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    if targets != {"stdout": 1, "stderr": 2}:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    saved: dict[str, int] = {}
    for name, fd in targets.items():
        saved[name] = os.dup(fd)
        os.set_inheritable(saved[name], False)
        _real[name] = io.TextIOWrapper(io.BufferedWriter(io.FileIO(saved[name], "w", closefd=False)),
                                       encoding="utf-8", errors="replace", line_buffering=True, write_through=True)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        reader = threading.Thread(target=_relay, args=(read_end, name), name=f"binner-capture-{name}", daemon=True)
        reader.start()
        _readers.append(reader)
    atexit.register(_restore, saved)
    return True


_CONTINUES = re.compile(rb"^(\s|Traceback \(most recent call last\)|During handling of the above exception|The above "
                       rb"exception was the direct cause|\^+$|~+$)")
_EXCEPTION_LINE = re.compile(rb"^[\w.]+(Error|Exception|Exit|Interrupt|Warning)\b")


class _Lines:
    """Lines of a captured descriptor grouped into events: a traceback (its frames, source lines, ``^^^^`` markers,
    chained exceptions and the exception line) stays with the line that introduced it, so that a worker's trace
    arrives as one event, not one per line."""

    _CHAIN = (b"Traceback", b"During handling", b"The above")

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.in_trace = False  # inside a traceback's frames
        self.after_exception = False  # a traceback just ended: a chained one may follow, after a blank line

    def add(self, line: bytes) -> list[bytes]:
        """Take one line; returns the events it completes."""
        bare = line.rstrip()
        if not bare.strip():
            return [] if self.in_trace or self.after_exception else self.flush()
        if self.pending and bare.startswith(self._CHAIN) and (self.in_trace or self.after_exception or
                                                               bare.startswith(b"Traceback")):
            self.pending.append(bare)
            self.in_trace, self.after_exception = True, False
            return []
        if self.pending and self.in_trace and (_CONTINUES.match(bare) or _EXCEPTION_LINE.match(bare)):
            self.pending.append(bare)
            if not bare[:1].isspace() and not bare.startswith((b"^", b"~")):
                self.in_trace, self.after_exception = False, True  # the exception line ends this trace
            return []
        if self.pending and not self.after_exception and bare[:1].isspace():
            self.pending.append(bare)  # an indented continuation of a multi-line message
            return []
        done = self.flush()
        self.pending = [bare]
        self.in_trace = bare.startswith(b"Traceback")
        return done

    def flush(self) -> list[bytes]:
        done, self.pending = self.pending, []
        self.in_trace = self.after_exception = False
        return [b"\n".join(done)] if done else []


def _relay(read_end: int, name: str) -> None:
    """What arrives on a captured descriptor: with JSON logs, or while a progress bar is on screen, each line
    becomes one event (a traceback with its introducing line is one event; JSON lines from model processes pass
    unchanged); otherwise it passes through as written, so that a download's progress bar in a terminal keeps
    redrawing in place."""
    log = structlog.get_logger("binner.output")
    pending = b""
    lines = _Lines()
    with io.open(read_end, "rb", closefd=True) as pipe:
        while True:
            if lines.pending and not select.select([read_end], [], [], 0.2)[0]:
                for event in lines.flush():  # nothing more came: the group is complete
                    _emit_line(event, name, log)
                continue
            chunk = pipe.read1(65536)
            if not chunk:
                break
            if not _json_lines and _live_console is None:
                for event in lines.flush():
                    _emit_line(event, name, log)
                with _state_lock:
                    real = real_stream(name)
                    real.flush()
                    real.buffer.write(pending + chunk)
                    real.buffer.flush()
                pending = b""
                continue
            pending += chunk.replace(b"\r", b"\n")  # a carriage return (a bar redrawing) also ends a line
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                if raw.strip().startswith(b"{"):  # a JSON line (a model process's log) is an event of its own
                    for event in [*lines.flush(), raw]:
                        _emit_line(event, name, log)
                    continue
                for event in lines.add(raw):
                    _emit_line(event, name, log)
    for event in [*lines.add(pending), *lines.flush()] if pending else lines.flush():
        _emit_line(event, name, log)


def _emit_line(raw: bytes, name: str, log: Any) -> None:
    line = _ANSI_SEQUENCE.sub("", raw.decode("utf-8", errors="replace")).strip("\n").rstrip()
    if not line.strip():
        return
    line = line if "\n" in line else line.strip()
    if line.startswith("{") and _is_json_object(line):
        with _state_lock:
            real_stream(name).write(line + "\n")
            real_stream(name).flush()
        return
    # stdout carries banners and progress; stderr is a warning unless it says it is informational.
    quiet = name == "stdout" or _NATIVE_INFO.match(line) is not None
    (log.info if quiet else log.warning)(line, source=name)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _restore(saved: dict[str, int]) -> None:
    """At exit: flush, give fd 1 and 2 back (closing the pipes' last write ends), let the readers finish."""
    for name in ("stdout", "stderr"):
        try:
            getattr(sys, name).flush()
        except (OSError, ValueError):
            pass
    for name, fd in (("stdout", 1), ("stderr", 2)):
        os.dup2(saved[name], fd)
    for reader in _readers:
        reader.join(timeout=1.0)


@contextmanager
def lines_above(console: Any) -> Iterator[None]:
    """While ``console`` shows a live progress bar, log lines print above it instead of cutting through it."""
    global _live_console
    previous, _live_console = _live_console, console
    try:
        yield
    finally:
        _live_console = previous
