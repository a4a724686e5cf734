"""PP-OCRv4 (detection, angle classification, recognition) batched across images, on torch or onnxruntime.

The three networks are the ONNX files inside the ``rapidocr_onnxruntime`` wheel: run by onnxruntime
(``PpOcrOnnxRuntime``, RapidOCR's own sessions) or converted to torch modules with ``onnx2torch`` at load
(``PpOcrTorch``; nothing is fetched). Pre- and post-processing follow RapidOCR 1.4.4 step by step (resize rules,
normalisation, DB post-processing, box order, crops, 180-degree rule, CTC decoding) in one shared pipeline
(``PpOcrPipeline``), so both runtimes read the same lines. What differs from RapidOCR is the batching:

- detection: each image is resized by RapidOCR's rule; torch pads it (bottom/right) into a fixed size bucket and
  runs one forward pass per bucket, with the padding masked (``PaddingMask``) so that each image gets the answer
  it would get alone; onnxruntime runs one call per distinct size;
- classification and recognition: the text-line crops of all images go through together, sorted by width and
  padded to width buckets chosen per crop (never by the other crops of the batch), with CTC greedy decoding
  vectorised over the batch. A result therefore never depends on which other images share the batch;
- bounded shapes (torch on CUDA, ``pad_counts``): the number of images in a detection pass and of crops in a
  cls/rec pass is padded up ``COUNT_LADDER`` with blank inputs whose outputs are dropped, so every network sees a
  small fixed set of input shapes however the batches are composed, and cuDNN plans each shape once.

A batch runs in two phases (``prepare`` on the host, any thread; ``forward`` with the networks, the device's
thread), so that the OCR stage can overlap the host work of one batch with the device work of another.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.devices import parse_device

# Bucket ladders. Detection: per side, after RapidOCR's resize (shorter side to 736, multiples of 32); beyond the
# ladder a side rounds up to a multiple of 512. Recognition: crop width at height 48 (at least 320, RapidOCR's
# minimum); beyond it a multiple of REC_WIDTH_STEP (padding changes PP-OCRv4 rec's answers, so the steps are small).
DET_SIDE_BUCKETS: tuple[int, ...] = (736, 1024, 1344, 1664, 2048)
REC_WIDTH_BUCKETS: tuple[int, ...] = (320,)
REC_WIDTH_STEP = 64
# Images per detection pass (per bucket) and crops per cls/rec pass, padded up: the ladder, then multiples of
# COUNT_STEP. At most N per pass gives |{1, 2, 4, 8, 16, 32, 48, ..., N}| counts (8 up to 64 images, 12 up to the
# 128 crops of a CUDA rec pass), so a network sees at most that many shapes per bucket. Powers of two to 16 waste
# at most half a small pass; steps of 16 beyond it waste at most 15 blanks instead of doubling a large one.
COUNT_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16)
COUNT_STEP = 16
PRECISIONS = ("auto", "fp16", "fp32")
CPU_CROP_BATCH, CUDA_CROP_BATCH = 6, 128
HOST_THREADS = min(8, max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))

_DET_LIMIT_SIDE = 736
_MAX_SIDE, _MIN_SIDE, _MIN_HEIGHT, _WIDTH_HEIGHT_RATIO = 2000, 30, 30, 8
_CLS_SHAPE = (3, 48, 192)
_CLS_THRESH = 0.9
_REC_HEIGHT, _REC_MIN_WIDTH = 48, 320


@dataclass(frozen=True)
class OcrPrecision:
    """Per-network precision on CUDA (``auto``: det fp32, cls and rec fp16); on CPU every network runs fp32.
    fp16 means autocast (mixed precision) with fp32 weights, see ``PpOcrTorch._precision``."""

    det: str = "auto"
    cls: str = "auto"
    rec: str = "auto"

    def resolve(self, device: str) -> dict[str, Any]:
        import torch

        defaults = {"det": "fp32", "cls": "fp16", "rec": "fp16"}
        out: dict[str, Any] = {}
        for net in ("det", "cls", "rec"):
            value = getattr(self, net)
            if value not in PRECISIONS:
                raise ValueError(f"ocr.precision.{net} must be one of {', '.join(PRECISIONS)} (got {value!r})")
            if not parse_device(device).is_cuda:
                value = "fp32"  # fp16 convolutions on CPU are slow or missing
            elif value == "auto":
                value = defaults[net]
            out[net] = torch.float16 if value == "fp16" else torch.float32
        return out


def model_dir() -> Path:
    """The folder of the PP-OCR ONNX files shipped in the rapidocr_onnxruntime wheel."""
    try:
        import rapidocr_onnxruntime
    except ImportError as error:
        raise RuntimeError(
            "ocr.runtime 'torch' loads the PP-OCRv4 models from the package rapidocr_onnxruntime: "
            "pip install 'rapidocr_onnxruntime==1.4.4'"
        ) from error
    return Path(rapidocr_onnxruntime.__file__).resolve().parent / "models"


MODEL_FILES = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}


def _install_batchnorm_converter() -> None:
    """onnx2torch's BatchNormalization converter needs the input rank, which the rec model's 3-D BN inputs lack
    ("spatial rank == -2"); ``F.batch_norm`` takes any ``(N, C, ...)`` input, so one module serves every rank."""
    import torch
    import torch.nn.functional as F
    from onnx2torch.node_converters import registry
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    class AnyRankBatchNorm(torch.nn.Module):
        def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                     eps: float) -> None:
            super().__init__()
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.register_buffer("running_mean", mean)
            self.register_buffer("running_var", var)
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def convert(node: Any, graph: Any) -> Any:
        names = node.input_values
        if len(node.output_values) != 1 or not all(name in graph.initializers for name in names[1:]):
            raise NotImplementedError("BatchNormalization with computed statistics is not supported")
        weight, bias, mean, var = (graph.initializers[name].to_torch() for name in names[1:5])
        module = AnyRankBatchNorm(weight, bias, mean, var, float(node.attributes.get("epsilon", 1e-5)))
        return OperationConverterResult(torch_module=module, onnx_mapping=OnnxMapping(inputs=(names[0],),
                                                                                     outputs=node.output_values))

    for version in (9, 14, 15):
        registry._CONVERTER_REGISTRY[registry.OperationDescription("", "BatchNormalization", version)] = convert


def _constants_to_initializers(model: Any) -> Any:
    """Paddle2ONNX writes weights-like values as ``Constant`` nodes; onnx2torch folds only initializers."""
    import onnx

    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def convert_model(path: Path) -> Any:
    """One PP-OCR ONNX file -> an eval-mode torch module (an ``fx.GraphModule``) with the same weights."""
    from stages.torch_compat import ensure_torchvision

    ensure_torchvision()  # onnx2torch imports torchvision (its NMS converter)
    import onnx
    from onnx2torch import convert

    # onnx2torch's Slice indexes with a list (deprecated by torch, still correct); say it once, not per forward.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")

    _install_batchnorm_converter()
    return convert(_constants_to_initializers(onnx.load(str(path)))).eval()


def character_list(path: Path) -> list[str]:
    """The recognition alphabet from the rec model's metadata, with CTC blank first and space last (RapidOCR)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if "character" not in meta:
        raise RuntimeError(f"{path} has no 'character' metadata: not a RapidOCR PP-OCR recognition model")
    return ["blank", *meta["character"].splitlines(), " "]


def bucket(size: int, ladder: Sequence[int], step: int) -> int:
    """Smallest ladder entry >= ``size``; past the ladder, ``size`` rounded up to a multiple of ``step``."""
    for value in ladder:
        if size <= value:
            return value
    return int(math.ceil(size / step) * step)


def padded_count(count: int, cap: int | None = None) -> int:
    """``count`` inputs of one pass rounded up ``COUNT_LADDER``; a pass limited to ``cap`` inputs (the crop batch)
    pads to ``cap`` at most, so that padding never makes a pass larger than the runtime's own limit."""
    padded = bucket(count, COUNT_LADDER, COUNT_STEP)
    return min(padded, cap) if cap is not None and count <= cap else padded


def count_shapes(limit: int, cap: int | None = None) -> list[int]:
    """Every padded count of a pass of 1 to ``limit`` inputs: the bound on a network's shapes per input size."""
    return sorted({padded_count(count, cap) for count in range(1, limit + 1)})


def stack_padded(inputs: Sequence[np.ndarray], count: int) -> np.ndarray:
    """``inputs`` stacked into a batch of ``count`` (>= their number); the rest are zeros, blank inputs."""
    batch = np.zeros((count, *inputs[0].shape), dtype=inputs[0].dtype)
    batch[: len(inputs)] = inputs
    return batch


# --- RapidOCR's geometry, kept step for step -------------------------------------------------------------------


def _resize_to_32(img: np.ndarray, ratio: float) -> tuple[np.ndarray, float, float]:
    h, w = img.shape[:2]
    resize_h = int(round(int(h * ratio) / 32) * 32)
    resize_w = int(round(int(w * ratio) / 32) * 32)
    if resize_w <= 0 or resize_h <= 0:
        raise ValueError(f"image of {w}x{h} pixels is too small for OCR")
    return cv2.resize(img, (resize_w, resize_h)), h / resize_h, w / resize_w


def prepare_image(img: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """RapidOCR.preprocess + maybe_add_letterbox: size limits and a letterbox for very flat images."""
    record = {"ratio_h": 1.0, "ratio_w": 1.0, "top": 0.0}
    h, w = img.shape[:2]
    if max(h, w) > _MAX_SIDE:
        img, record["ratio_h"], record["ratio_w"] = _resize_to_32(img, _MAX_SIDE / max(h, w))
    h, w = img.shape[:2]
    if min(h, w) < _MIN_SIDE:
        img, record["ratio_h"], record["ratio_w"] = _resize_to_32(img, _MIN_SIDE / min(h, w))
    h, w = img.shape[:2]
    if h <= _MIN_HEIGHT or w / h > _WIDTH_HEIGHT_RATIO:
        new_h = max(int(w / _WIDTH_HEIGHT_RATIO), _MIN_HEIGHT) * 2
        pad = int(abs(new_h - h) / 2)
        img = cv2.copyMakeBorder(img, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        record["top"] = float(pad)
    return img, record


def det_resize(img: np.ndarray) -> np.ndarray | None:
    """DetPreProcess.resize with limit_type 'min', limit_side_len 736."""
    h, w = img.shape[:2]
    ratio = float(_DET_LIMIT_SIDE) / min(h, w) if min(h, w) < _DET_LIMIT_SIDE else 1.0
    resize_h = int(round(int(h * ratio) / 32) * 32)
    resize_w = int(round(int(w * ratio) / 32) * 32)
    if resize_w <= 0 or resize_h <= 0:
        return None
    return cv2.resize(img, (resize_w, resize_h))


def _order_points_clockwise(pts: np.ndarray) -> np.ndarray:
    x_sorted = pts[np.argsort(pts[:, 0]), :]
    left, right = x_sorted[:2, :], x_sorted[2:, :]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype="float32")


def filter_boxes(boxes: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    """TextDetector.filter_tag_det_res: clockwise corners, clipped to the image, tiny boxes dropped."""
    kept = []
    for box in boxes:
        box = _order_points_clockwise(box)
        box[:, 0] = np.clip(box[:, 0], 0, width - 1).astype(np.int64)
        box[:, 1] = np.clip(box[:, 1], 0, height - 1).astype(np.int64)
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        kept.append(box)
    return kept


def sort_boxes(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """RapidOCR.sorted_boxes: top to bottom, then left to right within 10 px rows."""
    ordered = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(ordered) - 1):
        for j in range(i, -1, -1):
            if abs(ordered[j + 1][0][1] - ordered[j][0][1]) < 10 and ordered[j + 1][0][0] < ordered[j][0][0]:
                ordered[j], ordered[j + 1] = ordered[j + 1], ordered[j]
            else:
                break
    return ordered


def crop_line(img: np.ndarray, points: np.ndarray) -> np.ndarray:
    """RapidOCR.get_crop_img_list for one box: perspective crop, tall crops turned upright."""
    width = int(max(np.linalg.norm(points[0] - points[1]), np.linalg.norm(points[2] - points[3])))
    height = int(max(np.linalg.norm(points[0] - points[3]), np.linalg.norm(points[1] - points[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(points.astype(np.float32), target)
    crop = cv2.warpPerspective(img, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    if crop.shape[0] * 1.0 / crop.shape[1] >= 1.5:
        crop = np.rot90(crop)
    return crop


def origin_points(boxes: list[np.ndarray], record: dict[str, float], raw_h: int, raw_w: int) -> np.ndarray:
    """RapidOCR._get_origin_points: undo the letterbox and the size-limit resize, clip to the input image."""
    arr = np.array(boxes).astype(np.float32)
    arr[:, :, 1] -= record["top"]
    arr[:, :, 0] *= record["ratio_w"]
    arr[:, :, 1] *= record["ratio_h"]
    arr = np.where(arr < 0, 0, arr)
    arr[..., 0] = np.where(arr[..., 0] > raw_w, raw_w, arr[..., 0])
    arr[..., 1] = np.where(arr[..., 1] > raw_h, raw_h, arr[..., 1])
    return arr


def cls_input(crop: np.ndarray) -> np.ndarray:
    """TextClassifier.resize_norm_img: height 48, width up to 192, right-padded with zeros."""
    c, h_out, w_out = _CLS_SHAPE
    h, w = crop.shape[:2]
    resized_w = min(w_out, int(math.ceil(h_out * (w / float(h)))))
    resized = cv2.resize(crop, (resized_w, h_out)).astype("float32").transpose((2, 0, 1)) / 255
    out = np.zeros((c, h_out, w_out), dtype=np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def rec_target_width(crop: np.ndarray) -> int:
    """The width RapidOCR would give this crop alone: 48 x max(320/48, w/h)."""
    h, w = crop.shape[:2]
    return int(_REC_HEIGHT * max(_REC_MIN_WIDTH / _REC_HEIGHT, w * 1.0 / h))


def rec_input(crop: np.ndarray, canvas_width: int) -> np.ndarray:
    """TextRecognizer.resize_norm_img for a canvas of ``canvas_width``: height 48, right-padded with zeros."""
    h, w = crop.shape[:2]
    own_width = rec_target_width(crop)
    resized_w = min(own_width, int(math.ceil(_REC_HEIGHT * (w / float(h)))))
    resized = cv2.resize(crop, (resized_w, _REC_HEIGHT)).astype("float32").transpose((2, 0, 1)) / 255
    out = np.zeros((3, _REC_HEIGHT, canvas_width), dtype=np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def ctc_greedy_decode(indices: np.ndarray, probs: np.ndarray, characters: list[str]) -> list[tuple[str, float]]:
    """CTC greedy decoding for a whole batch: drop repeats and blanks with array masks, then join characters."""
    keep = indices != 0
    keep[:, 1:] &= indices[:, 1:] != indices[:, :-1]
    counts = keep.sum(axis=1)
    scores = np.where(counts > 0, (probs * keep).sum(axis=1, dtype=np.float64) / np.maximum(counts, 1), 0.0)
    table = np.asarray(characters, dtype=object)
    return [("".join(table[row[mask]]), float(score)) for row, mask, score in zip(indices, keep, scores)]


class PaddingMask:
    """Makes a convolutional network see a padded canvas as if each image had its own size.

    Batching images of different sizes needs padding, and padding would change PP-OCR's answers twice: the
    squeeze-and-excitation blocks average over the whole feature map, and convolutions near the right and bottom
    edges would read the padded values instead of their own zero padding. With every k x k convolution's input
    zeroed outside each image's valid region and global average pooling taken over that region only, each image
    gets the values it would get alone (sizes are multiples of 32, so the region scales exactly at every stride).
    """

    def __init__(self) -> None:
        self.canvas: tuple[int, int] | None = None
        self.valid: Any = None  # (B, 2) int tensor: height and width of each image on the canvas
        self._cache: dict[tuple[int, int, Any], Any] = {}

    def set(self, canvas: tuple[int, int] | None, valid: Any) -> None:
        self.canvas, self.valid, self._cache = canvas, valid, {}

    def mask(self, x: Any) -> Any:
        """(B, 1, H, W) mask of the valid region at ``x``'s resolution, or None when nothing is padded."""
        import torch

        if self.canvas is None or self.valid is None:
            return None
        height, width = x.shape[-2:]
        key = (height, width, x.dtype)
        if key not in self._cache:
            stride_h, stride_w = self.canvas[0] / height, self.canvas[1] / width
            rows = torch.arange(height, device=x.device)[None, :] < torch.ceil(self.valid[:, :1] / stride_h)
            cols = torch.arange(width, device=x.device)[None, :] < torch.ceil(self.valid[:, 1:] / stride_w)
            self._cache[key] = (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)
        return self._cache[key]


def apply_padding_mask(model: Any, padding: PaddingMask) -> Any:
    """Wrap the k x k convolutions and global average pools of an onnx2torch module with ``padding``'s mask."""
    import torch

    class MaskedInput(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = padding.mask(x)
            return self.inner(x if mask is None else x * mask)

    class MaskedGlobalAveragePool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = padding.mask(x)
            if mask is None:
                return x.mean(dim=(2, 3), keepdim=True)
            # fp32: a sum over a large fp16 feature map would overflow fp16's range.
            total = (x.float() * mask.float()).sum(dim=(2, 3), keepdim=True)
            return (total / mask.float().sum(dim=(2, 3), keepdim=True)).to(x.dtype)

    for name, module in list(model.named_children()):
        kind = type(module).__name__
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
            model._modules[name] = MaskedInput(module)
        elif kind.startswith("OnnxGlobalAveragePool"):
            model._modules[name] = MaskedGlobalAveragePool()
        elif isinstance(module, torch.nn.ConvTranspose2d) and module.kernel_size != module.stride:
            model._modules[name] = MaskedInput(module)  # overlapping windows would mix in padded values
    return model


@dataclass
class _Page:
    """One image on its way through the batch."""

    raw_h: int
    raw_w: int
    img: np.ndarray  # after the size limits and letterbox (the coordinates of detection and the crops)
    record: dict[str, float]
    boxes: list[np.ndarray]


@dataclass
class DetGroup:
    """One detection pass: ``members`` (indices into the resized images) on ``canvas``; the slots past them are
    blank padding. ``sizes`` is each slot's valid (height, width)."""

    members: list[int]
    canvas: Any  # torch: (slots, H, W, 3) uint8 tensor, pinned on CUDA; onnxruntime: (n, 3, h, w) float32 array
    sizes: np.ndarray


@dataclass
class DetBatch:
    """The detection inputs of a batch, built on the host: one ``DetGroup`` per forward pass."""

    count: int  # resized images (the length of what ``det_maps`` returns)
    groups: list[DetGroup]


@dataclass
class PreparedPages:
    """A batch after the host phase: the pages and their detection inputs, ready for ``PpOcrPipeline.forward``."""

    pages: list[_Page]
    present: list[int]  # the pages with a detection input: ``det``'s image i is page ``present[i]``
    det: DetBatch | None

    @property
    def count(self) -> int:
        return len(self.pages)


class PpOcrPipeline:
    """RapidOCR's PP-OCRv4 pipeline batched across images; subclasses run the three networks.

    ``det_maps`` gets the resized images of a batch and returns each one's probability map; ``cls_probs`` and
    ``rec_probs`` get normalised crop batches. Everything else (geometry, grouping, decoding) is shared, so the
    onnxruntime and torch runtimes see the same inputs and give the same lines.
    """

    def __init__(self, rec_batch: int | None = None, cls_batch: int | None = None,
                 rec_buckets: Sequence[int] = REC_WIDTH_BUCKETS,
                 rec_step: int = REC_WIDTH_STEP) -> None:
        # Crops per cls/rec call; None: by device (``set_device``). Results do not depend on it (each crop's canvas
        # width is its own bucket), only speed does: a CPU is fastest on small calls (RapidOCR's 6; 128 crops
        # took a third longer on one core), a GPU wants large ones.
        self.rec_batch = rec_batch or CPU_CROP_BATCH
        self.cls_batch = cls_batch or CPU_CROP_BATCH
        self._fixed_batches = (rec_batch, cls_batch)
        self.host_threads = 1
        self._pool: Any = None
        self._pool_lock = threading.Lock()  # prepare (any thread) and forward (the device's) share the pool
        # Pad the inputs per cls/rec pass (and per detection pass, torch) up the ladder: bounded shapes.
        self.pad_counts = False
        self.rec_buckets = tuple(rec_buckets)
        self.rec_step = rec_step
        self.characters: list[str] = []
        from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

        self._postprocess = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                                          score_mode="fast", use_dilation=True)

    def set_device(self, device: str) -> None:
        """Crop batch sizes for ``device`` where the constructor left them open, and host threads: on a GPU the
        per-image work on the host (resizes, DB post-processing, crops; OpenCV releases the GIL) is what the
        device waits for, so it runs on a few threads; on a CPU the networks already use every core."""
        default = CPU_CROP_BATCH if device == "cpu" else CUDA_CROP_BATCH
        self.rec_batch = self._fixed_batches[0] or default
        self.cls_batch = self._fixed_batches[1] or default
        self.host_threads = 1 if device == "cpu" else HOST_THREADS

    def shutdown(self) -> None:
        """Stop the host threads (if any were started)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _map(self, function: Callable[[Any], Any], items: Any) -> list[Any]:
        """``[function(item) for item in items]``, in order, on ``host_threads`` threads."""
        items = list(items)
        if self.host_threads <= 1 or len(items) < 2:
            return [function(item) for item in items]
        with self._pool_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.host_threads, thread_name_prefix="ocr-host")
            pool = self._pool
        return list(pool.map(function, items))

    def _padded(self, inputs: Sequence[np.ndarray], cap: int) -> np.ndarray:
        """A cls/rec batch of ``inputs``, padded up the ladder (at most to ``cap``) when ``pad_counts`` is on."""
        return stack_padded(inputs, padded_count(len(inputs), cap) if self.pad_counts else len(inputs))

    # --- the networks (subclasses) ----------------------------------------------------------------------------

    def det_batch(self, resized: list[np.ndarray]) -> DetBatch:
        """Host half of detection: the inputs of every detection pass (any thread; touches no runtime state)."""
        raise NotImplementedError

    def det_maps(self, batch: DetBatch) -> list[np.ndarray]:
        """Device half of detection: each resized image's probability map, in ``det_batch``'s input order."""
        raise NotImplementedError

    def cls_probs(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rec_probs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best probability and its index per time step, ``(N, T)`` each."""
        raise NotImplementedError

    # --- the three steps --------------------------------------------------------------------------------------

    def detect(self, prepared: PreparedPages) -> list[list[np.ndarray]]:
        """Text boxes per page (in each page's pixels, RapidOCR order)."""
        images = [page.img for page in prepared.pages]
        maps = dict(zip(prepared.present, self.det_maps(prepared.det))) if prepared.det is not None else {}

        def boxes_of(index: int) -> list[np.ndarray]:
            if index not in maps:
                return []
            img = images[index]
            boxes, _scores = self._postprocess(maps[index][None, None], img.shape[:2])
            return sort_boxes(filter_boxes(boxes, img.shape[0], img.shape[1]))

        return self._map(boxes_of, range(len(images)))

    def classify(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Angle classification: crops read upside down (label 180, score > 0.9) are turned."""
        if not crops:
            return crops
        order = np.argsort(np.array([c.shape[1] / float(c.shape[0]) for c in crops]), kind="stable")
        out = list(crops)
        for start in range(0, len(order), self.cls_batch):
            chunk = order[start : start + self.cls_batch]
            probs = self.cls_probs(self._padded(self._map(cls_input, [crops[i] for i in chunk]), self.cls_batch))
            probs = probs[: len(chunk)]  # the padding's rows are dropped
            labels = probs.argmax(axis=1)
            for i, label, row in zip(chunk, labels, probs):
                if label == 1 and row[label] > _CLS_THRESH:
                    out[i] = cv2.rotate(crops[i], cv2.ROTATE_180)
        return out

    def read(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """Recognition: crops sorted by width and grouped by width bucket, CTC decoding per forward."""
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        widths = [rec_target_width(c) for c in crops]
        groups: dict[int, list[int]] = defaultdict(list)
        for i in np.argsort(np.array(widths), kind="stable"):
            groups[bucket(widths[i], self.rec_buckets, self.rec_step)].append(int(i))
        for canvas_width, members in sorted(groups.items()):
            for start in range(0, len(members), self.rec_batch):
                chunk = members[start : start + self.rec_batch]
                inputs = self._map(lambda crop, width=canvas_width: rec_input(crop, width), [crops[i] for i in chunk])
                best, indices = self.rec_probs(self._padded(inputs, self.rec_batch))
                best, indices = best[: len(chunk)], indices[: len(chunk)]  # the padding's rows are dropped
                for i, decoded in zip(chunk, ctc_greedy_decode(indices, best, self.characters)):
                    results[i] = decoded
        return results

    def prepare(self, images: list[np.ndarray]) -> PreparedPages:
        """Host phase of a batch of BGR images: size limits, letterbox, detection resize and the detection inputs.

        Safe on any thread while ``forward`` runs another batch: it reads only what ``load`` set."""
        pages = self._map(lambda img: _Page(img.shape[0], img.shape[1], *prepare_image(img), []), images)
        resized = self._map(det_resize, [page.img for page in pages])
        present = [index for index, det_img in enumerate(resized) if det_img is not None]
        det = self.det_batch([resized[index] for index in present]) if present else None
        return PreparedPages(pages, present, det)

    def forward(self, prepared: PreparedPages) -> list[list[tuple[list[list[float]], str, float]]]:
        """Device phase: detection, the DB post-processing and crops it feeds (host threads), classification,
        recognition; ``(box, text, score)`` lines per image, in RapidOCR's order and the input's coordinates."""
        pages = prepared.pages
        for page, boxes in zip(pages, self.detect(prepared)):
            page.boxes = boxes
        crops = self._map(lambda job: crop_line(job[0], job[1].copy()), [(page.img, box) for page in pages
                                                                              for box in page.boxes])
        texts = self.read(self.classify(crops))
        found: list[list[tuple[list[list[float]], str, float]]] = [[] for _ in pages]
        position = 0
        for number, page in enumerate(pages):
            count = len(page.boxes)
            if count:
                boxes = origin_points(page.boxes, page.record, page.raw_h, page.raw_w)
                for box, (text, score) in zip(boxes, texts[position : position + count]):
                    found[number].append((box.tolist(), text, score))
            position += count
        return found

    def recognize(self, images: list[np.ndarray]) -> list[list[tuple[list[list[float]], str, float]]]:
        """``(box, text, score)`` lines per BGR image: both phases on the calling thread."""
        return self.forward(self.prepare(images))


class PpOcrOnnxRuntime(PpOcrPipeline):
    """The networks on onnxruntime sessions (RapidOCR's, possibly moved to CUDA). Detection runs one call per
    distinct input size: onnxruntime takes dynamic shapes, and on a CPU padding would only add work."""

    def __init__(self, det_session: Any, cls_session: Any, rec_session: Any, characters: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.det_session, self.cls_session, self.rec_session = det_session, cls_session, rec_session
        self.characters = characters

    @staticmethod
    def _run(session: Any, batch: np.ndarray) -> np.ndarray:
        return session.run(None, {session.get_inputs()[0].name: batch})[0]

    def det_batch(self, resized: list[np.ndarray]) -> DetBatch:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, img in enumerate(resized):
            groups[img.shape].append(index)
        out = []
        for shape, members in groups.items():
            batch = np.stack([((resized[i].astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1) for i in members])
            out.append(DetGroup(members, batch, np.array([shape[:2]] * len(members), dtype=np.int64)))
        return DetBatch(len(resized), out)

    def det_maps(self, batch: DetBatch) -> list[np.ndarray]:
        maps: list[np.ndarray] = [np.empty(0)] * batch.count
        for group in batch.groups:
            prob = self._run(self.det_session, group.canvas)[:, 0]
            for slot, index in enumerate(group.members):
                maps[index] = prob[slot]
        return maps

    def cls_probs(self, batch: np.ndarray) -> np.ndarray:
        return self._run(self.cls_session, batch)

    def rec_probs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = self._run(self.rec_session, batch)
        return probs.max(axis=2), probs.argmax(axis=2)


class PpOcrTorch(PpOcrPipeline):
    """The networks as torch modules converted from the same ONNX files; one instance per device.

    Detection pads the images of a batch into fixed size buckets and runs one forward pass per bucket, with
    ``PaddingMask`` keeping every image's answer what it would be alone. With ``pad_counts`` (default: on CUDA,
    off on the CPU, where no per-shape planning exists and blank inputs would only cost time) the images of a
    bucket's pass and the crops of a cls/rec pass are padded up ``COUNT_LADDER`` with blank inputs, so that each
    network sees a bounded set of shapes: per detection bucket at most ``len(count_shapes(images))`` counts for
    batches of up to ``images`` images (8 up to 64), per rec width bucket (cls has one input size) at most
    ``len(count_shapes(n, n))`` for crop passes of ``n`` (12 for CUDA's 128). The buckets themselves are fixed
    grids (``DET_SIDE_BUCKETS``, ``REC_WIDTH_BUCKETS`` and their steps), never set by a batch's composition.

    cuDNN. It is left as the process has it: torch's default, on, with ``benchmark`` off. It used to be switched
    off for the whole process because it planned every new shape (23-30x slower OCR on an H100 with changing batch
    composition), which slowed YOLO and CLIP in the same process; bounded shapes are the cure, each one planned
    once. Benchmark off: the heuristics pick one algorithm per (convolution, shape) quickly, where benchmark mode
    would time every algorithm of every convolution for each of the bounded shapes (a longer cold start) to gain
    little on these small, launch-bound convolutions. No OCR-scoped setting either: torch's cuDNN switches
    (``torch.backends.cudnn.flags(...)`` included) are process globals, not per thread, so a "scoped" setting
    would still change the models of other threads while OCR runs, and two replicas restoring it interleaved
    could leave it wrong. ``binner bench -s gpu`` measures it (``ocr_cudnn``, docs/benchmarks.md "GPU"): cuDNN off
    against on, cold (the first pass of each shape) and warm, the batches recomposed every round, lines compared;
    its verdict says whether on is the faster. Benchmark mode is not measured there.
    """

    def __init__(self, precision: OcrPrecision | None = None, det_buckets: Sequence[int] = DET_SIDE_BUCKETS,
                 pad_counts: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.precision = precision or OcrPrecision()
        self.det_buckets = tuple(det_buckets)
        self._pad_choice = pad_counts  # None: by device, in ``load``
        self.device: str | None = None
        self.det: Any = None
        self.cls: Any = None
        self.rec: Any = None
        self.dtypes: dict[str, Any] = {}
        self.padding = PaddingMask()  # set and cleared by detection passes: state of the device phase only

    def load(self, device: str) -> None:
        import torch

        if parse_device(device).is_cuda and not torch.cuda.is_available():
            raise RuntimeError(
                f"OCR device {device}: this torch build has no CUDA ({torch.__version__}); install the CUDA build "
                "(make env GPU=1, or deploy/install.sh on the GPU host) or set ocr.devices to cpu"
            )
        folder = model_dir()
        self.dtypes = self.precision.resolve(device)
        nets = {}
        for net, name in MODEL_FILES.items():
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"PP-OCR model {path} is missing: reinstall rapidocr_onnxruntime==1.4.4")
            nets[net] = convert_model(path).to(device=device)  # fp32 weights; fp16 runs under autocast
        self.det = apply_padding_mask(nets["det"], self.padding)
        self.cls, self.rec = nets["cls"], nets["rec"]
        self.characters = character_list(folder / MODEL_FILES["rec"])
        self.set_device(device)
        self.pad_counts = parse_device(device).is_cuda if self._pad_choice is None else self._pad_choice
        self.device = device

    def close(self) -> None:
        self.shutdown()
        self.det = self.cls = self.rec = None
        if self.device is not None and parse_device(self.device).is_cuda:
            import torch

            torch.cuda.empty_cache()

    def _precision(self, net: str) -> Any:
        """fp16 as autocast (mixed precision): convolutions and matrix products in fp16, while the reductions,
        powers and softmax of rec's attention and layer norms stay fp32, so nothing overflows fp16's range."""
        import torch

        half = self.dtypes[net] == torch.float16
        return torch.autocast(device_type="cuda", dtype=torch.float16, enabled=half and self._on_cuda())

    def _on_cuda(self) -> bool:
        return bool(self.device is not None and parse_device(self.device).is_cuda)

    def _to_device(self, array: Any, dtype: Any) -> Any:
        """Host array or tensor -> device tensor; on CUDA through pinned memory with a non-blocking copy."""
        import torch

        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if self._on_cuda():
            if not tensor.is_pinned():
                tensor = tensor.pin_memory()
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(dtype)

    def det_buckets_of(self, resized: list[np.ndarray]) -> dict[tuple[int, int], list[int]]:
        """Images grouped by their (height, width) bucket; one detection forward pass per group."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, img in enumerate(resized):
            h, w = img.shape[:2]
            groups[(bucket(h, self.det_buckets, 512), bucket(w, self.det_buckets, 512))].append(index)
        return dict(groups)

    def det_batch(self, resized: list[np.ndarray]) -> DetBatch:
        """One uint8 canvas per bucket (a quarter of a float copy), in pinned memory on CUDA, with the images of the
        bucket and, with ``pad_counts``, blank slots up the ladder (their valid size is the whole canvas)."""
        import torch

        if self.det is None:
            raise RuntimeError("PpOcrTorch used before load()")
        groups = []
        for (bucket_h, bucket_w), members in self.det_buckets_of(resized).items():
            slots = padded_count(len(members)) if self.pad_counts else len(members)
            canvas = torch.zeros((slots, bucket_h, bucket_w, 3), dtype=torch.uint8, pin_memory=self._on_cuda())
            pixels = canvas.numpy()
            sizes = np.full((slots, 2), (bucket_h, bucket_w), dtype=np.int64)
            for slot, index in enumerate(members):
                h, w = resized[index].shape[:2]
                pixels[slot, :h, :w] = resized[index]
                sizes[slot] = (h, w)
            groups.append(DetGroup(members, canvas, sizes))
        return DetBatch(len(resized), groups)

    def det_maps(self, batch: DetBatch) -> list[np.ndarray]:
        import torch

        if self.det is None:
            raise RuntimeError("PpOcrTorch used before load()")
        maps: list[np.ndarray] = [np.empty(0)] * batch.count
        for group in batch.groups:
            bucket_h, bucket_w = group.canvas.shape[1:3]
            with torch.inference_mode():
                x = self._to_device(group.canvas, torch.float32).permute(0, 3, 1, 2)
                x = ((x * (1 / 255.0) - 0.5) / 0.5).contiguous()
                self.padding.set((bucket_h, bucket_w), self._to_device(group.sizes, torch.float32))
                try:
                    with self._precision("det"):
                        prob = self.det(x)[:, 0]
                    prob = prob.float().cpu().numpy()
                finally:
                    self.padding.set(None, None)
            for slot, index in enumerate(group.members):  # the padding's slots are dropped
                h, w = group.sizes[slot]
                maps[index] = prob[slot, :h, :w]
        return maps

    def cls_probs(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            with self._precision("cls"):
                probs = self.cls(self._to_device(batch, torch.float32))
            return probs.float().cpu().numpy()

    def rec_probs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            with self._precision("rec"):
                probs = self.rec(self._to_device(batch, torch.float32))
            best, indices = probs.float().max(dim=2)
            return best.float().cpu().numpy(), indices.cpu().numpy()

    def prepare(self, images: list[np.ndarray]) -> PreparedPages:
        if self.det is None:
            raise RuntimeError("PpOcrTorch.prepare() called before load()")
        return super().prepare(images)

    def forward(self, prepared: PreparedPages) -> list[list[tuple[list[list[float]], str, float]]]:
        if self.det is None:
            raise RuntimeError("PpOcrTorch.forward() called before load()")
        return super().forward(prepared)
