"""Opening input paths without following a symbolic link in any component (the input root is a boundary), and
showing names to people (``shown``).

Light on purpose (``os`` and ``re`` only): the loader, the intake, the engine and the writer all open inputs this
way, and commands such as ``binner status`` must not pay for the loader's imaging libraries.
"""

from __future__ import annotations

import errno
import os
import re
from typing import overload

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


# What a name may hold that must never reach a terminal, a log line or JSON as it is: C0 controls (ESC starts
# terminal escape sequences, CR rewrites the line, NUL, BEL...), DEL, C1 controls (U+0080-U+009F; 8-bit CSI), the
# line and paragraph separators, and the bidirectional overrides that make a name read differently ("Trojan Source").
_SEPARATORS_AND_BIDI = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_CHARS = re.compile(f"[\x00-\x1f\x7f-\x9f{_SEPARATORS_AND_BIDI}]")
_UNSAFE_KEEPING_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_SEPARATORS_AND_BIDI}]")  # \t and \n stay


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


@overload
def shown(text: None, *, lines: bool = False) -> None: ...
@overload
def shown(text: str | os.PathLike[str], *, lines: bool = False) -> str: ...
def shown(text: str | os.PathLike[str] | None, *, lines: bool = False) -> str | None:
    """A name (or a message naming one) safe to print, log, store as text or put in JSON: bytes that are not UTF-8
    appear as ``\\xff``, control characters as ``\\x1b`` (``\\u202e`` above U+00FF), everything else as it is.

    Linux names are bytes and may hold anything but ``/`` and NUL; printed raw they can move the cursor, recolour or
    clear a terminal, forge log lines, or make JSON invalid UTF-8. ``lines=True`` keeps newlines and tabs, for
    multi-line messages (tracebacks, configuration errors) whose lines are each escaped. The result holds only
    printable characters (and backslashes), so escaping twice changes nothing.
    """
    if text is None:
        return None
    text = os.fspath(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes of a name that is not UTF-8
        try:
            text = os.fsencode(text).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that no file name produced
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return (_UNSAFE_KEEPING_LINES if lines else _UNSAFE_CHARS).sub(_escape, text)
