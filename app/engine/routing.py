"""Routing by what a stage declares: an item skips a stage whose signals the rules no longer need for its bin.

The rules (``stages.rules.unneeded``) say whether the signals a stage writes (``Stage.produces``: those of its enabled
models) can still change an item's decision, given the signals the stages after it may still write; this module
applies that to the pipeline's order of stages. The local engine's router, the Ray engine's actors and
``rebin --infer`` all ask here, so an item is passed by the same stages everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.base import ImageItem, Stage
from stages.rules import RuleThresholds, unneeded


def needs(stage: Stage, item: ImageItem, thresholds: RuleThresholds, later: frozenset[str]) -> bool:
    """Whether ``stage`` must run on ``item`` under ``thresholds`` (``later``: the signals the stages after it write;
    none for the last model stage). A stage whose signals the item already carries has nothing to do. When the rules
    need none of its signals, records in ``item.not_computed`` which were not computed, and why."""
    if item.failure is not None:
        return False
    if stage.produces and stage.produces <= item.signals.keys():
        return False
    reason = unneeded(stage.produces, item.signals, thresholds, later)
    if reason is None:
        return True
    for signal in sorted(stage.produces - item.signals.keys()):
        item.not_computed[signal] = reason
    return False


def later_signals(stages: Sequence[Stage], index: int) -> frozenset[str]:
    """What the stages after ``stages[index]`` write: the signals that may still come once it has run."""
    return frozenset().union(*(stage.produces for stage in stages[index + 1:]))


def next_stage(stages: Sequence[Stage], after: int, item: ImageItem, thresholds: RuleThresholds) -> int | None:
    """The index of the next stage after ``after`` that ``item`` needs under ``thresholds``, or None: it is decided."""
    for index in range(after + 1, len(stages)):
        if needs(stages[index], item, thresholds, later_signals(stages, index)):
            return index
    return None
