"""Synthetic stages (benchmarks only): they cost what they are told and write well-formed empty signals."""

from __future__ import annotations

import threading
import time

from PIL import Image

from stages.base import BatchPolicy, ImageItem
from stages.synthetic import SyntheticOcrStage, SyntheticVisionStage


def items(count: int) -> list[ImageItem]:
    return [ImageItem(key=i, source=f"{i}.png", image=Image.new("RGB", (8, 8))) for i in range(count)]


def test_batch_costs_base_plus_per_item_time() -> None:
    stage = SyntheticOcrStage(20.0, 5.0, ["cpu"], BatchPolicy(8))
    started = time.perf_counter()
    stage.process_batch(items(8))
    elapsed = time.perf_counter() - started
    assert 0.060 <= elapsed < 0.5  # 20 + 8 * 5 ms


def test_signals_are_well_formed_and_empty() -> None:
    batch = items(3)
    batch[1].fail("corrupt", "test", stage="load")
    SyntheticOcrStage(0, 0, ["cpu"], BatchPolicy()).process_batch(batch)
    SyntheticVisionStage(0, 0, ["cpu"], BatchPolicy()).process_batch(batch[:2])  # item 2 routed past vision
    assert batch[0].signals == {
        "ocr": {
            "text": "",
            "lines": [],
            "char_count": 0,
            "line_count": 0,
            "text_area_ratio": 0.0,
            "mean_confidence": 0.0,
        },
        "detections": [],
    }
    assert batch[1].signals == {}
    assert "detections" not in batch[2].signals and "ocr" in batch[2].signals


def test_sleep_releases_the_gil_so_stages_overlap() -> None:
    ocr, vision = (
        SyntheticOcrStage(100, 0, ["cpu"], BatchPolicy()),
        SyntheticVisionStage(100, 0, ["cpu"], BatchPolicy()),
    )
    threads = [threading.Thread(target=s.process_batch, args=(items(1),)) for s in (ocr, vision)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert time.perf_counter() - started < 0.19


def test_zero_cost_stage_annotates_without_sleeping(monkeypatch) -> None:
    """The framework benchmark runs stages that cost nothing: they must not even yield the GIL in a sleep."""
    import stages.synthetic as synthetic

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds} s in a zero-cost stage")

    monkeypatch.setattr(synthetic.time, "sleep", no_sleep)
    batch = items(2)
    SyntheticOcrStage(0, 0, ["cpu"], BatchPolicy()).process_batch(batch)
    assert all("ocr" in item.signals for item in batch)
