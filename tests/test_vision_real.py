"""The vision stage with real models: the shared YOLOv8n (int8 TFLite through Ultralytics) and tiny
random CLIP/BLIP checkpoints loaded through ``from_pretrained(dir)``, as real checkpoints are."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import load_config
from stages.base import BatchPolicy, ImageItem
from stages.vision import (
    CaptionerOptions,
    ClipOptions,
    DetectorOptions,
    ModelUnavailableError,
    VisionConfigError,
    VisionStage,
    resolve_dtype,
)
from tests.conftest_models import IMAGES, YOLO_TFLITE, require_shared

pytestmark = pytest.mark.models

ZIDANE = "photo/yolov5_zidane.jpg"
DOG = "photo/darknet_dog.jpg"
PAGE = "text/skimage_page.png"


def load(relative: str) -> Image.Image:
    path = IMAGES / relative
    require_shared(path)
    with Image.open(path) as image:
        return image.convert("RGB")


def detector() -> DetectorOptions:
    require_shared(YOLO_TFLITE)
    return DetectorOptions(weights=str(YOLO_TFLITE), confidence=0.25, image_size=640)


@pytest.fixture(scope="module")
def stage(tiny_blip_dir: Path, tiny_clip_dir: Path) -> Iterator[VisionStage]:
    vision = VisionStage(
        detector(),
        CaptionerOptions(model=str(tiny_blip_dir), max_new_tokens=8, prompt=None),
        ClipOptions(model=str(tiny_clip_dir)),
        "auto",
        ["cpu"],
        BatchPolicy(max_batch_size=8),
    )
    vision.setup("cpu")
    vision.warmup()
    yield vision
    vision.teardown()


@pytest.fixture(scope="module")
def batch(stage: VisionStage) -> list[ImageItem]:
    """One micro-batch: two photos, a text page, a failed item, an item without image (which items skip vision is
    the engine's routing, tested in test_engine)."""
    items = [ImageItem(key=i, source=name, image=load(name)) for i, name in enumerate([ZIDANE, DOG, PAGE])]
    failed = ImageItem(key=3, source=DOG, image=load(DOG))
    failed.fail("corrupt", "test: failed upstream", stage="load")
    items += [failed, ImageItem(key=4, source="nothing.png")]
    assert stage.process_batch(items) is items
    return items


def labels(item: ImageItem, min_confidence: float = 0.5) -> list[str]:
    return [d["label"] for d in item.signals["detections"] if d["confidence"] >= min_confidence]


def test_yolo_finds_persons_in_zidane_and_a_dog_in_darknet_dog(batch: list[ImageItem]) -> None:
    zidane, dog = batch[0], batch[1]
    assert labels(zidane).count("person") >= 2, zidane.signals["detections"]
    assert "dog" in labels(dog), dog.signals["detections"]
    assert "dog" not in labels(zidane) and "person" not in labels(dog, 0.5)


def test_detections_follow_the_contract(batch: list[ImageItem]) -> None:
    for item in batch[:2]:
        width, height = item.image.size
        for found in item.signals["detections"]:
            assert set(found) == {"label", "confidence", "box"}
            assert isinstance(found["label"], str) and 0.25 <= found["confidence"] <= 1.0
            x1, y1, x2, y2 = found["box"]
            assert -1 <= x1 < x2 <= width + 1 and -1 <= y1 < y2 <= height + 1


def test_caption_and_clip_similarity_per_item(batch: list[ImageItem]) -> None:
    for item in batch[:2]:
        assert isinstance(item.signals["caption"], str)
        similarity = item.signals["clip_similarity"]
        assert isinstance(similarity, float) and math.isfinite(similarity) and -1.0 <= similarity <= 1.0


def test_failed_and_empty_items_pass_through(batch: list[ImageItem]) -> None:
    assert [item.key for item in batch] == [0, 1, 2, 3, 4]
    page, failed, empty = batch[2], batch[3], batch[4]
    assert "detections" in page.signals and page.image is not None
    assert failed.signals == {} and failed.failure is not None and failed.failure.reason == "corrupt"
    assert empty.signals == {} and empty.failure is None


def test_clip_scores_the_caption_it_is_given(stage: VisionStage) -> None:
    """Similarity is computed per (image, caption) pair: other captions give other scores."""
    frames, _ = stage._upload([load(DOG), load(DOG)])
    scores = stage._similarity(frames, ["a dog on a street", "text document page"])
    assert scores[0] != pytest.approx(scores[1], abs=1e-6)
    again = stage._similarity(frames[:1], ["a dog on a street"])
    assert again[0] == pytest.approx(scores[0], abs=1e-4)


def test_torch_threads_are_restored_after_yolo_predict() -> None:
    """Ultralytics' first CPU predict sets torch threads for the whole process; the stage undoes it."""
    from ultralytics import YOLO
    from ultralytics.utils import NUM_THREADS

    image = load(ZIDANE)
    before = torch.get_num_threads()
    wanted = NUM_THREADS + 1
    try:
        torch.set_num_threads(wanted)
        raw = YOLO(str(YOLO_TFLITE), task="detect")  # the premise: a bare predict changes the setting
        raw.predict(source=[image], device="cpu", verbose=False)
        assert torch.get_num_threads() == NUM_THREADS

        torch.set_num_threads(wanted)
        fresh = VisionStage(detector(), None, None, "auto", ["cpu"], BatchPolicy())
        fresh.setup("cpu")
        item = ImageItem(key=0, source=ZIDANE, image=image)
        fresh.process_batch([item])
        assert "person" in labels(item)
        assert torch.get_num_threads() == wanted
        fresh.teardown()
    finally:
        torch.set_num_threads(before)


def test_precision_resolution_on_cpu_and_cuda_names(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("fp16", "cuda:1") == torch.float16
    assert resolve_dtype("fp32", "cuda:0") == torch.float32
    with caplog.at_level(logging.WARNING, logger="stages.vision"):
        assert resolve_dtype("fp16", "cpu") == torch.float32
    assert "fp16" in caplog.text
    with pytest.raises(VisionConfigError, match="vision.precision"):
        resolve_dtype("int4", "cpu")


def test_bf16_stage_runs_blip_and_clip_in_bf16(tiny_blip_dir: Path, tiny_clip_dir: Path) -> None:
    half = VisionStage(
        None,
        CaptionerOptions(str(tiny_blip_dir), 4, "a picture of"),
        ClipOptions(str(tiny_clip_dir)),
        "bf16",
        ["cpu"],
        BatchPolicy(),
    )
    half.setup("cpu")
    assert half.blip.dtype == torch.bfloat16 and half.clip.dtype == torch.bfloat16
    items = [ImageItem(key=i, source=DOG, image=load(DOG)) for i in range(2)]
    half.process_batch(items)
    for item in items:
        assert "detections" not in item.signals  # detector disabled: key absent
        assert item.signals["caption"].startswith("a picture of")
        assert -1.0 <= item.signals["clip_similarity"] <= 1.0
    assert half.probe_batch_size("cpu", 12) == 12
    half.teardown()
    assert half.blip is None and half.clip is None and half.device is None


def test_the_memory_probe_runs_the_batches_in_flight_at_the_largest_side(tmp_path: Path, tiny_blip_dir: Path,
                                                                            tiny_clip_dir: Path) -> None:
    """The probe's worst case is production's: ``batches_in_flight`` (the engine's overlap depth) batches of frames
    at ``limits.max_side`` on the device at once, one of them through the models. The memory figure itself needs CUDA;
    what it measures is checked here."""
    import weakref

    from app.build import build_stages
    from app.hosts import OVERLAP_DEPTH

    config = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "st",
                                "limits": {"max_side": 96}, "ocr": {"enabled": False},
                                "vision": {"detector": {"enabled": False},
                                           "captioner": {"model": str(tiny_blip_dir), "max_new_tokens": 4},
                                           "clip": {"model": str(tiny_clip_dir)}}})
    vision = next(stage for stage in build_stages(config, gpu_count=0) if stage.name == "vision")
    assert isinstance(vision, VisionStage) and vision.max_image_side == 96
    assert VisionStage.batches_in_flight == OVERLAP_DEPTH
    vision.setup("cpu")
    uploads: list[list[weakref.ref[torch.Tensor]]] = []
    shapes: list[list[tuple[int, ...]]] = []
    alive_at_the_models: list[int] = []
    upload = vision._upload

    def recorded(images: list[object]) -> tuple[list[torch.Tensor], object]:
        frames, ready = upload(images)
        uploads.append([weakref.ref(frame) for frame in frames])
        shapes.append([tuple(frame.shape) for frame in frames])
        return frames, ready

    def counted(batch: object) -> list[dict[str, object]]:
        alive_at_the_models.append(sum(all(ref() is not None for ref in refs) for refs in uploads))
        return infer(batch)

    infer = vision._infer
    vision._upload, vision._infer = recorded, counted  # type: ignore[method-assign]
    try:
        vision._probe_attempt(2)
    finally:
        vision.teardown()
    assert shapes == [[(96, 96, 3)] * 2] * OVERLAP_DEPTH  # every batch in flight, at the largest side
    assert alive_at_the_models == [OVERLAP_DEPTH]  # all of them held while the models run


@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_blip_with_a_static_cache_writes_the_same_captions(tiny_blip_dir: Path, prompt: str | None,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers has no SDPA for BLIP and its ``cache_implementation="static"`` fails on BLIP's cross-attention;
    the stage says once what BLIP runs with, and its static self-attention cache gives the dynamic cache's captions."""
    import copy

    import stages.vision as vision_module

    monkeypatch.setattr(vision_module, "_reported_captioners", set())
    vision = VisionStage(None, CaptionerOptions(str(tiny_blip_dir), 8, prompt), None, "auto", ["cpu"], BatchPolicy())
    with caplog.at_level(logging.INFO, logger="stages.vision"):
        vision.setup("cpu")
        vision.teardown()
        vision.setup("cpu")
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("BLIP ")]
    assert said == [f"BLIP {tiny_blip_dir} runs with eager attention and a dynamic KV cache in float32 (transformers "
                    "has no SDPA path for BLIP; docs/benchmarks.md, GPU)"]
    assert vision.blip_attention == vision.blip.config._attn_implementation == "eager"
    frames = [torch.from_numpy(np.array(load(name))) for name in (ZIDANE, DOG, PAGE)]
    static = copy.copy(vision)
    static.blip_cache = "static"
    with torch.inference_mode():
        expected = vision._caption(frames, min_new_tokens=8)
        assert static._caption(frames, min_new_tokens=8) == expected
        assert static._caption(frames[:1]) == vision._caption(frames[:1])
    vision.teardown()


def test_configuration_errors_name_the_keys(tmp_path: Path) -> None:
    with pytest.raises(VisionConfigError, match="vision.captioner"):
        VisionStage(None, None, ClipOptions("openai/clip-vit-base-patch32"), "auto", ["cpu"], BatchPolicy())
    with pytest.raises(VisionConfigError, match="vision.precision"):
        VisionStage(detector(), None, None, "fp8", ["cpu"], BatchPolicy())
    missing = VisionStage(DetectorOptions(str(tmp_path / "nope.pt")), None, None, "auto", ["cpu"], BatchPolicy())
    with pytest.raises(ModelUnavailableError, match="vision.detector.weights"):
        missing.setup("cpu")
    uncached = VisionStage(None, CaptionerOptions("binner-tests/no-such-blip"), None, "auto", ["cpu"], BatchPolicy())
    with pytest.raises(ModelUnavailableError, match="vision.captioner.model.*fetch-weights"):
        uncached.setup("cpu")


def test_a_device_that_does_not_exist_is_named() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = f"cuda:{count + 3}"
    gpu = VisionStage(detector(), None, None, "auto", [absent], BatchPolicy())
    with pytest.raises(RuntimeError, match=absent):
        gpu.setup(absent)
