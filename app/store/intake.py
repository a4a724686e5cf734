"""Intake: which files under the input root are complete and ready, and getting them into the ledger.

A file is taken once it is complete: its mtime is at least ``settle`` old (it arrived by rename, or was
written a while ago), or its size and mtime stayed the same for ``settle``. Watch events are a hint; a
startup scan and periodic rescans find anything the watcher missed.

The input root is a security boundary. Symbolic links under it are never followed and never taken, whether
they name a file or a directory, inside the root or outside it: each is skipped with a logged reason (once per
path). Paths are recorded under the root's real path, so that every later open can refuse a symlink in any
component of the path (``stages.loader.open_no_symlinks``): a directory swapped for a link after intake leads
nowhere. Watch events from inside a linked directory (the watcher follows them) are dropped the same way.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import structlog

from app.store.ledger import Discovered, Finished, Ledger, shown
from stages.paths import lstat_no_symlinks

log = structlog.get_logger("binner.intake")

TEMP_SUFFIXES = (".part", ".tmp", "~", ".crdownload", ".partial", ".swp", ".download")
SCAN_CHUNK = 1000
_REPORTED_LIMIT = 10_000
_reported_links: set[str] = set()


def is_candidate_name(name: str) -> bool:
    """Hidden and temporary files are never taken (writers use them before renaming into place)."""
    return not name.startswith(".") and not name.endswith(TEMP_SUFFIXES)


@dataclass(frozen=True)
class Observation:
    """A candidate regular file: ``path`` as the watcher or scan named it, ``real`` under the root's real path."""

    path: Path
    rel_path: str
    size: int
    mtime_ns: int
    inode: int | None = None
    ctime_ns: int | None = None
    real: str = ""
    seen_at: float | None = None  # wall time just before the stat: what the ledger has recorded since is newer


def _skip_link(path: str, why: str) -> None:
    """Log a skipped symlink once per path (rescans would repeat it forever)."""
    if path in _reported_links:
        return
    if len(_reported_links) < _REPORTED_LIMIT:
        _reported_links.add(path)
    log.warning("skipping a symbolic link under the input: binner never follows links; put the file itself there",
                file=shown(path), detail=why)


def _observation(path: Path, rel_path: str, real: str, st: os.stat_result, seen_at: float) -> Observation:
    return Observation(path, rel_path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, real, seen_at)


def observe(root: Path, root_real: Path, path: Path) -> Observation | None:
    """Stat ``path`` if it is a candidate regular file inside ``root`` reached without any symlink."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    if not relative.parts or any(not is_candidate_name(part) for part in relative.parts):
        return None
    real = os.path.join(root_real, *relative.parts)
    seen_at = time.time()
    try:
        st = lstat_no_symlinks(real)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):  # a linked directory on the way: outside, or not ours
            _skip_link(str(path), "a directory on its path is a symbolic link")
        return None
    if stat_module.S_ISLNK(st.st_mode):
        _skip_link(str(path), "the file is a symbolic link")
        return None
    if not stat_module.S_ISREG(st.st_mode):
        return None
    return _observation(path, relative.as_posix(), real, st, seen_at)


def iter_scan(root: Path, chunk: int = SCAN_CHUNK) -> Generator[list[Observation], None, None]:
    """Every candidate regular file under ``root``, in chunks of at most ``chunk`` (memory stays flat).

    Directories are listed with ``os.scandir`` and entered only when they are real directories; symlinks
    (to files, to directories, loops) are skipped with a logged reason and never resolved.
    """
    root = root.absolute()
    root_real = Path(os.path.realpath(root))
    found: list[Observation] = []
    stack: list[tuple[str, str]] = [(str(root_real), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as error:
            log.warning("cannot list a directory under the input", directory=shown(directory), error=str(error))
            continue
        subdirectories: list[tuple[str, str]] = []
        for entry in entries:
            if not is_candidate_name(entry.name):
                continue
            rel = f"{prefix}{entry.name}"
            try:
                if entry.is_symlink():
                    _skip_link(str(root / rel), "the entry is a symbolic link")
                    continue
                if entry.is_dir(follow_symlinks=False):
                    subdirectories.append((entry.path, rel + "/"))
                    continue
                seen_at = time.time()
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat_module.S_ISREG(st.st_mode):
                found.append(_observation(root / rel, rel, entry.path, st, seen_at))
                if len(found) >= chunk:
                    yield found
                    found = []
        stack.extend(reversed(subdirectories))
    if found:
        yield found


def scan(root: Path) -> list[Observation]:
    """Every candidate regular file under ``root`` (see ``iter_scan``), as one list."""
    return [seen for part in iter_scan(root) for seen in part]


def to_discovered(root: Path, seen: Observation) -> Discovered:
    """The ledger's view of an observation: the path under the root's real path, and the file's identity."""
    path = seen.real or os.path.join(os.path.realpath(root), seen.rel_path)
    return Discovered(path, seen.rel_path, seen.size, seen.mtime_ns, seen.inode, seen.ctime_ns, seen.seen_at)


class SettleTracker:
    """Holds files that are still being written until their size and mtime stop changing."""

    def __init__(self, root: Path, settle_s: float) -> None:
        self.root = root.absolute()  # watch events name absolute paths
        self.root_real = Path(os.path.realpath(root))  # never raises, even for a loop
        self.settle_s = settle_s
        self._watching: dict[Path, tuple[int, int, float]] = {}

    def __len__(self) -> int:
        return len(self._watching)

    def offer(self, observations: list[Observation]) -> list[Discovered]:
        """Settled files among ``observations`` now; the rest are watched until they settle."""
        ready: list[Discovered] = []
        now_wall_ns, now = time.time_ns(), time.monotonic()
        for seen in observations:
            if now_wall_ns - seen.mtime_ns >= self.settle_s * 1e9:
                if self._watching:
                    self._watching.pop(seen.path, None)
                ready.append(to_discovered(self.root, seen))
                continue
            previous = self._watching.get(seen.path)
            if previous is None or previous[:2] != (seen.size, seen.mtime_ns):
                self._watching[seen.path] = (seen.size, seen.mtime_ns, now)
            elif now - previous[2] >= self.settle_s:
                self._watching.pop(seen.path, None)
                ready.append(to_discovered(self.root, seen))
        return ready

    def next_due_s(self) -> float | None:
        """Seconds until the earliest watched file may have settled (None when nothing is watched).

        Lets the daemon look again exactly then instead of polling every settle_ms/2: a file then waits
        ``settle_ms``, not ``settle_ms`` plus up to half a polling period.
        """
        if not self._watching:
            return None
        now_wall_ns, now = time.time_ns(), time.monotonic()
        due = min(
            min((mtime_ns + self.settle_s * 1e9 - now_wall_ns) / 1e9, first_seen + self.settle_s - now)
            for _, mtime_ns, first_seen in self._watching.values()
        )
        return max(0.0, due)

    def hint(self, path: Path) -> list[Discovered]:
        """A watch event for ``path``: look at it now."""
        seen = observe(self.root, self.root_real, path)
        if seen is None:
            self._watching.pop(path, None)
            return []
        return self.offer([seen])

    def poll(self) -> list[Discovered]:
        """Re-examine every file still settling."""
        observations = []
        for path in list(self._watching):
            seen = observe(self.root, self.root_real, path)
            if seen is None:
                self._watching.pop(path, None)
            else:
                observations.append(seen)
        return self.offer(observations)


def finish_leftovers(ledger: Ledger, rows: list[Finished], move_mode: bool,
                     remove_source: Callable[..., bool]) -> tuple[int, int]:
    """Finished rows whose input is still present with the same identity.

    In move mode that is a crash between the durable ledger row and the removal of the input: the output
    is already placed, so the input is removed (never placed twice). If the input now holds other content,
    it is a new generation (a new row; the old row keeps describing its output). If the output went missing,
    the file is processed again. In copy/hardlink mode inputs stay by design: nothing to do.
    Returns (removed, requeued).
    """
    removed = requeued = 0
    if not move_mode:
        return removed, requeued
    for row in rows:
        if row.output_path and os.path.lexists(row.output_path):
            try:
                if remove_source(Path(row.path), Path(row.output_path), row.sha256):
                    removed += 1
                    log.info("input already placed before a restart; removed the leftover", file=shown(row.path),
                             output=shown(row.output_path))
                else:
                    ledger.new_generation(row.id)
                    requeued += 1
            except FileNotFoundError:
                pass
        else:
            ledger.requeue(row.id)
            requeued += 1
    return removed, requeued


def prune_empty_dirs(root: Path) -> int:
    """Remove the directories under ``root`` that a move-mode run left empty (deepest first); returns how many.

    ``root`` itself stays. Links are never followed (``os.walk`` does not descend into them) and a directory
    that is not empty, holds hidden files, or gains a file meanwhile is kept: ``rmdir`` removes only empty ones.
    """
    removed = 0
    for current, _dirs, _files in os.walk(root, topdown=False, followlinks=False):
        if current == str(root):
            continue
        try:
            os.rmdir(current)
            removed += 1
        except OSError:
            continue
    return removed
