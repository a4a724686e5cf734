"""`binner eval`: run the pipeline on a labelled set without placing files, and score the bins it chose.

Labels are a CSV with at least ``file,expected_bin`` (optional: ``category``, ``acceptable_bins`` such as ``B|C``).
"""

from __future__ import annotations

import contextlib
import csv
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from app.build import StreamingIntake, build_runtime, preflight_weights
from app.config import BinnerConfig, load_config
from app.once import run_to_idle
from app.store import Ledger


class LabelsError(ValueError):
    """The labels file cannot be used; the message names it and the columns it needs."""


def read_labels(path: Path) -> list[dict[str, str]]:
    """The rows of a labels CSV, checked for the columns scoring needs."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise LabelsError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
                          "save it as UTF-8") from None
    if not rows or "file" not in rows[0] or "expected_bin" not in rows[0]:
        raise LabelsError(f"{path}: needs a header with at least the columns file,expected_bin")
    return rows


def evaluate(images: Path, labels: list[dict[str, str]], config_file: Path | None, state: Path | None,
             show_progress: bool, console: Console | None = None,
             on_config: Callable[[BinnerConfig], object] | None = None) -> dict[str, Any]:
    """Bin the labelled images of ``images`` (dry run: nothing placed) and score them against ``labels``.

    ``on_config(config)`` runs once the configuration is loaded (the CLI starts its logs there). Raises
    ``ConfigError``, ``StageSetupError``, ``RunStopped`` or ``ScanError`` with a message for the user.
    """
    labelled = {row["file"].strip() for row in labels}
    with tempfile.TemporaryDirectory(prefix="binner-eval-") as scratch:
        config = load_config(config_file, {"input": images, "output": Path(scratch) / "out",
                                           "state_dir": state or Path(scratch) / "state"})
        if on_config is not None:
            on_config(config)
        preflight_weights(config)
        runtime = build_runtime(config, dry_run=True, command="eval")
        try:
            intake = StreamingIntake(runtime, only=labelled.__contains__)  # the labelled images, not labels.csv
            started = time.monotonic()
            with contextlib.redirect_stdout(sys.stderr):  # model libraries print; keep stdout for the result
                stats = run_to_idle(runtime, None, show_progress and config.log.format != "json", console, intake)
            elapsed = time.monotonic() - started
            result = score(runtime.ledger, labels)
        finally:
            runtime.close()
    result["images_per_second"] = round(stats.finished / max(elapsed, 1e-9), 3)
    return result


# Categories whose label allows more than one bin (../shared/data/images/README.md: "mixed" photos are B,
# "a few are text-heavy enough that C is defensible"). A labels column acceptable_bins (e.g. B|C) overrides it.
ACCEPTABLE_BINS = {"mixed": ("B", "C")}


def score(ledger: Ledger, labels: list[dict[str, str]]) -> dict[str, Any]:
    """Per-category accuracy (exact, and within the acceptable bins), confusion, and every misbinned file."""
    confusion: dict[str, dict[str, int]] = {}
    per_category: dict[str, dict[str, Any]] = {}
    misbinned: list[dict[str, Any]] = []
    for label in labels:
        rel = label["file"].strip()
        category = (label.get("category") or rel.split("/", 1)[0]).strip()
        expected = label["expected_bin"].strip().upper()
        given = (label.get("acceptable_bins") or "").replace(",", "|").upper().split("|")
        acceptable = tuple(b.strip() for b in given if b.strip()) or ACCEPTABLE_BINS.get(category, (expected,))
        if expected not in acceptable:
            acceptable = (expected, *acceptable)
        found = ledger.find(rel)
        row = found[0] if found else None
        got = "missing"
        if row is not None:
            got = row.bin if row.status == "done" and row.bin else ("quarantined" if row.status == "quarantined" else "missing")
        cell = confusion.setdefault(category, {"A": 0, "B": 0, "C": 0, "quarantined": 0, "missing": 0})
        cell[got] += 1
        line = per_category.setdefault(category, {"n": 0, "correct": 0, "acceptable": 0, "expected_bin": expected,
                                                  "acceptable_bins": list(acceptable)})
        line["n"] += 1
        line["correct"] += int(got == expected)
        line["acceptable"] += int(got in acceptable)
        if got != expected:
            rule = (row.rule if row is not None and row.status == "done" else
                    (f"quarantined: {row.reason}" if row is not None and row.reason else None))
            misbinned.append({"file": rel, "category": category, "expected": expected, "actual": got, "rule": rule,
                              "acceptable": got in acceptable,
                              "reason": (row.decision or {}).get("reason") if row is not None else None})
    for line in per_category.values():
        line["accuracy"] = line["correct"] / line["n"] if line["n"] else 0.0
        line["acceptable_accuracy"] = line["acceptable"] / line["n"] if line["n"] else 0.0
    total = sum(line["n"] for line in per_category.values())
    correct = sum(line["correct"] for line in per_category.values())
    acceptable_total = sum(line["acceptable"] for line in per_category.values())
    return {"per_category": per_category, "confusion": confusion, "misbinned": misbinned,
            "overall": {"n": total, "correct": correct, "accuracy": correct / total if total else 0.0,
                        "acceptable": acceptable_total,
                        "acceptable_accuracy": acceptable_total / total if total else 0.0}}
