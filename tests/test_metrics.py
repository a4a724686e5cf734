"""Metrics an operator reads: busy time counted while a call runs, series present from start-up, process metrics."""

from __future__ import annotations

import threading
import time

import anyio
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import QUARANTINE_REASONS, Metrics
from stages.base import BatchPolicy, ImageItem, Stage


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_known_label_sets_exist_at_zero_before_any_event() -> None:
    values = scrape(Metrics())
    for queue in ("load", "ocr", "vision", "sink"):
        assert values[("binner_backpressure_seconds_total", (("queue", queue),))] == 0.0
    for bin_name in ("A", "B", "C"):
        assert values[("binner_binned_total", (("bin", bin_name),))] == 0.0
    for reason in QUARANTINE_REASONS:
        assert values[("binner_quarantined_total", (("reason", reason),))] == 0.0


def test_process_and_gc_metrics_are_exported() -> None:
    names = {name for name, _ in scrape(Metrics())}
    assert "process_resident_memory_bytes" in names
    assert "process_open_fds" in names
    assert any(name.startswith("python_gc_") for name in names)
    assert "python_info" in names


class _SlowStage(Stage):
    """Each call sleeps ``seconds`` (releasing the GIL, like a GPU call)."""

    name = "ocr"

    def __init__(self, seconds: float) -> None:
        super().__init__(["cpu"], BatchPolicy(max_batch_size=4, max_wait_ms=0))
        self.seconds = seconds

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        time.sleep(self.seconds)
        return items


def test_busy_time_grows_during_a_long_call_and_never_outpaces_the_clock(tmp_path) -> None:
    """One replica in one long call: each scrape's busy delta is at most the wall time between scrapes."""
    from app.engine import StageRunner
    from queues.bounded import BoundedQueue

    metrics = Metrics()
    key = ("binner_stage_busy_seconds_total", (("device", "cpu"), ("stage", "ocr")))

    async def main() -> list[tuple[float, float, float]]:
        inbound: BoundedQueue[ImageItem] = BoundedQueue("ocr", 4)
        routed: list[ImageItem] = []

        async def route(item: ImageItem) -> None:
            routed.append(item)

        runner = StageRunner(_SlowStage(1.2), inbound, route, metrics)
        await runner.setup()
        metrics.busy_seconds.add_running_calls(
            lambda: [("ocr", r.device, s) for r in runner.replicas if (s := r.busy_since) is not None])
        readings: list[tuple[float, float, float]] = []
        async with anyio.create_task_group() as group:
            group.start_soon(runner.run)
            await inbound.put(ImageItem(key=1, source="x"))
            for _ in range(8):
                await anyio.sleep(0.25)
                before = time.monotonic()
                busy = scrape(metrics)[key]
                readings.append((before, busy, time.monotonic()))
            await inbound.close()
        await runner.teardown()
        assert len(routed) == 1
        return readings

    readings = anyio.run(main)
    assert readings[2][1] > 0.3, "busy time must count a call while it runs, not only when it ends"
    for (before0, v0, _), (_, v1, after1) in zip(readings, readings[1:]):
        assert v1 >= v0, "the counter never goes down"
        # each value is read somewhere inside its scrape: the gap between two is at most after1 - before0
        assert v1 - v0 <= after1 - before0 + 1e-3, "one replica is never more than 100% busy"
    assert threading.active_count() >= 1
