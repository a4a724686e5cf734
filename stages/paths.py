"""Opening input paths without following a symbolic link in any component (the input root is a boundary).

Light on purpose (``os`` only): the loader, the intake, the engine and the writer all open inputs this way, and
commands such as ``binner status`` must not pay for the loader's imaging libraries.
"""

from __future__ import annotations

import errno
import os

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)


def open_parent_no_symlinks(path: str) -> tuple[int, str]:
    """A descriptor of ``path``'s directory, reached from ``/`` one component at a time with ``O_NOFOLLOW``,
    and the last component's name. Any symlink on the way fails with ELOOP or ENOTDIR, so a directory swapped
    for a link (leading out of the input) is never walked through. Close the descriptor when done.
    """
    if not os.path.isabs(path):
        path = os.path.abspath(path)
    parts = [part for part in path.split(os.sep) if part]
    if not parts:
        raise IsADirectoryError(errno.EISDIR, "not a file", path)
    *parents, name = parts
    fd = os.open(os.sep, _DIR_FLAGS)
    try:
        for part in parents:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def open_no_symlinks(path: str, flags: int = os.O_RDONLY) -> int:
    """``os.open`` that follows no symlink in any component of ``path`` (ELOOP/ENOTDIR instead).

    The input root is a security boundary: a file replaced by a link, or a directory replaced by a link after
    the file was taken, must not make binner read (or place, or delete) something outside it.
    """
    parent, name = open_parent_no_symlinks(path)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)


def lstat_no_symlinks(path: str) -> os.stat_result:
    """``os.lstat`` of ``path``, reached without following a symlink in any directory on the way."""
    parent, name = open_parent_no_symlinks(path)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)
