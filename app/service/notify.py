"""systemd notification (``sd_notify``) in plain stdlib, so the daemon can talk to systemd without a C library.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` and waits for ``READY=1`` before it calls the unit started;
with ``WatchdogSec=`` it also sets ``WATCHDOG_USEC`` and kills the service when ``WATCHDOG=1`` stops arriving.
Outside systemd (a terminal, ``binner once``, tests) ``NOTIFY_SOCKET`` is unset and every call is a no-op.

Sending never raises: a notification that cannot be delivered must not take the pipeline down. The first
failure is logged once (systemd will then act on the missing READY/WATCHDOG itself, which is the right outcome).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_SEND_TIMEOUT_S = 2.0


def _address(raw: str) -> str | bytes | None:
    """Turn ``NOTIFY_SOCKET`` into a ``sendto`` address: a path, or ``@name`` for the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock:... and other transports are not used by binner's units


class SystemdNotifier:
    """Sends ``sd_notify`` datagrams to the socket named by ``NOTIFY_SOCKET`` (read once, at construction).

    Thread-safe: the engine's watchdog task and the signal handlers may notify concurrently.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ if environ is None else environ)
        self._raw_socket = env.get("NOTIFY_SOCKET", "")
        self._address = _address(self._raw_socket) if self._raw_socket else None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._failure_logged = False
        if self._raw_socket and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @abstract name; notifications are off",
                        self._raw_socket)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket (``Type=notify`` or ``NotifyAccess``)."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; returns whether it was delivered (False when disabled)."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A full receive queue (systemd busy) blocks a datagram send: bound it, callers may be on
                    # the event loop.
                    self._socket.settimeout(_SEND_TIMEOUT_S)
                self._socket.sendto(payload, self._address)
                return True
            except OSError as error:
                if not self._failure_logged:
                    self._failure_logged = True
                    log.warning("cannot notify systemd at NOTIFY_SOCKET=%s (%s); further failures are not logged",
                                self._raw_socket, error)
                return False

    def ready(self, status: str | None = None) -> bool:
        """Models are loaded and warm: systemd now reports the unit active and ``systemctl start`` returns."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """Free-form one-line state shown by ``systemctl status`` (``StatusText``)."""
        return self.notify(f"STATUS={' '.join(text.splitlines())}")

    def watchdog(self) -> bool:
        """Keep-alive: send only while the pipeline makes progress, so a wedged pipeline gets restarted."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """A stop (SIGTERM) was received and the drain begins."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """A reload (SIGHUP) began; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` lets ``Type=notify-reload`` (systemd >= 253) match the reload to this message;
        older managers ignore the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the start/stop timeout fires (slow model downloads, long drains)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout in seconds (ping at about half of it), or None when no watchdog applies.

        Like ``sd_watchdog_enabled``: ``WATCHDOG_PID``, when set, must name this process, because a child
        that inherited the environment must not believe it is the one being watched.
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        """Release the socket; later notifications reopen it."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


@contextmanager
def start_timeout_extended(notifier: SystemdNotifier | None, every_s: float = 20.0) -> Iterator[None]:
    """While the block runs, keep asking systemd for more start-up time (``EXTEND_TIMEOUT_USEC``), so that a
    first start that downloads weights is not killed by ``TimeoutStartSec``; a no-op outside systemd."""
    if notifier is None or not notifier.enabled:
        yield
        return
    done = threading.Event()

    def extend() -> None:
        while True:
            notifier.extend_timeout(every_s * 3)  # overlapping extensions: one late ping is harmless
            if done.wait(every_s):
                return

    pinger = threading.Thread(target=extend, name="binner-extend-start-timeout", daemon=True)
    pinger.start()
    try:
        yield
    finally:
        done.set()
        pinger.join(timeout=2.0)
