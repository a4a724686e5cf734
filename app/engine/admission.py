"""Admission: a claimed ledger row becomes an item, or a failure that is final before any stage runs.

Shared by the local feeder and the Ray driver, so that a file past its attempts ends the same way in both.
"""

from __future__ import annotations

from app.store import Row
from stages.base import ImageItem, ItemFailure


def final_failure(row: Row, max_attempts: int) -> ItemFailure | None:
    """Why ``row`` goes straight to quarantine (it took its process down, or used up its attempts), else None."""
    if row.crashes >= max_attempts:
        return ItemFailure("crashed_repeatedly", f"the process died {row.crashes} times in a row while this file was "
                           f"inside the {row.crash_stage} model call")
    if row.attempts > max_attempts and row.last_error:
        return ItemFailure("retries_exhausted", f"gave up after {row.attempts - 1} attempts: {row.last_error}")
    return None


def admit(row: Row, max_attempts: int) -> ImageItem:
    """The item for a claimed row; it carries its final failure when it must not run again."""
    item = ImageItem(key=row.id, source=row.path, seen_at=row.seen_at)
    item.failure = final_failure(row, max_attempts)
    return item
