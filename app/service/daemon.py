"""`binner run`: the long-running service.

Start: load and warm the models, recover interrupted rows, scan the input, then READY=1. Run: watch the
input (events are hints), rescan periodically, feed the pipeline from the ledger, ping the watchdog while
the pipeline makes progress. SIGTERM/SIGINT: STOPPING=1, stop intake, drain in-flight work, exit 0 within
``drain_timeout_s``. SIGHUP: reload the rules from the configuration file without reloading models.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

from app.build import Runtime, build_runtime, preflight_weights, prepare_dirs, take_files
from app.config import BinnerConfig, ConfigError, load_config
from app.engine import Pipeline, StageSetupError
from app.service.http import StatusServer
from app.service.lifecycle import run_async, stop_on_signals
from app.service.notify import SystemdNotifier, start_timeout_extended
from app.store import SettleTracker, is_disk_full, iter_scan

log = structlog.get_logger("binner.daemon")


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
        if pipeline.placement_paused:
            return True, "ok (placement paused: output disk refused writes)"
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
        try:
            result, _ = take_files(self.runtime, discovered)
        except sqlite3.OperationalError as error:  # a full state disk pauses intake; rescans find the files later
            if not is_disk_full(error):
                raise
            self.pipeline.note_state_full(error)
            return
        if result.new or result.requeued:
            self.pipeline.note_state_ok()
            log.info("files taken", new=result.new, requeued=result.requeued)

    async def _rescan(self) -> None:
        """Scan in chunks off the event loop: memory and loop time stay flat however many files exist."""
        chunks = iter_scan(self.config.input)
        while (observations := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            ready = self.settle.offer(observations)
            if ready:
                await anyio.to_thread.run_sync(self._intake, ready)
                if self.runtime:
                    self.pipeline.wake()
        self.last_rescan = time.monotonic()

    async def _watch(self) -> None:
        from watchfiles import Change, awatch

        try:
            async for changes in awatch(self.config.input, stop_event=self.stop_intake, recursive=True,
                                        watch_filter=None, debounce=200, step=25, rust_timeout=1000):
                paths = [Path(path) for change, path in changes if change != Change.deleted]
                ready: list[Any] = []
                for path in paths:
                    ready.extend(self.settle.hint(path))
                self.settle_changed.set()  # the intake loop recomputes when the next file is due
                if ready:
                    await anyio.to_thread.run_sync(self._intake, ready)
                    assert self.runtime is not None
                    self.pipeline.wake()
        except Exception as error:  # the rescans still find everything; say so and carry on
            log.error("watching the input failed; relying on periodic rescans", error=str(error),
                      input=str(self.config.input))

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
            if time.monotonic() - self.last_rescan >= self.config.rescan_interval_s:
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
        """Stop intake and let what is in flight finish, within ``drain_timeout_s`` (the scope's new deadline)."""
        log.info("stopping: draining in-flight work; a second Ctrl-C or SIGTERM stops at once", signal=why,
                 in_flight=self.pipeline.in_flight, timeout_s=self.config.drain_timeout_s)
        self.drain_until = time.monotonic() + self.config.drain_timeout_s
        self.notifier.stopping()
        self.stop_intake.set()
        self.settle_changed.set()
        self.pipeline.request_stop()
        scope.deadline = min(scope.deadline, anyio.current_time() + self.config.drain_timeout_s)

    def _report_drain(self, remaining_s: float) -> None:
        # A drain can take a while (a large batch on CPU): say what is left, so it never looks hung.
        log.info("draining", in_flight=self.pipeline.in_flight, remaining_s=round(max(0.0, remaining_s), 1),
                 hint="a second Ctrl-C or SIGTERM stops at once; interrupted files resume at the next start")

    async def _signals(self, scope: anyio.CancelScope) -> None:
        await stop_on_signals(
            scope, self.config.drain_timeout_s, lambda why: self.begin_drain(scope, why), report=self._report_drain,
            stop_now=lambda: log.warning("second stop signal: stopping now; interrupted files resume at the next start"),
            reload=self._reload_rules)

    def _reload_rules(self) -> None:
        assert self.runtime is not None
        self.notifier.reloading()
        try:
            fresh = load_config(self.config_file)
        except ConfigError as error:
            log.error("reload refused: the configuration is invalid; keeping the current rules", error=str(error))
        else:
            self.pipeline.thresholds = fresh.rules
            log.info("rules reloaded", rules=fresh.rules.model_dump())
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
        self.notifier.status("loading models")
        _quiet_model_progress_bars()
        from app import __version__

        log.info("starting binner", version=__version__,
                 config=str(config.source_file) if config.source_file else "built-in defaults (no --config)",
                 devices={r.stage.name: list(r.stage.devices) for r in self.pipeline.runners},
                 input=str(config.input), output=str(config.output), state_dir=str(config.state_dir))
        log.info("loading models", stages=[r.stage.name for r in self.pipeline.runners])
        with anyio.CancelScope(shield=False) as cancel_during_setup:
            async with anyio.create_task_group() as group:
                group.start_soon(self._signals_during_setup, cancel_during_setup)
                await self.pipeline.setup()
                group.cancel_scope.cancel()
        if cancel_during_setup.cancelled_caught:
            log.info("stopped while loading models")
            await self.pipeline.teardown()
            runtime.close()
            return 0
        recovered = runtime.ledger.recover_interrupted()
        if recovered:
            log.info("resuming files interrupted by the last stop", files=recovered)
        await self._rescan()
        backlog, _ = runtime.ledger.backlog()
        runtime.metrics.backlog.set(backlog)  # true from the first scrape after READY, not only after housekeeping
        self.serving = True
        self.notifier.ready()
        log.info("ready", input=str(config.input), output=str(config.output), backlog=backlog)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._signals, group.cancel_scope)
                group.start_soon(self._watch)
                group.start_soon(self._intake_loop)
                group.start_soon(self._housekeeping)
                await self.pipeline.run(until_idle=False)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.pipeline.teardown()
                if self.http:
                    self.http.stop()
                runtime.close()
        left = self.pipeline.in_flight
        log.info("stopped", drained=left == 0, left_for_next_start=left)
        return 0

    def fetch_missing_weights(self) -> None:
        """Preflight the weights; a first-start download keeps systemd's start timeout extended meanwhile."""

        def fetching() -> Any:
            self.notifier.status("downloading model weights (first start)")
            return start_timeout_extended(self.notifier)

        preflight_weights(self.config, while_fetching=fetching)

    async def _signals_during_setup(self, scope: anyio.CancelScope) -> None:
        """While models load, a stop signal stops at once (there is nothing in flight to drain)."""
        await stop_on_signals(scope, 0.0, lambda why: self.notifier.stopping(), reload=self._reload_rules)


def serve(config: BinnerConfig, config_file: Path | None) -> int:
    daemon = Daemon(config, config_file)
    try:
        code = int(run_async(daemon.main))
    except (ConfigError, StageSetupError) as error:
        # One message, on stderr (the journal under systemd): what is wrong and what to do.
        report_error(str(error), as_json=config.log.format == "json")
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


def report_error(message: str, as_json: bool) -> None:
    """One message on stderr (the journal under systemd): a JSON log line under ``log.format: json``, else text."""
    from app.logs import fatal_json_line, real_stream

    print(fatal_json_line(message) if as_json else f"error: {message}", file=real_stream("stderr"), flush=True)


def _quiet_model_progress_bars() -> None:
    """Progress bars are for terminals; under journald they are noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
