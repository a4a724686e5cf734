"""What a finished file counts for: the run's summary and its log line (both engines, where the outcome is recorded:
on Ray that is the driver, since a worker's log stays on its node), and the local engine's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog

from app.metrics import Metrics
from app.store import Outcome, Row
from stages.paths import shown
from stages.rules import MODEL_OF_SIGNAL

log = structlog.get_logger("binner.engine")

FINISHED = ("done", "quarantined", "vanished", "refused")  # outcomes that end a file's journey through this run


@dataclass
class RunStats:
    """The summary of one run (``once``'s table, the daemon's STATUS line)."""

    started: float = field(default_factory=time.monotonic)
    finished: int = 0
    bins: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # left in the input: the output refused bin and quarantine
    retried: int = 0
    vanished: int = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.finished / elapsed if elapsed > 0 else 0.0

    def count(self, outcome: Outcome) -> None:
        """Add one outcome to the summary."""
        if outcome.status == "done":
            self.finished += 1
            self.bins[outcome.bin or "?"] = self.bins.get(outcome.bin or "?", 0) + 1
        elif outcome.status == "quarantined":
            self.finished += 1
            reason = outcome.reason or "unknown"
            self.quarantined[reason] = self.quarantined.get(reason, 0) + 1
        elif outcome.status == "refused":
            self.finished += 1
            reason = outcome.reason or "unknown"
            self.refused[reason] = self.refused.get(reason, 0) + 1
        elif outcome.status == "vanished":
            self.vanished += 1
        else:
            self.retried += 1


def say(path: str, outcome: Outcome) -> None:
    """The log line of a file that did not end in a bin: the operator's trail of what went wrong, per file."""
    if outcome.status == "quarantined":
        log.warning("quarantined", file=shown(path), reason=outcome.reason, detail=shown(outcome.last_error or ""))
    elif outcome.status == "refused":
        log.error("cannot place or quarantine a file; it stays in the input until it changes or the next start",
                  file=shown(path), reason=outcome.reason, detail=shown(outcome.last_error or ""))


def observe(metrics: Metrics, row: Row, outcome: Outcome) -> None:
    """The local engine's sink metrics for one outcome."""
    for signal, reason in ((outcome.signals or {}).get("not_computed") or {}).items():
        metrics.signals_skipped.labels(model=MODEL_OF_SIGNAL.get(signal, signal), reason=reason).inc()
    if outcome.status == "done":
        metrics.binned.labels(bin=outcome.bin).inc()
        metrics.end_to_end.observe(max(0.0, time.time() - row.seen_at))
        metrics.items.labels(stage="sink", outcome="binned").inc()
    elif outcome.status == "quarantined":
        metrics.quarantined.labels(reason=outcome.reason or "unknown").inc()
        metrics.end_to_end.observe(max(0.0, time.time() - row.seen_at))
        metrics.items.labels(stage="sink", outcome="quarantined").inc()
    elif outcome.status == "vanished":
        metrics.items.labels(stage="sink", outcome="vanished").inc()
    elif outcome.status == "refused":
        metrics.items.labels(stage="sink", outcome="refused").inc()
    else:
        metrics.items.labels(stage="sink", outcome="retry").inc()
