"""`binner once --engine ray`: the same stages, rules, placement and ledger, spread over a Ray cluster.

Shape (Ray Data streams blocks between the steps, with backpressure and retries):

    driver: ledger.claim_pending -> ray.data.from_arrow(window of rows, one block per loader batch)
      -> loader          CPU ``map_batches`` tasks
      -> ocr, vision     actor pools: one ``Stage`` replica per actor (``setup(device)`` once, ``process_batch``
                         per batch), ``num_gpus`` from the stage's devices, pool size = number of devices
      -> finish          CPU tasks: rules + placement into the shared output
    driver: iter_batches -> ledger.record (durable) -> remove inputs (move mode) -> progress, summary

Why it is built this way:

- One adapter (:class:`RayStage`) wraps any ``Stage``; no stage logic is copied. Rules are ``stages.rules.decide``
  and placement is ``app.placement.Placer``, as in the local engine.
- Only the driver writes the ledger, and only after the finish task placed the file; inputs are removed after
  the ledger commit. Placement is idempotent by content (the Placer reuses a name that already holds the same
  bytes), so a driver killed with ``kill -9`` leaves ``processing`` rows that the next run recovers and places
  again without a second copy.
- Rows are claimed in windows, each run as one dataset: the file list never has to fit in the driver's memory.
  A window restarts the actor pools, so windows start small and grow to minutes of work (see ``RayRun``).
- A window that fails as a whole (a lost node after Ray's own retries) is run again; one that fails again (a
  file that crashes its worker natively) is split in halves down to single rows, and only a single row that
  still fails is charged an attempt: a poison file ends quarantined alone, its neighbours are not charged.
- Images travel between nodes as raw RGB bytes (Arrow ``large_binary``) plus their shape, not as pickled PIL
  objects; paths travel as bytes (``os.fsencode``), so non-UTF-8 names round-trip exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from app.engine import RunStats
from app.ledger import Outcome, Row
from stages.base import ImageItem, Stage, is_out_of_memory
from stages.rules import RuleThresholds, text_dominant

log = structlog.get_logger("binner.ray")

INSTALL_HINT = ("--engine ray needs Ray: install the extra with `pip install -e '.[ray]'` "
                "(or `pip install 'ray[data]==2.60.*'`), or use --engine local")
AUTO_BATCH_CEILING = 64
WINDOW_ROWS = 4096  # the first window: first results come soon
MAX_WINDOW_ROWS = 250_000  # later windows grow to about TARGET_WINDOW_S of work, up to this many rows
TARGET_WINDOW_S = 300.0
TASK_RETRIES = 4  # a task lost with its node is run again elsewhere this many times
ACTOR_RESTARTS = 4  # an actor lost with its node is started again elsewhere this many times


def ray_missing() -> str | None:
    """The one-line install hint when Ray Data cannot be imported, else None."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None


class RayEngineError(Exception):
    """The Ray run cannot go on (cannot reach the cluster, a stage cannot start): say so and stop."""


class RayStageSetupError(RuntimeError):
    """Raised inside an actor whose stage could not load its models; the driver stops the run with it."""


# --- rows on the wire ------------------------------------------------------------------------------
def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("key", pa.int64()), ("source", pa.binary()), ("rel_path", pa.binary()), ("size", pa.int64()),
        ("mtime_ns", pa.int64()), ("inode", pa.int64()), ("ctime_ns", pa.int64()), ("attempts", pa.int64()),
        ("seen_at", pa.float64()), ("sha256", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("image_width", pa.int64()), ("image_height", pa.int64()),
        ("pixels", pa.large_binary()), ("signals", pa.string()), ("timings", pa.string()), ("failure", pa.string()),
        ("skip_vision", pa.bool_()), ("nodes", pa.string()),
    ])


def row_record(row: Row, max_attempts: int) -> dict[str, Any]:
    """A claimed ledger row as the first record of its item; rows past their attempts carry their failure
    (the same rule as the local engine's ``Pipeline._admit``)."""
    failure = None
    if row.crashes >= max_attempts:
        failure = {"reason": "crashed_repeatedly", "stage": "", "retryable": False,
                   "message": f"the process died {row.crashes} times in a row while this file was inside the "
                              f"{row.crash_stage} model call"}
    elif row.attempts > max_attempts and row.last_error:
        failure = {"reason": "retries_exhausted", "message": f"gave up after {row.attempts - 1} attempts: "
                   f"{row.last_error}", "stage": "", "retryable": False}
    return {
        "key": row.id, "source": os.fsencode(row.path), "rel_path": os.fsencode(row.rel_path), "size": row.size,
        "mtime_ns": row.mtime_ns, "inode": row.inode, "ctime_ns": row.ctime_ns, "attempts": row.attempts,
        "seen_at": row.seen_at, "sha256": None, "width": None,
        "height": None, "image_width": None, "image_height": None, "pixels": None, "signals": "{}", "timings": "{}",
        "failure": json.dumps(failure) if failure else None, "skip_vision": False, "nodes": "{}",
    }


@dataclass
class _Carried:
    """What an item carries besides ``ImageItem``: the row's identity and where it ran."""

    rel_path: bytes
    size: int | None
    mtime_ns: int | None
    attempts: int
    nodes: dict[str, str]
    inode: int | None = None
    ctime_ns: int | None = None


def decode_items(table: Any) -> list[tuple[ImageItem, _Carried]]:
    """Arrow rows -> items with PIL images rebuilt from their raw bytes (no copy of the pixels)."""
    import numpy as np
    from PIL import Image

    from stages.base import ItemFailure

    out: list[tuple[ImageItem, _Carried]] = []
    for record in table.to_pylist():
        item = ImageItem(key=int(record["key"]), source=os.fsdecode(record["source"]), seen_at=record["seen_at"],
                         size=record["size"], sha256=record["sha256"], width=record["width"], height=record["height"])
        item.signals = json.loads(record["signals"] or "{}")
        item.timings = json.loads(record["timings"] or "{}")
        item.skip_vision = bool(record["skip_vision"])
        if record["failure"]:
            item.failure = ItemFailure(**json.loads(record["failure"]))
        elif record["pixels"] is not None:
            pixels = np.frombuffer(record["pixels"], dtype=np.uint8)
            item.image = Image.fromarray(pixels.reshape(record["image_height"], record["image_width"], 3), "RGB")
        carried = _Carried(record["rel_path"], record["size"], record["mtime_ns"], int(record["attempts"]),
                           json.loads(record["nodes"] or "{}"), record["inode"], record["ctime_ns"])
        out.append((item, carried))
    return out


def encode_items(pairs: list[tuple[ImageItem, _Carried]], keep_image: bool) -> Any:
    """Items -> Arrow rows; the image goes as RGB bytes while a later stage still needs it."""
    import numpy as np
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in _schema().names}
    for item, carried in pairs:
        pixels = width = height = None
        if keep_image and item.failure is None and item.image is not None:
            image = item.image if item.image.mode == "RGB" else item.image.convert("RGB")
            pixels = np.asarray(image, dtype=np.uint8).tobytes()
            width, height = image.size
        failure = item.failure
        values = {
            "key": item.key, "source": os.fsencode(item.source), "rel_path": carried.rel_path, "size": carried.size,
            "mtime_ns": carried.mtime_ns, "inode": carried.inode, "ctime_ns": carried.ctime_ns,
            "attempts": carried.attempts, "seen_at": item.seen_at, "sha256": item.sha256,
            "width": item.width, "height": item.height, "image_width": width, "image_height": height,
            "pixels": pixels, "signals": json.dumps(item.signals), "timings": json.dumps(item.timings),
            "failure": json.dumps(failure.__dict__) if failure is not None else None,
            "skip_vision": item.skip_vision, "nodes": json.dumps(carried.nodes),
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=_schema())


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


# --- running one stage on a batch, failures contained to their item ---------------------------------
def run_contained(stage: Stage, items: list[ImageItem], cap: int) -> int:
    """Run ``items`` through ``stage`` in chunks of ``cap``; returns the (possibly lowered) cap.

    The same containment as the local ``StageRunner``: out of memory halves the cap and retries the same items,
    any other exception bisects the batch until only the item that causes it fails (retryable, as locally).
    """
    active = [item for item in items if item.failure is None and not (stage.name == "vision" and item.skip_vision)]
    start = 0
    while start < len(active):
        chunk = active[start:start + cap]
        cap = _call(stage, chunk, cap)
        start += len(chunk)
    return cap


def _call(stage: Stage, items: list[ImageItem], cap: int) -> int:
    name, device = stage.name, stage.device or "cpu"
    started = time.monotonic()
    try:
        result = stage.process_batch(items)
        if len(result) != len(items):
            raise RuntimeError(f"stage {name} returned {len(result)} items for a batch of {len(items)}")
    except Exception as caught:
        error: Exception = caught
    else:
        elapsed = time.monotonic() - started
        for item in items:
            item.timings[f"{name}_batch"] = item.timings.get(f"{name}_batch", 0.0) + elapsed
        return cap
    # Handled outside the except block: a retry's own error must not carry this one as its __context__ (the OOM
    # test follows that chain, so a poison item failing after an OOM would look like another OOM).
    if is_out_of_memory(error):
        if len(items) == 1:
            items[0].fail("out_of_memory", f"{name} on {device}: out of memory for a single image", name, True)
            return cap
        cap = max(1, min(cap, len(items)) // 2)
        log.warning("out of device memory: halving batch cap", stage=name, device=device, new_cap=cap)
        for start in range(0, len(items), cap):
            cap = _call(stage, items[start:start + cap], cap)
        return cap
    if len(items) == 1:
        items[0].fail(f"{name}_error", f"{name} on {device}: {type(error).__name__}: {error}", name, True)
        return cap
    middle = len(items) // 2
    cap = _call(stage, items[:middle], cap)
    return _call(stage, items[middle:], cap)


def _actor_device(stage: Stage) -> str:
    """The device inside a Ray actor: Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, which is cuda:0 here."""
    if not any(device.startswith("cuda") for device in stage.devices):
        return "cpu"
    import ray

    return "cuda:0" if ray.get_gpu_ids() else "cpu"


class RayStage:
    """A ``Stage`` as a Ray Data callable class: one replica per actor, set up once, a batch per call."""

    def __init__(self, stage: Stage, thresholds: RuleThresholds, keep_image: bool) -> None:
        self.stage = stage.replicate()
        self.thresholds = thresholds
        self.keep_image = keep_image
        device = _actor_device(stage)
        try:
            self.stage.setup(device)
            cap = self.stage.batch_policy.max_batch_size
            if cap is None:
                cap = self.stage.probe_batch_size(device, AUTO_BATCH_CEILING)
            self.cap = max(1, int(cap))
            self.stage.warmup()
        except Exception as error:
            raise RayStageSetupError(f"stage {stage.name} could not start on {device} "
                                     f"(node {_node_id()}): {type(error).__name__}: {error}") from error
        self.node = _node_id()

    def __call__(self, table: Any) -> Any:
        pairs = decode_items(table)
        items = [item for item, _ in pairs]
        self.cap = run_contained(self.stage, items, self.cap)
        for item, carried in pairs:
            carried.nodes[self.stage.name] = self.node
            if (self.stage.name == "ocr" and item.failure is None and self.thresholds.short_circuit_text
                    and text_dominant(item.signals, self.thresholds) is not None):
                item.skip_vision = True  # the local engine routes these past vision; here vision passes them by
        return encode_items(pairs, self.keep_image)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stage.teardown()


def load_batch(table: Any, stage: Stage, keep_image: bool) -> Any:
    """The loader as a plain CPU task (no model to keep): a fresh replica per block."""
    from stages.loader import LoaderStage

    # Built again rather than copied: its constructor also sets this process's Pillow pixel limit.
    replica = LoaderStage(stage.options, ["cpu"], stage.batch_policy) if isinstance(stage, LoaderStage) else stage.replicate()
    replica.setup("cpu")
    pairs = decode_items(table)
    node = _node_id()
    run_contained(replica, [item for item, _ in pairs], max(1, replica.batch_policy.max_batch_size or 16))
    for _, carried in pairs:
        carried.nodes[stage.name] = node
    return encode_items(pairs, keep_image)


# --- rules + placement, on the workers ---------------------------------------------------------------
def _row_of(item: ImageItem, carried: _Carried) -> Row:
    """The claimed ledger row the item came from, as far as finishing needs it."""
    return Row(id=item.key, path=item.source, rel_path=os.fsdecode(carried.rel_path), size=carried.size,
               mtime_ns=carried.mtime_ns, sha256=None, status="processing", attempts=carried.attempts, bin=None,
               rule=None, reason=None, decision=None, signals=None, output_path=None, last_error=None, timings=None,
               seen_at=item.seen_at, updated_at=item.seen_at, finished_at=None, inode=carried.inode,
               ctime_ns=carried.ctime_ns)


def finish_batch(table: Any, thresholds: RuleThresholds, output_root: str, placement: str, max_attempts: int) -> Any:
    """Decide and place every item of a block with the local engine's own ``Finisher`` (rules, placement,
    per-file failures); returns one JSON outcome per item for the driver to record. A refusal of the whole output
    (disk full, read-only) comes back as ``blocked`` for the items from there on: the driver pauses and runs
    those files again."""
    import pyarrow as pa

    from app.finishing import Finisher
    from app.placement import Placer

    finisher = Finisher(Placer(Path(output_root), placement), thresholds, max_attempts)  # type: ignore[arg-type]
    node = _node_id()
    decoded = decode_items(table)
    for _item, carried in decoded:
        carried.nodes["finish"] = node
    pairs = [(_row_of(item, carried), item) for item, carried in decoded]
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


# --- the driver --------------------------------------------------------------------------------------
def _stage_resources(stage: Stage) -> dict[str, Any]:
    """Per-actor resources: one GPU for a CUDA device list, else one CPU; pool size = number of devices."""
    import ray.data

    on_gpu = any(device.startswith("cuda") for device in stage.devices)
    pool = ray.data.ActorPoolStrategy(size=max(1, len(stage.devices)))
    return {"num_gpus": 1 if on_gpu else 0, "num_cpus": 1, "compute": pool}


def build_dataset(blocks: list[Any], stages: list[Stage], config: Any) -> Any:
    """One window of rows (Arrow blocks, one loader batch each) as a Ray Dataset: loader tasks -> actor pools -> finish.

    Retries are bounded on purpose (Ray Data's own default restarts actors and retries their calls forever, so a
    file that crashes its worker natively would loop): a lost node costs a few retries, a poison file fails its
    window, which the driver then splits until the file fails alone. Ray 2.60 takes these only as the extra
    ``ray_remote_args`` it calls deprecated (removal announced for 2.64); the extra pins ray 2.60.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated.*")
        return _build_dataset(blocks, stages, config)


def _build_dataset(blocks: list[Any], stages: list[Stage], config: Any) -> Any:
    import ray.data

    loader, models = stages[0], stages[1:]
    block_rows = block_size(stages)
    ds = ray.data.from_arrow(blocks)  # one block per loader batch: the blocks spread over the nodes
    ds = ds.map_batches(load_batch, batch_size=block_rows, batch_format="pyarrow", num_cpus=1,
                        fn_kwargs={"stage": loader, "keep_image": bool(models)}, max_retries=TASK_RETRIES)
    for index, stage in enumerate(models):
        resources = _stage_resources(stage)
        cap = stage.batch_policy.max_batch_size or AUTO_BATCH_CEILING
        ds = ds.map_batches(RayStage, batch_size=cap, batch_format="pyarrow",
                            fn_constructor_kwargs={"stage": stage, "thresholds": config.rules,
                                                   "keep_image": index + 1 < len(models)},
                            max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES, **resources)
    return ds.map_batches(finish_batch, batch_size=block_rows, batch_format="pyarrow", num_cpus=1,
                          max_retries=TASK_RETRIES,
                          fn_kwargs={"thresholds": config.rules, "output_root": str(config.output),
                                     "placement": config.placement, "max_attempts": config.max_attempts})


def block_size(stages: list[Stage]) -> int:
    """Rows per block: one loader batch."""
    return max(1, stages[0].batch_policy.max_batch_size or 16)


def _worker_env() -> dict[str, str]:
    """Settings the workers need that they would not inherit from the driver's shell."""
    names = ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "BINNER_CACHE_DIR",
             "XDG_CACHE_HOME", "OMP_NUM_THREADS")
    return {name: os.environ[name] for name in names if name in os.environ}


def connect(address: str | None, needed_cpus: int) -> None:
    """Join the cluster at ``address``, or start a local Ray with enough CPU slots for the actor pools."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": _worker_env()}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="warning")
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, needed_cpus), runtime_env=runtime_env, log_to_driver=False,
                     include_dashboard=False, logging_level="warning")
    except Exception as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayEngineError(f"cannot start or reach {where}: {type(error).__name__}: {error}; check --ray-address "
                             "(host:port of the head node's GCS) and that `ray status` works from here") from None
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # binner draws its own bar
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-window "starting execution" lines
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": on purpose


def _absolute_weights(config: Any) -> Any:
    """Relative weight paths are the driver's; workers run elsewhere, so hand them absolute paths."""
    weights = Path(config.vision.detector.weights).expanduser()
    if not weights.is_absolute() and weights.exists():
        config = config.model_copy(deep=True)
        config.vision.detector.weights = str(weights.absolute())
    return config


def _is_setup_failure(error: BaseException) -> str | None:
    """The stage's own start-up error when an actor could not set up its stage (Ray wraps it in its traceback)."""
    found = re.search(r"RayStageSetupError: (stage [^\n]*)", str(error))
    return found.group(1).strip() if found else None


def account(stats: RunStats, outcome: Outcome) -> None:
    """The summary counters, as the local engine keeps them."""
    if outcome.status == "done":
        stats.finished += 1
        stats.bins[outcome.bin or "?"] = stats.bins.get(outcome.bin or "?", 0) + 1
    elif outcome.status == "quarantined":
        stats.finished += 1
        reason = outcome.reason or "unknown"
        stats.quarantined[reason] = stats.quarantined.get(reason, 0) + 1
    elif outcome.status == "vanished":
        stats.vanished += 1
    else:
        stats.retried += 1


def _outcome(data: dict[str, Any]) -> Outcome:
    return Outcome(**data)


class RayRun:
    """The driver: claims windows of rows, streams them through the cluster, records what comes back.

    Each window is one Ray Data run, and each run starts its actor pools again (about 15 s on the development
    machine), so windows start small (first results soon) and then grow to about ``target_window_s`` of work at the
    measured rate, up to ``max_window`` rows: the start-up then costs a few percent. Claimed rows are held as
    Arrow blocks and an id -> path map, never as a list of ledger rows.
    """

    def __init__(self, runtime: Any, stages: list[Stage], window_rows: int = WINDOW_ROWS,
                 on_finished: Callable[[Outcome], None] | None = None, max_window: int = MAX_WINDOW_ROWS,
                 target_window_s: float = TARGET_WINDOW_S) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.ledger = runtime.ledger
        self.stages = stages
        self.first_window = max(1, window_rows)
        self.max_window = max(self.first_window, max_window)
        self.target_window_s = target_window_s
        self.on_finished = on_finished
        self.stats = RunStats()
        self.move_mode = self.config.placement == "move"
        self._claimed: dict[int, str] = {}
        self._suspects: set[int] = set()  # rows of a window that failed twice, until each has finished
        self._culprit_charged = False

    def _wait_for_resources(self, timeout_s: float = 600.0) -> None:
        """After a lost node the pools may no longer fit: wait for the cluster to grow back, then give up."""
        deadline = time.monotonic() + timeout_s
        while (problem := missing_resources(self.stages)) is not None:
            if time.monotonic() > deadline:
                raise RayEngineError(problem)
            log.warning("waiting for the Ray cluster to have room for the stages again", problem=problem)
            time.sleep(5.0)

    def _claim(self, limit: int) -> list[Any]:
        """Claim up to ``limit`` pending rows, page by page, as Arrow blocks of one loader batch each."""
        import pyarrow as pa

        per_block = block_size(self.stages)
        page_size = max(per_block, (4096 // per_block) * per_block)
        self._claimed = {}
        blocks: list[Any] = []
        after_id = 0
        while len(self._claimed) < limit:
            rows = self.ledger.claim_pending(min(page_size, limit - len(self._claimed)), after_id)
            if not rows:
                break
            after_id = rows[-1].id
            records = [row_record(row, self.config.max_attempts) for row in rows]
            blocks += [pa.Table.from_pylist(records[at:at + per_block], schema=_schema())
                       for at in range(0, len(records), per_block)]
            self._claimed.update((row.id, row.path) for row in rows)
        return blocks

    def run(self) -> RunStats:
        window = self.first_window
        backoff = 1.0
        failures = 0  # windows failed in a row
        while True:
            self._wait_for_resources()
            blocks = self._claim(window)
            if not blocks:
                return self.stats
            left = set(self._claimed)
            claimed = len(left)
            started = time.monotonic()
            try:
                blocked = self._run_window(blocks, left)
            except RayEngineError:
                self.ledger.recover_interrupted()
                raise
            except Exception as error:  # the window failed as a whole, after Ray's own retries
                setup = _is_setup_failure(error)
                self.ledger.recover_interrupted()
                if setup:
                    raise RayEngineError(setup) from None
                message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                failures += 1
                # A lost node fails a window once: run the rest again as it was. A window that fails again holds
                # an item that kills its worker: its rows become suspects, and failing windows are halved until
                # that item fails alone; then only that row is charged an attempt (as a crash in a model call).
                if failures > 1 and not self._suspects:
                    self._suspects = set(left)
                if len(left) == 1 and self._suspects:
                    (row_id,) = left
                    self._record([Outcome(row_id, "pending", last_error=f"the Ray task failed: {message}")])
                    self._culprit_charged = True
                window = max(1, len(left) // 2) if self._suspects else len(left)
                log.warning("a Ray window failed; running its unfinished rows again", rows=claimed,
                            unfinished=len(left), next_window=window, error=message)
                continue
            failures = 0
            if blocked:
                self.ledger.recover_interrupted()
                log.error("placement paused: the output directory refused a write; will retry", error=blocked,
                          retry_in_s=backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            if left:  # nothing failed, yet rows did not come back: release them (never seen in practice)
                self.ledger.recover_interrupted()
            if self._suspects:  # bisecting: the culprit is in the other half (same size) until it has been charged
                window = max(1, min(window * 2 if self._culprit_charged else window, len(self._suspects)))
                continue
            self._culprit_charged = False
            rate = (claimed - len(left)) / max(time.monotonic() - started, 1e-3)
            window = int(min(self.max_window, max(self.first_window, window * 2, rate * self.target_window_s)))

    def _run_window(self, blocks: list[Any], left: set[int]) -> str | None:
        dataset = build_dataset(blocks, self.stages, self.config)
        blocked: str | None = None
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            outcomes: list[Outcome] = []
            for text in table.column("result").to_pylist():
                result = json.loads(text)
                if "blocked" in result:
                    blocked = result["blocked"]
                    continue
                outcomes.append(_outcome(result["outcome"]))
            self._record(outcomes)
            for outcome in outcomes:
                left.discard(outcome.id)
        return blocked

    def _record(self, outcomes: list[Outcome]) -> None:
        """Durable ledger rows first, then (move mode) the inputs they describe go away."""
        if not outcomes:
            return
        self.ledger.record(outcomes)
        placer = self.runtime.placer
        for outcome in outcomes:
            path = self._claimed.get(outcome.id)
            if (self.move_mode and placer is not None and path is not None and outcome.output_path
                    and outcome.status in ("done", "quarantined")):  # no output: the input was left where it is
                with contextlib.suppress(FileNotFoundError):
                    placer.remove_source(Path(path), Path(outcome.output_path), outcome.sha256)
            if outcome.status in ("done", "quarantined", "vanished"):
                self._suspects.discard(outcome.id)
            account(self.stats, outcome)
            if self.on_finished is not None:
                self.on_finished(outcome)


def needed_resources(stages: list[Stage]) -> dict[str, int]:
    """What the actor pools hold for the whole run, plus one CPU for the loader and finish tasks to move."""
    need = {"CPU": 1, "GPU": 0}
    for stage in stages[1:]:
        resources = _stage_resources(stage)
        size = max(1, len(stage.devices))
        need["CPU"] += resources["num_cpus"] * size
        need["GPU"] += resources["num_gpus"] * size
    return need


def missing_resources(stages: list[Stage]) -> str | None:
    """Why the cluster cannot run these pools now (the pipeline would wait for ever), or None."""
    import ray

    have = ray.cluster_resources()
    need = needed_resources(stages)
    short = [f"{need[kind]} {kind} (the cluster has {int(have.get(kind, 0))})" for kind in ("CPU", "GPU")
             if need[kind] > have.get(kind, 0)]
    if not short:
        return None
    return ("the Ray cluster is too small for the configured stages: they need " + " and ".join(short) +
            "; add nodes, or list fewer devices per stage (each device is one actor)")


def ray_stages(stages: list[Stage]) -> list[Stage]:
    """The stages themselves, out of their ``isolation: process`` wrapper: every Ray actor is already a process of
    its own (that is the isolation), and the wrapper, which owns a child process, locks and pipes, cannot travel."""
    from app.process_worker import ProcessStage

    return [stage.inner if isinstance(stage, ProcessStage) else stage for stage in stages]


def gpu_count_of_cluster() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_on_ray(runtime: Any, address: str | None, total: int | None, show_progress: bool,
               window_rows: int = WINDOW_ROWS) -> RunStats:
    """``binner once --engine ray``: connect, build the stages for the cluster's GPUs, run to the end."""
    import ray
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from app.wiring import build_stages

    config = _absolute_weights(runtime.config)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), disable=not show_progress)
    try:
        with progress:
            task = progress.add_task("connecting to Ray", total=total, rate=0.0)
            connect(address, needed_cpus=2 + sum(max(1, len(s.devices)) for s in build_stages(config)[1:]))
            from app.config import ConfigError

            try:
                stages = ray_stages(build_stages(config, gpu_count=gpu_count_of_cluster()))
            except ConfigError as error:
                raise RayEngineError(str(error)) from None
            if problem := missing_resources(stages):
                raise RayEngineError(problem)
            progress.update(task, description="binning on Ray")
            run = RayRun(runtime, stages, window_rows)

            def advance(outcome: Outcome) -> None:
                if outcome.status in ("done", "quarantined", "vanished"):
                    progress.update(task, advance=1, rate=run.stats.rate())

            run.on_finished = advance
            return run.run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
