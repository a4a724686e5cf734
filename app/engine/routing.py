"""Routing by what a stage declares: an item skips a stage whose signals the rules no longer need for its bin.

The rules (``stages.rules.unneeded``) say whether the signals a stage writes (``Stage.produces``) can still change
an item's decision; this module applies that to the pipeline's order of stages. The local engine's router and the
Ray engine's actors both ask here, so an item is passed by the same stages in both.
"""

from __future__ import annotations

from collections.abc import Sequence

from stages.base import ImageItem, Stage
from stages.rules import RuleThresholds, unneeded


def needs(stage: Stage, item: ImageItem, thresholds: RuleThresholds) -> bool:
    """Whether ``stage`` must run on ``item``; when not, records in ``item.not_computed`` which signals were not
    computed, and why."""
    if item.failure is not None:
        return False
    reason = unneeded(stage.produces, item.signals, thresholds)
    if reason is None:
        return True
    for signal in sorted(stage.produces - item.signals.keys()):
        item.not_computed[signal] = reason
    return False


def next_stage(stages: Sequence[Stage], after: int, item: ImageItem, thresholds: RuleThresholds) -> int | None:
    """The index of the next stage after ``after`` that ``item`` needs, or None: it goes to the sink."""
    for index in range(after + 1, len(stages)):
        if needs(stages[index], item, thresholds):
            return index
    return None
