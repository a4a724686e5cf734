"""The Ray engine's driver: claims windows of ledger rows, streams them through the cluster, records what comes back.

Shape (Ray Data streams blocks between the steps, with backpressure and retries):

    driver: ledger.claim_pending -> ray.data.from_arrow(window of rows, one block per batch of the first stage)
      -> each stage in order:
           stateless (the loader)    CPU ``map_batches`` tasks, a fresh replica per block    (tasks.py)
           with models (ocr, vision) actor pools: one ``Stage`` replica per actor             (actor.py)
      -> finish                      CPU tasks: rules + placement into the shared output     (tasks.py)
    driver: iter_batches -> ledger.record (durable) -> remove inputs (move mode) -> progress, summary

Why it is built this way:

- Only the driver writes the ledger, and only after the finish task placed the file; inputs are removed after
  the ledger commit. Placement is idempotent by content (the Placer reuses a name that already holds the same
  bytes), so a driver killed with ``kill -9`` leaves ``processing`` rows that the next run recovers and places
  again without a second copy.
- Rows are claimed in windows, each run as one dataset: the file list never has to fit in the driver's memory.
  A window restarts the actor pools, so windows start small and grow to minutes of work (see ``RayRun``).
- A window that fails as a whole (a lost node after Ray's own retries) is run again; one that fails again (a
  file that crashes its worker natively) is split in halves down to single rows, and only a single row that
  still fails is charged an attempt: a poison file ends quarantined alone, its neighbours are not charged.
- Admission, routing, containment, finishing and accounting are the local engine's own (``app.engine``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from app.config import BinnerConfig, ConfigError, with_model_paths_absolute
from app.engine import FINISHED, PlacementPause, RunStats, remove_inputs, say
from app.progress import BinningProgress
from app.ray_data.codec import row_record, schema
from app.ray_data.dataset import (
    block_size,
    build_dataset,
    cluster_resources,
    fit_stages,
    missing_resources,
    needed_resources,
    pooled,
)
from app.store import Ledger, Outcome, Placer, shown
from stages.base import Stage

log = structlog.get_logger("binner.ray")

INSTALL_HINT = ("--engine ray needs Ray: install the extra with `pip install -e '.[ray]'` "
                "(or `pip install 'ray[data]==2.60.*'`), or use --engine local")
WINDOW_ROWS = 4096  # the first window: first results come soon
MAX_WINDOW_ROWS = 250_000  # later windows grow to about TARGET_WINDOW_S of work, up to this many rows
TARGET_WINDOW_S = 300.0


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


class LedgerRun(Protocol):
    """What the driver needs of a built runtime: the configuration, the ledger it records into, the writer."""

    config: BinnerConfig
    ledger: Ledger
    placer: Placer | None


def _worker_env() -> dict[str, str]:
    """Settings the workers need that they would not inherit from the driver's shell."""
    names = ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "BINNER_CACHE_DIR",
             "XDG_CACHE_HOME", "OMP_NUM_THREADS")
    return {name: os.environ[name] for name in names if name in os.environ}


def check_access(address: str, timeout_s: float = 15.0) -> None:
    """Fail in one line, before any file is touched, when the cluster refuses this driver's token or cannot be
    reached (``ray.init`` would retry for some twenty seconds and print a warning per try).

    The probe opens a GCS client in a child process, which also keeps the client's native log lines out of ours.
    """
    probe = "import sys\nfrom ray._raylet import GcsClient\nGcsClient(address=sys.argv[1])\n"
    try:
        done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    except subprocess.TimeoutExpired:
        raise RayEngineError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s: check --ray-address "
                             "(host:port of the head node's GCS) and that `ray status` works from here") from None
    if done.returncode == 0:
        return
    if "InvalidAuthToken" in done.stderr or "AuthenticationError" in done.stderr:
        given = ("RAY_AUTH_TOKEN is set but is not the cluster's" if os.environ.get("RAY_AUTH_TOKEN") else
                 "this driver has no RAY_AUTH_TOKEN")
        raise RayEngineError(f"the Ray cluster at {address} refused this driver's authentication token ({given}): "
                             "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the token every `ray start` of the cluster "
                             "was given (or copy the head's ~/.ray/auth_token here); see the README, \"Sorting an "
                             "archive on a Ray cluster\"")
    last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no answer")
    raise RayEngineError(f"cannot reach the Ray cluster at {address}: {last.strip()}; check --ray-address (host:port of "
                         "the head node's GCS) and that `ray status` works from here")


def no_auto_init() -> None:
    """Ray calls made while this process is not connected fail instead of starting a local Ray.

    A stopped window's Ray Data threads still call Ray after ``ray.shutdown``; by default each such call starts a
    local Ray (``RAY_ENABLE_AUTO_CONNECT``), which raced the driver's own reconnection and left it attached to a
    one-machine Ray whose pools never started. Ray reads the variable once, at import (and ``binner`` has imported
    Ray by then), so its switch is set as well.
    """
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    try:
        from ray._private import auto_init_hook
    except ImportError:  # another Ray than the pinned 2.60 moved it: the variable is the public switch
        return
    if hasattr(auto_init_hook, "enable_auto_connect"):
        auto_init_hook.enable_auto_connect = False


def connect(address: str | None, needed_cpus: int = 0) -> None:
    """Join the cluster at ``address``, or start a local Ray with at least ``needed_cpus`` CPU slots."""
    import ray

    no_auto_init()
    if address:
        check_access(address)
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


def _is_setup_failure(error: BaseException) -> str | None:
    """The stage's own start-up error when an actor could not set up its stage (Ray wraps it in its traceback)."""
    found = re.search(r"RayStageSetupError: (stage [^\n]*)", str(error))
    return found.group(1).strip() if found else None


def _outcome(data: dict[str, Any]) -> Outcome:
    return Outcome(**data)


class ClusterShrank(Exception):
    """The cluster no longer has what the running window's pools need (a node was lost)."""


@dataclass(frozen=True)
class Heartbeat:
    """Where a running window stands; ``since_last_result_s`` is None before its first result (the pools are still
    starting)."""

    done: int
    in_flight: int
    since_last_result_s: float | None
    running_s: float


CLUSTER_CHECK_S = 1.0  # how often a running window compares the cluster's resources with what its pools need
TICK_S = 1.0  # how often a running window tells ``on_heartbeat`` where it stands
POOLS_START_S = 60.0  # a window with no result yet after this long is said to be stalled, not starting


class RayRun:
    """The driver: claims windows of rows, streams them through the cluster, records what comes back.

    Each window is one Ray Data run, and each run starts its actor pools again (about 15 s on the development
    machine), so windows start small (first results soon) and then grow to about ``target_window_s`` of work at the
    measured rate, up to ``max_window`` rows: the start-up then costs a few percent. Claimed rows are held as
    Arrow blocks and an id -> path map, never as a list of ledger rows.
    """

    def __init__(self, runtime: LedgerRun, stages: list[Stage], window_rows: int = WINDOW_ROWS,
                 on_finished: Callable[[Outcome], None] | None = None, max_window: int = MAX_WINDOW_ROWS,
                 target_window_s: float = TARGET_WINDOW_S, reconnect: Callable[[], None] | None = None,
                 rebuild: Callable[[int], list[Stage]] | None = None,
                 on_heartbeat: Callable[[Heartbeat], None] | None = None,
                 more_coming: Callable[[], bool] | None = None) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.ledger = runtime.ledger
        self.stages = stages
        self.first_window = max(1, window_rows)
        self.max_window = max(self.first_window, max_window)
        self.target_window_s = target_window_s
        self.on_finished = on_finished
        self.reconnect = reconnect  # a fresh connection after a window was stopped (ray.shutdown ends its tasks)
        self.rebuild = rebuild  # the stages for a number of GPUs (``devices: auto`` follows the cluster)
        self.on_heartbeat = on_heartbeat
        self.more_coming = more_coming  # whether a scan may still record rows (then an empty claim is not the end)
        self.cluster_check_s = CLUSTER_CHECK_S
        self.stats = RunStats()
        self.move_mode = self.config.placement == "move"
        self._claimed: dict[int, str] = {}
        self._suspects: set[int] = set()  # rows of a window that failed twice, until each has finished
        self._culprit_charged = False

    def _wait_for_resources(self, timeout_s: float | None = None) -> None:
        """Make the pools fit the cluster as it is now: fewer replicas where a stage has several, a CPU in place of a
        GPU where its devices are ``auto``; where even one replica per stage does not fit, wait for the cluster to
        grow back (logging what is missing), and after ``ray.wait_for_resources_s`` stop with one line."""
        wait_s = self.config.ray.wait_for_resources_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        last_said = 0.0
        while (problem := missing_resources(self.stages, have := self._cluster())) is not None:
            fitted = fit_stages(self.stages, have, self.rebuild)
            if fitted is not None:
                log.warning("the Ray cluster has less room than the stages asked for; running smaller pools",
                            problem=problem, devices={stage.name: stage.devices for stage in pooled(fitted)})
                self.stages = fitted
                return
            now = time.monotonic()
            if now > deadline:
                pending, _ = self.ledger.backlog()
                raise RayEngineError(f"{problem}; waited {wait_s:g} s for it (ray.wait_for_resources_s); {pending} files "
                                     "are still pending: run the same command again to resume once the cluster has room")
            if now - last_said >= min(30.0, self.config.ray.heartbeat_s):
                log.warning("waiting for the Ray cluster to have room for the stages again", problem=problem,
                            cluster=have, waited_s=round(wait_s - (deadline - now)),
                            gives_up_in_s=round(deadline - now))
                last_said = now
            time.sleep(1.0)

    def _cluster(self) -> dict[str, int]:
        """The cluster's CPUs and GPUs now."""
        return cluster_resources()

    def _claim(self, limit: int) -> list[Any]:
        """Claim up to ``limit`` pending rows, page by page, as Arrow blocks of one batch of the first stage each."""
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
            blocks += [pa.Table.from_pylist(records[at:at + per_block], schema=schema())
                       for at in range(0, len(records), per_block)]
            self._claimed.update((row.id, row.path) for row in rows)
        return blocks

    def run(self) -> RunStats:
        window = self.first_window
        pause = PlacementPause()
        failures = 0  # windows failed in a row
        while True:
            # Read before the claim: a scan that records its last rows and ends between the two is then seen
            # as still going, and its last rows are claimed on the next turn.
            more = self.more_coming is not None and self.more_coming()
            blocks = self._claim(window)
            if not blocks:
                if more:
                    time.sleep(0.5)  # the scan is still recording the tree: the next rows come soon
                    continue
                return self.stats
            left = set(self._claimed)
            claimed = len(left)
            try:
                self._wait_for_resources()  # only with rows to run: a node lost after the last rows is no matter
                started = time.monotonic()
                blocked = self._run_window(blocks, left)
            except RayEngineError:
                self.ledger.recover_interrupted()
                raise
            except ClusterShrank as shrink:  # stopped here: Ray Data would wait for ever for the lost resources
                self.ledger.recover_interrupted()
                log.warning("the Ray cluster lost resources the stages need: stopping the window to size the pools "
                            "again", problem=str(shrink), done=claimed - len(left), unfinished=len(left))
                if self.reconnect is not None:
                    self.reconnect()
                window = max(1, len(left))
                continue
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
                time.sleep(pause.blocked(blocked))
                window = min(window, self.first_window)  # each try runs the models again: small ones while paused
                continue
            pause.placed()
            if left:  # nothing failed, yet rows did not come back: release them (never seen in practice)
                self.ledger.recover_interrupted()
            if self._suspects:  # bisecting: the culprit is in the other half (same size) until it has been charged
                window = max(1, min(window * 2 if self._culprit_charged else window, len(self._suspects)))
                continue
            self._culprit_charged = False
            rate = (claimed - len(left)) / max(time.monotonic() - started, 1e-3)
            window = int(min(self.max_window, max(self.first_window, window * 2, rate * self.target_window_s)))

    def _run_window(self, blocks: list[Any], left: set[int]) -> str | None:
        """One window through the cluster; results are recorded here, on the driver's thread, as they come."""
        dataset = build_dataset(blocks, self.stages, self.config)
        return self._follow(dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1), left)

    def _follow(self, batches: Iterable[Any], left: set[int]) -> str | None:
        """Record the result tables of a window as they come, and watch it meanwhile.

        The results are taken on a thread of their own, so that this one keeps time whether results come or not:
        ``on_heartbeat`` every second, a heartbeat in the log (rows done, rows in flight, seconds since the last
        result) every ``ray.heartbeat_s``, and the cluster's resources every ``cluster_check_s``. A cluster that has shrunk
        below what the pools need stops the window (``ClusterShrank``). Returns the output's refusal, if any.
        """
        results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=4)
        stop = threading.Event()

        def hand_over(kind: str, value: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put((kind, value), timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False  # the window was given up: nobody takes results any more

        def consume() -> None:
            try:
                for table in batches:
                    if not hand_over("table", table):
                        return
                hand_over("end", None)
            except BaseException as error:  # noqa: BLE001 - handed to the driver's thread as it is
                hand_over("error", error)

        threading.Thread(target=consume, name="ray-window", daemon=True).start()
        blocked: str | None = None
        total = len(left)
        started = last_tick = last_beat = last_check = time.monotonic()
        last_result: float | None = None
        try:
            while True:
                due = min(last_tick + TICK_S, last_beat + self.config.ray.heartbeat_s,
                          last_check + self.cluster_check_s)
                try:
                    kind, value = results.get(timeout=max(0.01, due - time.monotonic()))
                except queue.Empty:
                    kind, value = "nothing", None
                if kind == "end":
                    return blocked
                if kind == "error":
                    raise value
                now = time.monotonic()
                if kind == "table":
                    last_result = now
                    outcomes: list[Outcome] = []
                    for text in value.column("result").to_pylist():
                        result = json.loads(text)
                        if "blocked" in result:
                            blocked = result["blocked"]
                            continue
                        outcomes.append(_outcome(result["outcome"]))
                    self._record(outcomes)
                    for outcome in outcomes:
                        left.discard(outcome.id)
                beat = Heartbeat(total - len(left), len(left), None if last_result is None else now - last_result,
                                 now - started)
                if now - last_tick >= TICK_S:
                    last_tick = now
                    if self.on_heartbeat is not None:
                        self.on_heartbeat(beat)
                if now - last_beat >= self.config.ray.heartbeat_s:
                    last_beat = now
                    self._say(beat)
                if now - last_check >= self.cluster_check_s:
                    last_check = now
                    if (problem := missing_resources(self.stages, self._cluster())) is not None:
                        raise ClusterShrank(problem)
        finally:
            stop.set()

    def _say(self, beat: Heartbeat) -> None:
        """The heartbeat in the log; a warning when nothing came back for a whole interval (a stalled window shows
        at once), but not while the pools are starting."""
        fields = {"rows_done": beat.done, "rows_in_flight": beat.in_flight, "seconds_running": round(beat.running_s, 1)}
        if beat.since_last_result_s is None:
            if beat.running_s < POOLS_START_S:
                log.info("Ray window starting the pools: no result yet", **fields)
            else:
                log.warning("Ray window stalled: no result yet", **fields)
            return
        fields["seconds_since_last_result"] = round(beat.since_last_result_s, 1)
        if beat.since_last_result_s >= self.config.ray.heartbeat_s:
            log.warning("Ray window stalled: no result lately", **fields)
        else:
            log.info("Ray window running", **fields)

    def _record(self, outcomes: list[Outcome]) -> None:
        """Durable ledger rows first, then (move mode) the inputs they describe go away.

        A failure here is the driver's own (its state disk, its view of the input), not the window's: it stops the
        run with one line, rather than being taken for a lost window and run again (and charged to its files)."""
        if not outcomes:
            return
        try:
            self.ledger.record(outcomes)
            remove_inputs(self.runtime.placer, self.move_mode,
                          ((path, outcome) for outcome in outcomes
                           if (path := self._claimed.get(outcome.id)) is not None))
        except (sqlite3.Error, OSError) as error:
            raise RayEngineError(
                f"the driver could not record what the cluster finished ({type(error).__name__}: {error}) in "
                f"{shown(self.config.ledger_path)}; files already placed stay in place and are recorded by the next "
                "run: fix the state directory's disk (free space, permissions), then run the same command again"
            ) from error
        for outcome in outcomes:
            if outcome.status in FINISHED:
                self._suspects.discard(outcome.id)
            self.stats.count(outcome)
            say(self._claimed.get(outcome.id, f"row {outcome.id}"), outcome)
            if self.on_finished is not None:
                self.on_finished(outcome)


def gpu_count_of_cluster() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_on_ray(runtime: LedgerRun, address: str | None, progress: BinningProgress,
               build_stages: Callable[..., list[Stage]], window_rows: int = WINDOW_ROWS,
               more_coming: Callable[[], bool] | None = None) -> RunStats:
    """``binner once --engine ray``: connect, build the stages once for the cluster's GPUs, run to the end.

    ``build_stages(config, gpu_count=, where=)`` is ``app.build``'s: on a cluster, device lists are checked against
    its GPU resources, not this driver's (a CPU-only driver may send ``cuda:N`` stages to GPU nodes); a local Ray is
    this machine, and is started with enough CPU slots for the stages' pools. ``progress`` is the caller's bar, whose
    total the scan grows (``more_coming()`` is true while it does).
    """
    import ray

    config = with_model_paths_absolute(runtime.config)  # the workers do not run in this driver's folder
    scanning = more_coming or (lambda: False)

    def build(gpus: int | None, where: str) -> list[Stage]:
        try:
            return build_stages(config, gpu_count=gpus, where=where)
        except ConfigError as error:
            raise RayEngineError(str(error)) from None

    def join(stages: list[Stage]) -> None:
        # One CPU slot more than the pools and one task need, so that a stage's task and a finish task run at once.
        connect(address, needed_cpus=needed_resources(stages)["CPU"] + 1)

    try:
        with progress.shown("connecting to Ray"):
            if address:
                connect(address)
                stages = build(gpu_count_of_cluster(), "the Ray cluster")
            else:
                stages = build(None, "this machine")
                join(stages)
            if problem := missing_resources(stages, cluster_resources()):
                raise RayEngineError(problem)
            progress.phase("binning on Ray (scanning the input)" if scanning() else "binning on Ray")

            def reconnect() -> None:
                ray.shutdown()  # ends the stopped window's actors and tasks, and Ray Data's wait for them
                join(run.stages)

            def heartbeat(beat: Heartbeat) -> None:
                still = "; scanning the input" if scanning() else ""
                if beat.since_last_result_s is None:
                    progress.phase(f"binning on Ray (starting the pools, {beat.in_flight} in flight{still})")
                else:
                    progress.phase(f"binning on Ray ({beat.in_flight} in flight, last result "
                                   f"{beat.since_last_result_s:.0f} s ago{still})")

            run = RayRun(runtime, stages, window_rows, reconnect=reconnect, on_heartbeat=heartbeat,
                         rebuild=lambda gpus: build_stages(config, gpu_count=gpus, where="the Ray cluster"),
                         more_coming=more_coming)

            def advance(outcome: Outcome) -> None:
                if outcome.status in FINISHED:
                    progress.advance(run.stats.rate())

            run.on_finished = advance
            return run.run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
