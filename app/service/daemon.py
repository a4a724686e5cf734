"""`binner run`: the long-running service.

Start: load and warm the models, recover interrupted rows, scan the input, then READY=1. Run: watch the
input (events are hints), rescan periodically, feed the pipeline from the ledger, ping the watchdog while
the pipeline makes progress. SIGTERM/SIGINT: STOPPING=1, stop intake, drain in-flight work, exit 0 within
``drain_timeout_s``. SIGHUP: reload the rules from the configuration file without reloading models.

No signal ever has its default action once ``serve`` runs. SIGHUP has one handler for the whole life of the
process, installed first: before the rules can be swapped it notes the reload (applied once they can), afterwards
it hands the reload to the event loop, and once the service stops SIGHUP is ignored outright. So there is no
gap, while starting, running, draining or shutting down, where SIGHUP would end the process. One signal task
serves SIGINT and SIGTERM (the drain) from loading to the end.
The watch (watchdog's inotify observer, which takes names as bytes: a name that is not UTF-8 is an event like any
other) is a hint, and a hint that stops is re-armed: when the watcher cannot start or dies (inotify limits) or the
input directory is removed or replaced, the daemon says so, shows a degraded watch in /healthz and
``binner_watch_degraded``, re-arms the watch (backing off while it keeps failing) and rescans what it may have missed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import anyio.abc
import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from app.build import Runtime, build_runtime, preflight_weights, prepare_dirs, take_files
from app.config import BinnerConfig, ConfigError, load_config
from app.engine import Pipeline, StageSetupError
from app.service.http import StatusServer
from app.service.lifecycle import run_async, stop_on_signals
from app.service.notify import SystemdNotifier, start_timeout_extended
from app.store import SettleTracker, is_disk_full, iter_scan, shown

log = structlog.get_logger("binner.daemon")

# A re-armed watch that runs this long without failing counts as healthy again. One that fails sooner is re-armed
# at once WATCH_QUICK_RETRIES times in a row, then after a back-off that doubles from WATCH_BACKOFF_FIRST_S up to
# WATCH_BACKOFF_MAX_S: a watch that keeps failing costs a rescan per re-arm, and files still arrive no later than
# the periodic rescan would bring them.
WATCH_STABLE_S = 5.0
WATCH_QUICK_RETRIES = 2
WATCH_BACKOFF_FIRST_S = 0.5
WATCH_BACKOFF_MAX_S = 60.0
# How often the watch checks that the input directory is still the one it watches (removed, or replaced by another).
ROOT_CHECK_S = 1.0


def _directory_id(path: Path) -> tuple[int, int] | None:
    """Device and inode of the directory at ``path``, or None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if os.path.isdir(path) else None


# How long a burst of watch events is gathered before the intake looks at it.
HINT_BATCH_S = 0.05
_HINTED = frozenset({"created", "modified", "closed", "moved"})  # not opened/closed_no_write: loading an input opens it


class _Hints(FileSystemEventHandler):
    """watchdog's events, on its dispatcher thread, as (kind, path) for the event loop. Paths are ``str`` with
    surrogate escapes for bytes that are not UTF-8, like every path binner handles, so no name can end the watch."""

    def __init__(self, hints: queue.SimpleQueue[tuple[str, str] | None]) -> None:
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type == "deleted":
                self.hints.put(("deleted", os.fsdecode(event.src_path)))
            return
        if event.event_type in _HINTED:
            self.hints.put((event.event_type, os.fsdecode(event.dest_path or event.src_path)))


def _next_hints(hints: queue.SimpleQueue[tuple[str, str] | None]) -> list[tuple[str, str]] | None:
    """The next burst of hints (on a worker thread: it blocks until one comes); None once the watch ends."""
    first = hints.get()
    if first is None:
        return None
    time.sleep(HINT_BATCH_S)
    batch = {first}
    while True:
        try:
            more = hints.get_nowait()
        except queue.Empty:
            return list(batch)
        if more is None:
            hints.put(None)  # seen after this batch
            return list(batch)
        batch.add(more)


class Daemon:
    def __init__(self, config: BinnerConfig, config_file: Path | None) -> None:
        self.config = config
        self.config_file = config_file
        self.notifier = SystemdNotifier()
        self.runtime: Runtime | None = None
        self.stop_intake = anyio.Event()
        self.settle_changed = anyio.Event()  # a watch event arrived (or a stop): the intake loop looks again
        self.settle = SettleTracker(config.input, config.settle_ms / 1000.0)
        self.http: StatusServer | None = None
        self.last_rescan = 0.0
        # Written by the housekeeping task, read by /healthz (another thread); all times are time.monotonic(),
        # the clock of Pipeline.last_progress.
        self.backlog = 0
        self.work_since: float | None = None  # when the backlog last went from empty to non-empty
        self.housekept_at: float | None = None  # when housekeeping last got an answer from the ledger
        self.drain_until: float | None = None  # set when a stop signal starts the drain
        self.serving = False  # models warm and the start-up scan recorded: /readyz and READY=1
        self.watch_problem: str | None = None  # why the watch is degraded (read by /healthz), None while it works
        self.rescan_requested = False  # the watch was re-armed: rescan now for what it may have missed
        self.rescan_when_resumed = False  # files were seen while the state disk was full: rescan once it has room
        self.reload_pending = False  # a SIGHUP arrived before the rules could be swapped
        self.reloads: asyncio.AbstractEventLoop | None = None  # the loop that runs reloads, while it runs

    def hold_signals(self) -> None:
        """From now on a SIGHUP cannot end the process (``_on_sighup`` for good). Call from the main thread,
        before anything slow."""
        signal.signal(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        """Runs between two bytecodes of the main thread: only note the reload, or queue it on the event loop
        (``call_soon_threadsafe`` only appends and wakes the loop), never run it here."""
        loop = self.reloads
        if loop is None:
            self.reload_pending = True
            return
        try:
            loop.call_soon_threadsafe(self._reload_rules)
        except RuntimeError:  # the loop is closing: the service is stopping, the rules no longer matter
            pass

    # --- health -----------------------------------------------------------------------------------
    @property
    def pipeline(self) -> Pipeline:
        assert self.runtime is not None and self.runtime.pipeline is not None
        return self.runtime.pipeline

    def healthy(self) -> tuple[bool, str]:
        """Unhealthy when work waits and nothing moves for ``stall_timeout_s``, whatever part is stuck."""
        if self.runtime is None:
            return True, "starting"
        pipeline = self.pipeline
        limit = self.config.stall_timeout_s
        stalled = pipeline.stalled_for()
        if stalled > limit:
            return False, f"a model call has been running for {stalled:.0f} s (stall_timeout_s={limit:g})"
        now = time.monotonic()
        if self.housekept_at is not None and now - self.housekept_at > limit:
            return False, (f"the ledger has not answered for {now - self.housekept_at:.0f} s "
                           f"(stall_timeout_s={limit:g}); check the state directory's disk")
        idle_for = self.progress_stalled_for(now)
        if idle_for > limit:
            where = "placement paused: the output disk refuses writes" if pipeline.placement_paused else (
                "queues " + ", ".join(f"{name}={queue.depth}" for name, queue in
                                      [*pipeline.queues.items(), ("sink", pipeline.sink_queue)]))
            return False, (f"nothing placed for {idle_for:.0f} s while {self.backlog} files wait and "
                           f"{pipeline.in_flight} are in flight ({where}; stall_timeout_s={limit:g})")
        paused = [text for on, text in (
            (getattr(pipeline, "state_paused", False), "the state disk is full: intake and placement wait for space"),
            (pipeline.placement_paused, "placement paused: output disk refused writes")) if on]
        if self.watch_problem is not None:  # still serving, so no 503 (a restart would not help): but not "ok"
            return True, "degraded: " + "; ".join([
                f"watching the input: {self.watch_problem}; new files are found by rescans meanwhile (every "
                f"{self.config.rescan_interval_s:g} s)", *paused])
        if paused:
            return True, f"ok ({'; '.join(paused)})"
        return True, "ok"

    def progress_stalled_for(self, now: float) -> float:
        """Seconds since the last placement (or since work arrived, if later) while a backlog exists; else 0."""
        if self.runtime is None or self.work_since is None:
            return 0.0
        if not self.backlog and not self.pipeline.in_flight:
            return 0.0
        return max(0.0, now - max(self.pipeline.last_progress, self.work_since))

    def ready(self) -> bool:
        return self.serving

    # --- intake -----------------------------------------------------------------------------------
    def _intake(self, discovered: list[Any]) -> None:
        assert self.runtime is not None
        if not discovered:
            return
        if self.pipeline.state_paused:  # the room freed must go to the work in flight; look again once resumed
            self.rescan_when_resumed = True
            return
        try:
            result, _ = take_files(self.runtime, discovered)
        except sqlite3.OperationalError as error:  # a full state disk pauses intake; a rescan finds the files later
            if not is_disk_full(error):
                raise
            self.pipeline.note_state_full(error)
            self.rescan_when_resumed = True
            return
        if result.new or result.requeued:
            log.info("files taken", new=result.new, requeued=result.requeued)

    async def _rescan(self) -> None:
        """Scan in chunks off the event loop: memory and loop time stay flat however many files exist."""
        self.rescan_requested = False
        chunks = iter_scan(self.config.input)
        while (observations := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            ready = self.settle.offer(observations)
            if ready:
                await anyio.to_thread.run_sync(self._intake, ready)
                if self.runtime:
                    self.pipeline.wake()
        self.last_rescan = time.monotonic()

    def request_rescan(self) -> None:
        """Rescan at the intake loop's next turn (the watch was re-armed and may have missed files meanwhile)."""
        self.rescan_requested = True
        self.settle_changed.set()

    # --- the watch ----------------------------------------------------------------------------------
    async def _watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the input for as long as intake runs; re-arm the watch whenever it stops, backing off while it
        keeps failing, and rescan after each re-arm for what it missed. Started with ``TaskGroup.start``, it
        returns to the starter once the first watch is armed (or could not be), so a scan after that misses
        nothing: a file written meanwhile is either listed by the scan or seen by the watch."""
        quick_failures = 0
        missing_since: float | None = None
        first = True
        while not self.stop_intake.is_set():
            root = _directory_id(self.config.input)
            if root is None:
                if missing_since is None:
                    missing_since = time.monotonic()
                    self._watch_degraded(f"the input directory {shown(self.config.input)} does not exist; nothing "
                                         "can arrive until it exists again")
                    log.error("the input directory is gone: watching it again once it exists; meanwhile nothing can "
                              "arrive (recreate it, or fix the mount it is on)", input=shown(self.config.input))
                task_status.started()
                task_status = anyio.TASK_STATUS_IGNORED
                with anyio.move_on_after(ROOT_CHECK_S):
                    await self.stop_intake.wait()
                continue
            if missing_since is not None:
                log.info("the input directory exists again: watching it", input=shown(self.config.input),
                         missing_for_s=round(time.monotonic() - missing_since, 1))
                missing_since = None
            started = time.monotonic()
            why = await self._watch_until_it_stops(root, rescan_when_armed=not first, armed=task_status)
            task_status = anyio.TASK_STATUS_IGNORED
            first = False
            if why is None:  # intake stopped
                return
            if _directory_id(self.config.input) is None:
                continue  # removed: said and waited for above
            quick_failures = 0 if time.monotonic() - started >= WATCH_STABLE_S else quick_failures + 1
            backoff = 0.0 if quick_failures <= WATCH_QUICK_RETRIES else min(
                WATCH_BACKOFF_FIRST_S * 2 ** (quick_failures - WATCH_QUICK_RETRIES - 1), WATCH_BACKOFF_MAX_S)
            self._watch_degraded(why)
            log.error("watching the input stopped; re-arming it (rescans find what it missed)", reason=why,
                      retry_in_s=backoff, input=shown(self.config.input))
            if backoff:
                with anyio.move_on_after(backoff):
                    await self.stop_intake.wait()

    async def _watch_until_it_stops(self, root: tuple[int, int], rescan_when_armed: bool,
                                    armed: anyio.abc.TaskStatus[None]) -> str | None:
        """One watch of the input directory whose identity is ``root``: returns why it stopped by itself, or None
        when intake stopped."""
        from watchdog.observers import Observer

        hints: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        observer = Observer(timeout=0.2)
        try:
            observer.schedule(_Hints(hints), str(self.config.input), recursive=True)
            observer.start()
        except Exception as error:  # noqa: BLE001 - inotify limits, a directory gone meanwhile: back off, try again
            observer.stop()
            armed.started()
            return f"the watcher could not start ({type(error).__name__}: {error})"
        armed.started()
        stopped: list[str] = []
        roots = {str(self.config.input), os.path.realpath(self.config.input)}

        def end(why: str | None) -> None:
            if why is not None:
                stopped.append(why)
            hints.put(None)  # wakes the thread waiting for hints

        async def guard() -> None:  # intake stops, the directory is no longer the one watched, or watchdog died
            while True:
                with anyio.move_on_after(ROOT_CHECK_S):
                    await self.stop_intake.wait()
                if self.stop_intake.is_set():
                    return end(None)
                if _directory_id(self.config.input) != root:
                    return end("the input directory was removed or replaced")
                emitters = observer.emitters
                if not observer.is_alive() or not emitters or not all(emitter.is_alive() for emitter in emitters):
                    return end("the watcher stopped")

        async def settle_in() -> None:  # the watch is armed: catch up on the gap, then call it healthy after a while
            if rescan_when_armed:
                self.request_rescan()
            await anyio.sleep(WATCH_STABLE_S)
            self._watch_ok()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(guard)
                group.start_soon(settle_in)
                while (batch := await anyio.to_thread.run_sync(_next_hints, hints, abandon_on_cancel=True)) is not None:
                    if any(kind == "deleted" and path in roots for kind, path in batch):
                        end("the input directory was removed")
                    await self._take_hints([Path(path) for kind, path in batch if kind != "deleted"])
                group.cancel_scope.cancel()
        finally:
            hints.put(None)
            observer.stop()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(observer.join, 5.0)
        if self.stop_intake.is_set():
            return None
        return stopped[0] if stopped else "the watcher stopped"

    async def _take_hints(self, paths: list[Path]) -> None:
        ready: list[Any] = []
        for path in paths:
            ready.extend(self.settle.hint(path))
        self.settle_changed.set()  # the intake loop recomputes when the next file is due
        if ready:
            await anyio.to_thread.run_sync(self._intake, ready)
            self.pipeline.wake()

    def _watch_degraded(self, why: str) -> None:
        """The reason first, then the gauge: whoever sees the gauge at 1 finds /healthz already degraded."""
        was_ok = self.watch_problem is None
        self.watch_problem = why
        if was_ok and self.runtime is not None:
            self.runtime.metrics.watch_degraded.set(1)

    def _watch_ok(self) -> None:
        if self.watch_problem is not None:
            log.info("watching the input again", input=shown(self.config.input), after=self.watch_problem)
            self.watch_problem = None
            if self.runtime is not None:
                self.runtime.metrics.watch_degraded.set(0)

    async def _intake_loop(self) -> None:
        settle_s = max(self.config.settle_ms / 1000.0, 0.05)
        while not self.stop_intake.is_set():
            due = self.settle.next_due_s()
            wait_s = min(settle_s / 2, 1.0) if due is None else min(max(due, 0.005), 1.0)
            with anyio.move_on_after(wait_s):
                await self.settle_changed.wait()
            self.settle_changed = anyio.Event()
            if self.stop_intake.is_set():
                return
            if self.rescan_when_resumed and not self.pipeline.state_paused:
                self.rescan_when_resumed = False
                self.rescan_requested = True
            if self.rescan_requested or time.monotonic() - self.last_rescan >= self.config.rescan_interval_s:
                await self._rescan()
            elif len(self.settle):
                ready = self.settle.poll()
                if ready:
                    await anyio.to_thread.run_sync(self._intake, ready)
                    assert self.runtime is not None
                    self.pipeline.wake()

    # --- housekeeping -------------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        assert self.runtime is not None
        runtime = self.runtime
        interval = self.notifier.watchdog_interval_s()
        ping_every = interval / 2 if interval else None
        last_ping = last_status = 0.0
        while True:
            backlog, oldest = await anyio.to_thread.run_sync(runtime.ledger.backlog)
            now = time.monotonic()
            self.housekept_at = now
            self.backlog = backlog
            if backlog or self.pipeline.in_flight:
                if self.work_since is None:
                    self.work_since = now
            else:
                self.work_since = None
            runtime.metrics.backlog.set(backlog)
            runtime.metrics.oldest_pending_age.set(max(0.0, time.time() - oldest) if oldest else 0.0)
            ok, detail = self.healthy()
            if ping_every and ok and now - last_ping >= ping_every:
                self.notifier.watchdog()
                last_ping = now
            elif not ok:
                log.error("pipeline unhealthy: not pinging the watchdog", detail=detail)
            if now - last_status >= 5.0:
                stats = self.pipeline.stats
                self.notifier.status(f"backlog {backlog}, in flight {self.pipeline.in_flight}, "
                                     f"binned {stats.finished}, {stats.rate():.2f} img/s")
                last_status = now
            await anyio.sleep(min(1.0, ping_every or 1.0))

    def begin_drain(self, scope: anyio.CancelScope, why: str) -> None:
        """Stop intake and let what is in flight finish, within ``drain_timeout_s`` (the scope's new deadline).

        Before the daemon serves (models loading, the start-up scan) nothing is in flight: it stops at once."""
        self.notifier.stopping()
        if not self.serving:
            log.info("stopping while starting: nothing is in flight yet", signal=why)
            scope.cancel()
            return
        log.info("stopping: draining in-flight work; a second Ctrl-C or SIGTERM stops at once", signal=why,
                 in_flight=self.pipeline.in_flight, timeout_s=self.config.drain_timeout_s)
        self.drain_until = time.monotonic() + self.config.drain_timeout_s
        self.stop_intake.set()
        self.settle_changed.set()
        self.pipeline.request_stop()
        scope.deadline = min(scope.deadline, anyio.current_time() + self.config.drain_timeout_s)

    def _report_drain(self, remaining_s: float) -> None:
        # A drain can take a while (a large batch on CPU): say what is left, so it never looks hung.
        log.info("draining", in_flight=self.pipeline.in_flight, remaining_s=round(max(0.0, remaining_s), 1),
                 hint="a second Ctrl-C or SIGTERM stops at once; interrupted files resume at the next start")

    async def _signals(self, scope: anyio.CancelScope, *,
                       task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await stop_on_signals(
            scope, self.config.drain_timeout_s, lambda why: self.begin_drain(scope, why), report=self._report_drain,
            stop_now=lambda: log.warning("second stop signal: stopping now; interrupted files resume at the next start"),
            task_status=task_status)

    def _reload_rules(self) -> None:
        """SIGHUP: new rules from the configuration file. Whatever is wrong with the file (invalid, not YAML, not
        UTF-8, unreadable, a directory), the reload is refused in one log line and the current rules stay."""
        assert self.runtime is not None
        if self.serving:
            self.notifier.reloading()
        try:
            fresh = load_config(self.config_file)
        except Exception as error:  # noqa: BLE001 - a reload must never end the service
            why = " ".join(line.strip() for line in str(error).splitlines()) if isinstance(error, ConfigError) else \
                f"{type(error).__name__}: {error}"
            log.error("reload refused: the configuration cannot be used; keeping the current rules", error=why,
                      config=shown(str(self.config_file)) if self.config_file else os.environ.get("BINNER_CONFIG"))
        else:
            self.pipeline.thresholds = fresh.rules
            log.info("rules reloaded", rules=fresh.rules.model_dump())
        if self.serving:
            self.notifier.ready()

    # --- main -------------------------------------------------------------------------------------
    async def main(self) -> int:
        config = self.config
        prepare_dirs(config)  # a missing input is refused before any weight is fetched
        self.fetch_missing_weights()
        self.runtime = runtime = build_runtime(config, command="run")
        if config.http.enabled:
            self.http = StatusServer(config.http.host, config.http.port, runtime.metrics.registry,
                                     self.healthy, self.ready).start()
            log.info("serving /metrics, /healthz, /readyz", address=f"http://{config.http.host}:{self.http.port}")
        try:
            async with anyio.create_task_group() as group:
                # One signal task for the whole life: loading, the start-up scan, running and draining.
                await group.start(self._signals, group.cancel_scope)
                self.reloads = asyncio.get_running_loop()  # the rules can be swapped: SIGHUPs reload from now on
                if self.reload_pending:
                    self.reload_pending = False
                    log.info("a reload (SIGHUP) was asked for while starting; applying it now")
                    self._reload_rules()
                await self._start_serving(runtime, group)
                group.start_soon(self._intake_loop)
                group.start_soon(self._housekeeping)
                await self.pipeline.run(until_idle=False)
                group.cancel_scope.cancel()
        finally:
            # Stopping: the rules no longer matter, and SIGHUP is ignored by the kernel from here to the exit (the
            # interpreter's own shutdown puts a Python handler back to the default action, which would end the
            # process with SIGHUP in its last moments).
            self.reloads = None
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            with anyio.CancelScope(shield=True):
                await self.pipeline.teardown()
                if self.http:
                    self.http.stop()
                runtime.close()
        if not self.serving:
            log.info("stopped while starting")
            return 0
        left = self.pipeline.in_flight
        log.info("stopped", drained=left == 0, left_for_next_start=left)
        return 0

    async def _start_serving(self, runtime: Runtime, group: anyio.abc.TaskGroup) -> None:
        """Load and warm the models, recover interrupted rows, arm the watch, scan the input; then READY=1."""
        config = self.config
        self.notifier.status("loading models")
        _quiet_model_progress_bars()
        from app import __version__

        log.info("starting binner", version=__version__,
                 config=shown(str(config.source_file)) if config.source_file else "built-in defaults (no --config)",
                 devices={r.stage.name: list(r.stage.devices) for r in self.pipeline.runners},
                 input=shown(config.input), output=shown(config.output), state_dir=shown(config.state_dir))
        log.info("loading models", stages=[r.stage.name for r in self.pipeline.runners])
        await self.pipeline.setup()
        recovered = runtime.ledger.recover_interrupted()
        if recovered:
            log.info("resuming files interrupted by the last stop", files=recovered)
        refused = runtime.ledger.retry_refused()
        if refused:
            log.info("trying again the files the output refused before this start", files=refused)
        await group.start(self._watch)
        await self._rescan()
        backlog, _ = runtime.ledger.backlog()
        runtime.metrics.backlog.set(backlog)  # true from the first scrape after READY, not only after housekeeping
        self.serving = True
        self.notifier.ready()
        log.info("ready", input=shown(config.input), output=shown(config.output), backlog=backlog)

    def fetch_missing_weights(self) -> None:
        """Preflight the weights; a first-start download keeps systemd's start timeout extended meanwhile."""

        def fetching() -> Any:
            self.notifier.status("downloading model weights (first start)")
            return start_timeout_extended(self.notifier)

        preflight_weights(self.config, while_fetching=fetching)


def serve(config: BinnerConfig, config_file: Path | None) -> int:
    daemon = Daemon(config, config_file)
    daemon.hold_signals()
    try:
        code = int(run_async(daemon.main))
    except BaseException as error:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # ending: no SIGHUP may cut the last line short (see main)
        problem = _user_problem(error)
        if problem is None:
            raise
        # One message, on stderr (the journal under systemd): what is wrong and what to do.
        report_error(str(problem), as_json=config.log.format == "json")
        return 2
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    busy = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if busy:
        # A model call that outlived the drain cannot be interrupted, and Python would wait for its thread at
        # exit. The ledger already holds everything durable; its rows resume at the next start.
        log.warning("exiting while model threads are still busy", threads=busy)
        sys.stdout.flush()
        os._exit(code)
    return code


def _user_problem(error: BaseException) -> ConfigError | StageSetupError | None:
    """The configuration or set-up error inside ``error`` (task groups wrap what they raise), if that is what it is."""
    if isinstance(error, (ConfigError, StageSetupError)):
        return error
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return _user_problem(error.exceptions[0])
    return None


def report_error(message: str, as_json: bool) -> None:
    """One message on stderr (the journal under systemd): a JSON log line under ``log.format: json``, else text."""
    from app.logs import fatal_json_line, real_stream

    print(fatal_json_line(message) if as_json else f"error: {shown(message, lines=True)}", file=real_stream("stderr"),
          flush=True)


def _quiet_model_progress_bars() -> None:
    """Progress bars are for terminals; under journald they are noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
