"""Host work overlaps device work: a stage whose host phases and device call each take 50 ms per batch runs 20
batches in about 20 x 50 ms, not 20 x 100 ms, in thread mode and in process mode (inside the child), and the
engine reports the host seconds per phase beside the device's busy time."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine import Hosting, Pipeline
from app.metrics import Metrics
from app.store import Ledger, scan, to_discovered
from stages.rules import RuleThresholds
from tests.fakes import RecordingStage, run_until_idle
from tests.process_fakes import HostAndDeviceStage

BATCHES, BATCH, HOST_S, DEVICE_S = 20, 4, 0.050, 0.050


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_twenty_batches_take_about_twenty_device_calls_not_twenty_host_plus_device(tmp_path: Path,
                                                                                    isolation: str) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    for index in range(BATCHES * BATCH):
        (inbox / f"f{index:04d}.png").write_bytes(b"x" * (index + 1))
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    journal = tmp_path / "device.journal"
    stage = HostAndDeviceStage("ocr", HOST_S, DEVICE_S, BATCH, journal)
    metrics = Metrics()
    pipeline = Pipeline(ledger=ledger, metrics=metrics, stages=[RecordingStage("load", batch_size=BATCH * 4), stage],
                        thresholds=RuleThresholds(), placer=None, queue_capacities={"load": 64, "ocr": 64, "sink": 64},
                        max_attempts=2, placement_mode="copy", hosting={"ocr": Hosting(isolation)})

    run_until_idle(pipeline, timeout=120)
    assert {row.status for row in ledger.rows()} == {"done"}
    spans = sorted(tuple(map(float, line.split())) for line in journal.read_text().splitlines())
    assert len(spans) == BATCHES, "every batch went to the device once, in full batches"
    device_span = spans[-1][1] - spans[0][0]
    sequential = BATCHES * (HOST_S + DEVICE_S)
    # Overlapped, the device is the only serial part: about BATCHES * DEVICE_S from the first call to the last.
    assert device_span < 0.75 * sequential, f"{device_span:.2f} s for {BATCHES} batches: host work did not overlap"
    gaps = [later[0] - earlier[1] for earlier, later in zip(spans, spans[1:])]
    assert sorted(gaps)[len(gaps) // 2] < HOST_S / 2, f"the device waited for the host between calls: {gaps}"
    busy = metrics.registry.get_sample_value("binner_stage_busy_seconds_total", {"stage": "ocr", "device": "cpu"})
    assert busy == pytest.approx(BATCHES * DEVICE_S, rel=0.5)
    for phase in ("prepare", "finish"):
        host = metrics.registry.get_sample_value("binner_stage_host_seconds_total",
                                                 {"stage": "ocr", "device": "cpu", "phase": phase})
        assert host == pytest.approx(BATCHES * HOST_S / 2, rel=0.5), phase


def test_a_stage_without_host_phases_takes_one_batch_at_a_time() -> None:
    from app.hosts import OVERLAP_DEPTH, concurrency_of

    assert concurrency_of(RecordingStage("ocr")) == 1
    assert concurrency_of(HostAndDeviceStage("ocr", 0, 0, 1)) == OVERLAP_DEPTH > 1
