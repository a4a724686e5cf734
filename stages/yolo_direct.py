"""Ultralytics YOLO ``.pt`` detection without ``YOLO.predict``: letterbox, network, NMS and box scaling on the device.

``YOLO.predict`` starts from host images: it letterboxes each one with OpenCV on the CPU, switches to a minimal
rectangle (a new input shape, new cuDNN plans) whenever a batch happens to share one image shape, uploads the
batch, and scales boxes back image by image. ``DirectDetector`` starts from uint8 images already on the device
and keeps the work there: one fixed square input, OpenCV's INTER_LINEAR reproduced in integer arithmetic (the
same pixels, not nearly the same), ``LetterBox``'s own geometry and grey, the network as ``AutoBackend`` prepares
it, Ultralytics' own ``non_max_suppression``, and a single copy of the final boxes to the host per batch.

Nothing here imports Ultralytics or torchvision at module import; ``torch`` is imported, which every caller has.
"""

from __future__ import annotations

import copy
import platform
from typing import Any

import torch

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are integers out of 2048
_COEF_SCALE = 1 << _COEF_BITS
_TAP_CACHE_SIZE = 512  # (source, target) side lengths whose resize taps stay on the device

Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # first, second source index; their weights


def _axis_taps(source: int, target: int, device: torch.device, columns: bool) -> Taps:
    """Source indices and fixed-point weights of OpenCV's INTER_LINEAR along one axis (``resizeGeneric_``).

    OpenCV computes ``scale = 1 / (target / source)`` in double, each centre ``(d + 0.5) * scale - 0.5`` in double
    rounded to float, splits it into ``floor`` and fraction in float, clamps at the borders, and rounds
    ``(1 - f) * 2048`` and ``f * 2048`` to the nearest integer (ties to even). The same operations in the same
    precisions give the same integers on any IEEE device.
    """
    scale = 1.0 / (target / source)
    centre = ((torch.arange(target, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).to(torch.float32)
    start = torch.floor(centre)
    fraction = centre - start
    start = start.to(torch.int64)
    if columns:  # OpenCV zeroes the fraction of border columns (the border pixel alone); border rows keep theirs
        at_edge = (start < 0) | (start >= source - 1)
        fraction = torch.where(at_edge, torch.zeros_like(fraction), fraction)
    first = start.clamp(0, source - 1)
    second = (start + 1).clamp(0, source - 1)
    weight_first = torch.round((1 - fraction) * _COEF_SCALE).to(torch.int32)
    weight_second = torch.round(fraction * _COEF_SCALE).to(torch.int32)
    return first, second, weight_first, weight_second


def resize_like_opencv(image: torch.Tensor, height: int, width: int, taps: tuple[Taps, Taps] | None = None) -> torch.Tensor:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)`` for a uint8 HWC tensor, on its device.

    OpenCV resizes uint8 images in fixed point: a horizontal pass with 11-bit weights into int32, then a vertical
    pass in its SIMD form, ``((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16) + 2 >> 2``. torch's float bilinear
    differs from that by one grey level in about one pixel in ten, which moves confidences by ~1e-3; this gives
    OpenCV's pixels exactly (checked against opencv-python 5.0 on noise and photos, up- and downscaling, the 2x
    case OpenCV routes to INTER_AREA included). ``taps``: the (rows, columns) taps, when the caller keeps them.
    """
    source_h, source_w = int(image.shape[0]), int(image.shape[1])
    if taps is None:
        taps = (_axis_taps(source_h, height, image.device, False), _axis_taps(source_w, width, image.device, True))
    (row0, row1, beta0, beta1), (col0, col1, alpha0, alpha1) = taps
    alpha0, alpha1 = alpha0.view(1, -1, 1), alpha1.view(1, -1, 1)

    def horizontal(rows: torch.Tensor) -> torch.Tensor:  # only the source rows the vertical pass reads
        return rows[:, col0].to(torch.int32) * alpha0 + rows[:, col1].to(torch.int32) * alpha1

    top, bottom = horizontal(image.index_select(0, row0)), horizontal(image.index_select(0, row1))
    mixed = (((top >> 4) * beta0.view(-1, 1, 1)) >> 16) + (((bottom >> 4) * beta1.view(-1, 1, 1)) >> 16)
    return ((mixed + 2) >> 2).clamp_(0, 255).to(torch.uint8)


class DirectDetector:
    """YOLO ``.pt`` detect weights run as a plain ``nn.Module``: device tensors in, ``{label, confidence, box}`` out.

    Gives what ``YOLO.predict`` gives when it letterboxes to the full square (``rect=False``, or a batch of images
    of different shapes); predict's minimal rectangle for same-shape batches is not reproduced on purpose, since
    fixed input shapes are what keep cuDNN's plans. Not thread-safe: one instance per device, used by the thread
    that owns the device; ``records`` alone touches no device state and may run elsewhere.
    """

    @staticmethod
    def supports(yolo: Any) -> bool:
        """True for a PyTorch detection model; exports and other tasks keep ``YOLO.predict``.

        Exports (ONNX, TFLite, TensorRT, ...) hold a file, not an ``nn.Module``; segmentation, pose, OBB, RT-DETR,
        YOLO-World and YOLOE subclass ``DetectionModel`` but post-process differently, so only that exact class
        with a plain ``Detect`` head qualifies.
        """
        model = getattr(yolo, "model", None)
        if not isinstance(model, torch.nn.Module) or getattr(yolo, "task", "detect") != "detect":
            return False
        from ultralytics.nn.modules import Detect
        from ultralytics.nn.tasks import DetectionModel

        return type(model) is DetectionModel and type(model.model[-1]) is Detect

    def __init__(
        self,
        yolo: Any,
        image_size: int,
        confidence: float,
        device: torch.device | str,
        dtype: torch.dtype,
        iou: float = 0.7,
        max_det: int = 300,
        channels_last: bool | None = None,
    ) -> None:
        if not self.supports(yolo):
            raise ValueError(f"not a PyTorch YOLO detect model ({type(getattr(yolo, 'model', None)).__name__}): use YOLO.predict")
        from stages.torch_compat import ensure_torchvision

        ensure_torchvision()  # Ultralytics' NMS takes torchvision's kernel only once torchvision is imported
        from ultralytics.data.augment import LetterBox
        from ultralytics.utils.checks import check_imgsz

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # images say cuda:N; compare like with like
            self.device = torch.device("cuda", torch.cuda.current_device())
        # AutoBackend runs fp16 only off the CPU. Ultralytics has no bf16, and bf16's 8-bit mantissa would put box
        # corners up to 4 px apart at 640, so anything but fp16 on an accelerator runs fp32, as predict does.
        self.dtype = torch.float16 if dtype == torch.float16 and self.device.type != "cpu" else torch.float32
        self.confidence = float(confidence)
        self.iou = float(iou)
        self.max_det = int(max_det)
        self.names: dict[int, str] = {int(index): str(name) for index, name in dict(yolo.names).items()}
        self.model = self._prepare_model(yolo.model, channels_last)
        self.end2end = bool(getattr(self.model, "end2end", False))
        self.stride = max(int(self.model.stride.max()), 32)
        self.image_size: int = check_imgsz(image_size, stride=self.stride, min_dim=1)  # predict rounds up the same way
        # predict's letterbox for a batch of mixed shapes: full square, centred, LetterBox's default grey
        self.letterboxer = LetterBox(self.image_size, auto=False, stride=self.stride)
        self._taps: dict[tuple[int, int, bool], Taps] = {}

    def _prepare_model(self, model: torch.nn.Module, channels_last: bool | None) -> torch.nn.Module:
        """What predict's ``AutoBackend`` does to its own copy, so that the arithmetic is the same.

        The one-to-many head with external NMS (predict's default ``nms=None`` selects ``end2end=False``), Conv+BN
        fused, moved, cast, frozen, channels-last weights where AutoBackend picks them (x86 CPUs with oneDNN) unless
        told; the input stays a contiguous NCHW batch, as predict's is.
        A copy: the caller's ``YOLO`` object stays usable for ``predict``.
        """
        model = copy.deepcopy(model)
        if hasattr(model, "end2end"):
            model.end2end = False
        model = model.fuse(verbose=False).to(self.device)
        model = model.half() if self.dtype == torch.float16 else model.float()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if channels_last is None:
            channels_last = (
                self.device.type == "cpu"
                and platform.machine() in {"AMD64", "x86_64"}
                and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled
            )
        model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return model.eval()

    # -- pre-processing -----------------------------------------------------------------------------------

    def _resize_taps(self, height: int, width: int, new_h: int, new_w: int) -> tuple[Taps, Taps]:
        """Resize taps per (source, target) side, kept on the device: photos come in a handful of sizes."""
        if len(self._taps) > _TAP_CACHE_SIZE:
            self._taps.clear()
        axes = []
        for source, target, columns in ((height, new_h, False), (width, new_w, True)):
            key = (source, target, columns)
            if key not in self._taps:
                self._taps[key] = _axis_taps(source, target, self.device, columns)
            axes.append(self._taps[key])
        return axes[0], axes[1]

    def letterbox(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 HWC RGB images on the device -> the network's NCHW batch in its dtype, and per image
        ``(pad_x, pad_y, gain_x, gain_y, width, height)`` on the device, to map boxes back.

        Sizes and padding come from ``LetterBox.get_params`` itself; the gains are ``scale_boxes``': each side's
        rounded length over its original length. Only shapes are read on the host: nothing waits for the device.
        """
        size = self.image_size
        grey = int(self.letterboxer.padding_value)
        batch = torch.full((len(images), 3, size, size), grey, dtype=torch.uint8, device=self.device)
        geometry = []
        for index, image in enumerate(images):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.device != self.device:
                raise ValueError(
                    f"expected a uint8 HWC RGB image on {self.device}, got {image.dtype} {tuple(image.shape)} on {image.device}"
                )
            height, width = int(image.shape[0]), int(image.shape[1])
            params = self.letterboxer.get_params({"img": image})  # reads the shape only
            new_w, new_h = (int(side) for side in params["new_unpad"])
            top, left = int(params["top"]), int(params["left"])
            placed = image
            if (new_h, new_w) != (height, width):
                placed = resize_like_opencv(image, new_h, new_w, self._resize_taps(height, width, new_h, new_w))
            batch[index, :, top : top + new_h, left : left + new_w] = placed.permute(2, 0, 1)
            geometry.append((left, top, new_w / width, new_h / height, width, height))
        scaled = batch.to(self.dtype).div_(255)  # as predict: cast first, then divide, in the network's dtype
        return scaled, torch.tensor(geometry, dtype=torch.float32).to(self.device, non_blocking=True)

    # -- inference ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def boxes(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """The device half: ``(rows, counts)``, rows ``[x1, y1, x2, y2, confidence, class]`` (float32, on the device)
        for all images one after another, boxes in each image's own pixels, ``counts[i]`` rows for image ``i``."""
        from ultralytics.utils.nms import non_max_suppression

        if not images:
            return torch.zeros((0, 6), device=self.device), []
        batch, geometry = self.letterbox(images)
        kept = non_max_suppression(
            self.model(batch),
            self.confidence,
            self.iou,
            classes=None,
            agnostic=False,
            max_det=self.max_det,
            nc=0,
            end2end=self.end2end,
        )  # exactly predict's call for a detect model
        counts = [int(rows.shape[0]) for rows in kept]  # known on the host already: NMS sized them
        found = torch.cat([rows[:, :6].float() for rows in kept])
        owner = torch.repeat_interleave(
            torch.arange(len(images), device=self.device), torch.tensor(counts, device=self.device), output_size=len(found)
        )
        per_row = geometry[owner]
        # scale_boxes for the whole batch at once: remove the padding, divide by the gain, clip to the image
        boxes = (found[:, :4] - per_row[:, 0:2].repeat(1, 2)) / per_row[:, 2:4].repeat(1, 2)
        boxes = torch.minimum(boxes.clamp_(min=0), per_row[:, 4:6].repeat(1, 2))
        return torch.cat((boxes, found[:, 4:6]), dim=1), counts

    def records(self, rows: list[list[float]], counts: list[int]) -> list[list[dict[str, Any]]]:
        """The host half: the ``detections`` records ``VisionStage`` writes, from ``boxes()``' rows as lists."""
        detections: list[list[dict[str, Any]]] = []
        start = 0
        for count in counts:
            detections.append(
                [
                    {"label": self.names[int(cls)], "confidence": float(conf), "box": [float(v) for v in box]}
                    for *box, conf, cls in rows[start : start + count]
                ]
            )
            start += count
        return detections

    def detect(self, images: list[torch.Tensor]) -> list[list[dict[str, Any]]]:
        """Detections per image, boxes ``[x1, y1, x2, y2]`` in that image's pixels; one host copy for the batch."""
        rows, counts = self.boxes(images)
        return self.records(rows.tolist(), counts)
