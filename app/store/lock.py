"""One writer per state directory: an exclusive ``flock`` on ``STATE/binner.lock``.

Two processes writing one ledger undo each other's work: the second one returns the first one's in-flight
rows to pending, both place them, and the loser records files it never saw as vanished. Every command that
writes the ledger (``run``, ``once``, ``rebin``, ``eval --state``) therefore holds this lock for its whole
life; ``status``, ``explain`` and ``rebin --dry-run`` read the ledger read-only and need no lock.

``flock`` (not a PID file) because the kernel drops the lock when the holder dies, ``kill -9`` included, so
a crash never leaves a stale lock behind. The holder writes its PID and command into the file only so that
the refused process can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from app.config import ConfigError

LOCK_NAME = "binner.lock"


class StateDirLocked(ConfigError):
    """Another process holds the state directory; the message names its PID and what to do."""


class InstanceLock:
    """The exclusive lock of one state directory, held from :meth:`acquire` to :meth:`release` (or exit)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str) -> InstanceLock:
        """Take the lock without waiting, or raise :class:`StateDirLocked` naming the holder's PID."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as error:
            raise ConfigError(
                f"state_dir: cannot create the lock file {self.path}: {error.strerror}; make {self.state_dir} "
                "writable by this user, or point state_dir (--state) at a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"state_dir: cannot lock {self.path}: {error.strerror}") from None
            raise StateDirLocked(
                f"state_dir {self.state_dir} is in use by another binner process ({holder}): only one process may "
                f"write its ledger; stop that process first, or give this one its own state_dir (--state)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} binner {command}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor of this open file releases the flock


def _read_holder(fd: int) -> str:
    """'PID 1234, `binner run`' from the lock file, or what is known when the holder has not written yet."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "PID unknown: it is starting up"
    return f"PID {pid}, `{command}`" if command else f"PID {pid}"
