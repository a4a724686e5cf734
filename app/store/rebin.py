"""`binner rebin`: re-apply the current thresholds to stored signals and move placed files between bins.

The ledger is read in pages and moves are committed in batches, so memory stays flat however many rows there
are. A move links the file into its new bin, records the new place durably (with the removal it owes), and only
then removes the old name; after a ``kill -9`` anywhere in that, the next rebin finishes the owed removals first, so
every file ends in exactly one bin and the ledger agrees with the disk.

A decision that did not compute a signal (``rules.signals: needed``) may need it under new thresholds (a detection
threshold raised from 0.5 to 0.7 leaves a 0.6 detection to CLIP). Such files are reported; with ``infer`` the missing
models run on the placed files where they are, and the files move once decided.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from app.config import BinnerConfig
from app.store.ledger import Ledger, PlacementChange, Row
from app.store.placement import Placer
from stages.rules import VISION_SIGNALS, Decision, RuleThresholds, decide, settled

log = structlog.get_logger("binner.rebin")

MOVES_PER_COMMIT = 100

# The models' outputs for rows that lack a signal their decision needs: (row, its signals complete) per row whose
# models ran; a row left out could not be read (it stays where it is).
Inference = Callable[[list[Row]], list[tuple[Row, dict[str, Any]]]]


@dataclass(frozen=True)
class Move:
    """One file to another bin (what `rebin` prints)."""

    path: str
    old: str
    new: str
    rule: str


@dataclass
class RebinReport:
    """What a rebin did (or would do): counts only, so that it stays small at any ledger size."""

    moved: int = 0
    unchanged: int = 0
    need_models: int = 0  # rows a missing signal could change, left where they are
    inferred: int = 0  # rows whose missing signals were computed (with ``infer``)
    owed_removals: int = 0  # old names removed that an interrupted rebin left behind


def missing_signals(signals: dict[str, Any]) -> dict[str, str]:
    """The signals a decision record says were not computed, with why (rows of binner 0.1 say ``vision_skipped``)."""
    missing = dict(signals.get("not_computed") or {})
    if signals.get("vision_skipped"):
        missing.update(dict.fromkeys(VISION_SIGNALS, str(signals["vision_skipped"])))
    return {signal: why for signal, why in missing.items() if signal not in signals}


def computable_missing(signals: dict[str, Any], produced: frozenset[str]) -> dict[str, str]:
    """The signals a decision record says were not computed and that the enabled models (``produced``: the
    configuration's ``produced_signals``) can compute now, with why they were not."""
    return {signal: why for signal, why in missing_signals(signals).items() if signal in produced}


def decision_from_stored(signals: dict[str, Any], needed: RuleThresholds, produced: frozenset[str]) -> Decision | None:
    """The bin under ``needed`` (the rules with ``signals: needed``: a stored decision is settled, whatever its rules
    were) from stored signals, or None when a signal that was not computed, and that an enabled model (``produced``)
    could compute now, could change it. A signal whose model is disabled now can never come: the rules pass the
    criteria that read it, as the engine does."""
    return settled(signals, needed, frozenset(computable_missing(signals, produced)))


def rebin_all(config: BinnerConfig, ledger: Ledger, dry_run: bool = False, infer: Inference | None = None,
              on_move: Callable[[Move], None] | None = None,
              on_needs_models: Callable[[Row, dict[str, str]], None] | None = None,
              infer_batch: int = 256) -> RebinReport:
    """Move every done file whose bin changes under ``config.rules`` (``on_move`` hears of each, and of each that
    would move in a dry run); files a missing signal could change are given to ``infer`` (``infer_batch`` rows a
    call) when there is one, else to ``on_needs_models`` with what they miss."""
    placer = Placer(config.output, "move")
    report = RebinReport()
    if not dry_run:
        report.owed_removals = finish_owed_removals(ledger, placer)
    rules, produced = config.rules, config.produced_signals
    needed = rules.model_copy(update={"signals": "needed"})  # once, not per row
    batch = _Moves(ledger, placer, report, on_move, dry_run)
    waiting: list[Row] = []
    for row in ledger.rows("done"):
        signals = row.signals or {}
        if not signals:
            report.unchanged += 1
            continue
        decision = decision_from_stored(signals, needed, produced)
        if decision is None:  # a signal it did not compute could change the bin under these thresholds
            if infer is not None and not dry_run:
                waiting.append(row)
                if len(waiting) >= infer_batch:
                    _infer(waiting, infer, rules, batch, report)
                    waiting = []
                continue
            report.need_models += 1
            if on_needs_models is not None:
                on_needs_models(row, computable_missing(signals, produced))
            continue
        batch.add(row, decision)
    if waiting:
        _infer(waiting, infer, rules, batch, report)  # type: ignore[arg-type]
    batch.flush()
    return report


def _infer(rows: list[Row], infer: Inference, rules: RuleThresholds, batch: _Moves, report: RebinReport) -> None:
    done = infer(rows)
    for row, signals in done:
        report.inferred += 1
        batch.add(row, decide(signals, rules), signals)
    report.need_models += len(rows) - len(done)  # files the models could not read stay where they are


class _Moves:
    """Moves gathered and committed ``MOVES_PER_COMMIT`` at a time: link, record (owing the removal), remove."""

    def __init__(self, ledger: Ledger, placer: Placer, report: RebinReport, on_move: Callable[[Move], None] | None,
                 dry_run: bool) -> None:
        self.ledger, self.placer, self.report, self.on_move, self.dry_run = ledger, placer, report, on_move, dry_run
        self.pending: list[tuple[Row, Decision, dict[str, Any] | None]] = []

    def add(self, row: Row, decision: Decision, signals: dict[str, Any] | None = None) -> None:
        if decision.bin == row.bin and signals is None:
            self.report.unchanged += 1
            return
        if decision.bin != row.bin:
            self.report.moved += 1
            if self.on_move is not None:
                self.on_move(Move(row.output_path or row.path, row.bin or "?", decision.bin, decision.rule))
        elif signals is not None:
            self.report.unchanged += 1
        if self.dry_run:
            return
        self.pending.append((row, decision, signals))
        if len(self.pending) >= MOVES_PER_COMMIT:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        changes: list[PlacementChange] = []
        leaving: list[tuple[int, str, str, str | None]] = []
        with self.placer.batch():  # the new names are durable when the block ends, before the ledger says so
            for row, decision, signals in self.pending:
                old = row.output_path
                if decision.bin == row.bin or not old or not Path(old).exists():
                    changes.append(PlacementChange(row.id, decision.bin, decision.rule, decision.to_dict(), old or "",
                                                   None, signals))
                    continue
                new = str(self.placer.place(Path(old), row.rel_path, decision.bin, row.sha256))
                changes.append(PlacementChange(row.id, decision.bin, decision.rule, decision.to_dict(), new, old,
                                               signals))
                leaving.append((row.id, old, new, row.sha256))
        self.ledger.record_moves(changes)  # durable: from here the old names are owed removals
        for _row_id, old, new, sha256 in leaving:
            _remove_old(self.placer, old, new, sha256)
            log.info("rebinned", file=new, old=old)
        self.ledger.removals_done(row_id for row_id, *_ in leaving)
        self.pending = []


def _remove_old(placer: Placer, old: str, new: str, sha256: str | None) -> bool:
    """Remove the name a move left, if it still holds what now lives at ``new``."""
    try:
        return placer.remove_source(Path(old), Path(new), sha256)
    except FileNotFoundError:
        return False


def finish_owed_removals(ledger: Ledger, placer: Placer) -> int:
    """Remove the old names of moves an interrupted rebin recorded but did not finish; returns how many."""
    owed = ledger.owed_removals()
    removed = sum(_remove_old(placer, old, new, None) for _row_id, old, new in owed)
    ledger.removals_done(row_id for row_id, _old, _new in owed)
    if owed:
        log.info("finished the removals an interrupted rebin left", checked=len(owed), removed=removed)
    return removed


def merged_signals(stored: dict[str, Any], computed: dict[str, Any], still_not_computed: Iterable[tuple[str, str]]) \
        -> dict[str, Any]:
    """Stored signals with what the models computed now; ``not_computed`` keeps only what is still missing."""
    merged = {**stored, **computed}
    missing = {key: why for key, why in missing_signals(stored).items() if key not in computed}
    missing.update(still_not_computed)
    merged.pop("vision_skipped", None)
    merged.pop("not_computed", None)
    if missing:
        merged["not_computed"] = dict(sorted(missing.items()))
    return merged
