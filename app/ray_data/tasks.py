"""The Ray engine's tasks: a stateless stage (the loader) as CPU tasks, and finishing (rules + placement) as CPU tasks
that run the local engine's own ``Finisher`` on the workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.engine import Finisher, starting_batch_cap
from app.ray_data.actor import node_id, run_contained
from app.ray_data.codec import decode_items, encode_items, row_of
from app.store import Placer
from stages.base import Stage
from stages.rules import RuleThresholds


def run_stateless(table: Any, stage: Stage, thresholds: RuleThresholds, keep_image: bool,
                  later: frozenset[str] = frozenset()) -> Any:
    """A stateless stage (``Stage.stateless``: no model to keep, the loader) as a plain CPU task: a fresh replica per
    block, set up, its batch through the shared containment, then dropped."""
    replica = stage.replicate()
    replica.setup("cpu")
    try:
        pairs = decode_items(table)
        cap = starting_batch_cap(replica, lambda ceiling: replica.probe_batch_size("cpu", ceiling))
        run_contained(replica, [item for item, _ in pairs], cap, thresholds, later=later)
    finally:
        replica.teardown()
    node = node_id()
    for _, carried in pairs:
        carried.nodes[stage.name] = node
    return encode_items(pairs, keep_image)


def finish_batch(table: Any, thresholds: RuleThresholds, output_root: str, placement: str, max_attempts: int) -> Any:
    """Decide and place every item of a block with the local engine's own ``Finisher`` (rules, placement,
    per-file failures); returns one JSON outcome per item for the driver to record. A refusal of the whole output
    (disk full, read-only) comes back as ``blocked`` for the items from there on: the driver pauses and runs
    those files again."""
    import pyarrow as pa

    finisher = Finisher(Placer(Path(output_root), placement), thresholds, max_attempts)  # type: ignore[arg-type]
    node = node_id()
    decoded = decode_items(table)
    for _item, carried in decoded:
        carried.nodes["finish"] = node
    pairs = [(row_of(item, carried), item) for item, carried in decoded]
    assert finisher.placer is not None
    with finisher.placer.batch():
        finished, refusal, stopped = finisher.place_batch(pairs)
    keys: list[int] = []
    results: list[str] = []
    for (row, outcome), (_item, carried) in zip(finished, decoded):
        result: dict[str, Any] = {"outcome": outcome.__dict__}
        result["outcome"]["timings"] = {**(outcome.timings or {}), "ray_nodes": carried.nodes}
        keys.append(row.id)
        results.append(json.dumps(result))
    for item, _carried in decoded[stopped:]:
        keys.append(item.key)
        results.append(json.dumps({"blocked": str(refusal)}))
    return pa.table({"key": pa.array(keys, pa.int64()), "result": pa.array(results, pa.string())})
