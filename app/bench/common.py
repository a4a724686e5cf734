"""What every `binner bench` scenario shares: options, test images, per-file latency, peak memory, and a run of
the real engine over a backlog.

Latency here is per file, measured from the moment the pipeline took the file (the feeder claimed its ledger
row) to the moment it was placed, never read from histogram buckets.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.metrics import Metrics

if TYPE_CHECKING:
    from app.build import Runtime
    from app.config import BinnerConfig
    from app.store import Outcome, Row


class BenchUnavailable(Exception):
    """A scenario cannot run here (a missing extra or option); the message says what to do."""


@dataclass
class BenchOptions:
    """The knobs of `binner bench`; ``None`` sizes mean "the scenario's documented default"."""

    images: int | None = None
    large_images: int | None = None
    stream_seconds: float | None = None
    ocr_ms: tuple[float, float] = (20.0, 10.0)
    vision_ms: tuple[float, float] = (15.0, 6.0)
    batch: int = 16
    queue: int = 32
    config_file: Path | None = None
    source: Path | None = None
    repeat: int = 3
    show_progress: bool = False

    def count(self, default: int) -> int:
        return self.images if self.images is not None else default


def parse_ms(text: str, option: str) -> tuple[float, float]:
    """``"20,10"`` -> (20.0, 10.0); a clear error naming the option otherwise."""
    parts = [part.strip() for part in text.split(",")]
    try:
        base, per_item = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"{option}: expected 'BASE_MS,PER_ITEM_MS' such as 20,10, got {text!r}") from None
    if base < 0 or per_item < 0 or not math.isfinite(base + per_item):
        raise ValueError(f"{option}: costs must be finite and >= 0 ms, got {text!r}")
    return base, per_item


def stage_limit(cost_ms: tuple[float, float], batch: int, devices: int = 1) -> float:
    """Items/s of a stage running full batches back to back; infinite for a stage that costs nothing."""
    base_ms, per_item_ms = cost_ms
    seconds = (base_ms + per_item_ms * batch) / 1000.0
    return math.inf if seconds <= 0 else devices * batch / seconds


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def make_images(directory: Path, count: int, size: int = 64, start: int = 0) -> None:
    """Small, distinct PNGs named ``img_NNNNNN.png`` (each colour differs, so each hash does)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        colour = (index % 251, (index * 7) % 253, (index * 13) % 241)
        Image.new("RGB", (size, size), colour).save(directory / f"img_{index:06d}.png", optimize=False)


def make_photos(directory: Path, count: int, size: tuple[int, int] = (4000, 3000)) -> None:
    """``count`` real baseline JPEGs of ``size`` (12 megapixels by default) with photo-like detail.

    One image is encoded and written under ``count`` names (encoding 300 distinct 12 MP photos would take
    minutes); each copy is read, hashed, decoded and placed like any other file.
    """
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    width, height = size
    rng = np.random.default_rng(8)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    base = np.stack([x * 200 + y * 30, y * 180 + 20 * np.sin(x * 40), (x + y) * 100], axis=-1)
    noise = rng.normal(0.0, 12.0, size=(height, width, 1)).astype(np.float32)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    first = directory / "photo_000000.jpg"
    Image.fromarray(pixels, "RGB").save(first, quality=90)
    data = first.read_bytes()
    for index in range(1, count):
        (directory / f"photo_{index:06d}.jpg").write_bytes(data)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of measured values; ``None`` when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(latencies: list[float]) -> dict[str, float | None]:
    return {f"p{q}_s": _round(percentile(latencies, q), 4) for q in (50, 95, 99)}


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class PeakRss:
    """Peak resident memory of this process during one scenario.

    Linux resets the high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs; elsewhere the
    process-wide ``ru_maxrss`` is reported (then it is the peak so far, not the scenario's own).
    """

    def __init__(self) -> None:
        self.scoped = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scoped = True
        except OSError:
            pass

    def mib(self) -> float:
        if self.scoped:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def process_peak_rss_mib(pid: int) -> float | None:
    """VmHWM of another process (the daemon of the stream scenario)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def counter_by_stage(metrics: Metrics, name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                stage = sample.labels.get("stage", "")
                totals[stage] = totals.get(stage, 0.0) + sample.value
    return totals


def synthetic_overrides(ocr_ms: tuple[float, float], vision_ms: tuple[float, float], batch: int,
                        queue: int) -> dict[str, Any]:
    """Configuration for synthetic model stages of the given costs (short-circuit off: every file sees both)."""
    return {
        "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": batch, "synthetic_ms": ocr_ms},
        "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": batch, "synthetic_ms": vision_ms},
        "queues": {"ocr": queue, "vision": queue},
        "rules": {"signals": "all"},
    }


@dataclass
class BacklogRun:
    """The engine over a backlog already in the ledger: timings from the moment the models were ready."""

    files: int
    finished: int
    seconds: float  # models ready -> last file placed
    exit_lag_s: float  # last file placed -> the run returned (idle detection)
    latencies: list[float]
    busy: dict[str, float]
    peak_rss_mib: float
    bins: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    file_bins: dict[str, str] = field(default_factory=dict)  # relative path -> bin (or _quarantine/<reason>)
    skipped: dict[str, float] = field(default_factory=dict)  # model -> images it did not run on

    @property
    def images_per_second(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The keys every scenario reports, for this run."""
        lat = latency_summary(self.latencies)
        return {
            "images_per_second": round(self.images_per_second, 2),
            "p50_latency_s": lat["p50_s"],
            "p95_latency_s": lat["p95_s"],
            "p99_latency_s": lat["p99_s"],
            "stage_utilisation": {stage: round(busy / self.seconds, 3) if self.seconds > 0 else 0.0
                                  for stage, busy in self.busy.items()},
            "peak_rss_mib": self.peak_rss_mib,
            "files": self.files,
            "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "exit_lag_s": round(self.exit_lag_s, 3),
        }


@dataclass
class FileTimes:
    """``time.perf_counter()`` when the feeder claimed each ledger row and when its file was placed (or quarantined),
    by row id: per-file latency, never read from histogram buckets."""

    claimed: dict[int, float] = field(default_factory=dict)
    placed: dict[int, float] = field(default_factory=dict)

    def latencies(self) -> list[float]:
        return [at - self.claimed[key] for key, at in self.placed.items() if key in self.claimed]


def clocked_runtime(config: BinnerConfig, metrics: Metrics,
                    on_placed: Callable[[Row, Outcome], None]) -> tuple[Runtime, FileTimes]:
    """The runtime of ``config`` with its ledger's claims and its finished files stamped into a ``FileTimes``;
    ``on_placed(row, outcome)`` sees each placed or quarantined file after its stamp."""
    from app.build import build_runtime

    times = FileTimes()

    def on_finished(row: Row, outcome: Outcome) -> None:
        if outcome.status in ("done", "quarantined"):
            times.placed[row.id] = time.perf_counter()
            on_placed(row, outcome)

    runtime = build_runtime(config, metrics=metrics, on_finished=on_finished, command="bench")
    claim = runtime.ledger.claim_pending

    def claim_and_stamp(limit: int, after_id: int = 0) -> list[Row]:
        rows = claim(limit, after_id)
        now = time.perf_counter()
        for row in rows:
            times.claimed.setdefault(row.id, now)
        return rows

    runtime.ledger.claim_pending = claim_and_stamp  # type: ignore[method-assign]
    return runtime, times


def run_backlog(overrides: dict[str, Any], fill_inbox: Callable[[Path], None], config_file: Path | None = None,
                on_setup: Callable[[Any], None] | None = None) -> BacklogRun:
    """Fill a temporary inbox, take it into a fresh ledger, load the stages, then run the engine to idle.

    The clock starts once every stage is set up and warm (so model loading is not counted) and stops when
    the last file is placed.
    """
    import sys

    import anyio

    from app.build import intake_all
    from app.config import load_config
    from app.logs import configure_logging
    from app.service import run_async

    configure_logging("console", "error", sys.stderr)
    with tempfile.TemporaryDirectory(prefix="binner-bench-") as scratch:
        root = Path(scratch)
        inbox = root / "inbox"
        inbox.mkdir()
        fill_inbox(inbox)
        base: dict[str, Any] = {"input": inbox, "output": root / "bins", "state_dir": root / "state",
                                "placement": "move", "http": {"enabled": False}}
        config = load_config(config_file, {**base, **overrides})
        metrics = Metrics()
        file_bins: dict[str, str] = {}

        def on_placed(row: Any, outcome: Any) -> None:
            file_bins[row.rel_path] = outcome.bin or f"_quarantine/{outcome.reason}"

        runtime, times = clocked_runtime(config, metrics, on_placed)
        intake_all(runtime)
        files, _ = runtime.ledger.backlog()
        clock: dict[str, float] = {}

        async def drive() -> Any:
            pipeline = runtime.local
            await pipeline.setup()
            if on_setup is not None:
                on_setup(pipeline)
            peak = PeakRss()
            clock["started"] = time.perf_counter()
            try:
                stats = await pipeline.run(until_idle=True)
                clock["returned"] = time.perf_counter()
                clock["rss"] = peak.mib()
                return stats
            finally:
                with anyio.CancelScope(shield=True):
                    await pipeline.teardown()

        try:
            stats = run_async(drive)
        finally:
            runtime.close()
        started = clock["started"]
        last = max(times.placed.values(), default=clock["returned"])
        return BacklogRun(
            files=files,
            finished=stats.finished,
            seconds=last - started,
            exit_lag_s=clock["returned"] - last,
            latencies=times.latencies(),
            busy=counter_by_stage(metrics, "binner_stage_busy_seconds_total"),
            peak_rss_mib=clock["rss"],
            bins=dict(stats.bins),
            quarantined=dict(stats.quarantined),
            file_bins=file_bins,
            skipped=_skipped_by_model(metrics),
        )


def _skipped_by_model(metrics: Metrics) -> dict[str, float]:
    """Images that did not run each model (``rules.signals: needed``), from ``binner_signals_skipped_total``."""
    totals: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "binner_signals_skipped_total":
                model = sample.labels.get("model", "")
                totals[model] = totals.get(model, 0.0) + sample.value
    return totals


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
        info["load_average"] = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        pass
    info["gpus"] = _nvml_gpu_names()
    return info


def _nvml_gpu_names() -> list[str]:
    """GPU names from NVML (no torch import: that would weigh on every scenario's memory figure)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU to report
        return []
    try:
        names = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    finally:
        pynvml.nvmlShutdown()
