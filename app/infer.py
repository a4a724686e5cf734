"""The models `binner rebin --infer` needs: the configured stages, on their first configured device with their
batch policy, run on placed files where they are, for the signals the stored decisions did not compute.

Each stage runs only on the files it can still change, and a stage whose signals a file already has is skipped
(OCR is not run again for a missing caption); failures stay with their file, through the engine's containment.
"""

from __future__ import annotations

from typing import Any

import structlog

from app.build import build_stages
from app.config import BinnerConfig
from app.engine import BatchCap, contain, needs, starting_batch_cap
from app.hosts import ThreadHost
from app.store import Row, merged_signals, missing_signals
from stages.base import ImageItem

log = structlog.get_logger("binner.rebin")


class MissingSignals:
    """Callable over rows: (row, complete signals) for each row whose file could be read and run."""

    def __init__(self, config: BinnerConfig) -> None:
        self.rules = config.rules.model_copy(update={"signals": "needed"})
        self.hosts: list[tuple[Any, ThreadHost, BatchCap]] = []
        for stage in build_stages(config):
            host = ThreadHost(stage.replicate(), stage.devices[0])
            host.setup()
            self.hosts.append((stage, host, starting_batch_cap(stage, host.probe_batch_size)))

    def __call__(self, rows: list[Row]) -> list[tuple[Row, dict[str, Any]]]:
        items: list[tuple[Row, ImageItem]] = []
        for row in rows:
            stored = dict(row.signals or {})
            known = {key: value for key, value in stored.items() if key not in ("not_computed", "vision_skipped")}
            item = ImageItem(key=row.id, source=row.output_path or row.path, signals=known, rules=self.rules)
            items.append((row, item))
        for stage, host, cap in self.hosts:
            wanted = [item for _row, item in items if item.failure is None
                      and (not stage.produces or not stage.produces <= item.signals.keys())
                      and needs(stage, item, self.rules)]
            if wanted:
                contain(host.process_batch, wanted, stage=stage.name, device=host.device, cap=cap)
        done: list[tuple[Row, dict[str, Any]]] = []
        for row, item in items:
            if item.failure is not None:
                log.warning("rebin could not run the models on a placed file; it stays where it is",
                            file=row.output_path, reason=item.failure.reason, detail=item.failure.message)
                continue
            stored = row.signals or {}
            missing = missing_signals(stored)
            computed = {key: value for key, value in item.signals.items() if key in missing}
            done.append((row, merged_signals(stored, computed, item.not_computed.items())))
        return done

    def close(self) -> None:
        for _stage, host, _cap in self.hosts:
            host.teardown()
