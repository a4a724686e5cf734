"""One window of claimed rows as a Ray Dataset: each stage in order (a stateless one as CPU tasks, one with models
as an actor pool), then finish tasks; and what those pools need from the cluster."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

from app.config import BinnerConfig, ConfigError
from app.engine import later_signals, probe_ceiling
from app.hosts import concurrency_of
from app.ray_data.actor import RayStage
from app.ray_data.tasks import finish_batch, run_stateless
from stages.base import Stage
from stages.devices import on_cuda

TASK_RETRIES = 4  # a task lost with its node is run again elsewhere this many times
ACTOR_RESTARTS = 4  # an actor lost with its node is started again elsewhere this many times


def stage_resources(stage: Stage) -> dict[str, Any]:
    """Per-actor resources: one CPU, plus one GPU for a CUDA device list; pool size = number of devices. A stage with
    host phases takes several calls at once, so that its host work overlaps its device calls (``PhasedReplica``)."""
    import ray.data

    calls = concurrency_of(stage)
    pool = ray.data.ActorPoolStrategy(size=max(1, len(stage.devices)), max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)
    return {"num_gpus": 1 if on_cuda(stage.devices) else 0, "num_cpus": 1, "compute": pool}


def pooled(stages: list[Stage]) -> list[Stage]:
    """The stages that run as actor pools (one actor per device): those that keep models between batches."""
    return [stage for stage in stages if not stage.stateless]


def block_size(stages: list[Stage]) -> int:
    """Rows per block: one batch of the first stage (the blocks are its input)."""
    return max(1, stages[0].batch_policy.max_batch_size or probe_ceiling(stages[0]))


def needed_resources(stages: list[Stage]) -> dict[str, int]:
    """What the actor pools hold for the whole run, plus one CPU for the stateless stages' and finish tasks to move."""
    need = {"CPU": 1, "GPU": 0}
    for stage in pooled(stages):
        size = max(1, len(stage.devices))
        need["CPU"] += size
        need["GPU"] += size if on_cuda(stage.devices) else 0
    return need


def cluster_resources() -> dict[str, int]:
    """The CPUs and GPUs of the cluster's live nodes."""
    import ray

    have = ray.cluster_resources()
    return {"CPU": int(have.get("CPU", 0)), "GPU": int(have.get("GPU", 0))}


def missing_resources(stages: list[Stage], have: dict[str, int]) -> str | None:
    """Why a cluster with ``have`` cannot run these pools (the pipeline would wait for ever), or None."""
    need = needed_resources(stages)
    short = [f"{need[kind]} {kind} (the cluster has {have[kind]})" for kind in ("CPU", "GPU") if need[kind] > have[kind]]
    if not short:
        return None
    return ("the Ray cluster is too small for the configured stages: they need " + " and ".join(short) +
            "; add nodes, or list fewer devices per stage (each device is one actor)")


def fit_stages(stages: list[Stage], have: dict[str, int],
               rebuild: Callable[[int], list[Stage]] | None = None) -> list[Stage] | None:
    """Pools that fit ``have``: first the stages rebuilt for the cluster's GPUs (``devices: auto`` then takes the CPU
    where the GPU node is gone; explicit ``cuda:N`` lists do not change), then fewer replicas where a stage has
    several. None when even one replica per stage does not fit."""
    fitted = stages
    if rebuild is not None and needed_resources(stages)["GPU"] > have["GPU"]:
        try:
            fitted = rebuild(have["GPU"])
        except ConfigError:  # an explicit cuda:N list needs GPUs the cluster no longer has
            fitted = stages
    fitted = [copy.copy(stage) for stage in fitted]
    for stage in fitted:
        stage.devices = list(stage.devices)
    while True:
        if missing_resources(fitted, have) is None:
            return fitted
        several = [stage for stage in pooled(fitted) if len(stage.devices) > 1]
        if not several:
            return None
        max(several, key=lambda stage: len(stage.devices)).devices.pop()


def build_dataset(blocks: list[Any], stages: list[Stage], config: BinnerConfig) -> Any:
    """One window of rows (Arrow blocks, one batch of the first stage each) as a Ray Dataset: every stage in order (a
    stateless one as CPU tasks, the others as actor pools), then the finish tasks.

    Retries are bounded on purpose (Ray Data's own default restarts actors and retries their calls forever, so a
    file that crashes its worker natively would loop): a lost node costs a few retries, a poison file fails its
    window, which the driver then splits until the file fails alone. Ray 2.60 takes these only as the extra
    ``ray_remote_args`` it calls deprecated (removal announced for 2.64); the extra pins ray 2.60.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated.*")
        return _build_dataset(blocks, stages, config)


def _build_dataset(blocks: list[Any], stages: list[Stage], config: BinnerConfig) -> Any:
    import ray.data

    ds = ray.data.from_arrow(blocks)  # one block per batch of the first stage: the blocks spread over the nodes
    for index, stage in enumerate(stages):
        keep_image = index + 1 < len(stages)  # after the last stage no pixels travel
        later = later_signals(stages, index)
        cap = stage.batch_policy.max_batch_size or probe_ceiling(stage)
        if stage.stateless:
            ds = ds.map_batches(run_stateless, batch_size=cap, batch_format="pyarrow", num_cpus=1,
                                max_retries=TASK_RETRIES,
                                fn_kwargs={"stage": stage, "thresholds": config.rules, "keep_image": keep_image,
                                           "later": later})
        else:
            ds = ds.map_batches(RayStage, batch_size=cap, batch_format="pyarrow",
                                fn_constructor_kwargs={"stage": stage, "thresholds": config.rules,
                                                       "keep_image": keep_image, "later": later},
                                max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, **stage_resources(stage))
    return ds.map_batches(finish_batch, batch_size=block_size(stages), batch_format="pyarrow", num_cpus=1,
                          max_retries=TASK_RETRIES,
                          fn_kwargs={"thresholds": config.rules, "output_root": str(config.output),
                                     "placement": config.placement, "max_attempts": config.max_attempts})
