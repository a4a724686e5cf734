"""The state of a run on disk: the ledger (one row per input generation), intake from the input tree, placement
into the output tree, the instance lock of a state directory, and ``rebin``. Nothing here runs a model."""

from app.store.folders import is_within
from app.store.intake import SettleTracker, finish_leftovers, iter_scan, prune_empty_dirs, scan, to_discovered
from app.store.ledger import (
    Discovered,
    Finished,
    IntakeResult,
    Ledger,
    LedgerOpenError,
    Outcome,
    Row,
    StateRoom,
    is_disk_full,
    shown,
)
from app.store.lock import InstanceLock, StateDirLocked
from app.store.placement import QUARANTINE_DIR, TEMP_PREFIX, Placer, SourceError, SourceVanished, safe_relative_path, sha256_file
from app.store.rebin import Inference, Move, RebinReport, merged_signals, missing_signals, rebin_all

__all__ = ["QUARANTINE_DIR", "TEMP_PREFIX", "Discovered", "Finished", "Inference", "InstanceLock", "IntakeResult",
           "Ledger", "LedgerOpenError", "Move", "Outcome", "Placer", "RebinReport", "Row", "SettleTracker",
           "SourceError", "SourceVanished", "StateDirLocked", "StateRoom", "finish_leftovers", "is_disk_full", "is_within",
           "iter_scan", "merged_signals", "missing_signals", "prune_empty_dirs", "rebin_all", "safe_relative_path",
           "scan", "sha256_file", "shown", "to_discovered"]
