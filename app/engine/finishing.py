"""What happens to an item at the end of the pipeline: the rules decide its bin, the writer places it (or
quarantines it), the outcome for the ledger says so, and once that is recorded the input goes (move mode).
Shared by the local engine's sink and the Ray engine.

Placement refusals are sorted here: a refusal of the whole output (full, read-only, I/O error, or an output root
that cannot be written) pauses placement; a refusal of one path fails that item with a reason and the rest flows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from app.metrics import Metrics
from app.store import Outcome, Placer, Row, SourceError, shown
from stages.base import ImageItem
from stages.paths import lstat_no_symlinks
from stages.rules import RuleThresholds, decide

log = structlog.get_logger("binner.engine")

# Refusals that concern the whole output (every file would fail the same way): placement pauses and retries.
WHOLE_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
# Refusals that usually concern one path (a protected directory, a link leading out of the output root): that
# file fails with a reason and the rest flows; they pause placement only when the output root itself refuses.
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
DISK_ERRNOS = WHOLE_OUTPUT_ERRNOS | PATH_ERRNOS  # kept for callers that test for any disk refusal
Identity = tuple[int, int, int, int]


def _same_identity(row: Row, current: Identity) -> bool:
    """Size and mtime, and inode and ctime where the row knows them (rows from older ledgers may not)."""
    stored = (row.size, row.mtime_ns, row.inode, row.ctime_ns)
    return all(known is None or known == now for known, now in zip(stored, current, strict=True))


class PlacementBlocked(Exception):
    """The output disk refused a write (full, read-only, no permission): placement pauses and retries."""

    def __init__(self, error: OSError, remaining: list[ImageItem]) -> None:
        super().__init__(str(error))
        self.error = error
        self.remaining = remaining


class PlacementPause:
    """A refused output write pauses placement and tries again after a wait that doubles while it keeps failing (1 s
    up to 30 s); one placement that succeeds ends the pause. The same for both engines' sinks."""

    FIRST_S, LONGEST_S = 1.0, 30.0

    def __init__(self) -> None:
        self.wait_s = self.FIRST_S
        self.paused = False

    def blocked(self, error: str, **context: Any) -> float:
        """Say that placement pauses, and why; the seconds to wait before trying again."""
        wait, self.paused = self.wait_s, True
        log.error("placement paused: the output directory refused a write; will retry", error=error, retry_in_s=wait,
                  **context)
        self.wait_s = min(wait * 2, self.LONGEST_S)
        return wait

    def placed(self) -> bool:
        """A placement went through: True when that ends a pause (said in the log)."""
        ended, self.paused, self.wait_s = self.paused, False, self.FIRST_S
        if ended:
            log.info("placement resumed")
        return ended


class Finisher:
    """Rules + placement for finished items; runs on the sink thread (or a Ray worker), never on the event loop."""

    def __init__(self, placer: Placer | None, thresholds: RuleThresholds, max_attempts: int,
                 metrics: Metrics | None = None) -> None:
        self.placer = placer
        self.thresholds = thresholds
        self.max_attempts = max_attempts
        self.metrics = metrics

    def place_batch(self, pairs: list[tuple[Row, ImageItem]]) -> tuple[list[tuple[Row, Outcome]], OSError | None, int]:
        """Decide and place each item in order; returns the outcomes, and the refusal of the whole output with
        the index where placement stopped (None and ``len(pairs)`` when every item went through)."""
        finished: list[tuple[Row, Outcome]] = []
        for index, (row, item) in enumerate(pairs):
            try:
                outcome = self.finish_one(row, item)
            except SourceError as error:  # the input, not the output disk: retry this file alone
                outcome = self.item_failed(row, item, "unreadable", f"reading the input failed: {error}")
            except OSError as error:
                if self.refuses_whole_output(error):
                    return finished, error, index
                code = errno.errorcode.get(error.errno or 0, "error")
                if self.metrics is not None:
                    self.metrics.placement_errors.labels(error=code).inc()
                log.warning("placement refused for one file; the others go on", file=row.shown_path,
                            error=shown(str(error)))
                outcome = self.item_failed(row, item, "output_refused", f"placement failed: {error}")
            finished.append((row, outcome))
        return finished, None, len(pairs)

    def refuses_whole_output(self, error: OSError) -> bool:
        """ENOSPC, EDQUOT, EROFS, EIO; EACCES/EPERM only when the output root itself cannot be written."""
        if error.errno in WHOLE_OUTPUT_ERRNOS:
            return True
        if error.errno in PATH_ERRNOS and self.placer is not None:
            root = self.placer.output_root
            return not os.access(root, os.W_OK | os.X_OK)
        return False

    def item_failed(self, row: Row, item: ImageItem, reason: str, message: str) -> Outcome:
        """One file could not be placed: retried while it has attempts, then quarantined under ``reason``.

        When even the quarantine cannot take it (the same refusal, or an input that cannot be read), the row
        is finished as ``refused``, without an output, and the input stays where it is: it is not counted as
        quarantined (nothing is in the quarantine), and it is tried again when the file changes or at the next start,
        not at every rescan.
        """
        final = item.failure is not None and (not item.failure.retryable or row.attempts >= self.max_attempts)
        if not final and row.attempts < self.max_attempts:
            return Outcome(row.id, "pending", last_error=message)
        if item.failure is None:
            try:
                return self.quarantine(row, item, reason, message, dict(item.timings))
            except OSError as error:
                if self.refuses_whole_output(error):  # the output as a whole refuses now: try again later
                    return Outcome(row.id, "pending", last_error=f"{message}; quarantine failed too: {error}")
                message = f"{message}; quarantine failed too: {error}"
        return Outcome(row.id, "refused", sha256=item.sha256, reason=item.failure.reason if item.failure else reason,
                       last_error=f"{message} (the input was left where it is)")

    def finish_one(self, row: Row, item: ImageItem) -> Outcome:
        timings = dict(item.timings)
        failure = item.failure
        if failure is not None:
            if failure.reason == "vanished":
                return Outcome(row.id, "vanished", last_error=failure.message, timings=timings)
            if failure.retryable and row.attempts < self.max_attempts:
                return Outcome(row.id, "pending", last_error=failure.message, timings=timings)
            return self.quarantine(row, item, failure.reason, failure.message, timings)
        if item.not_computed:  # what was not computed, and why (explain, rebin)
            item.signals["not_computed"] = dict(sorted(item.not_computed.items()))
        # The rules the item was admitted under, which decided what it skipped (a reload since then applies to the
        # files admitted after it); ``thresholds`` for an item that carries none.
        decision = decide(item.signals, item.rules if item.rules is not None else self.thresholds)
        current = self.input_identity(row.path)
        if current is None:
            return Outcome(row.id, "vanished", last_error="the input file disappeared (or became a link) before it "
                           "could be placed")
        # The file must still be the one the loader read. A loader that says which file that was is believed over
        # the row: a placement that linked the input (move, hardlink) and then went unrecorded (a lost Ray window, a
        # kill -9) changed its ctime, yet these are its bytes, and placing them again only finds them in place.
        changed = current != item.opened if item.opened is not None else \
            row.size is not None and not _same_identity(row, current)
        if changed:
            return Outcome(row.id, "pending", size=current[0], mtime_ns=current[1], inode=current[2],
                           ctime_ns=current[3],
                           last_error="the input file changed while it was processed; it will be processed again")
        output = None
        if self.placer is not None:
            try:
                output = str(self.placer.place(Path(row.path), row.rel_path, decision.bin, item.sha256))
            except FileNotFoundError:
                return Outcome(row.id, "vanished", last_error="the input file disappeared before it could be placed")
            # Linking the input (move, hardlink) changes its ctime: remember the identity it has now, so that
            # the next scan sees the same file (and a crash leftover in move mode is recognised).
            current = self.input_identity(row.path) or current
        return Outcome(
            row.id, "done", sha256=item.sha256, bin=decision.bin, rule=decision.rule, decision=decision.to_dict(),
            signals=item.signals, output_path=output, timings=timings, size=current[0], mtime_ns=current[1],
            inode=current[2], ctime_ns=current[3],
        )

    def quarantine(self, row: Row, item: ImageItem, reason: str, message: str, timings: dict[str, Any]) -> Outcome:
        output = None
        if self.placer is not None:
            try:
                output = str(self.placer.quarantine(Path(row.path), row.rel_path, reason, item.sha256))
            except FileNotFoundError:
                return Outcome(row.id, "vanished", last_error=message)
        return Outcome(row.id, "quarantined", sha256=item.sha256, reason=reason, last_error=message,
                       output_path=output, signals=item.signals or None, timings=timings)

    @staticmethod
    def input_identity(path: str) -> Identity | None:
        """The input's identity, reached without following links; None when it is no longer a regular file."""
        try:
            st = lstat_no_symlinks(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None
            raise SourceError(f"cannot stat the input {shown(path)}: {error}", error.errno) from None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def remove_inputs(placer: Placer | None, move_mode: bool, finished: Iterable[tuple[str, Outcome]]) -> None:
    """Move mode, after the outcomes are durable in the ledger: remove each input that now has an output.

    An outcome without an output (a file that could be neither placed nor quarantined) keeps its input.
    """
    if not move_mode or placer is None:
        return
    for path, outcome in finished:
        if outcome.status in ("done", "quarantined") and outcome.output_path:
            with contextlib.suppress(FileNotFoundError):
                placer.remove_source(Path(path), Path(outcome.output_path), outcome.sha256)
