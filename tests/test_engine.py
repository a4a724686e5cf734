"""Engine semantics with fake stages: backpressure, batching, no loss or duplication, per-item failure,
OOM back-off, short-circuit, and drain on stop. Fast and deterministic: no models, placer-less sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from app.engine import Pipeline
from app.metrics import Metrics
from app.store import Ledger, scan, to_discovered
from stages.rules import RuleThresholds
from tests.fakes import RecordingStage, run_until_idle


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


def test_a_poison_item_after_an_out_of_memory_retry_is_a_stage_error_not_out_of_memory(tmp_path: Path) -> None:
    """The retry after an OOM must not carry the OOM along: the poison item fails as vision_error, and the
    batch cap is not halved for it."""
    load = RecordingStage("load", batch_size=16)
    vision = RecordingStage("vision", batch_size=8, max_wait_ms=50, oom_above=4, poison={"f0005.png"})
    pipeline, ledger, metrics = build(tmp_path, [load, vision], count=16, capacity=16, max_attempts=1)
    run_until_idle(pipeline)
    rows = {Path(row.path).name: row for row in ledger.rows()}
    bad = rows.pop("f0005.png")
    assert bad.status == "quarantined" and bad.reason == "vision_error", (bad.reason, bad.last_error)
    assert {row.status for row in rows.values()} == {"done"}
    assert sample(metrics, "binner_batch_size_limit", stage="vision", device="cpu") == 4


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
            assert row.signals is not None and row.signals["not_computed"] == dict.fromkeys(
                ("caption", "clip_similarity", "detections"), "text_dominant")


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
    # simulate two deaths of the process while the first row was inside the OCR model call
    for _ in range(2):
        claimed = ledger.claim_pending(3)
        claimed += ledger.claim_pending(3)  # a row charged before waits for a pass that finds nothing else
        assert sorted(row.id for row in claimed) == [1, 2, 3]
        ledger.mark_in_call([1], "ocr")
        assert ledger.recover_interrupted() == 3
    run_until_idle(pipeline)
    rows = list(ledger.rows())
    assert rows[0].status == "quarantined" and rows[0].reason == "crashed_repeatedly"
    assert "ocr model call" in (rows[0].last_error or "")
    assert [row.status for row in rows[1:]] == ["done", "done"], "claimed but not in a call: never charged"
    assert [row.attempts for row in rows[1:]] == [1, 1]


def test_crashes_are_charged_only_inside_a_model_call_and_only_in_a_row(tmp_path: Path) -> None:
    pipeline, ledger, _ = build(tmp_path, [RecordingStage("load")], count=4, max_attempts=2)
    for _ in range(5):  # killed right after start-up, holding claims, before any model call
        assert len(ledger.claim_pending(4)) == 4
        ledger.recover_interrupted()
    first = ledger.get(1)
    assert first is not None and (first.crashes, first.attempts) == (0, 0)
    ledger.claim_pending(4)
    ledger.mark_in_call([1], "load")
    ledger.recover_interrupted()
    assert [row.id for row in ledger.claim_pending(4)] == [2, 3, 4], "the charged row waits for the others"
    assert [row.id for row in ledger.claim_pending(4)] == [1]
    ledger.mark_in_call([1], "vision")  # a different call this time: not the same culprit evidence
    ledger.recover_interrupted()
    first = ledger.get(1)
    assert first is not None and (first.crashes, first.crash_stage) == (1, "vision")
    run_until_idle(pipeline)
    assert {row.status for row in ledger.rows()} == {"done"}


def test_model_calls_are_marked_in_the_ledger_while_they_run(tmp_path: Path) -> None:
    seen: list[set[str | None]] = []

    class Peeking(RecordingStage):
        def process_batch(self, items: list[Any]) -> list[Any]:
            reader = Ledger(tmp_path / "ledger.sqlite3", read_only=True)
            seen.append({reader.get(item.key).in_call for item in items})  # type: ignore[union-attr]
            reader.close()
            return super().process_batch(items)

    pipeline, ledger, _ = build(tmp_path, [RecordingStage("load"), Peeking("ocr")], count=6)
    run_until_idle(pipeline)
    assert seen and all(marks == {"ocr"} for marks in seen)
    assert {row.in_call for row in ledger.rows()} == {None}, "cleared when the call returns"


def test_rows_that_were_in_a_fatal_call_run_alone_next_time(tmp_path: Path) -> None:
    load = RecordingStage("load", batch_size=8, max_wait_ms=50)
    pipeline, ledger, _ = build(tmp_path, [load], count=8, max_attempts=3)
    ledger.claim_pending(8)
    ledger.mark_in_call([3, 4], "load")
    ledger.recover_interrupted()
    run_until_idle(pipeline)
    batches = [keys for kind, _, keys in load.log.batches if kind == "ok"]
    assert [3] in batches and [4] in batches, batches
    assert all(len(keys) == 1 for keys in batches if 3 in keys or 4 in keys)
    assert {row.status for row in ledger.rows()} == {"done"}


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

    from app.store import Placer

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


# --- degrade, don't die ---------------------------------------------------------------------------------
def test_one_refused_output_path_fails_that_file_and_the_rest_flows(tmp_path: Path) -> None:
    """A directory under a bin that is a link leading out of the output root: never followed, never paused."""
    from app.store import Placer

    outside = tmp_path / "outside"
    outside.mkdir()
    inbox = make_inputs(tmp_path, 6)
    (inbox / "sub").mkdir()
    (inbox / "sub" / "x.png").write_bytes(b"in a subdirectory")
    out = tmp_path / "out"
    for bin_name in ("A", "B", "C"):
        (out / bin_name).mkdir(parents=True)
        (out / bin_name / "sub").symlink_to(outside, target_is_directory=True)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    metrics = Metrics()
    pipeline = Pipeline(
        ledger=ledger, metrics=metrics, stages=[RecordingStage("load")], thresholds=RuleThresholds(),
        placer=Placer(out, "copy"), queue_capacities={"load": 4, "sink": 4}, max_attempts=2, feeder_page_size=8,
        placement_mode="copy",
    )
    paused: list[bool] = []
    pipeline.on_finished = lambda row, outcome: paused.append(pipeline.placement_paused)
    run_until_idle(pipeline)
    assert not any(paused) and sample(metrics, "binner_placement_paused") == 0
    rows = {row.rel_path: row for row in ledger.rows()}
    assert rows["sub/x.png"].status == "quarantined" and rows["sub/x.png"].reason == "output_refused"
    assert rows["sub/x.png"].attempts == 2, "retried once, then quarantined"
    assert (out / "_quarantine" / "output_refused" / "sub" / "x.png").read_bytes() == b"in a subdirectory"
    assert all(rows[f"f{i:04d}.png"].status == "done" for i in range(6))
    assert list(outside.iterdir()) == []


def test_a_full_state_disk_pauses_and_resumes_without_crashing(tmp_path: Path) -> None:
    import sqlite3

    pipeline, ledger, metrics = build(tmp_path, [RecordingStage("load")], count=10)
    failures = {"record": 2, "claim": 2}
    real_record, real_claim = ledger.record, ledger.claim_pending

    def full(kind: str) -> None:
        if failures[kind]:
            failures[kind] -= 1
            raise sqlite3.OperationalError("database or disk is full")

    def record(outcomes: list[Any]) -> None:
        full("record")
        real_record(outcomes)

    def claim(limit: int, after_id: int = 0) -> list[Any]:
        full("claim")
        return real_claim(limit, after_id)

    ledger.record, ledger.claim_pending = record, claim  # type: ignore[method-assign]
    paused: list[float] = []  # every value the gauge is set to: a pause can be shorter than any polling interval
    real_set = metrics.state_paused.set

    def set_paused(value: float) -> None:
        paused.append(float(value))
        real_set(value)

    metrics.state_paused.set = set_paused  # type: ignore[method-assign]

    async def main() -> None:
        with anyio.fail_after(60):
            await pipeline.setup()
            async with anyio.create_task_group() as group:
                group.start_soon(pipeline.run, True)
                while pipeline.stats.finished < 10:
                    await anyio.sleep(0.02)
            await pipeline.teardown()

    anyio.run(main)
    assert 1.0 in paused and paused[-1] == 0.0 and sample(metrics, "binner_state_paused") == 0
    assert failures == {"record": 0, "claim": 0}
    assert {row.status for row in ledger.rows()} == {"done"} and len(list(ledger.rows())) == 10


def test_the_done_row_is_durable_before_the_input_is_removed(tmp_path: Path) -> None:
    import sqlite3

    from app.store import Placer

    pipeline, ledger, _ = build(tmp_path, [RecordingStage("load")], count=5)
    assert ledger.synchronous() == 2, "FULL: the WAL is fsynced at every commit, so the row survives a power loss"

    class Checking(Placer):
        removed: list[str] = []

        def remove_source(self, source: Path, placed: Path | None = None, sha256: str | None = None) -> bool:
            # another connection sees the committed row: the commit happened before any removal
            with sqlite3.connect(tmp_path / "ledger.sqlite3") as other:
                status = other.execute("SELECT status FROM files WHERE path = ?", (str(source),)).fetchone()
            assert status == ("done",), f"{source} removed before its row was committed"
            self.removed.append(str(source))
            return super().remove_source(source, placed, sha256)

    pipeline.placer = Checking(tmp_path / "out", "move")
    pipeline.move_mode = True
    run_until_idle(pipeline)
    assert len(Checking.removed) == 5 and not list((tmp_path / "in").iterdir())


@pytest.mark.parametrize("mode", ["hardlink", "copy", "move"])
def test_a_rescan_after_placement_takes_nothing_again(tmp_path: Path, mode: str) -> None:
    """Linking an input changes its ctime: the row keeps the identity the file has after placement."""
    from app.store import Placer, finish_leftovers

    pipeline, ledger, _ = build(tmp_path, [RecordingStage("load")], count=6)
    pipeline.placer = Placer(tmp_path / "out", mode)  # type: ignore[assignment]
    pipeline.move_mode = mode == "move"
    run_until_idle(pipeline)
    inbox = tmp_path / "in"
    result = ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    assert (result.new, result.requeued) == (0, 0)
    assert finish_leftovers(ledger, result.already_finished, mode == "move", pipeline.placer.remove_source) == (0, 0)
    assert len(list(ledger.rows())) == 6 and not ledger.has_pending()
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == 6


def test_a_pending_input_re_pointed_at_an_outside_file_is_never_read(tmp_path: Path) -> None:
    """`ln -sfn OUTSIDE/secret INPUT/f0001.png` while its row is pending: copy mode writes no outside byte."""
    from app.store import Placer
    from stages.loader import LoaderOptions, LoaderStage

    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"\x89PNG outside secret")
    pipeline, ledger, _ = build(tmp_path, [LoaderStage(LoaderOptions(10_000_000, 10_000_000, 4096))], count=3)
    pipeline.placer = Placer(tmp_path / "out", "copy")  # type: ignore[assignment]
    target = tmp_path / "in" / "f0001.png"
    target.unlink()
    target.symlink_to(secret)
    run_until_idle(pipeline)
    row = next(r for r in ledger.rows() if r.path == str(target))
    assert row.status == "vanished" and row.sha256 is None
    written = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert b"\x89PNG outside secret" not in written and secret.read_bytes() == b"\x89PNG outside secret"


@pytest.mark.parametrize("mode", ["hardlink", "move"])
def test_a_placement_that_went_unrecorded_is_finished_in_one_pass(tmp_path: Path, mode: str) -> None:
    """A run linked its inputs into the output and stopped before the ledger heard of it (a lost Ray window, a
    kill -9): linking changed the inputs' ctime. The next pass finds the placed files and finishes each row at once;
    before, every such file was 'changed while it was processed' and cost an attempt (enough node losses would
    quarantine a good file as retries_exhausted)."""
    import hashlib

    from app.bench import make_images
    from app.store import Placer
    from stages.loader import LoaderOptions, LoaderStage

    pipeline, ledger, _ = build(tmp_path, [LoaderStage(LoaderOptions(10_000_000, 10_000_000, 4096))], count=0)
    inbox = tmp_path / "in"
    make_images(inbox, 4, size=32)
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    placer = Placer(tmp_path / "out", mode)
    for path in sorted(inbox.iterdir()):  # what the lost run did: placed, in B (no content model here), unrecorded
        placer.place(path, path.name, "B", hashlib.sha256(path.read_bytes()).hexdigest())
    pipeline.placer = placer  # type: ignore[assignment]
    pipeline.move_mode = mode == "move"
    run_until_idle(pipeline)
    rows = list(ledger.rows())
    assert [(row.status, row.attempts, row.last_error) for row in rows] == [("done", 1, None)] * 4
    assert sorted(p.name for p in (tmp_path / "out" / "B").iterdir()) == sorted(row.rel_path for row in rows)
    assert len(list(inbox.iterdir())) == (0 if mode == "move" else 4)
