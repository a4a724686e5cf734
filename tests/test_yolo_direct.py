"""``DirectDetector`` against ``YOLO.predict`` on the same ``.pt`` weights and the same real images, on CPU.

The weights are ``build_yolo``'s YOLOv8n (the real architecture, saved and loaded as a real ``.pt``) with weights
drawn so that its output depends on the image: with the default initialisation the signal has vanished to exactly
zero by the head, every image gets the same boxes, and a comparison could not tell a wrong letterbox from a right
one. ``test_comparison_catches`` shows that this one can.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.bench.standin_models import build_yolo
from stages.torch_compat import ensure_torchvision
from stages.ultralytics_env import preserve_torch_threads
from stages.yolo_direct import _NMS_ROUNDS, DirectDetector, batched_non_max_suppression, resize_like_opencv
from tests.conftest_models import IMAGES, YOLO_TFLITE, require_shared

pytestmark = pytest.mark.models

IMAGE_SIZE = 320  # small keeps the test fast; any multiple of 32 letterboxes the same way
CONFIDENCE = 0.05
TOLERANCE = 1e-3
# Wide, tall, smaller than the input (upscaled), exactly twice it (OpenCV switches to INTER_AREA), plain downscale.
PHOTOS = (
    "photo/paddledet_visdrone_0000315_01601_d_0000509.jpg",  # 765 x 1360
    "mixed/paddleocr_12.jpg",  # 1150 x 720
    "mixed/paddleocr_japan_1.jpg",  # 170 x 296
    "photo/darknet_person.jpg",  # 424 x 640
    "photo/darknet_dog.jpg",  # 576 x 768
)
CALIBRATION = ("photo/skimage_chelsea.png", "text/skimage_page.png")


def _load(name: str) -> Image.Image:
    """RGB, orientation applied, as the loader hands images to the vision stage."""
    with Image.open(IMAGES / name) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _responsive_yolo(path: Path) -> Path:
    """Seeded fan-in-scaled weights, head outputs scaled to a chosen spread on two other images; saved as ``.pt``."""
    from ultralytics import YOLO
    from ultralytics.data.augment import LetterBox

    yolo = YOLO(str(build_yolo(path.with_name("random.pt"))), task="detect")
    model = yolo.model.eval()
    head = model.model[-1]
    letterbox = LetterBox(IMAGE_SIZE, auto=False)
    batch = torch.stack([torch.from_numpy(letterbox(image=np.asarray(_load(name)))) for name in CALIBRATION])
    batch = batch.permute(0, 3, 1, 2).float() / 255
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module is not head.dfl.conv:  # DFL's conv is a fixed 0..15 ruler
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
        # Class logits around -7: a few dozen boxes over 0.05 per image. Box-distance logits falling with the
        # distance (channel = side * reg_max + bin), so that boxes span a few strides, most of them inside the image.
        tilt = -0.4 * (torch.arange(4 * head.reg_max) % head.reg_max).float()
        targets = [(branch[-1], torch.tensor(-7.0)) for branch in head.cv3] + [(branch[-1], tilt) for branch in head.cv2]
        outputs: dict[torch.nn.Module, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(lambda m, _args, out: outputs.__setitem__(m, out)) for layer, _ in targets]
        model(batch)
        for hook in hooks:
            hook.remove()
        for layer, mean in targets:
            gain = 1.0 / outputs[layer].std().item()
            layer.weight.mul_(gain)
            layer.bias.copy_((layer.bias - outputs[layer].mean(dim=(0, 2, 3))) * gain + mean)
    yolo.save(str(path))
    return path


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_shared(*(IMAGES / name for name in CALIBRATION))
    ensure_torchvision()
    from stages.ultralytics_env import prepare_ultralytics

    prepare_ultralytics()
    from ultralytics import YOLO

    return YOLO(str(_responsive_yolo(tmp_path_factory.mktemp("yolo-direct") / "responsive.pt")), task="detect")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    require_shared(*(IMAGES / name for name in PHOTOS))
    return [_load(name) for name in PHOTOS]


def _on_device(images: list[Image.Image]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(image)) for image in images]  # uint8 HWC RGB; the device here is the CPU


@contextmanager
def _threads_of_predict() -> Iterator[None]:
    """The torch thread count predict's CPU device selection sets: oneDNN splits its sums by thread, and a different
    split rounds fp32 differently (up to ~7e-4 px on these boxes), which is not what this comparison is about."""
    from ultralytics.utils import NUM_THREADS

    with preserve_torch_threads():
        torch.set_num_threads(NUM_THREADS)
        yield


def _direct(detector: DirectDetector, images: list[Image.Image]) -> list[list[dict[str, Any]]]:
    with _threads_of_predict():
        return detector.detect(_on_device(images))


def _predict(yolo: Any, images: list[Image.Image], **options: Any) -> list[list[dict[str, Any]]]:
    """``YOLO.predict`` as ``VisionStage._detect`` calls it and turns its ``Results`` into records."""
    with preserve_torch_threads():
        results = yolo.predict(source=images, conf=CONFIDENCE, imgsz=IMAGE_SIZE, device="cpu", verbose=False, **options)
    return [
        [
            {"label": str(result.names[int(cls)]), "confidence": float(conf), "box": [float(v) for v in xyxy]}
            for xyxy, conf, cls in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist())
        ]
        for result in results
    ]


@pytest.fixture(scope="module")
def detector(yolo: Any) -> DirectDetector:
    return DirectDetector(yolo, IMAGE_SIZE, CONFIDENCE, "cpu", torch.float32)


@pytest.fixture(scope="module")
def predicted(yolo: Any, photos: list[Image.Image], detector: DirectDetector) -> list[list[dict[str, Any]]]:
    """One predict call over images of different shapes: the predictor letterboxes with ``auto`` (the minimal
    rectangle) only when every image in the call has the same shape, so these all get the full ``IMAGE_SIZE``
    square, centred, as the direct path does. Run after ``detector`` was built: building it leaves ``yolo`` as it was.
    """
    assert len({image.size for image in photos}) == len(photos) > 1
    return _predict(yolo, photos)


def _difference(direct: list[dict[str, Any]], predicted: list[dict[str, Any]]) -> float:
    """Largest box or confidence difference, box by box in predict's order; infinite when the boxes or labels differ."""
    if len(direct) != len(predicted) or [d["label"] for d in direct] != [p["label"] for p in predicted]:
        return math.inf
    worst = 0.0
    for mine, theirs in zip(direct, predicted):
        worst = max(worst, abs(mine["confidence"] - theirs["confidence"]))
        worst = max(worst, *(abs(a - b) for a, b in zip(mine["box"], theirs["box"])))
    return worst


def test_resize_gives_opencv_pixels() -> None:
    import cv2

    generator = np.random.default_rng(0)
    for (height, width), (new_h, new_w) in [
        ((765, 1360), (180, 320)),  # downscale
        ((170, 296), (184, 320)),  # upscale
        ((424, 640), (212, 320)),  # exactly half: OpenCV's INTER_AREA branch
        ((500, 500), (640, 640)),  # upscale whose border rows keep their fraction
        ((1, 3000), (1, 640)),  # thin
        ((7, 13), (172, 320)),  # large upscale
    ]:
        image = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).reshape(new_h, new_w, 3)
        np.testing.assert_array_equal(resize_like_opencv(torch.from_numpy(image), new_h, new_w).numpy(), expected)


def test_direct_path_gives_predicts_boxes(
    detector: DirectDetector, photos: list[Image.Image], predicted: list[list[dict[str, Any]]]
) -> None:
    direct = _direct(detector, photos)
    assert len(direct) == len(photos)
    for name, image, mine, theirs in zip(PHOTOS, photos, direct, predicted):
        assert theirs, f"{name}: predict found nothing at {CONFIDENCE}; the comparison would prove nothing"
        assert _difference(mine, theirs) <= TOLERANCE, f"{name}: direct {mine[:3]} ... predict {theirs[:3]} ..."
        width, height = image.size
        corners = np.array([record["box"] for record in mine])
        assert (corners >= 0).all() and (corners[:, [0, 2]] <= width).all() and (corners[:, [1, 3]] <= height).all()
        assert (corners[:, 2] >= corners[:, 0]).all() and (corners[:, 3] >= corners[:, 1]).all()
        # Boxes away from the borders, so that an error in the padding offset or the gain would show, not be clipped.
        interior = (corners[:, 0] > 1) & (corners[:, 2] < width - 1) & (corners[:, 1] > 1) & (corners[:, 3] < height - 1)
        assert interior.any(), f"{name}: every box touches a border"


def test_one_image_equals_predict_without_rect(yolo: Any, detector: DirectDetector, photos: list[Image.Image]) -> None:
    """One image alone would get predict's minimal rectangle; ``rect=False`` turns ``auto`` off, as in the batch."""
    image = photos[-1]
    [theirs] = _predict(yolo, [image], rect=False)
    [mine] = _direct(detector, [image])
    assert theirs and _difference(mine, theirs) <= TOLERANCE


class _UnpaddedBoxes(DirectDetector):
    """Forgets to remove the letterbox padding from the boxes."""

    def letterbox(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, geometry = super().letterbox(images)
        geometry[:, 0:2] = 0
        return batch, geometry


class _LetterBoxRatio(DirectDetector):
    """Scales boxes by LetterBox's ratio, not by each side's rounded length as ``scale_boxes`` does."""

    def letterbox(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, geometry = super().letterbox(images)
        ratio = torch.tensor([min(self.image_size / i.shape[0], self.image_size / i.shape[1]) for i in images])
        geometry[:, 2:4] = ratio.view(-1, 1)
        return batch, geometry


@pytest.mark.parametrize("mistake", ["black padding", "padding left in the boxes", "letterbox ratio as the gain"])
def test_comparison_catches(
    mistake: str, yolo: Any, photos: list[Image.Image], predicted: list[list[dict[str, Any]]]
) -> None:
    """The equality above is not vacuous: a plausible mistake in the letterbox or the box scaling breaks it."""
    kind = {"padding left in the boxes": _UnpaddedBoxes, "letterbox ratio as the gain": _LetterBoxRatio}
    wrong = kind.get(mistake, DirectDetector)(yolo, IMAGE_SIZE, CONFIDENCE, "cpu", torch.float32)
    if mistake == "black padding":
        wrong.letterboxer.padding_value = 0
    direct = _direct(wrong, photos[:2])  # the wide one and the tall one: padding on either axis
    assert max(_difference(mine, theirs) for mine, theirs in zip(direct, predicted)) > 100 * TOLERANCE


def test_exports_and_other_tasks_keep_predict(yolo: Any) -> None:
    from ultralytics import YOLO

    assert DirectDetector.supports(yolo)
    require_shared(YOLO_TFLITE)
    export = YOLO(str(YOLO_TFLITE), task="detect")
    assert not DirectDetector.supports(export)
    with pytest.raises(ValueError, match="use YOLO.predict"):
        DirectDetector(export, IMAGE_SIZE, CONFIDENCE, "cpu", torch.float32)
    assert not DirectDetector.supports(YOLO("yolov8n-seg.yaml", task="segment"))  # a DetectionModel subclass


def _prediction(images: int, classes: int, anchors: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A detect head's ``(B, 4 + classes, anchors)`` output: crowded boxes (centres in 60 px, sides 10-50 px, so that
    most overlap) and skewed class scores; image 2 has no score above any threshold."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand((images, 2, anchors), generator=generator) * 60
    size = 10 + torch.rand((images, 2, anchors), generator=generator) * 40
    scores = torch.rand((images, classes, anchors), generator=generator) ** 3
    if images > 2:
        scores[2] = 0
    return torch.cat((centre, size, scores), dim=1).to(dtype)


def _ultralytics_nms(prediction: torch.Tensor, iou: float = 0.5, **options: Any) -> list[torch.Tensor]:
    ensure_torchvision()  # Ultralytics' NMS uses torchvision's kernel once torchvision is imported, as predict does
    from ultralytics.utils.nms import non_max_suppression

    return non_max_suppression(prediction, 0.3, iou, classes=None, nc=0, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [{}, {"agnostic": True}, {"max_det": 7}, {"max_det": 1000}, {"max_nms": 200}],
                         ids=["default", "agnostic", "max_det 7", "max_det 1000", "max_nms 200"])
@pytest.mark.parametrize("dense", [True, False], ids=["matrix", "per-image kernel"])
def test_batched_nms_gives_ultralytics_rows(dtype: torch.dtype, options: dict[str, Any], dense: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole batch at once keeps exactly the rows, in the order, that Ultralytics' per-image NMS keeps; so does
    the per-image kernel that images with too many candidates for the pairwise matrix go through."""
    if dtype == torch.float16 and "max_nms" in options:
        pytest.skip("fp16 scores tie at the max_nms cut, where Ultralytics' unstable argsort picks arbitrarily")
    if not dense:
        monkeypatch.setattr("stages.yolo_direct._NMS_DENSE_MAX", 8)
    prediction = _prediction(4, 6, 600, seed=1, dtype=dtype)
    expected = _ultralytics_nms(prediction, **options)
    rows, counts = batched_non_max_suppression(prediction, 0.3, 0.5, **options)
    assert counts.tolist() == [len(kept) for kept in expected]
    assert counts[2] == 0 and 0 < min(counts[[0, 1, 3]]) < 600  # something suppressed, something kept
    for image, kept in enumerate(expected):
        assert torch.equal(rows[image, : len(kept)], kept), f"image {image}"


def test_batched_nms_follows_a_long_suppression_chain() -> None:
    """Twenty boxes in a row, each overlapping the next, confidence falling: greedy NMS keeps every other one, which
    takes many more rounds than one check covers."""
    steps = 20
    prediction = torch.zeros((1, 5, steps + 3))
    prediction[0, 0, :steps] = 100 + 4 * torch.arange(steps)  # x centres 4 px apart, 10 px wide: IoU 0.43 > 0.3
    prediction[0, 1, :steps], prediction[0, 2, :steps], prediction[0, 3, :steps] = 50, 10, 10
    prediction[0, 4, :steps] = 0.9 - 0.01 * torch.arange(steps)
    assert steps > 2 * _NMS_ROUNDS
    [expected] = _ultralytics_nms(prediction, iou=0.3)
    rows, counts = batched_non_max_suppression(prediction, 0.3, 0.3)
    assert int(counts[0]) == steps // 2 and torch.equal(rows[0, : steps // 2], expected)


def test_batched_nms_with_nothing_to_keep() -> None:
    prediction = _prediction(3, 4, 50, seed=2)
    prediction[:, 4:] = 0
    rows, counts = batched_non_max_suppression(prediction, 0.3, 0.5)
    assert rows.shape == (3, 0, 6) and counts.tolist() == [0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host synchronisations")
def test_batched_nms_syncs_do_not_grow_with_the_batch() -> None:
    """Ultralytics syncs at least once per image; the batched NMS a few times per batch, however many images."""

    def syncs(images: int) -> int:
        prediction = _prediction(images, 6, 600, seed=3).cuda()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                batched_non_max_suppression(prediction, 0.3, 0.5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(warning.message) for warning in caught)

    few, many = syncs(2), syncs(24)
    assert 1 <= many <= 4 and few <= 4, (few, many)
