"""The vision stage on the device path gives what the host path gave: on the 30 labelled images (decoded by the
real loader), with the real YOLOv8n and tiny BLIP/CLIP, every detection, caption and similarity, and so every bin,
equals the previous implementation, written out here as it was: ``YOLO.predict`` on the decoded images and the BLIP
and CLIP processors on PIL images on the host, then the networks. The direct YOLO path against ``predict`` on
``.pt`` weights is tests/test_yolo_direct.py; the pixel values against the processors, tests/test_vision_inputs.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stages.base import BatchPolicy, ImageItem
from stages.loader import LoaderOptions, LoaderStage
from stages.rules import RuleThresholds, decide
from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage
from tests.conftest_models import IMAGES, YOLO_TFLITE, require_shared

pytestmark = pytest.mark.models


def host_path(stage: VisionStage, images: list[Any]) -> list[dict[str, Any]]:
    """The previous implementation: processors on the host, tensors moved over, networks, per batch."""
    assert stage.yolo is not None and stage.blip is not None and stage.clip is not None
    options = stage.captioner_options
    assert options is not None
    results = stage.yolo.predict(source=images, conf=stage.detector_options.confidence,  # type: ignore[union-attr]
                                 imgsz=stage.detector_options.image_size, device="cpu", verbose=False)  # type: ignore[union-attr]
    signals: list[dict[str, Any]] = []
    with torch.inference_mode():
        blip_in = stage.blip_processor(images=images, return_tensors="pt")
        output = stage.blip.generate(pixel_values=blip_in["pixel_values"].to(stage.dtype),
                                     max_new_tokens=options.max_new_tokens)
        captions = [text.strip() for text in stage.blip_processor.batch_decode(output, skip_special_tokens=True)]
        clip_in = stage.clip_processor(images=images, text=captions, return_tensors="pt", padding=True, truncation=True,
                                       max_length=stage._clip_max_tokens)
        clip_in["pixel_values"] = clip_in["pixel_values"].to(stage.dtype)
        out = stage.clip(**clip_in)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        similarity = (image * text).sum(dim=-1).clamp(-1.0, 1.0).tolist()
    for result, caption, score in zip(results, captions, similarity):
        boxes = result.boxes
        found = [{"label": str(result.names[int(c)]), "confidence": float(f), "box": [float(v) for v in xyxy]}
                 for xyxy, f, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist())] if boxes else []
        signals.append({"detections": found, "caption": caption, "clip_similarity": float(score)})
    return signals


def test_the_device_path_gives_the_host_paths_signals_and_bins(tiny_blip_dir: Path, tiny_clip_dir: Path) -> None:
    require_shared(IMAGES, YOLO_TFLITE)
    loader = LoaderStage(LoaderOptions(max_file_bytes=1 << 28, max_pixels=120_000_000, max_side=1600), ["cpu"])
    files = sorted(path for path in IMAGES.rglob("*") if path.suffix in (".jpg", ".png"))
    assert len(files) == 30
    items = loader.process_batch([ImageItem(key=index, source=str(path)) for index, path in enumerate(files)])
    assert all(item.failure is None for item in items)
    stage = VisionStage(DetectorOptions(str(YOLO_TFLITE), confidence=0.25, image_size=640),
                        CaptionerOptions(str(tiny_blip_dir), max_new_tokens=6), ClipOptions(str(tiny_clip_dir)), "auto",
                        ["cpu"], BatchPolicy(max_batch_size=8))
    stage.setup("cpu")
    try:
        rules = RuleThresholds(signals="all")
        for start in range(0, len(items), 8):
            batch = items[start:start + 8]
            expected = host_path(stage, [item.image for item in batch])
            for item in batch:
                item.rules = rules
            stage.process_batch(batch)
            for item, wanted in zip(batch, expected):
                got = item.signals
                assert got["caption"] == wanted["caption"], item.source
                assert got["clip_similarity"] == pytest.approx(wanted["clip_similarity"], abs=1e-5), item.source
                assert [d["label"] for d in got["detections"]] == [d["label"] for d in wanted["detections"]]
                for mine, theirs in zip(got["detections"], wanted["detections"]):
                    assert mine["confidence"] == pytest.approx(theirs["confidence"], abs=1e-6)
                    assert mine["box"] == pytest.approx(theirs["box"], abs=1e-3)
                assert decide(got, RuleThresholds()).bin == decide(wanted, RuleThresholds()).bin, item.source
    finally:
        stage.teardown()
