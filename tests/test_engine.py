"""Engine semantics with fake stages: backpressure, batching, no loss or duplication, per-item failure,
OOM back-off, short-circuit, and drain on stop. Fast and deterministic: no models, placer-less sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from app.engine import Pipeline
from app.intake import scan, to_discovered
from app.ledger import Ledger
from app.metrics import Metrics
from stages.rules import RuleThresholds
from tests.fakes import RecordingStage


def make_inputs(root: Path, count: int) -> Path:
    inbox = root / "in"
    inbox.mkdir()
    for i in range(count):
        (inbox / f"f{i:04d}.png").write_bytes(b"x" * (i + 1))
    return inbox


def build(tmp_path: Path, stages: list[RecordingStage], count: int = 50, capacity: int = 4,
          thresholds: RuleThresholds | None = None, max_attempts: int = 2) -> tuple[Pipeline, Ledger, Metrics]:
    inbox = make_inputs(tmp_path, count)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    metrics = Metrics()
    pipeline = Pipeline(
        ledger=ledger, metrics=metrics, stages=stages, thresholds=thresholds or RuleThresholds(), placer=None,
        queue_capacities={s.name: capacity for s in stages} | {"sink": capacity}, max_attempts=max_attempts,
        feeder_page_size=8, placement_mode="copy",
    )
    return pipeline, ledger, metrics


def run_until_idle(pipeline: Pipeline) -> None:
    async def main() -> None:
        with anyio.fail_after(60):
            await pipeline.setup()
            await pipeline.run(until_idle=True)
            await pipeline.teardown()

    anyio.run(main)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_item_once_despite_out_of_order_completion(tmp_path: Path) -> None:
    load = RecordingStage("load", devices=["cpu", "cpu"], batch_size=3)
    ocr = RecordingStage("ocr", devices=["cpu", "cpu", "cpu"], batch_size=4, per_item_s=0.001, jitter_s=0.01)
    vision = RecordingStage("vision", devices=["cpu", "cpu"], batch_size=5, per_item_s=0.001, jitter_s=0.01)
    pipeline, ledger, metrics = build(tmp_path, [load, ocr, vision], count=120)
    run_until_idle(pipeline)
    rows = list(ledger.rows())
    assert len(rows) == 120 and {row.status for row in rows} == {"done"}
    for stage in (load, ocr, vision):
        counts = stage.log.processed()
        assert set(counts) == {row.id for row in rows}, f"{stage.name} missed items"
        assert set(counts.values()) == {1}, f"{stage.name} processed an item twice"
        assert max(stage.log.sizes()) <= stage.batch_policy.max_batch_size
        devices = {device for _, device, _ in stage.log.batches}
        assert len(devices) == len(stage.devices), "every replica should have taken work (self-balancing)"
    assert sample(metrics, "binner_items_total", stage="sink", outcome="binned") == 120
    assert sum(pipeline.stats.bins.values()) == 120


def test_queue_depth_never_exceeds_capacity_with_a_slow_consumer(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=8)
    slow = RecordingStage("vision", batch_size=2, per_item_s=0.005)
    pipeline, ledger, metrics = build(tmp_path, [load, slow], count=60, capacity=3)
    run_until_idle(pipeline)
    for queue in [*pipeline.queues.values(), pipeline.sink_queue]:
        assert queue.max_depth_seen <= queue.capacity == 3
    assert pipeline.queues["vision"].max_depth_seen == 3, "the slow stage's queue should have filled"
    assert sample(metrics, "binner_backpressure_seconds_total", queue="vision") > 0
    assert sample(metrics, "binner_queue_capacity", queue="vision") == 3
    assert all(row.status == "done" for row in ledger.rows())


def test_batches_respect_size(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=16)
    ocr = RecordingStage("ocr", batch_size=5, max_wait_ms=50, per_item_s=0.002)
    pipeline, _, metrics = build(tmp_path, [load, ocr], count=40, capacity=16)
    run_until_idle(pipeline)
    sizes = ocr.log.sizes()
    assert max(sizes) == 5 and sum(sizes) == 40
    assert sample(metrics, "binner_stage_batch_size_count", stage="ocr") == len(sizes)


def test_an_exception_fails_only_the_poisoned_item(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=8)
    ocr = RecordingStage("ocr", batch_size=8, max_wait_ms=20, poison={"f0013.png"})
    pipeline, ledger, metrics = build(tmp_path, [load, ocr], count=30, capacity=8, max_attempts=2)
    run_until_idle(pipeline)
    rows = {Path(row.path).name: row for row in ledger.rows()}
    bad = rows.pop("f0013.png")
    assert bad.status == "quarantined" and bad.reason == "ocr_error" and bad.attempts == 2
    assert "poisoned item" in (bad.last_error or "")
    assert {row.status for row in rows.values()} == {"done"}
    assert set(ocr.log.processed().values()) == {1}, "healthy items of a failing batch run exactly once"
    assert sample(metrics, "binner_quarantined_total", reason="ocr_error") == 1


def test_out_of_memory_halves_the_batch_cap_and_retries_the_same_items(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=16)
    vision = RecordingStage("vision", batch_size=16, max_wait_ms=50, oom_above=3)
    pipeline, ledger, metrics = build(tmp_path, [load, vision], count=48, capacity=16)
    run_until_idle(pipeline)
    assert {row.status for row in ledger.rows()} == {"done"}
    assert max(vision.log.sizes()) <= 3
    assert sample(metrics, "binner_batch_size_limit", stage="vision", device="cpu") <= 3
    assert sample(metrics, "binner_oom_total", stage="vision", device="cpu") >= 1
    assert set(vision.log.processed().values()) == {1}


def test_text_dominant_images_skip_vision(tmp_path: Path) -> None:
    def text_heavy(item: Any) -> dict[str, Any]:
        heavy = item.key % 2 == 0
        return {"ocr": {"text": "x" * (500 if heavy else 0), "char_count": 500 if heavy else 0,
                        "line_count": 20 if heavy else 0, "text_area_ratio": 0.5 if heavy else 0.0,
                        "mean_confidence": 0.9, "lines": []}}

    load = RecordingStage("load")
    ocr = RecordingStage("ocr", signals=text_heavy)
    vision = RecordingStage("vision", signals=lambda item: {"detections": [{"label": "dog", "confidence": 0.9,
                                                                             "box": [0, 0, 1, 1]}]})
    pipeline, ledger, _ = build(tmp_path, [load, ocr, vision], count=20)
    run_until_idle(pipeline)
    rows = list(ledger.rows())
    heavy = {row.id for row in rows if row.id % 2 == 0}
    assert set(vision.log.processed()) == {row.id for row in rows} - heavy
    for row in rows:
        assert row.bin == ("C" if row.id in heavy else "A")
        if row.id in heavy:
            assert row.signals is not None and row.signals["vision_skipped"] == "text_dominant"


def test_stop_drains_in_flight_work_and_stops_intake(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=4)
    ocr = RecordingStage("ocr", batch_size=4, per_item_s=0.01)
    pipeline, ledger, _ = build(tmp_path, [load, ocr], count=200, capacity=4)

    async def main() -> None:
        with anyio.fail_after(60):
            await pipeline.setup()
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run, False)
                while pipeline.stats.finished < 10:
                    await anyio.sleep(0.005)
                pipeline.request_stop()
            await pipeline.teardown()

    anyio.run(main)
    statuses = [row.status for row in ledger.rows()]
    assert statuses.count("processing") == 0, "every claimed item must finish during the drain"
    assert 10 <= statuses.count("done") < 200, "intake should stop before the backlog is exhausted"
    assert statuses.count("done") + statuses.count("pending") == 200
    assert pipeline.in_flight == 0


def test_a_process_killed_mid_item_resumes_and_gives_up_after_max_attempts(tmp_path: Path) -> None:
    load = RecordingStage("load")
    pipeline, ledger, _ = build(tmp_path, [load], count=3, max_attempts=2)
    # simulate two crashes of the process while a row was being processed
    for _ in range(2):
        claimed = ledger.claim_pending(1)
        assert claimed and ledger.recover_interrupted() == 1
    run_until_idle(pipeline)
    rows = list(ledger.rows())
    assert rows[0].status == "quarantined" and rows[0].reason == "crashed_repeatedly"
    assert [row.status for row in rows[1:]] == ["done", "done"]


@pytest.mark.parametrize("vanish", [True, False])
def test_files_deleted_or_changed_during_processing(tmp_path: Path, vanish: bool) -> None:
    target = tmp_path / "in" / "f0001.png"

    meddled: list[bool] = []

    class Meddler(RecordingStage):
        def process_batch(self, items: list[Any]) -> list[Any]:
            for item in items:
                if item.source == str(target) and not meddled:
                    meddled.append(True)
                    if vanish:
                        target.unlink()
                    else:
                        target.write_bytes(b"changed content, longer than before")
            return super().process_batch(items)

    pipeline, ledger, _ = build(tmp_path, [Meddler("load")], count=4)
    run_until_idle(pipeline)
    row = next(r for r in ledger.rows() if r.path == str(target))
    if vanish:
        assert row.status == "vanished"
    else:
        assert row.status == "done" and row.size == len(b"changed content, longer than before")
        assert row.attempts == 2, "a changed file is processed again"


def test_full_output_disk_pauses_placement_and_loses_nothing(tmp_path: Path) -> None:
    import errno

    from app.placement import Placer

    refusals = {"left": 3}

    class FullDiskOnce(Placer):
        def place(self, source: Path, rel_path: str, bin: str, sha256: str) -> Path:
            if refusals["left"]:
                refusals["left"] -= 1
                raise OSError(errno.ENOSPC, "No space left on device", str(self.output_root / bin / rel_path))
            return super().place(source, rel_path, bin, sha256)

    pipeline, ledger, metrics = build(tmp_path, [RecordingStage("load")], count=12)
    pipeline.placer = FullDiskOnce(tmp_path / "out", "move")
    pipeline.move_mode = True
    paused_seen: list[bool] = []

    async def main() -> None:
        with anyio.fail_after(60):
            await pipeline.setup()
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run, True)
                while pipeline.stats.finished < 12:
                    paused_seen.append(pipeline.placement_paused)
                    await anyio.sleep(0.05)
            await pipeline.teardown()

    anyio.run(main)
    assert any(paused_seen), "placement should have paused while the disk was full"
    assert sample(metrics, "binner_placement_errors_total", error="ENOSPC") == 3
    assert sample(metrics, "binner_placement_paused") == 0
    placed = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert placed == sorted(f"f{i:04d}.png" for i in range(12))
    assert not list((tmp_path / "in").iterdir()), "inputs are removed only after durable placement"
    assert {row.status for row in ledger.rows()} == {"done"}
