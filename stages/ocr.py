"""OCR stage: finds text lines in each image and summarises them into ``signals["ocr"]``.

The OCR engine sits behind a small interface (``OcrBackend``) so that the stage, its signals and the rules
do not care which engine runs: RapidOCR's PP-OCRv4 models (ONNX, shipped inside its wheel, so it works offline)
are the default, on one of two runtimes (``ocr.runtime``): onnxruntime (fastest on CPU) or torch (batched across
images, fp16, for CUDA devices); both share one batched pipeline (``stages.ppocr_torch``) and give the same
lines. PaddleOCR is an optional extra for sites that already run Paddle on GPUs.

The stage has host phases (``Stage.prepare``/``forward``/``finish``): the downscale, the BGR conversion and the
detection inputs (pinned on CUDA) are built in ``prepare``, the networks with the DB post-processing and crops
between them run in ``forward``, and the lines become signals in ``finish``; the engine overlaps them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw

from stages.base import BatchPolicy, ImageItem, OutOfDeviceMemory, Stage, is_out_of_memory, run_phases
from stages.devices import parse_device
from stages.ppocr_torch import OcrPrecision

R = TypeVar("R")
RUNTIMES = ("auto", "onnxruntime", "torch")
_MASK_SIDE = 1024  # longest side of the raster on which the union of text boxes is measured


@dataclass(frozen=True)
class OcrOptions:
    """What the OCR stage runs; ``min_confidence`` drops lines before any signal is computed."""

    backend: str = "rapidocr"  # "rapidocr" | "paddleocr"
    min_confidence: float = 0.5
    max_side: int = 1280  # images are downscaled to this longest side for OCR (the ratios are scale-free)
    paddle_model_dir: str | None = None
    runtime: str = "auto"  # rapidocr only: "auto" (torch on cuda, onnxruntime on cpu) | "onnxruntime" | "torch"
    precision: OcrPrecision = OcrPrecision()  # torch runtime on CUDA, per network
    # torch runtime: pad images and crops per forward pass up a short ladder (bounded shapes, see
    # ``stages.ppocr_torch.COUNT_LADDER``); None: on CUDA, off on the CPU. Same lines either way.
    pad_counts: bool | None = None


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto``: torch on CUDA devices (batched, fp16), onnxruntime on CPU (faster there, see docs/benchmarks.md)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"ocr.runtime {runtime!r} is not a runtime: use auto, onnxruntime or torch")
    if runtime == "auto":
        return "onnxruntime" if device == "cpu" else "torch"
    return runtime


@dataclass(frozen=True)
class OcrLine:
    """One recognised text line; ``box`` is four ``[x, y]`` corners in the coordinates of the input image."""

    text: str
    confidence: float
    box: list[list[float]]


@runtime_checkable
class OcrBackend(Protocol):
    """An OCR engine loaded on one device; its model calls come from one thread.

    ``recognize`` is ``forward(prepare(bgr images))``. ``prepare`` is host work that may run on any thread while
    ``forward`` runs another batch, so it must not touch what ``forward`` changes."""

    def load(self, device: str) -> None:
        """Load the models onto ``device`` (``"cpu"`` or ``"cuda:N"``); raise with the device named if impossible."""

    def prepare(self, images: list[np.ndarray]) -> Any:
        """Host phase for BGR uint8 arrays: whatever ``forward`` takes."""

    def forward(self, prepared: Any) -> list[list[OcrLine]]:
        """Device phase: all text lines of each prepared image, one list per image, in input order."""

    def recognize(self, images: list[np.ndarray | Image.Image]) -> list[list[OcrLine]]:
        """All text lines of each image (RGB arrays or PIL images), one list per image, in input order."""

    def close(self) -> None:
        """Release the models."""


def _cuda_index(device: str) -> int | None:
    """The CUDA index of an OCR device, None on the CPU; an unknown name is an error naming ``ocr.devices``."""
    return parse_device(device, "ocr.devices").index


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset, cgroups cpusets and systemd CPUAffinity=)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _to_bgr(image: np.ndarray | Image.Image) -> np.ndarray:
    """RGB array or PIL image -> contiguous BGR uint8 array, which both OCR engines expect."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[:, :, 2::-1])


def _lines(found: list[tuple[list[list[float]], str, float]]) -> list[OcrLine]:
    return [OcrLine(text=str(text), confidence=float(score), box=[[float(x), float(y)] for x, y in box])
            for box, text, score in found]


class RapidOcrBackend:
    """RapidOCR's PP-OCRv4 models (detection, angle classification, recognition) on ONNX Runtime.

    The sessions are RapidOCR's; the batched pipeline around them is ``stages.ppocr_torch.PpOcrOnnxRuntime``
    (RapidOCR's own steps, with the crops of all images read together). RapidOCR itself only knows "GPU 0"; on
    ``cuda:N`` this backend re-creates the three sessions with the CUDA execution provider pinned to device N
    (heuristic cuDNN algorithm choice: exhaustive search costs hundreds of ms per new input shape), and refuses
    to fall back to the CPU silently.
    """

    def __init__(self) -> None:
        self._engine: Any = None
        self.pipeline: Any = None
        self.device: str | None = None

    def load(self, device: str) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise RuntimeError(
                "ocr.backend 'rapidocr' needs the package rapidocr_onnxruntime: pip install 'rapidocr_onnxruntime==1.4.4'"
            ) from error
        index = _cuda_index(device)
        threads = min(usable_cpus(), 8)
        # text_score=0: keep every line here; the stage applies ocr.min_confidence itself.
        engine = RapidOCR(text_score=0.0, intra_op_num_threads=threads, inter_op_num_threads=1)
        if index is not None:
            self._move_to_cuda(engine, index, device)
        from stages.ppocr_torch import MODEL_FILES, PpOcrOnnxRuntime, character_list, model_dir

        self.pipeline = PpOcrOnnxRuntime(engine.text_det.infer.session, engine.text_cls.infer.session,
                                         engine.text_rec.session.session,
                                         character_list(model_dir() / MODEL_FILES["rec"]))
        self.pipeline.set_device(device)
        self._engine = engine
        self.device = device

    @staticmethod
    def _move_to_cuda(engine: Any, index: int, device: str) -> None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"OCR device {device}: onnxruntime has no CUDAExecutionProvider (available: "
                f"{', '.join(ort.get_available_providers())}). Use ocr.runtime torch (or auto) on CUDA devices, or "
                "replace onnxruntime with onnxruntime-gpu (pip uninstall -y onnxruntime, then pip install "
                "onnxruntime-gpu; they share one package folder), or set ocr.devices to cpu."
            )
        holders = (engine.text_det.infer, engine.text_cls.infer, engine.text_rec.session)
        for holder in holders:
            old = holder.session
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = [
                ("CUDAExecutionProvider", {"device_id": index, "arena_extend_strategy": "kSameAsRequested",
                                           "cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider",
            ]
            model_path = getattr(old, "_model_path", None) or _rapidocr_model_path(holder, engine)
            session = ort.InferenceSession(model_path, sess_options=options, providers=providers)
            if session.get_providers()[0] != "CUDAExecutionProvider":
                raise RuntimeError(
                    f"OCR device {device}: onnxruntime could not start its CUDA provider on device {index} "
                    "(check the driver, CUDA/cuDNN libraries and that the GPU exists), or set ocr.devices to cpu"
                )
            holder.session = session

    def prepare(self, images: list[np.ndarray]) -> Any:
        if self.pipeline is None:
            raise RuntimeError("RapidOcrBackend.prepare() called before load()")
        return self.pipeline.prepare(images)

    def forward(self, prepared: Any) -> list[list[OcrLine]]:
        if self.pipeline is None:
            raise RuntimeError("RapidOcrBackend.forward() called before load()")
        return [_lines(found) for found in self.pipeline.forward(prepared)]

    def recognize(self, images: list[np.ndarray | Image.Image]) -> list[list[OcrLine]]:
        return self.forward(self.prepare([_to_bgr(image) for image in images]))

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.shutdown()
        self._engine = None
        self.pipeline = None


class TorchOcrBackend:
    """The same PP-OCRv4 models converted to torch (``stages.ppocr_torch.PpOcrTorch``): detection batched in size
    buckets, crops of all images classified and read together, fp16 per network on CUDA."""

    def __init__(self, precision: OcrPrecision | None = None, pad_counts: bool | None = None) -> None:
        self.precision = precision or OcrPrecision()
        self.pad_counts = pad_counts
        self.runtime: Any = None
        self.device: str | None = None

    def load(self, device: str) -> None:
        _cuda_index(device)
        from stages.ppocr_torch import PpOcrTorch

        # CPU threads are torch's process-wide setting: left to the process, as other stages share it.
        runtime = PpOcrTorch(precision=self.precision, pad_counts=self.pad_counts)
        runtime.load(device)
        self.runtime = runtime
        self.device = device

    def _translating(self, call: Callable[[], R], count: int) -> R:
        """``call()``, with an out-of-memory error (device, or pinned host memory) raised as ``OutOfDeviceMemory``."""
        try:
            return call()
        except Exception as error:
            if is_out_of_memory(error):
                if self.device and parse_device(self.device).is_cuda:
                    import torch

                    torch.cuda.empty_cache()  # give the halved retry the cached blocks of the failed batch
                raise OutOfDeviceMemory(f"OCR on {self.device}: out of memory for {count} images") from error
            raise

    def prepare(self, images: list[np.ndarray]) -> Any:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("TorchOcrBackend.prepare() called before load()")
        return self._translating(lambda: runtime.prepare(images), len(images))

    def forward(self, prepared: Any) -> list[list[OcrLine]]:
        runtime = self.runtime
        if runtime is None:
            raise RuntimeError("TorchOcrBackend.forward() called before load()")
        found = self._translating(lambda: runtime.forward(prepared), prepared.count)
        return [_lines(lines) for lines in found]

    def recognize(self, images: list[np.ndarray | Image.Image]) -> list[list[OcrLine]]:
        return self.forward(self.prepare([_to_bgr(image) for image in images]))

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
        self.runtime = None


def _rapidocr_model_path(holder: Any, engine: Any) -> str:
    """The ONNX file behind one of RapidOCR's sessions (it does not keep the path itself)."""
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import read_yaml, update_model_path

    config = update_model_path(read_yaml(str(DEFAULT_CFG_PATH)))
    section = {id(engine.text_det.infer): "Det", id(engine.text_cls.infer): "Cls", id(engine.text_rec.session): "Rec"}
    return str(config[section[id(holder)]]["model_path"])


class PaddleOcrBackend:
    """PaddleOCR, optional (``pip install 'binner[paddle]'``); imported only when selected.

    ``model_dir`` points at local inference models so that no download is attempted: subfolders ``det``
    and ``rec`` (and optionally ``cls`` for text-line orientation), as exported by PaddleOCR.
    Supports PaddleOCR 3.x (``predict``) and 2.x (``ocr``).
    """

    def __init__(self, model_dir: str | None = None) -> None:
        self.model_dir = Path(model_dir).expanduser() if model_dir else None
        self._engine: Any = None
        self._major = 0
        self.device: str | None = None

    def load(self, device: str) -> None:
        try:
            import paddleocr
        except ImportError as error:
            raise RuntimeError(
                "ocr.backend 'paddleocr' needs PaddleOCR and PaddlePaddle: pip install 'binner[paddle]' "
                "(or set ocr.backend to rapidocr)"
            ) from error
        index = _cuda_index(device)
        self._major = int(str(getattr(paddleocr, "__version__", "3")).split(".")[0] or 3)
        dirs = self._model_dirs()
        if self._major >= 3:
            kwargs: dict[str, Any] = {
                "use_doc_orientation_classify": False,
                "use_doc_unwarping": False,
                "use_textline_orientation": "cls" in dirs,
                "device": "cpu" if index is None else f"gpu:{index}",
            }
            if "det" in dirs:
                kwargs["text_detection_model_dir"] = str(dirs["det"])
            if "rec" in dirs:
                kwargs["text_recognition_model_dir"] = str(dirs["rec"])
            if "cls" in dirs:
                kwargs["textline_orientation_model_dir"] = str(dirs["cls"])
        else:
            kwargs = {
                "use_angle_cls": "cls" in dirs,
                "use_gpu": index is not None,
                "gpu_id": index or 0,
                "show_log": False,
            }
            kwargs.update({f"{name}_model_dir": str(path) for name, path in dirs.items()})
        self._engine = paddleocr.PaddleOCR(**kwargs)
        self.device = device

    def _model_dirs(self) -> dict[str, Path]:
        if self.model_dir is None:
            return {}
        if not self.model_dir.is_dir():
            raise FileNotFoundError(
                f"ocr.paddle_model_dir {self.model_dir} does not exist: point it at a folder with det/ and rec/ "
                "inference models, or leave it empty to let PaddleOCR use its own cache"
            )
        found = {name: self.model_dir / name for name in ("det", "rec", "cls") if (self.model_dir / name).is_dir()}
        if not {"det", "rec"} <= found.keys():
            raise FileNotFoundError(f"ocr.paddle_model_dir {self.model_dir} must contain det/ and rec/ model folders")
        return found

    def prepare(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Nothing to do ahead: PaddleOCR's predictors take the BGR arrays as they are."""
        return images

    def recognize(self, images: list[np.ndarray | Image.Image]) -> list[list[OcrLine]]:
        return self.forward(self.prepare([_to_bgr(image) for image in images]))

    def forward(self, prepared: list[np.ndarray]) -> list[list[OcrLine]]:
        if self._engine is None:
            raise RuntimeError("PaddleOcrBackend.forward() called before load()")
        results: list[list[OcrLine]] = []
        for bgr in prepared:
            lines: list[OcrLine] = []
            if self._major >= 3:
                for page in self._engine.predict(bgr):
                    data = page.json.get("res", page) if hasattr(page, "json") else page
                    polys = data.get("rec_polys", data.get("dt_polys", []))
                    for text, score, poly in zip(data.get("rec_texts", []), data.get("rec_scores", []), polys):
                        box = [[float(x), float(y)] for x, y in np.asarray(poly).reshape(-1, 2)[:4]]
                        lines.append(OcrLine(text=str(text), confidence=float(score), box=box))
            else:
                for page in self._engine.ocr(bgr, cls=True) or []:
                    for box, (text, score) in page or []:
                        lines.append(
                            OcrLine(text=str(text), confidence=float(score), box=[[float(x), float(y)] for x, y in box])
                        )
            results.append(lines)
        return results

    def close(self) -> None:
        self._engine = None


def make_backend(options: OcrOptions, device: str = "cpu") -> OcrBackend:
    """The backend named by ``ocr.backend`` (and, for rapidocr, ``ocr.runtime`` resolved for ``device``)."""
    if options.backend == "rapidocr":
        if resolve_runtime(options.runtime, device) == "torch":
            return TorchOcrBackend(precision=options.precision, pad_counts=options.pad_counts)
        return RapidOcrBackend()
    if options.backend == "paddleocr":
        return PaddleOcrBackend(model_dir=options.paddle_model_dir)
    raise ValueError(f"ocr.backend {options.backend!r} is not a model backend: use rapidocr or paddleocr")


def text_area_ratio(boxes: list[list[list[float]]], width: int, height: int) -> float:
    """Union of the text polygons over the image area, in [0, 1], measured on a raster of at most 1024 px.

    Overlapping boxes count once: the polygons are filled onto one mask and its set pixels are counted.
    """
    if not boxes or width <= 0 or height <= 0:
        return 0.0
    scale = min(1.0, _MASK_SIDE / max(width, height))
    mask_w, mask_h = max(1, round(width * scale)), max(1, round(height * scale))
    mask = Image.new("1", (mask_w, mask_h), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        points = [(x * scale, y * scale) for x, y in box]
        draw.polygon(points, fill=1, outline=1)
    covered = np.count_nonzero(np.asarray(mask))
    return float(min(1.0, covered / (mask_w * mask_h)))


def summarize(lines: list[OcrLine], width: int, height: int, min_confidence: float) -> dict[str, Any]:
    """The ``signals["ocr"]`` record for one image (see the signals contract in the brief)."""
    kept = [line for line in lines if line.confidence >= min_confidence]
    return {
        "text": "\n".join(line.text for line in kept),
        "lines": [{"text": line.text, "confidence": line.confidence, "box": line.box} for line in kept],
        "char_count": sum(len("".join(line.text.split())) for line in kept),
        "line_count": len(kept),
        "text_area_ratio": text_area_ratio([line.box for line in kept], width, height),
        "mean_confidence": float(sum(line.confidence for line in kept) / len(kept)) if kept else 0.0,
    }


def _warmup_image() -> Image.Image:
    """A small white card with a few words, so that detection, classification and recognition all run."""
    image = Image.new("RGB", (320, 96), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 16), "binner warmup 0123", fill="black", font_size=28)
    return image


def _worst_case_image(side: int) -> Image.Image:
    """A ``side`` x ``side`` page of dense text lines: the largest detection input and many crops to read."""
    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    size = max(12, side // 40)
    line = "binner worst case 0123456789 " * (1 + side // (size * 8))
    for y in range(0, side - size, int(size * 1.6)):
        draw.text((4, y), line, fill="black", font_size=size)
    return image


@dataclass
class OcrBatch:
    """What ``OcrStage.prepare`` hands to ``forward``: which items are read, how to map their boxes back, and the
    backend's prepared inputs (None when no item is read)."""

    positions: list[int]  # indices into the batch's items
    back: list[float]  # per read item: the factor from the OCR image's pixels to ``item.image``'s
    prepared: Any


@dataclass
class OcrOutputs:
    """What ``OcrStage.forward`` hands to ``finish``: the lines of each read item, in the OCR image's pixels."""

    positions: list[int]
    back: list[float]
    lines: list[list[OcrLine]]


class OcrStage(Stage):
    """Runs the OCR backend on a micro-batch and fills ``signals["ocr"]``; boxes are in ``item.image`` pixels.

    Host phases: ``prepare`` (downscale, BGR arrays, the backend's host inputs) and ``finish`` (boxes mapped back,
    ``summarize``) touch only the batch's own items and objects, so they may run on other threads while ``forward``
    (the networks) runs another batch; ``process_batch`` is the three in sequence."""

    name = "ocr"
    produces = frozenset({"ocr"})

    def __init__(self, options: OcrOptions, devices: list[str], batch_policy: BatchPolicy) -> None:
        super().__init__(devices=devices, batch_policy=batch_policy)
        if options.backend not in {"rapidocr", "paddleocr"}:
            raise ValueError(f"ocr.backend {options.backend!r} is not a model backend: use rapidocr or paddleocr")
        if options.max_side < 32:
            raise ValueError(f"ocr.max_side must be at least 32 pixels (got {options.max_side})")
        resolve_runtime(options.runtime, "cpu")  # an unknown runtime fails here, not on the worker thread
        self.options = options
        self.backend: OcrBackend | None = None

    def replicate(self) -> OcrStage:
        clone = super().replicate()
        assert isinstance(clone, OcrStage)
        clone.backend = None
        return clone

    def setup(self, device: str) -> None:
        backend = make_backend(self.options, device)
        backend.load(device)
        self.backend = backend
        super().setup(device)

    def _downscale(self, image: Image.Image) -> tuple[Image.Image, float]:
        """Downscale to ``max_side``; returns the image and the factor that maps its pixels back."""
        longest = max(image.size)
        if longest <= self.options.max_side:
            return image, 1.0
        scale = self.options.max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), 1.0 / scale

    def prepare(self, items: list[ImageItem]) -> OcrBatch:
        backend = self.backend
        if backend is None:
            raise RuntimeError("OcrStage.prepare() called before setup(device)")
        positions = [index for index, item in enumerate(items) if item.failure is None and item.image is not None]
        if not positions:
            return OcrBatch([], [], None)
        downscaled = [self._downscale(items[index].image) for index in positions]
        prepared = backend.prepare([_to_bgr(image) for image, _ in downscaled])
        return OcrBatch(positions, [back for _, back in downscaled], prepared)

    def forward(self, batch: OcrBatch) -> OcrOutputs:
        if self.backend is None:
            raise RuntimeError("OcrStage.forward() called before setup(device)")
        if not batch.positions:
            return OcrOutputs([], [], [])
        found = self.backend.forward(batch.prepared)
        if len(found) != len(batch.positions):
            raise RuntimeError(f"OCR backend returned {len(found)} results for {len(batch.positions)} images")
        return OcrOutputs(batch.positions, batch.back, found)

    def finish(self, items: list[ImageItem], outputs: OcrOutputs) -> list[ImageItem]:
        for index, back, lines in zip(outputs.positions, outputs.back, outputs.lines):
            item = items[index]
            if back != 1.0:
                lines = [
                    OcrLine(line.text, line.confidence, [[x * back, y * back] for x, y in line.box]) for line in lines
                ]
            width, height = item.image.size
            item.signals["ocr"] = summarize(lines, width, height, self.options.min_confidence)
        return items

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        return run_phases(self, items)

    def probe_batch_size(self, device: str, ceiling: int) -> int:
        """Largest batch of worst-case images (``max_side`` squares full of text) that fits ``device``.

        Doubles the batch while it runs and leaves 15% of the device free, then backs off to the last size that
        did; CPU and the onnxruntime runtime use ``ceiling`` (nothing to measure there).
        """
        if device == "cpu" or not isinstance(self.backend, TorchOcrBackend):
            return ceiling
        import torch

        index = _cuda_index(device) or 0
        worst = _worst_case_image(self.options.max_side)
        best, size = 0, 1
        while size <= ceiling:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(index)
            try:
                self.backend.recognize([worst] * size)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                break
            free, total = torch.cuda.mem_get_info(index)
            peak = torch.cuda.max_memory_allocated(index)
            best = size
            if 2 * peak > 0.85 * total or free < 0.15 * total:
                break  # the next doubling (about twice the peak) would not fit with headroom
            size *= 2
        torch.cuda.empty_cache()
        if best == 0:
            raise OutOfDeviceMemory(f"OCR on {device}: one {self.options.max_side}-px image does not fit; "
                                    "lower ocr.max_side or free the device")
        return min(best, ceiling)

    def warmup(self) -> None:
        if self.backend is None:
            raise RuntimeError("OcrStage.warmup() called before setup(device)")
        self.backend.recognize([_warmup_image()])

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
