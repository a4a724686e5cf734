"""`binner rebin`: re-apply the current thresholds to stored signals and move placed files between bins."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from app.config import BinnerConfig
from app.store.ledger import Ledger
from stages.rules import decide

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
        decision = decide(row.signals, config.rules)
        if row.signals.get("vision_skipped") and decision.bin != "C":
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
