"""Intake: which files under the input root are complete and ready, and getting them into the ledger.

A file is taken once it is complete: its mtime is at least ``settle`` old (it arrived by rename, or was
written a while ago), or its size and mtime stayed the same for ``settle``. Watch events are a hint; a
startup scan and periodic rescans find anything the watcher missed.
"""

from __future__ import annotations

import os
import stat as stat_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from app.ledger import Discovered, Ledger, Row

log = structlog.get_logger("binner.intake")

TEMP_SUFFIXES = (".part", ".tmp", "~", ".crdownload", ".partial", ".swp", ".download")


def is_candidate_name(name: str) -> bool:
    """Hidden and temporary files are never taken (writers use them before renaming into place)."""
    return not name.startswith(".") and not name.endswith(TEMP_SUFFIXES)


@dataclass(frozen=True)
class Observation:
    path: Path
    size: int
    mtime_ns: int


def observe(root: Path, root_real: Path, path: Path) -> Observation | None:
    """Stat ``path`` if it is a candidate regular file inside ``root`` (symlinks only when they stay inside)."""
    try:
        relative = path.relative_to(root)
    except ValueError:
        return None
    if any(not is_candidate_name(part) for part in relative.parts):
        return None
    try:
        st = path.lstat()
        if stat_module.S_ISLNK(st.st_mode):
            if not path.resolve().is_relative_to(root_real):
                return None
            st = path.stat()
    except OSError:
        return None
    if not stat_module.S_ISREG(st.st_mode):
        return None
    return Observation(path, st.st_size, st.st_mtime_ns)


def scan(root: Path) -> list[Observation]:
    """Every candidate regular file under ``root``; symlinked directories are not entered."""
    root_real = root.resolve()
    found: list[Observation] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError) as error:
            log.warning("cannot list a directory under the input", directory=str(directory), error=str(error))
            continue
        for entry in entries:
            if not is_candidate_name(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
            except OSError:
                continue
            seen = observe(root, root_real, Path(entry.path))
            if seen is not None:
                found.append(seen)
    found.sort(key=lambda o: o.path)
    return found


def to_discovered(root: Path, seen: Observation) -> Discovered:
    return Discovered(str(seen.path.absolute()), seen.path.relative_to(root).as_posix(), seen.size, seen.mtime_ns)


class SettleTracker:
    """Holds files that are still being written until their size and mtime stop changing."""

    def __init__(self, root: Path, settle_s: float) -> None:
        self.root = root.absolute()  # watch events name absolute paths
        self.root_real = root.resolve()
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


def finish_leftovers(ledger: Ledger, rows: list[Row], move_mode: bool, remove_source: Callable[..., bool]) -> tuple[int, int]:
    """Finished rows whose input is still present with the same size and mtime.

    In move mode that is a crash between the durable ledger row and the removal of the input: the output
    is already placed, so the input is removed (never placed twice). If the output went missing, the file
    is processed again. In copy/hardlink mode inputs stay by design: nothing to do.
    Returns (removed, requeued).
    """
    removed = requeued = 0
    if not move_mode:
        return removed, requeued
    for row in rows:
        if row.output_path and Path(row.output_path).exists():
            try:
                if remove_source(Path(row.path), Path(row.output_path), row.sha256):
                    removed += 1
                    log.info("input already placed before a restart; removed the leftover", file=row.path,
                             output=row.output_path)
                else:
                    ledger.requeue(row.id)
                    requeued += 1
            except FileNotFoundError:
                pass
        else:
            ledger.requeue(row.id)
            requeued += 1
    return removed, requeued
