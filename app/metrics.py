"""Every Prometheus metric binner exports, in one registry owned by the one process (no multiprocess mode)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info  # noqa: F401
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app import __version__

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

BINS = ("A", "B", "C")
QUEUES = ("load", "ocr", "vision", "sink")
# Quarantine reasons a file can get; ``<stage>_error`` is added per stage at start-up (README, "Never losing a file").
QUARANTINE_REASONS = ("empty_file", "not_an_image", "truncated", "too_many_pixels", "file_too_large", "decode_error",
                      "unreadable", "out_of_memory", "retries_exhausted", "crashed_repeatedly", "output_refused")
ITEM_OUTCOMES = ("ok", "failed")
SINK_OUTCOMES = ("binned", "quarantined", "vanished", "refused", "retry")
WORKER_RESTART_CAUSES = ("crashed", "stuck")
HOST_PHASES = ("prepare", "finish")

RunningCalls = Callable[[], Iterable[tuple[str, str, float]]]  # (stage, device, monotonic start) of calls in flight


class BusySeconds:
    """``binner_stage_busy_seconds_total`` that counts a model call while it runs, not only when it ends.

    Finished calls add their duration (``labels(...).inc``); at scrape time the collector adds the elapsed part
    of each call still running, so ``rate()`` of one replica never exceeds 1.0, even for calls longer than the
    rate window. The running calls come from a provider the engine registers (its replicas' ``busy_since``).
    """

    def __init__(self) -> None:
        # Held while a call's duration is added and its "running" mark cleared, and while a scrape reads both,
        # so that a scrape never counts a call twice or drops it for a moment (the counter stays monotonic).
        self.lock = threading.RLock()
        self._finished: dict[tuple[str, str], float] = {}
        self._providers: list[RunningCalls] = []

    class _Child:
        def __init__(self, owner: BusySeconds, key: tuple[str, str]) -> None:
            self._owner, self._key = owner, key

        def inc(self, amount: float = 1.0) -> None:
            with self._owner.lock:
                self._owner._finished[self._key] = self._owner._finished.get(self._key, 0.0) + amount

    def labels(self, stage: str, device: str) -> BusySeconds._Child:
        with self.lock:
            self._finished.setdefault((stage, device), 0.0)
        return BusySeconds._Child(self, (stage, device))

    def add_running_calls(self, provider: RunningCalls) -> None:
        with self.lock:
            self._providers.append(provider)

    def remove_running_calls(self, provider: RunningCalls) -> None:
        with self.lock:
            if provider in self._providers:
                self._providers.remove(provider)

    def describe(self) -> list[Any]:
        return [CounterMetricFamily("binner_stage_busy_seconds",
                                    "Seconds a stage worker spent in model calls (rate = utilisation)",
                                    labels=["stage", "device"])]

    def collect(self) -> Iterable[Any]:
        with self.lock:
            now = time.monotonic()
            totals = dict(self._finished)
            for provider in self._providers:
                for stage, device, since in provider():
                    totals[(stage, device)] = totals.get((stage, device), 0.0) + max(0.0, now - since)
        family = CounterMetricFamily("binner_stage_busy_seconds",
                                     "Seconds a stage worker spent in model calls (rate = utilisation)",
                                     labels=["stage", "device"])
        for (stage, device), seconds in sorted(totals.items()):
            family.add_metric([stage, device], seconds)
        yield family


class Metrics:
    """The registry and its instruments; the engine, queues and daemon write to it, /metrics reads it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.items = Counter("binner_items", "Items leaving a stage, by outcome", ["stage", "outcome"], registry=r)
        self.batch_seconds = Histogram(
            "binner_stage_batch_seconds", "Time of one model call on a micro-batch", ["stage", "device"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "binner_stage_batch_size", "Items per micro-batch", ["stage"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.busy_seconds = BusySeconds()
        r.register(self.busy_seconds)
        self.queue_depth = Gauge("binner_queue_depth", "Items waiting in a queue", ["queue"], registry=r)
        self.queue_capacity = Gauge("binner_queue_capacity", "Capacity of a bounded queue", ["queue"], registry=r)
        self.queue_wait = Histogram(
            "binner_queue_wait_seconds", "Time an item waited in a queue", ["queue"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backpressure = Counter(
            "binner_backpressure_seconds", "Seconds producers spent blocked on a full queue", ["queue"], registry=r
        )
        self.binned = Counter("binner_binned", "Files placed in a bin", ["bin"], registry=r)
        self.quarantined = Counter("binner_quarantined", "Files quarantined, by reason", ["reason"], registry=r)
        self.end_to_end = Histogram(
            "binner_end_to_end_seconds", "File seen -> file placed", buckets=_E2E_BUCKETS, registry=r
        )
        self.backlog = Gauge("binner_backlog_files", "Files known to the ledger and not finished", registry=r)
        self.oldest_pending_age = Gauge(
            "binner_oldest_pending_age_seconds", "Age of the oldest unfinished file", registry=r
        )
        self.batch_limit = Gauge(
            "binner_batch_size_limit", "Current batch cap of a stage worker (halved on OOM)", ["stage", "device"],
            registry=r,
        )
        self.oom = Counter("binner_oom", "Out-of-memory events on a device", ["stage", "device"], registry=r)
        self.signals_skipped = Counter(
            "binner_signals_skipped",
            "Signals not computed because the decision did not need them (rules.signals: needed), by model and by "
            "the rule that had already decided", ["model", "reason"], registry=r,
        )
        self.host_seconds = Counter(
            "binner_stage_host_seconds",
            "Seconds of a stage's host work around its device calls, by phase (prepare, finish); beside busy time it "
            "tells a host-bound stage from a device-bound one", ["stage", "device", "phase"], registry=r,
        )
        self.worker_restarts = Counter(
            "binner_worker_restarts", "Stage worker processes replaced (process isolation), by cause: crashed, stuck",
            ["stage", "device", "cause"], registry=r,
        )
        self.placement_paused = Gauge(
            "binner_placement_paused", "1 while placement waits for the output disk (full or unwritable)", registry=r
        )
        self.state_paused = Gauge(
            "binner_state_paused",
            "1 while intake and placement wait for space on the state disk (the ledger cannot be written)",
            registry=r,
        )
        self.state_paused.set(0)
        self.watch_degraded = Gauge(
            "binner_watch_degraded",
            "1 while watching the input has stopped (the watcher failed, or the input directory is gone) and new files "
            "are found only by rescans", registry=r,
        )
        self.watch_degraded.set(0)
        self.placement_errors = Counter(
            "binner_placement_errors", "Failed placement attempts, by errno name", ["error"], registry=r
        )
        self.build_info = Gauge("binner_build_info", "Build of the running binner", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self.registry.register(_GpuCollector())
        # RSS, CPU, open fds, start time; Python version; garbage collections (a custom registry has none of them).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.initialise_labels()

    def initialise_labels(self, stage_devices: Iterable[tuple[str, str]] = ()) -> None:
        """Create every known label set at 0, so that panels show 0 rather than "No data" before the first event.

        Called at construction for what is always known (queues, bins, reasons) and again by the engine with the
        stages and devices it runs.
        """
        for queue in QUEUES:
            self.backpressure.labels(queue=queue)
            self.queue_depth.labels(queue=queue)
            self.queue_wait.labels(queue=queue)
        for bin_name in BINS:
            self.binned.labels(bin=bin_name)
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason=reason)
        for stage, device in stage_devices:
            self.quarantined.labels(reason=f"{stage}_error")
            self.busy_seconds.labels(stage=stage, device=device)
            self.batch_seconds.labels(stage=stage, device=device)
            self.batch_size.labels(stage=stage)
            self.oom.labels(stage=stage, device=device)
            for phase in HOST_PHASES:
                self.host_seconds.labels(stage=stage, device=device, phase=phase)
            for cause in WORKER_RESTART_CAUSES:
                self.worker_restarts.labels(stage=stage, device=device, cause=cause)
            for outcome in ITEM_OUTCOMES:
                self.items.labels(stage=stage, outcome=outcome)
        for outcome in SINK_OUTCOMES:
            self.items.labels(stage="sink", outcome=outcome)


class _GpuCollector:
    """NVML gauges, read at scrape time; absent where there is no NVIDIA GPU or no pynvml."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._initialised = False

    def _handle(self) -> Any:
        with self._lock:
            if not self._initialised:
                self._initialised = True
                try:
                    import pynvml  # type: ignore[import-not-found]

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception:
                    self._nvml = None
            return self._nvml

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        nvml = self._handle()
        if nvml is None:
            return
        util = GaugeMetricFamily("binner_gpu_utilization_ratio", "GPU busy ratio from NVML", labels=["gpu"])
        used = GaugeMetricFamily("binner_gpu_memory_used_bytes", "GPU memory in use from NVML", labels=["gpu"])
        total = GaugeMetricFamily("binner_gpu_memory_total_bytes", "GPU memory size from NVML", labels=["gpu"])
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index)], rates.gpu / 100.0)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
        except Exception:
            return
        yield util
        yield used
        yield total
