"""Any ``Stage`` as a Ray Data callable class: one replica per actor, set up once, a batch per call.

The adapter only adapts: which items a stage needs is ``engine.needs`` (routing), failures are contained by
``engine.contain``, and the replica is a ``PhasedReplica`` as in the local engine's hosts. A stage with host
phases takes several calls at once (``max_concurrent_calls_per_actor``), so its host work overlaps its device calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from app.devices import actor_device
from app.engine import BatchCap, contain, needs, starting_batch_cap
from app.hosts import PhasedReplica
from app.ray_data.codec import decode_items, encode_items
from stages.base import ImageItem, Stage
from stages.rules import RuleThresholds


class RayStageSetupError(RuntimeError):
    """Raised inside an actor whose stage could not load its models; the driver stops the run with it."""


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def assigned_gpus() -> list[int | str]:
    """The GPUs Ray assigned to this actor (its ``CUDA_VISIBLE_DEVICES``)."""
    import ray

    return list(ray.get_gpu_ids())


def run_contained(stage: Stage, items: list[ImageItem], cap: int | BatchCap, thresholds: RuleThresholds | None = None,
                  call: Callable[[list[ImageItem]], list[ImageItem]] | None = None,
                  later: frozenset[str] = frozenset()) -> int:
    """Run the items ``stage`` needs through ``call`` (default: the stage's ``process_batch``), failures contained;
    returns the (possibly lowered) batch cap. ``later``: the signals the stages after this one write (as
    ``engine.next_stage`` passes them), so that the same items skip the same stages as in the local engine."""
    rules = thresholds or RuleThresholds()
    for item in items:
        item.rules = rules
    active = [item for item in items if needs(stage, item, rules, later)]
    holder = cap if isinstance(cap, BatchCap) else BatchCap(max(1, cap))
    if active:
        contain(call or stage.process_batch, active, stage=stage.name, device=stage.device or "cpu", cap=holder)
    return holder.value


class RayStage:
    """One ``Stage`` replica per actor; ``__call__`` maps one Arrow block."""

    def __init__(self, stage: Stage, thresholds: RuleThresholds, keep_image: bool,
                 later: frozenset[str] = frozenset()) -> None:
        self.thresholds = thresholds
        self.keep_image = keep_image
        self.later = later
        device = actor_device(stage.devices, assigned_gpus())
        self.replica = PhasedReplica(stage.replicate(), device)
        self.stage = self.replica.stage
        try:
            self.replica.setup()
            self.cap = starting_batch_cap(self.stage, self.replica.probe_batch_size)
            self.replica.warmup()
        except Exception as error:
            raise RayStageSetupError(f"stage {stage.name} could not start on {device} "
                                     f"(node {node_id()}): {type(error).__name__}: {error}") from error
        self.node = node_id()

    def __call__(self, table: Any) -> Any:
        pairs = decode_items(table)
        run_contained(self.stage, [item for item, _ in pairs], self.cap, self.thresholds, call=self.replica.run,
                      later=self.later)
        for _item, carried in pairs:
            carried.nodes[self.stage.name] = self.node
        return encode_items(pairs, self.keep_image)

    def teardown(self) -> None:
        self.replica.teardown(timeout_s=30.0)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never block a garbage collection for long
            self.replica.teardown(timeout_s=5.0)
