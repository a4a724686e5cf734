"""`binner rebin`: re-apply the current thresholds to stored signals and move placed files between bins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from app.config import BinnerConfig
from app.store.ledger import Ledger
from stages.rules import VISION_SIGNALS, Decision, RuleThresholds, decide, settled

log = structlog.get_logger("binner.rebin")


@dataclass
class Move:
    path: str
    old: str
    new: str
    rule: str


@dataclass
class RebinReport:
    moves: list[Move] = field(default_factory=list)
    unchanged: int = 0
    need_models: list[str] = field(default_factory=list)


def missing_signals(signals: dict[str, Any]) -> dict[str, str]:
    """The signals a decision record says were not computed, with why (rows of binner 0.1 say ``vision_skipped``)."""
    missing = dict(signals.get("not_computed") or {})
    if signals.get("vision_skipped"):
        missing.update(dict.fromkeys(VISION_SIGNALS, str(signals["vision_skipped"])))
    return {signal: why for signal, why in missing.items() if signal not in signals}


def decision_from_stored(signals: dict[str, Any], rules: RuleThresholds) -> Decision | None:
    """The bin under ``rules`` from stored signals, or None when a signal that was not computed could change it."""
    if not missing_signals(signals):
        return decide(signals, rules)
    return settled(signals, rules.model_copy(update={"signals": "needed"}))


def rebin_all(config: BinnerConfig, ledger: Ledger, dry_run: bool = False) -> RebinReport:
    """Move every done file whose bin changes under ``config.rules``; no model runs.

    Files whose vision stage was skipped (text-dominant at the time) have no vision signals; if the new
    thresholds no longer call them text-dominant they cannot be judged without the models, so they stay
    where they are and are listed.
    """
    from app.store.placement import Placer

    placer = Placer(config.output, "move")
    report = RebinReport()
    for row in ledger.rows("done"):
        if not row.signals:
            report.unchanged += 1
            continue
        decision = decision_from_stored(row.signals, config.rules)
        if decision is None:  # a signal it did not compute could change the bin under these thresholds
            report.need_models.append(row.output_path or row.path)
            continue
        if decision.bin == row.bin:
            report.unchanged += 1
            continue
        report.moves.append(Move(row.output_path or row.path, row.bin or "?", decision.bin, decision.rule))
        if dry_run:
            continue
        new_path = str(row.output_path or "")
        if row.output_path and Path(row.output_path).exists():
            new_path = str(placer.place(Path(row.output_path), row.rel_path, decision.bin, row.sha256))
            ledger.update_placement(row.id, decision.bin, decision.rule, decision.to_dict(), new_path)
            placer.remove_source(Path(row.output_path))
        else:
            ledger.update_placement(row.id, decision.bin, decision.rule, decision.to_dict(), new_path)
        log.info("rebinned", file=new_path, old=row.bin, new=decision.bin, rule=decision.rule)
    return report
