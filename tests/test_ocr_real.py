"""The OCR stage with the real RapidOCR models (PP-OCRv4, shipped in the wheel) on the shared images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from stages.base import BatchPolicy, ImageItem
from stages.ocr import OcrLine, OcrOptions, OcrStage, summarize, text_area_ratio
from tests.conftest_models import IMAGES, require_shared

pytestmark = pytest.mark.models

TEXT_IMAGES = ["text/skimage_page.png", "text/paddleocr_11.jpg", "text/rapidocr_ch_en_num.jpg"]
PHOTOS = ["photo/darknet_dog.jpg", "photo/skimage_chelsea.png"]


def load(relative: str) -> Image.Image:
    path = IMAGES / relative
    require_shared(path)
    with Image.open(path) as image:
        return image.convert("RGB")


def item(key: int, relative: str) -> ImageItem:
    return ImageItem(key=key, source=relative, image=load(relative))


@pytest.fixture(scope="module")
def stage() -> Iterator[OcrStage]:
    require_shared(IMAGES)
    ocr = OcrStage(OcrOptions(), ["cpu"], BatchPolicy(max_batch_size=8))
    ocr.setup("cpu")
    ocr.warmup()
    yield ocr
    ocr.teardown()


@pytest.fixture(scope="module")
def batch(stage: OcrStage) -> list[ImageItem]:
    """One micro-batch: text images, photos, one failed item and one item without image."""
    items = [item(i, name) for i, name in enumerate(TEXT_IMAGES + PHOTOS)]
    failed = item(90, PHOTOS[0])
    failed.fail("corrupt", "test: failed upstream", stage="load")
    no_image = ImageItem(key=91, source="missing.png")
    items += [failed, no_image]
    returned = stage.process_batch(items)
    assert returned is items
    return items


def test_text_images_give_text_and_a_high_text_area_ratio(batch: list[ImageItem]) -> None:
    for processed in batch[: len(TEXT_IMAGES)]:
        ocr = processed.signals["ocr"]
        assert ocr["char_count"] >= 50, (processed.source, ocr["text"])
        assert ocr["line_count"] >= 5, processed.source
        assert ocr["text_area_ratio"] >= 0.2, (processed.source, ocr["text_area_ratio"])
        assert ocr["mean_confidence"] >= 0.8, processed.source
    assert "segmentation" in batch[0].signals["ocr"]["text"]  # skimage's page.png: "Region-based segmentation"


def test_photos_give_little_text(batch: list[ImageItem]) -> None:
    for processed in batch[len(TEXT_IMAGES) : len(TEXT_IMAGES) + len(PHOTOS)]:
        ocr = processed.signals["ocr"]
        assert ocr["char_count"] <= 5, (processed.source, ocr["text"])
        assert ocr["text_area_ratio"] < 0.02, processed.source


def test_signals_follow_the_contract(batch: list[ImageItem], stage: OcrStage) -> None:
    for processed in batch[: len(TEXT_IMAGES) + len(PHOTOS)]:
        ocr = processed.signals["ocr"]
        assert set(ocr) == {"text", "lines", "char_count", "line_count", "text_area_ratio", "mean_confidence"}
        assert ocr["line_count"] == len(ocr["lines"])
        assert ocr["text"] == "\n".join(line["text"] for line in ocr["lines"])
        assert ocr["char_count"] == sum(len("".join(line["text"].split())) for line in ocr["lines"])
        assert 0.0 <= ocr["text_area_ratio"] <= 1.0
        width, height = processed.image.size
        for line in ocr["lines"]:
            assert line["confidence"] >= stage.options.min_confidence
            assert len(line["box"]) == 4
            assert all(-1 <= x <= width + 1 and -1 <= y <= height + 1 for x, y in line["box"])


def test_batch_has_one_result_per_item_and_passes_failures_through(batch: list[ImageItem]) -> None:
    assert [processed.key for processed in batch] == list(range(len(TEXT_IMAGES) + len(PHOTOS))) + [90, 91]
    assert all("ocr" in processed.signals for processed in batch[:-2])
    failed, no_image = batch[-2:]
    assert failed.signals == {} and failed.failure is not None and failed.failure.reason == "corrupt"
    assert no_image.signals == {} and no_image.failure is None


def test_large_images_are_downscaled_and_boxes_map_back(stage: OcrStage) -> None:
    """A 1920-px image gives the lines of its 1280-px copy, with boxes in the 1920-px image's pixels."""
    original = load(TEXT_IMAGES[0])
    big = original.resize((original.width * 5, original.height * 5), Image.Resampling.BICUBIC)
    limit = stage.options.max_side
    assert max(big.size) > limit
    factor = max(big.size) / limit
    size = (round(big.width / factor), round(big.height / factor))
    copy = big.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)  # what the stage hands to the engine
    big_item, copy_item = ImageItem(key=1, source="big", image=big), ImageItem(key=2, source="copy", image=copy)
    stage.process_batch([big_item, copy_item])
    large, small = big_item.signals["ocr"], copy_item.signals["ocr"]
    assert large["line_count"] >= 3
    assert large["text"] == small["text"]
    assert large["text_area_ratio"] == pytest.approx(small["text_area_ratio"], abs=0.01)
    for line_big, line_small in zip(large["lines"], small["lines"]):
        for (xb, yb), (xs, ys) in zip(line_big["box"], line_small["box"]):
            assert xb == pytest.approx(xs * factor, abs=2 * factor) and yb == pytest.approx(ys * factor, abs=2 * factor)
    assert max(x for line in large["lines"] for x, _ in line["box"]) > limit


def test_text_area_ratio_counts_overlaps_once() -> None:
    left = [[0.0, 0.0], [50.0, 0.0], [50.0, 50.0], [0.0, 50.0]]
    right = [[25.0, 0.0], [75.0, 0.0], [75.0, 50.0], [25.0, 50.0]]
    assert text_area_ratio([left], 100, 100) == pytest.approx(0.25, abs=0.02)
    assert text_area_ratio([left, right], 100, 100) == pytest.approx(0.375, abs=0.02)
    assert text_area_ratio([left, left], 100, 100) == pytest.approx(0.25, abs=0.02)
    assert text_area_ratio([], 100, 100) == 0.0
    whole = [[0.0, 0.0], [4000.0, 0.0], [4000.0, 3000.0], [0.0, 3000.0]]
    assert text_area_ratio([whole], 4000, 3000) == pytest.approx(1.0, abs=0.01)


def test_lines_below_min_confidence_are_dropped() -> None:
    box = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0]]
    lines = [OcrLine("sure thing", 0.9, box), OcrLine("noise", 0.3, box)]
    record = summarize(lines, 100, 100, min_confidence=0.5)
    assert record["text"] == "sure thing" and record["line_count"] == 1
    assert record["char_count"] == 9  # spaces do not count
    assert record["mean_confidence"] == pytest.approx(0.9)
    assert record["text_area_ratio"] == pytest.approx(0.01, abs=0.005)
    empty = summarize([OcrLine("noise", 0.3, box)], 100, 100, min_confidence=0.5)
    assert empty == {
        "text": "",
        "lines": [],
        "char_count": 0,
        "line_count": 0,
        "text_area_ratio": 0.0,
        "mean_confidence": 0.0,
    }


def test_unknown_backend_and_missing_paddle_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ocr.backend"):
        OcrStage(OcrOptions(backend="tesseract"), ["cpu"], BatchPolicy())
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        paddle = OcrStage(OcrOptions(backend="paddleocr"), ["cpu"], BatchPolicy())
        with pytest.raises(RuntimeError, match=r"binner\[paddle\]"):
            paddle.setup("cpu")
    else:
        pytest.skip("paddleocr is installed here; the missing-extra message cannot be shown")


def test_cuda_device_without_cuda_provider_names_the_device() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here; the error path is for CPU-only installs")
    gpu = OcrStage(OcrOptions(runtime="onnxruntime"), ["cuda:1"], BatchPolicy())
    with pytest.raises(RuntimeError, match="cuda:1.*ocr.runtime torch"):
        gpu.setup("cuda:1")


def test_cuda_device_without_cuda_torch_names_the_device() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here; the error path is for CPU-only installs")
    gpu = OcrStage(OcrOptions(), ["cuda:1"], BatchPolicy())  # runtime auto: torch on a CUDA device
    with pytest.raises(RuntimeError, match="cuda:1.*GPU=1"):
        gpu.setup("cuda:1")
