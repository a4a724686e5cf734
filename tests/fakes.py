"""Fake stages for engine tests: deterministic, fast, and honest about what they do (sleep, record, fail)."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from stages.base import BatchPolicy, ImageItem, OutOfDeviceMemory, Stage
from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage

# What the real stages of these names write (``Stage.produces``), so that routing treats a fake like the real one.
PRODUCES = {"ocr": frozenset({"ocr"}), "vision": frozenset({"detections", "caption", "clip_similarity"})}


class RecordingStage(Stage):
    """Sleeps ``base_s + per_item_s * n`` per batch (releases the GIL like a GPU call) and records every batch."""

    def __init__(self, name: str, devices: list[str] | None = None, batch_size: int = 4, max_wait_ms: float = 5.0,
                 base_s: float = 0.0, per_item_s: float = 0.0, jitter_s: float = 0.0,
                 poison: set[str] | None = None, oom_above: int | None = None,
                 signals: Callable[[ImageItem], dict[str, Any]] | None = None) -> None:
        super().__init__(devices or ["cpu"], BatchPolicy(batch_size, max_wait_ms))
        self.name = name
        self.produces = PRODUCES.get(name, frozenset())
        self.base_s, self.per_item_s, self.jitter_s = base_s, per_item_s, jitter_s
        self.poison = poison or set()
        self.oom_above = oom_above
        self.signals = signals
        self.log = SharedLog()

    def setup(self, device: str) -> None:
        super().setup(device)
        self.thread = threading.get_ident()

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        assert threading.get_ident() == self.thread, "a replica must only ever run on its own thread"
        if self.oom_above is not None and len(items) > self.oom_above:
            self.log.add("oom", self.device, [i.key for i in items])
            raise OutOfDeviceMemory(f"fake OOM for a batch of {len(items)}")
        if any(i.source.rsplit("/", 1)[-1] in self.poison for i in items):
            raise ValueError("poisoned item in batch")
        delay = self.base_s + self.per_item_s * len(items) + random.uniform(0, self.jitter_s)
        if delay:
            time.sleep(delay)
        for item in items:
            if self.signals is not None:
                item.signals.update(self.signals(item))
            item.image = item.image or "decoded"
        self.log.add("ok", f"{self.device}@{self.thread}", [i.key for i in items])
        return items


class SharedLog:
    """Thread-safe record of batches across replicas (replicate() copies share it on purpose)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches: list[tuple[str, str | None, list[int]]] = []

    def add(self, kind: str, device: str | None, keys: list[int]) -> None:
        with self._lock:
            self.batches.append((kind, device, keys))

    def processed(self) -> Counter[int]:
        return Counter(key for kind, _, keys in self.batches if kind == "ok" for key in keys)

    def sizes(self) -> list[int]:
        return [len(keys) for kind, _, keys in self.batches if kind == "ok"]


def run_until_idle(pipeline: Any, timeout: float = 120) -> None:
    """Set the pipeline up, run it until no row is pending or in flight, tear it down (bounded by ``timeout``)."""
    import anyio

    async def main() -> None:
        with anyio.fail_after(timeout):
            await pipeline.setup()
            try:
                await pipeline.run(until_idle=True)
            finally:
                await pipeline.teardown()

    anyio.run(main)


class ReplayedVision(VisionStage):
    """The real ``VisionStage``'s batch logic (which images are detected, captioned and scored), its models answering
    from a script: each image is a name (a string, which crosses to a child process as it is), and ``recorded[name]``
    holds its ``detections``, ``caption`` and ``clip_similarity``. ``calls`` counts the images each model saw (in
    this process; a child's counts stay in the child). A model left out is disabled, as in the configuration."""

    def __init__(self, recorded: dict[str, dict[str, Any]], detector: bool = True, captioner: bool = True,
                 clip: bool = True, batch_size: int = 8) -> None:
        super().__init__(DetectorOptions("replayed.pt") if detector else None,
                         CaptionerOptions("replayed") if captioner else None, ClipOptions("replayed") if clip else None,
                         "fp32", ["cpu"], BatchPolicy(batch_size, 5.0))
        self.recorded = recorded
        self.calls: Counter[str] = Counter()

    def setup(self, device: str) -> None:
        self.device = device
        self.yolo = "replayed" if self.detector_options else None
        self.blip = "replayed" if self.captioner_options else None
        self.clip = "replayed" if self.clip_options else None

    def warmup(self) -> None:
        pass

    def _upload(self, images: list[Any]) -> tuple[list[Any], Any]:
        return list(images), None  # the "pixels" are the names: the models answer by name

    def _detect(self, frames: list[Any], images: list[Any]) -> list[list[dict[str, Any]]]:
        self.calls["detector"] += len(frames)
        return [self.recorded[name]["detections"] for name in frames]

    def _caption(self, images: list[Any], min_new_tokens: int | None = None) -> list[str]:
        self.calls["captioner"] += len(images)
        return [self.recorded[name]["caption"] for name in images]

    def _similarity(self, images: list[Any], captions: list[str]) -> list[float]:
        self.calls["clip"] += len(images)
        assert captions == [self.recorded[name]["caption"] for name in images], "CLIP scores the image's own caption"
        return [self.recorded[name]["clip_similarity"] for name in images]
