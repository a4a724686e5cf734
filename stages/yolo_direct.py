"""Ultralytics YOLO ``.pt`` detection without ``YOLO.predict``: letterbox, network, NMS and box scaling on the device.

``YOLO.predict`` starts from host images: it letterboxes each one with OpenCV on the CPU, switches to a minimal
rectangle (a new input shape, new cuDNN plans) whenever a batch happens to share one image shape, uploads the
batch, and scales boxes back image by image. ``DirectDetector`` starts from uint8 images already on the device
and keeps the work there: one fixed square input, OpenCV's INTER_LINEAR reproduced in integer arithmetic (the
same pixels, not nearly the same), ``LetterBox``'s own geometry and grey, the network as ``AutoBackend`` prepares
it, ``batched_non_max_suppression`` (Ultralytics' NMS over the whole batch at once, not image by image), box
scaling on the device, and a single copy of the final boxes to the host per batch.

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
_NMS_PAIRS_PER_CHUNK = 1 << 24  # pairwise IoU entries computed at once (a few float32 temporaries of this size)
_NMS_ROUNDS = 4  # suppression rounds between two checks that the greedy answer is reached (deeper chains are rare)
# Above this many candidates in one image the pairwise IoU matrix (candidates squared, several float32 temporaries)
# grows past tens of MB: those batches go through torchvision's NMS an image at a time, as Ultralytics does (a low
# ``vision.detector.confidence`` makes thousands of candidates; the default leaves a few dozen).
_NMS_DENSE_MAX = 2048

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


def _float32_at_most(value: float) -> float:
    """The largest float32 <= ``value``. A float32 IoU is above it exactly when it is above ``value`` in double, which
    is how torchvision's CPU kernel compares (float IoU against the double threshold)."""
    import numpy as np

    single = np.float32(value)
    if float(single) > value:
        single = np.nextafter(single, np.float32(-np.inf))
    return float(single)


def _sparse_keep(boxes: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """``_greedy_keep``'s answer through torchvision's NMS kernel, one image at a time (a sync per image, memory
    linear in the candidates): what Ultralytics' own NMS runs, for images with too many candidates for the matrix."""
    from torchvision.ops import nms

    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for image, count in enumerate(counts.tolist()):
        keep[image, nms(boxes[image, :count], scores[image, :count], iou_thres)] = True
    return keep


def _greedy_keep(boxes: torch.Tensor, areas: torch.Tensor, valid: torch.Tensor, iou_limit: float) -> torch.Tensor:
    """Greedy NMS for several images at once: ``boxes`` (C, M, 4) in decreasing score order per image, ``valid`` (C, M)
    the real rows. Returns the kept rows (C, M), exactly what torchvision's ``nms`` keeps for each image alone.

    Pairwise IoUs in torchvision's CPU operations and order, so the float32 values are its values. Greedy NMS keeps row
    j when no kept row before it overlaps it above the limit; that is a fixed point, reached from "every row kept" by
    repeating ``keep = valid & ~(any kept row suppresses it)``: after t rounds the first t rows are final, and in
    practice suppression chains are a few rows deep, so a few rounds (``_NMS_ROUNDS`` between checks, one host sync
    per check) reach it, whatever the number of images.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    width = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    height = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = width.mul_(height)
    del height
    overlap = inter / (areas[:, :, None] + areas[:, None, :] - inter)  # row i (the earlier, higher score) against j
    del inter
    count = boxes.shape[1]
    earlier = torch.ones((count, count), dtype=torch.bool, device=boxes.device).triu_(diagonal=1)
    # fp16 sums of 0/1 cannot round a positive count to 0, and halve the memory; the CPU has no fast fp16 matmul
    weight = torch.float16 if boxes.device.type == "cuda" else torch.float32
    suppresses = ((overlap > iou_limit) & earlier & valid[:, :, None] & valid[:, None, :]).to(weight)
    del overlap
    keep = valid
    while True:
        for _ in range(_NMS_ROUNDS):
            previous = keep
            keep = valid & ~(torch.bmm(keep.unsqueeze(1).to(weight), suppresses).squeeze(1) > 0)
        if torch.equal(keep, previous):  # one host sync per check
            return keep


def batched_non_max_suppression(
    prediction: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor],
    conf_thres: float,
    iou_thres: float,
    max_det: int = 300,
    agnostic: bool = False,
    max_nms: int = 30000,
    max_wh: int = 7680,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ultralytics' ``non_max_suppression`` for a detect head's ``(B, 4 + classes, anchors)`` output, one class per box
    (``multi_label`` off) and no class filter, as ``YOLO.predict`` calls it, over the whole batch at once.

    Returns ``rows`` (B, K, 6) float32 ``[x1, y1, x2, y2, confidence, class]`` and ``counts`` (B,) on the device: image
    b's detections are ``rows[b, :counts[b]]``, in Ultralytics' order (decreasing confidence), K <= ``max_det``.

    Ultralytics loops over the images, with host syncs in each. Here the confidence filter, the ``max_nms`` cut, the
    per-class offset (``class * max_wh``, so classes never suppress each other unless ``agnostic``), the greedy
    suppression and ``max_det`` run on all images together: one sync to size the candidates, one per convergence check
    of ``_greedy_keep`` (usually one per chunk of images), none per image. The same semantics: boxes converted to
    corners in the prediction's dtype and then float32 (where Ultralytics' ``torch.cat`` promotes them), the same
    offsets, IoUs and threshold comparison, ties broken by anchor order as torchvision's stable sort does. What is
    left out: Ultralytics' wall-clock limit (it stops processing the remaining images after 2 s + 50 ms per image);
    and on exactly equal confidences at the ``max_nms`` cut the kept anchors may differ (its argsort is not stable).
    """
    from ultralytics.utils.ops import xywh2xyxy

    if isinstance(prediction, (list, tuple)):  # eval mode: (inference output, raw head outputs)
        prediction = prediction[0]
    batch, _channels, anchors = prediction.shape
    device = prediction.device
    scores, classes = prediction[:, 4:].max(dim=1)  # (B, anchors), first class on ties, as Ultralytics' cls.max(1)
    candidate = scores > conf_thres  # in the prediction's dtype, as Ultralytics compares
    if anchors > max_nms:  # static: the anchors come from the input size (30000 is an input of ~1216 px)
        ranked = scores.masked_fill(~candidate, float("-inf")).topk(max_nms, dim=1).indices
        candidate &= torch.zeros_like(candidate).scatter_(1, ranked, True)
    counts = candidate.sum(dim=1)
    most = int(counts.max()) if batch else 0  # host sync: the candidates' padded length
    kept_max = min(most, max_det)
    if kept_max == 0:
        return torch.zeros((batch, 0, 6), dtype=torch.float32, device=device), torch.zeros_like(counts)
    order = scores.masked_fill(~candidate, float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :most]
    valid = torch.arange(most, device=device) < counts[:, None]  # (B, M): real candidates, best first
    corners = xywh2xyxy(prediction[:, :4].gather(2, order[:, None, :].expand(-1, 4, -1)).transpose(1, 2)).float()
    confidence = scores.gather(1, order).float()
    label = classes.gather(1, order).float()
    shifted = corners + (label * (0 if agnostic else max_wh))[..., None]  # Ultralytics' boxes + c, in float32
    areas = (shifted[..., 2] - shifted[..., 0]) * (shifted[..., 3] - shifted[..., 1])
    if most > _NMS_DENSE_MAX:
        keep = _sparse_keep(shifted, confidence, counts, iou_thres)
    else:
        iou_limit = _float32_at_most(iou_thres)
        per_chunk = max(1, _NMS_PAIRS_PER_CHUNK // (most * most))
        keep = torch.cat([
            _greedy_keep(shifted[start : start + per_chunk], areas[start : start + per_chunk],
                         valid[start : start + per_chunk], iou_limit)
            for start in range(0, batch, per_chunk)
        ])
    rank = keep.cumsum(dim=1)
    keep &= rank <= max_det
    # Kept rows to the front of each image's row block (slot kept_max collects the others and is dropped): no sync.
    slot = torch.where(keep, rank - 1, torch.full_like(rank, kept_max))
    rows = torch.cat((corners, confidence[..., None], label[..., None]), dim=2)
    packed = torch.zeros((batch, kept_max + 1, 6), dtype=torch.float32, device=device)
    packed.scatter_(1, slot[..., None].expand(-1, -1, 6), rows)
    return packed[:, :kept_max], keep.sum(dim=1)


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

        ensure_torchvision()  # Ultralytics imports torchvision; a CPU host may need its operators substituted
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
    def boxes(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The device half: ``(rows, counts)`` on the device, rows (B, K, 6) ``[x1, y1, x2, y2, confidence, class]``
        float32 in each image's own pixels, image b's detections ``rows[b, :counts[b]]``.

        Letterbox, network, ``batched_non_max_suppression`` with predict's arguments for a detect model (its ``iou``,
        ``max_det``, class-aware, every class), and ``scale_boxes`` for the whole batch at once: remove the padding,
        divide by each side's gain, clip to the image. No step loops over the images with a host sync.
        """
        if not images:
            return torch.zeros((0, 0, 6), device=self.device), torch.zeros((0,), dtype=torch.int64, device=self.device)
        batch, geometry = self.letterbox(images)
        rows, counts = batched_non_max_suppression(self.model(batch), self.confidence, self.iou, max_det=self.max_det)
        pad, gain, size = geometry[:, None, 0:2].repeat(1, 1, 2), geometry[:, None, 2:4].repeat(1, 1, 2), geometry[:, None, 4:6]
        corners = ((rows[..., :4] - pad) / gain).clamp_(min=0)
        corners = torch.minimum(corners, size.repeat(1, 1, 2))
        return torch.cat((corners, rows[..., 4:6]), dim=2), counts

    def records(self, rows: torch.Tensor, counts: torch.Tensor) -> list[list[dict[str, Any]]]:
        """The host half: the ``detections`` records ``VisionStage`` writes, from ``boxes()``' output in one copy."""
        images, slots = int(rows.shape[0]), int(rows.shape[1])
        host = torch.cat((counts.to(torch.float32), rows.reshape(-1))).cpu()  # one transfer (counts exact below 2**24)
        found = host[images:].view(images, slots, 6).tolist()
        detections: list[list[dict[str, Any]]] = []
        for image_rows, count in zip(found, host[:images].to(torch.int64).tolist()):
            detections.append(
                [
                    {"label": self.names[int(cls)], "confidence": float(conf), "box": [float(v) for v in box]}
                    for *box, conf, cls in image_rows[:count]
                ]
            )
        return detections

    def detect(self, images: list[torch.Tensor]) -> list[list[dict[str, Any]]]:
        """Detections per image, boxes ``[x1, y1, x2, y2]`` in that image's pixels; one host copy for the batch."""
        return self.records(*self.boxes(images))
