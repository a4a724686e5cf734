"""Synthetic OCR and vision stages: FOR BENCHMARKS AND BACKLOG TESTS ONLY, NEVER FOR BINNING REAL DATA.

They run no model. Each batch sleeps ``base_ms + per_item_ms * len(items)``, which stands in for a GPU
call: like a CUDA kernel launch or an ONNX Runtime run, ``time.sleep`` releases the GIL, so these stages
let the engine's queues, batching, threads, backpressure and metrics be measured at GPU-like speeds on a
machine without a GPU. The signals they write are well formed but empty (no text, no detections), so
every image they touch ends up in the "weak content" bin: that is the point, and why they must never be
configured for real input.
"""

from __future__ import annotations

import time

from stages.base import BatchPolicy, ImageItem, Stage
from stages.ocr import summarize


class _SleepStage(Stage):
    """A stage whose batch costs ``base_ms + per_item_ms * n`` of GIL-free waiting."""

    def __init__(self, base_ms: float, per_item_ms: float, devices: list[str], batch_policy: BatchPolicy) -> None:
        super().__init__(devices=devices, batch_policy=batch_policy)
        if base_ms < 0 or per_item_ms < 0:
            raise ValueError(f"synthetic stage costs must be >= 0 ms (got {base_ms}, {per_item_ms})")
        self.base_ms = float(base_ms)
        self.per_item_ms = float(per_item_ms)

    def _active(self, items: list[ImageItem]) -> list[ImageItem]:
        return [item for item in items if item.failure is None and item.image is not None]

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        active = self._active(items)
        if active:
            cost_s = (self.base_ms + self.per_item_ms * len(active)) / 1000.0
            if cost_s > 0:  # a zero-cost stage (framework benchmarks) must not even yield the GIL
                time.sleep(cost_s)
            for item in active:
                self._annotate(item)
        return items

    def _annotate(self, item: ImageItem) -> None:
        raise NotImplementedError


class SyntheticOcrStage(_SleepStage):
    """Benchmark stand-in for ``OcrStage`` (never for real data): sleeps, then writes empty OCR signals."""

    name = "ocr"
    produces = frozenset({"ocr"})

    def _annotate(self, item: ImageItem) -> None:
        item.signals["ocr"] = summarize([], 1, 1, min_confidence=0.0)


class SyntheticVisionStage(_SleepStage):
    """Benchmark stand-in for ``VisionStage`` (never for real data): sleeps, then writes no detections.

    Only ``detections`` is written (empty); ``caption`` and ``clip_similarity`` stay absent, as for
    disabled models, so the rules skip those criteria (and routing takes them as never coming).
    """

    name = "vision"
    produces = frozenset({"detections"})

    def _annotate(self, item: ImageItem) -> None:
        item.signals["detections"] = []
