"""`binner bench --scenario gpu`: each stage measured against its own networks' limit, on the CUDA GPU of this machine.

What it reports (docs/benchmarks.md, "GPU", has every key and the method):
- ``models``: per model (YOLO, BLIP, CLIP, OCR) and precision, at the stage's batch, the **network alone** on tensors
  already on the device (the device limit), the **stage** on decoded images (its three phases overlapped as the engine
  runs them: ``PhasedReplica`` with as many submitting threads as the engine gives it), their **ratio** (goal >= 0.7)
  and the stage's **host seconds per phase**; plus the loader alone, with the pipeline's worker count;
- ``blip_batches``: BLIP at batch 32, 128 and the probed maximum (``probe_batch_size`` from ``max_auto_batch``), with
  the attention implementation BLIP got, and its generate at batch 32 with the dynamic and a static KV cache;
- ``seeds_loop``: seed 000's loop (one image at a time, OCR then vision) on the same stages and GPU (goal: the
  pipeline >= 20x it);
- ``pipeline``: the real pipeline on one GPU in thread and in process isolation, with NVML utilisation of the
  bottleneck GPU (goal >= 80 %), images/s against the slowest stage alone (goal >= 0.9) and the run's own
  ``binner_gpu_*`` series read from its metrics registry;
- ``ocr_cudnn``: OCR on the torch runtime with cuDNN off and on, cold and warm, batch composition changing between
  rounds (the runtime keeps cuDNN on; this says whether that is the faster);
- ``signals_needed_vs_all``, ``ocr_bins_cpu_vs_gpu``, ``auto_batch_probe``, ``forced_oom_backoff``,
  ``pipeline_two_gpus``; and ``goals``: every figure that has a target, with ``met``.

``--quick`` runs the same steps with fewer precisions, batches and files (``QUICK``), to end inside 5 minutes on one
H100-class GPU with model loading. The dict is written to ``BINNER_BENCH_PARTIAL`` after every step, so a run cut
off by a time limit keeps what it measured; steps that would start after the plan's budget are reported as skipped.

Where the configured weights are not on the machine, randomly initialised models of the real architectures (BLIP base,
CLIP ViT-B/32, YOLOv8n ``.pt``) stand in and ``notes`` says so: their throughput and memory are the real ones, their
outputs are not (a random BLIP writes all ``max_new_tokens`` tokens: ``decoding_steps`` shows it).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from app.bench.common import BenchUnavailable, PeakRss, clocked_runtime, latency_summary

SAMPLE_PERIOD_S = 0.2
SERIES_PERIOD_S = 0.5  # how often a pipeline run's own registry is scraped for binner_gpu_* (Prometheus: 15 s)
GPU_METRICS = ("binner_gpu_utilization_ratio", "binner_gpu_memory_used_bytes", "binner_gpu_memory_total_bytes")
STAGE_TO_NETWORK = 0.7  # goal: each stage reaches this share of its networks' limit
PIPELINE_TO_SEEDS = 20.0  # goal: the pipeline against the seeds' loop
GPU_BUSY_PCT = 80.0  # goal: NVML utilisation of the bottleneck GPU during the pipeline's steady state
PIPELINE_TO_SLOWEST = 0.9  # goal: the pipeline against its slowest stage alone
# Each vision record: the stage running these models (CLIP scores BLIP's captions, so it runs with BLIP), against them.
VISION_VIEWS: dict[str, tuple[str, ...]] = {"yolo": ("yolo",), "blip": ("blip",), "clip": ("blip", "clip"),
                                            "vision": ("yolo", "blip", "clip")}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic"}


@dataclass(frozen=True)
class Plan:
    """The sizes of one run. The first precision of each list is the one the pipelines run, so its stage figures are
    the "stage alone" the pipelines are compared with."""

    name: str
    ocr_batch: int = 16
    vision_batch: int = 64
    vision_precisions: tuple[str, ...] = ("fp16", "fp32")
    ocr_precisions: tuple[str, ...] = ("auto", "fp32", "fp16")  # auto: det fp32, cls and rec fp16
    stage_batches: int = 6  # batches per stage measurement, after one warm-up batch
    network_calls: int = 5  # calls per network measurement, after one warm-up call
    ocr_replays: int = 3  # replays of the OCR passes recorded over the stage's images
    cudnn_images: int = 64  # OCR images per round of the cuDNN on/off measurement
    cudnn_rounds: int = 3  # rounds per cuDNN mode: the first cold, the others warm; the batches recomposed each round
    blip_batches: tuple[int, ...] = (32, 128)  # and the probed maximum
    blip_probe_ceiling: int | None = None  # None: VisionStage.max_auto_batch
    blip_stage_batches: int = 3
    seeds_images: int = 30
    loader_workers: int = 4
    loader_files: int = 256
    pipeline_files: int = 960
    oom_files: int = 128
    oom_batch: int = 64
    ocr_bins_images: int | None = None  # None: every source image
    ocr_probe_ceiling: int = 64
    budget_s: float = 900.0  # no step starts after this many seconds

    def describe(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan("full")
QUICK = Plan("quick", vision_precisions=("fp16",), ocr_precisions=("auto",), stage_batches=4, network_calls=3,
             ocr_replays=2, cudnn_images=32, blip_stage_batches=2, seeds_images=12, loader_files=128,
             pipeline_files=480, oom_files=64, ocr_probe_ceiling=16, budget_s=230.0)


# --- sampling -------------------------------------------------------------------------------------------------------


class NvmlSampler:
    """Samples every GPU's utilisation and memory with NVML on a background thread while a block runs."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.period_s = period_s
        self._nvml: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no NVML: the report says "no samples"
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    @contextmanager
    def sampling(self, into: dict[str, Any], window: Callable[[], tuple[float, float] | None] | None = None
                 ) -> Iterator[None]:
        """Fill ``into["gpu_utilisation"]`` with per-GPU mean/max utilisation and peak memory of the block
        (or of the ``perf_counter`` window that ``window()`` returns once the block has ended)."""
        samples: list[list[tuple[float, int, int]]] = [[] for _ in self._handles]
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                for index, handle in enumerate(self._handles):
                    try:
                        util = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                        used = self._nvml.nvmlDeviceGetMemoryInfo(handle).used
                        samples[index].append((time.perf_counter(), int(util), int(used)))
                    except Exception:  # noqa: BLE001
                        pass
                stop.wait(self.period_s)

        thread = threading.Thread(target=loop, name="nvml-sampler", daemon=True) if self.available else None
        if thread is not None:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=2)
            bounds = window() if window is not None else None
            summary: dict[str, Any] = {}
            for index, rows in enumerate(samples):
                if bounds is not None:
                    rows = [row for row in rows if bounds[0] <= row[0] <= bounds[1]]
                summary[f"gpu{index}"] = {
                    "samples": len(rows),
                    "mean_util_pct": round(sum(r[1] for r in rows) / len(rows), 1) if rows else None,
                    "max_util_pct": max((r[1] for r in rows), default=None),
                    "peak_memory_used_mib": round(max((r[2] for r in rows), default=0) / 2**20),
                }
            into["gpu_utilisation"] = summary


class RegistrySeries:
    """The ``binner_gpu_*`` gauges as a run's own metrics registry serves them (what Prometheus scrapes from /metrics
    and the Grafana GPU panels plot), read every ``period_s`` while a block runs."""

    def __init__(self, registry: Any, period_s: float = SERIES_PERIOD_S, max_points: int = 240) -> None:
        self.registry = registry
        self.period_s = period_s
        self.max_points = max_points

    def scrape(self) -> dict[str, float]:
        """``{"binner_gpu_utilization_ratio{gpu=0}": 0.93, ...}`` now; empty where the registry has no GPU series."""
        found: dict[str, float] = {}
        for family in self.registry.collect():
            if family.name in GPU_METRICS:
                for sample in family.samples:
                    found[f"{sample.name}{{gpu={sample.labels.get('gpu', '')}}}"] = float(sample.value)
        return found

    @contextmanager
    def sampling(self, into: dict[str, Any], window: Callable[[], tuple[float, float] | None] | None = None
                 ) -> Iterator[None]:
        """Fill ``into["daemon_gpu_series"]``: per series its samples, mean, max and last value in the window, and the
        points themselves (seconds from the start, value), thinned to ``max_points``."""
        rows: list[tuple[float, dict[str, float]]] = []
        scrapes = [0]
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    rows.append((time.perf_counter(), self.scrape()))
                except Exception:  # noqa: BLE001 - a failed scrape is a missing point, not a failed run
                    pass
                scrapes[0] += 1
                stop.wait(self.period_s)

        started = time.perf_counter()
        thread = threading.Thread(target=loop, name="registry-series", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
            bounds = window() if window is not None else None
            kept = [row for row in rows if bounds is None or bounds[0] <= row[0] <= bounds[1]]
            series: dict[str, Any] = {}
            for name in sorted({key for _, values in rows for key in values}):
                points = [(at, values[name]) for at, values in kept if name in values]
                values_only = [value for _, value in points]
                step = max(1, len(points) // self.max_points)
                series[name] = {
                    "samples": len(points),
                    "mean": round(sum(values_only) / len(values_only), 4) if values_only else None,
                    "max": max(values_only, default=None),
                    "last": values_only[-1] if values_only else None,
                    "points": [[round(at - started, 2), value] for at, value in points[::step]],
                }
            into["daemon_gpu_series"] = {
                "scrapes": scrapes[0], "period_s": self.period_s, "series": series,
                **({} if series else {"note": "the registry served no binner_gpu_* series (no NVML GPU in this process)"}),
            }


class _PhaseClock:
    """What ``PhasedReplica`` reports, added up: device seconds, host seconds per phase."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.device_s = 0.0
            self.calls = 0
            self.host_s: dict[str, float] = {"prepare": 0.0, "finish": 0.0}

    def device_started(self) -> None:
        pass

    def device_finished(self, seconds: float) -> None:
        with self._lock:
            self.device_s += seconds
            self.calls += 1

    def host_finished(self, phase: str, seconds: float) -> None:
        with self._lock:
            self.host_s[phase] = self.host_s.get(phase, 0.0) + seconds


# --- helpers --------------------------------------------------------------------------------------------------------


def _stack() -> dict[str, Any]:
    """The software and GPUs behind the figures (the report's ``machine`` already has the host, CPUs and Python)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpus"] = [
            {"name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())
        ]
    for module in ("transformers", "ultralytics", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            pass
    return info


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _sync(device: str) -> None:
    """Wait for the device: a figure must include the work it queued, not only its launches."""
    if _on_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def _empty_cache(device: str) -> None:
    if _on_cuda(device):
        import torch

        torch.cuda.empty_cache()


def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 2) if seconds > 0 else None


def _limit(rates: list[float | None]) -> float | None:
    """Images/s of networks run one after the other on the same images: 1 / sum(1 / rate)."""
    if not rates or any(rate is None or rate <= 0 for rate in rates):
        return None
    return round(1.0 / sum(1.0 / rate for rate in rates if rate), 2)


def _target(text: str, value: float | None, minimum: float) -> dict[str, Any]:
    return {"text": text, "met": None if value is None else bool(value >= minimum)}


def _cycle(images: list[Any], start: int, count: int) -> list[Any]:
    return [images[(start + index) % len(images)] for index in range(count)]


def _items(images: list[Any]) -> list[Any]:
    """Fresh items for one batch (a stage writes its signals onto them; batches in flight must not share them)."""
    from stages.base import ImageItem

    return [ImageItem(key=index, source=f"mem:{index}", image=image, width=image.width, height=image.height)
            for index, image in enumerate(images)]


def _decode(source: Path | None, count: int, max_side: int) -> tuple[list[Any], list[str]]:
    """Decoded RGB images through the real loader stage (the pipeline's own decoding), repeated to ``count``."""
    from PIL import Image

    from stages.base import ImageItem
    from stages.loader import LoaderOptions, LoaderStage

    images: list[Any] = []
    names: list[str] = []
    if source is not None and source.is_dir():
        source = source.resolve()  # the loader refuses paths through links; a linked source folder is the user's choice
        loader = LoaderStage(LoaderOptions(max_file_bytes=256 << 20, max_pixels=120_000_000, max_side=max_side))
        paths = [p for p in sorted(source.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        items = loader.process_batch([ImageItem(key=i, source=str(p)) for i, p in enumerate(paths)])
        for path, item in zip(paths, items):
            if item.image is not None:
                images.append(item.image)
                names.append(str(path.relative_to(source)))
    if not images:  # no source: noise photos with a line of text, so that every OCR network runs
        from PIL import ImageDraw

        for index in range(16):
            image = Image.effect_noise((960, 720), 48).convert("RGB")
            ImageDraw.Draw(image).text((40, 40 + 10 * index), f"binner gpu bench {index}", fill="white", font_size=36)
            images.append(image)
            names.append(f"synthetic_{index}.png")
    base = list(images)
    while len(images) < count:
        images.extend(base[: count - len(images)])
    return images, names


def _write_images(images: list[Any], names: list[str], scratch: Path) -> Path:
    folder = scratch / "source"
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        image.save(folder / name)
    return folder


def _image_files(images_dir: Path) -> list[Path]:
    return [p for p in sorted(images_dir.resolve().rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _fill_inbox(images_dir: Path, inbox: Path, at_least: int) -> int:
    """Copies of the image files of ``images_dir`` (repeated until ``at_least``) under ``inbox``."""
    images_dir = images_dir.resolve()
    files = _image_files(images_dir)
    copies = repeat = 0
    while copies < at_least and files:
        for path in files:
            if copies >= at_least:
                break
            target = inbox / f"r{repeat}" / path.relative_to(images_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copies += 1
        repeat += 1
    return copies


class _Report:
    """The scenario's dict, written to ``partial_path`` after every step so that a cut-off run keeps its figures."""

    def __init__(self, partial_path: Path | None, budget_s: float) -> None:
        self.data: dict[str, Any] = {"stack": _stack(), "notes": [], "step_seconds": {}}
        self.partial_path = partial_path
        self.started = time.monotonic()
        self.deadline = self.started + budget_s

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def step(self, key: str, fn: Callable[[], Any], place: Callable[[Any], None] | None = None) -> Any:
        """``data[key] = fn()`` (``key`` may be a dotted path; ``place(value)`` puts it elsewhere), an error record if it
        raises, a skip once the budget is spent."""
        value: Any
        if self.out_of_time():
            value = {"skipped": f"the plan's time budget ({self.deadline - self.started:.0f} s) was spent"}
        else:
            started = time.monotonic()
            try:
                value = fn()
            except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
                value = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            seconds = time.monotonic() - started
            self.data["step_seconds"][key] = round(seconds, 1)
            print(f"[bench gpu] {key}: {seconds:.1f} s", flush=True)
        if place is not None:
            place(value)
        else:
            *parents, last = key.split(".")
            into = self.data
            for part in parents:
                into = into.setdefault(part, {})
            into[last] = value
        self.flush()
        return value

    def flush(self) -> None:
        if self.partial_path is not None:
            self.partial_path.write_text(json.dumps(self.data, indent=2, default=str))


# --- loading --------------------------------------------------------------------------------------------------------


def _ocr_options(runtime: str, precision: str | None = None, **extra: Any) -> Any:
    from stages.ocr import OcrOptions

    known = {f.name for f in fields(OcrOptions)}
    wanted: dict[str, Any] = {"backend": "rapidocr", "runtime": runtime, **extra}
    if precision is not None:
        from stages.ppocr_torch import OcrPrecision

        wanted["precision"] = OcrPrecision(det=precision, cls=precision, rec=precision)
    return OcrOptions(**{key: value for key, value in wanted.items() if key in known})


def _ocr_stage(runtime: str, precision: str | None, device: str, batch: int, warm: bool = True) -> Any:
    from stages.base import BatchPolicy
    from stages.ocr import OcrStage

    stage = OcrStage(_ocr_options(runtime, precision), [device], BatchPolicy(max_batch_size=batch))
    stage.setup(device)
    if warm:
        stage.warmup()
    return stage


def _vision_stage(paths: dict[str, str], precision: str, device: str, config: Any, batch: int) -> Any:
    """The three vision models with the configuration's detector and captioner settings (``paths`` are the weights)."""
    from stages.base import BatchPolicy
    from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage

    detector, max_new_tokens = config.vision.detector, int(config.vision.captioner.max_new_tokens)
    stage = VisionStage(
        DetectorOptions(weights=paths["detector"], confidence=detector.confidence, image_size=detector.image_size),
        CaptionerOptions(model=paths["captioner"], max_new_tokens=max_new_tokens),
        ClipOptions(model=paths["clip"]),
        precision, [device], BatchPolicy(max_batch_size=batch), max_image_side=config.limits.max_side,
    )
    stage.setup(device)
    stage.warmup()
    return stage


def _standin_paths(config: Any, scratch: Path, notes: list[str]) -> dict[str, str]:
    """The configured vision weights where present; otherwise random models of the real architectures."""
    from app.bench.standin_models import build_blip, build_clip, build_yolo
    from app.weights import missing_weights

    v = config.vision
    paths = {"detector": v.detector.weights, "captioner": v.captioner.model, "clip": v.clip.model}
    missing = {m.value for m in missing_weights(*paths.values())}
    if paths["detector"] in missing or not str(paths["detector"]).endswith(".pt"):
        paths["detector"] = str(build_yolo(scratch / "yolov8n-random.pt"))
        notes.append("YOLO: randomly initialised YOLOv8n (.pt) built from Ultralytics' yolov8n.yaml stands in "
                     "for the configured detector (a .pt is what runs on the device without the predictor)")
    if paths["captioner"] in missing:
        paths["captioner"] = str(build_blip(scratch / "blip-base-random", "base"))
        notes.append("BLIP: randomly initialised BLIP base architecture (real weights absent): real throughput, "
                     "gibberish captions")
    if paths["clip"] in missing:
        paths["clip"] = str(build_clip(scratch / "clip-vit-b32-random", "base"))
        notes.append("CLIP: randomly initialised CLIP ViT-B/32 architecture (real weights absent): real throughput, "
                     "meaningless similarities")
    return paths


class _Loaded:
    """The stages the per-model steps, the BLIP batches and the seeds' loop share, each loaded once on first use."""

    def __init__(self, paths: dict[str, str], device: str, plan: Plan, config: Any) -> None:
        self.paths, self.device, self.plan, self.config = paths, device, plan, config
        self._stages: dict[str, Any] = {}

    def vision(self, precision: str) -> Any:
        key = f"vision:{precision}"
        if key not in self._stages:
            self._stages[key] = _vision_stage(self.paths, precision, self.device, self.config, self.plan.vision_batch)
        return self._stages[key]

    def ocr(self, precision: str) -> Any:
        key = f"ocr:{precision}"
        if key not in self._stages:
            self._stages[key] = _ocr_stage("torch", precision, self.device, self.plan.ocr_batch)
        return self._stages[key]

    def release(self, prefix: str = "") -> None:
        """Tear down the stages whose key starts with ``prefix`` (all by default), so the next step has the memory."""
        for key in [key for key in self._stages if key.startswith(prefix)]:
            self._stages.pop(key).teardown()
        _empty_cache(self.device)


# --- the network alone and the stage ----------------------------------------------------------------------------------


def _network_rate(call: Callable[[], Any], images_per_call: int, calls: int, device: str,
                  sampler: NvmlSampler, warm: bool = False) -> dict[str, Any]:
    """Images/s of ``call`` (one network pass over one batch of device tensors), after one warm-up call unless the
    caller has just made one (``warm``)."""
    import torch

    with torch.inference_mode():
        if not warm:
            call()
        _sync(device)
        record: dict[str, Any] = {"batch": images_per_call, "calls": calls}
        with sampler.sampling(record):
            started = time.perf_counter()
            for _ in range(calls):
                call()
            _sync(device)
            seconds = time.perf_counter() - started
    record.update(images=images_per_call * calls, seconds=round(seconds, 4),
                  images_per_second=_rate(images_per_call * calls, seconds))
    return record


def _stage_rate(stage: Any, device: str, images: list[Any], batch: int, batches: int,
                sampler: NvmlSampler, warm: bool = False) -> dict[str, Any]:
    """The stage on decoded images as the engine runs it: its three phases through a ``PhasedReplica`` fed by as many
    submitting threads as the engine's drivers (``concurrency``), so that host phases overlap device calls.

    ``stage`` is already set up (on this device); the replica is only the engine's way of calling it. One batch runs
    first, untimed (its shapes), unless ``warm`` says these batches ran already; then ``batches`` batches of fresh
    items are timed from first submit to last return.
    """
    from app.hosts import PhasedReplica

    clock = _PhaseClock()
    replica = PhasedReplica(stage, device, clock)
    chunks = [_cycle(images, index * batch, batch) for index in range(batches)]
    record: dict[str, Any] = {"batch": batch, "batches": batches, "submitters": replica.concurrency}
    try:
        if not warm:
            replica.run(_items(chunks[0]))
            clock.reset()
        with ThreadPoolExecutor(replica.concurrency, thread_name_prefix="bench-submit") as pool, sampler.sampling(record):
            started = time.perf_counter()
            done = list(pool.map(lambda chunk: replica.run(_items(chunk)), chunks))
            seconds = time.perf_counter() - started
    finally:
        replica.abandon()  # the model thread only; the stage stays loaded for the next measurement
    count = batch * batches
    record.update(
        images=count, seconds=round(seconds, 4), images_per_second=_rate(count, seconds),
        device_seconds=round(clock.device_s, 4), device_busy=round(clock.device_s / seconds, 3) if seconds > 0 else None,
        host_seconds={phase: round(value, 4) for phase, value in clock.host_s.items()},
        host_seconds_per_batch={phase: round(value / batches, 4) for phase, value in clock.host_s.items()},
        failed=sum(item.failure is not None for items in done for item in items),
        signals=sorted({key for items in done for item in items for key in item.signals}),
    )
    return record


def _versus(stage: dict[str, Any], limit: float | None) -> dict[str, Any]:
    """The stage's images/s over its networks' limit, with the goal."""
    rate = stage.get("images_per_second")
    ratio = round(rate / limit, 3) if rate and limit else None
    return {"ratio": ratio, "target": _target(f"stage >= {STAGE_TO_NETWORK} x its networks' limit", ratio, STAGE_TO_NETWORK)}


def _view(stage: Any, keep: set[str]) -> Any:
    """The loaded vision stage with only the models in ``keep`` (yolo, blip, clip), sharing their weights: a stage that
    runs one model's share of the work without loading it again. CLIP scores BLIP's captions, so it comes with BLIP."""
    view = copy.copy(stage)
    if "yolo" not in keep:
        view.yolo = None
        view.direct = None
    if "blip" not in keep:
        view.blip = None
    if "clip" not in keep:
        view.clip = None
    return view


def _uploaded(stage: Any, images: list[Any], device: str) -> list[Any]:
    """The images as the stage's uint8 frames on the device, the upload finished."""
    frames, _ready = stage._upload(images)
    _sync(device)
    return frames


def _blip_network(stage: Any, frames: list[Any], calls: int, device: str, sampler: NvmlSampler,
                  outputs: list[Any] | None = None) -> dict[str, Any]:
    """BLIP's ``generate`` alone on pixel values already on the device, the stage's options and KV cache
    (``blip_cache``); with the decoding steps. ``outputs`` receives the warm-up call's tokens."""
    import torch

    inputs = stage._blip_inputs(frames)
    _sync(device)
    tokens = stage.captioner_options.max_new_tokens

    def generate() -> Any:
        return stage._generate(inputs)

    with torch.inference_mode():
        output = generate()
    if outputs is not None:
        outputs.append(output)
    prompt_length = int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else 1  # BLIP starts from [DEC]
    record = _network_rate(generate, len(frames), calls, device, sampler, warm=True)  # generate above: the warm-up
    record["decoding_steps"] = int(output.shape[1]) - prompt_length
    record["max_new_tokens"] = tokens
    record["kv_cache"] = stage.blip_cache
    return record


def _vision_models(stage: Any, device: str, images: list[Any], plan: Plan, sampler: NvmlSampler) -> dict[str, Any]:
    """Per vision model: the network alone on the device at the stage's batch, the stage running that model's share on
    decoded images, the ratio; and the whole vision stage against its three networks."""
    import torch

    batch = plan.vision_batch
    frames = _uploaded(stage, _cycle(images, 0, batch), device)
    networks: dict[str, dict[str, Any]] = {}
    if stage.direct is not None:
        letterboxed, _ = stage.direct.letterbox(frames)
        networks["yolo"] = _network_rate(lambda: stage.direct.model(letterboxed), batch, plan.network_calls, device,
                                         sampler)
    elif stage.yolo is not None:
        networks["yolo"] = {"unavailable": "an export (TFLite, ONNX, ...) runs through YOLO.predict from host images: "
                                           "there is no network to run alone on device tensors"}
    networks["blip"] = _blip_network(stage, frames, plan.network_calls, device, sampler)
    with torch.inference_mode():
        captions = stage._caption(frames)
        text = stage.clip_processor.tokenizer(captions, return_tensors="pt", padding=True, truncation=True,
                                              max_length=stage._clip_max_tokens)
        text = {key: value.to(stage.torch_device) for key, value in text.items()}
        pixels = stage._clip_pixels(frames, stage.torch_device, stage.dtype)
    networks["clip"] = _network_rate(lambda: stage.clip(pixel_values=pixels, **text), batch, plan.network_calls, device,
                                     sampler)
    del frames
    report: dict[str, Any] = {}
    for name, keep in VISION_VIEWS.items():
        measured = _stage_rate(_view(stage, set(keep)), device, images, batch, plan.stage_batches, sampler)
        limit = _limit([networks[model].get("images_per_second") for model in keep])
        report[name] = {"batch": batch, "dtype": str(stage.dtype).replace("torch.", ""), "stage_models": list(keep),
                        "networks": {model: networks[model] for model in keep}, "limit_images_per_second": limit,
                        "stage": measured, **_versus(measured, limit)}
    report["blip"]["attention"] = stage.blip_attention
    return report


def _ocr_network(stage: Any, device: str, chunks: list[list[Any]], replays: int, sampler: NvmlSampler) -> dict[str, Any]:
    """PP-OCR's three networks alone: every det/cls/rec pass the stage makes over ``chunks`` is recorded (its input
    tensor on the device, the detection's padding mask), then replayed on the device without any host work."""
    import torch

    runtime = getattr(stage.backend, "runtime", None)
    if runtime is None or not hasattr(runtime, "padding"):
        return {"unavailable": "the OCR stage is not on the torch runtime: its networks are not torch modules"}
    passes: list[tuple[str, Any, Any]] = []

    def recorder(net: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            padding = runtime.padding
            mask = (padding.canvas, padding.valid.clone()) if net == "det" and padding.canvas is not None else None
            passes.append((net, args[0].detach().clone(), mask))
        return hook

    hooks = [getattr(runtime, net).register_forward_pre_hook(recorder(net)) for net in ("det", "cls", "rec")]
    try:
        for chunk in chunks:
            stage.process_batch(_items(chunk))
    finally:
        for hook in hooks:
            hook.remove()

    def replay(net: str) -> None:
        module = getattr(runtime, net)
        for kind, tensor, mask in passes:
            if kind != net:
                continue
            if mask is not None:
                runtime.padding.set(*mask)
            try:
                with runtime._precision(net):
                    module(tensor)
            finally:
                runtime.padding.set(None, None)

    # The recording pass ran these very shapes already (cuDNN has planned them): every replay is timed, each network's
    # passes between two synchronisations, so the total is their sum and each one's share is known.
    per_network = {"det": 0.0, "cls": 0.0, "rec": 0.0}
    record: dict[str, Any] = {}
    with torch.inference_mode(), sampler.sampling(record):
        for _ in range(replays):
            for net in per_network:
                _sync(device)
                started = time.perf_counter()
                replay(net)
                _sync(device)
                per_network[net] += time.perf_counter() - started
    images = sum(len(chunk) for chunk in chunks)
    seconds = sum(per_network.values())
    record.update(batch=len(chunks[0]), calls=replays, images_per_replay=images, images=images * replays,
                  seconds=round(seconds, 4), images_per_second=_rate(images * replays, seconds),
                  passes=dict(Counter(net for net, _, _ in passes)),
                  seconds_per_replay={net: round(value / replays, 4) for net, value in per_network.items()})
    return record


def _ocr_models(stage: Any, device: str, images: list[Any], plan: Plan, sampler: NvmlSampler) -> dict[str, Any]:
    """OCR: det + cls + rec alone (the passes of the stage's own batches, replayed) against the stage on decoded images."""
    batch = plan.ocr_batch
    chunks = [_cycle(images, index * batch, batch) for index in range(plan.stage_batches)]
    network = _ocr_network(stage, device, chunks, plan.ocr_replays, sampler)
    measured = _stage_rate(stage, device, images, batch, plan.stage_batches, sampler, warm=True)  # the recording pass
    limit = network.get("images_per_second")
    return {"batch": batch, "stage_models": ["det", "cls", "rec"], "networks": {"det+cls+rec": network},
            "limit_images_per_second": limit, "stage": measured, **_versus(measured, limit)}


def _ocr_cudnn(device: str, images: list[Any], plan: Plan, precision: str) -> dict[str, Any]:
    """OCR on the torch runtime with cuDNN off, then on: ``cudnn_rounds`` rounds over the same ``cudnn_images`` images in
    batches of ``ocr_batch``, every round composing its batches differently (the images rotated), as changing batches
    do. The first round of a mode is cold (every shape new to the process, for cuDNN a new plan), the others warm.

    A stage of its own, loaded without the warm-up batch, so that no OCR shape ran before; off goes first, so that
    on's cold round still plans every shape (off's cold round pays the process's first launches of the other kernels).
    cuDNN's switch is process-wide: nothing else runs during this step, and it is restored after. Both modes' lines are
    compared. On a CPU cuDNN does not apply: both modes run the same kernels, and the verdicts are null.
    """
    import torch

    applicable = _on_cuda(device) and torch.backends.cudnn.is_available()
    batch, count = plan.ocr_batch, max(1, plan.cudnn_images)
    base = _cycle(images, 0, count)
    shift = batch // 2 + 1  # each round's batches mix images that were in different batches the round before
    record: dict[str, Any] = {
        "batch": batch, "images_per_round": count, "rounds": plan.cudnn_rounds, "precision": precision,
        "cudnn": {"applicable": applicable, "version": torch.backends.cudnn.version() if applicable else None,
                  "benchmark": bool(torch.backends.cudnn.benchmark) if applicable else None,
                  **({} if applicable else {"why": f"cuDNN does not apply on {device}: both modes run the same kernels"})},
    }
    texts: dict[str, list[list[str]]] = {}
    stage = _ocr_stage("torch", precision, device, batch, warm=False)
    enabled = torch.backends.cudnn.enabled
    try:
        # One untimed batch of another size with cuDNN off first: CUDA's lazy module loading and the allocator's
        # first growth are then paid by neither mode (else by the first, tilting "cold" towards the second).
        torch.backends.cudnn.enabled = False
        stage.process_batch(_items(base[: max(1, batch - 1)]))
        _sync(device)
        for mode in ("off", "on"):
            torch.backends.cudnn.enabled = mode == "on"
            rounds: list[dict[str, Any]] = []
            for number in range(max(1, plan.cudnn_rounds)):
                chosen = _cycle(base, number * shift, count)
                _sync(device)
                started = time.perf_counter()
                done = [item for start in range(0, count, batch)
                        for item in stage.process_batch(_items(chosen[start:start + batch]))]
                _sync(device)
                seconds = time.perf_counter() - started
                rounds.append({"round": number + 1, "images": count, "seconds": round(seconds, 4),
                               "images_per_second": _rate(count, seconds)})
                if number == 0:
                    texts[mode] = [[line["text"] for line in item.signals.get("ocr", {}).get("lines", [])]
                                   for item in done]
            warm = rounds[1:]
            warm_seconds = sum(entry["seconds"] for entry in warm)
            record[mode] = {"cold": rounds[0],
                            "warm": {"images": count * len(warm), "seconds": round(warm_seconds, 4),
                                     "images_per_second": _rate(count * len(warm), warm_seconds)} if warm else None,
                            "rounds": rounds, "lines": sum(len(lines) for lines in texts[mode])}
    finally:
        torch.backends.cudnn.enabled = enabled
        stage.teardown()
        _empty_cache(device)
    record["lines_identical"] = texts["on"] == texts["off"]
    faster: dict[str, str | None] = {}
    for phase in ("cold", "warm"):
        on = (record["on"].get(phase) or {}).get("images_per_second")
        off = (record["off"].get(phase) or {}).get("images_per_second")
        faster[phase] = ("on" if on >= off else "off") if applicable and on and off else None
    record["faster"] = faster
    verdicts = [value == "on" for value in faster.values() if value is not None]
    record["target"] = {"text": "cuDNN on (what the OCR runtime keeps) at least as fast as off, cold and warm, "
                                "reading the same lines",
                        "met": (all(verdicts) and record["lines_identical"]) if verdicts else None}
    return record


def _loader_rate(images_dir: Path, workers: int, files: int, max_side: int) -> dict[str, Any]:
    """The loader alone (read, hash, decode) on the source files, with the pipeline's number of worker threads."""
    from stages.base import ImageItem
    from stages.loader import LoaderOptions, LoaderStage

    paths = _cycle(_image_files(images_dir), 0, files)
    loader = LoaderStage(LoaderOptions(max_file_bytes=256 << 20, max_pixels=120_000_000, max_side=max_side))
    loader.setup("cpu")
    chunks = [paths[start:start + 16] for start in range(0, len(paths), 16)]
    with ThreadPoolExecutor(workers) as pool:
        started = time.perf_counter()
        done = list(pool.map(lambda chunk: loader.process_batch([ImageItem(key=i, source=str(p)) for i, p in
                                                                  enumerate(chunk)]), chunks))
        seconds = time.perf_counter() - started
    return {"workers": workers, "images": len(paths), "seconds": round(seconds, 3),
            "images_per_second": _rate(len(paths), seconds),
            "failed": sum(item.failure is not None for items in done for item in items)}


# --- BLIP at the batch it needs, the seeds' loop ----------------------------------------------------------------------


def _blip_batches(stage: Any, device: str, images: list[Any], plan: Plan, sampler: NvmlSampler) -> dict[str, Any]:
    """BLIP's network and BLIP's share of the stage at batch 32, 128 and the largest batch the vision stage's probe
    accepts (from ``VisionStage.max_auto_batch``, full-length captions, 90 % of the device's memory)."""
    ceiling = plan.blip_probe_ceiling or int(type(stage).max_auto_batch or 512)
    started = time.perf_counter()
    probed = int(stage.probe_batch_size(device, ceiling))
    probe_seconds = time.perf_counter() - started
    _empty_cache(device)
    runs = []
    view = _view(stage, {"blip"})
    for batch in sorted({*plan.blip_batches, probed}):
        frames = _uploaded(stage, _cycle(images, 0, batch), device)
        network = _blip_network(stage, frames, max(1, plan.network_calls - 1), device, sampler)
        del frames
        measured = _stage_rate(view, device, images, batch, plan.blip_stage_batches, sampler)
        runs.append({"batch": batch, "probed": batch == probed, "network": network, "stage": measured,
                     **_versus(measured, network.get("images_per_second"))})
        _empty_cache(device)
    best = max(runs, key=lambda run: run["stage"].get("images_per_second") or 0.0)
    return {"attention": stage.blip_attention, "dtype": str(stage.dtype).replace("torch.", ""),
            "probe": {"ceiling": ceiling, "batch": probed, "seconds": round(probe_seconds, 2)},
            "runs": runs, "best_stage_batch": best["batch"],
            "kv_cache": _guarded(lambda: _blip_caches(stage, device, images, min(plan.blip_batches),
                                                      max(1, plan.network_calls - 1), sampler))}


def _guarded(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A secondary measurement that must not cost the step its main figures: its error is recorded in its place."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - a library's API moved, say: say so, keep the rest of the step
        return {"error": f"{type(error).__name__}: {error}"}


def _blip_caches(stage: Any, device: str, images: list[Any], batch: int, calls: int, sampler: NvmlSampler
                 ) -> dict[str, Any]:
    """BLIP's ``generate`` alone at ``batch`` with the stage's dynamic KV cache and with a static self-attention cache
    (``VisionStage.blip_cache = "static"``), and whether both write the same tokens. transformers' own
    ``cache_implementation="static"`` fails on BLIP; without CUDA graphs a static cache saves no kernel launches, so
    this measures whether it is worth switching."""
    import torch

    static = copy.copy(stage)
    static.blip_cache = "static"
    frames = _uploaded(stage, _cycle(images, 0, batch), device)
    written: list[Any] = []
    records = {view.blip_cache: _blip_network(view, frames, calls, device, sampler, written) for view in (stage, static)}
    del frames
    _empty_cache(device)
    rates = {name: record.get("images_per_second") for name, record in records.items()}
    faster = max(rates, key=lambda name: rates[name] or 0.0) if all(rates.values()) else None
    return {"batch": batch, "stage_uses": stage.blip_cache, "networks": records,
            "identical_tokens": bool(torch.equal(written[0], written[1])), "faster": faster}


def _seeds_loop(ocr: Any, vision: Any, images: list[Any], thresholds: Any) -> dict[str, Any]:
    """Seed 000's loop on the same loaded stages: ``for image in images: ocr(image); yolo, blip, clip(image); decide``,
    one image at a time. Images are decoded before the clock (the loop is not charged for reading files) and nothing
    is written (no ledger, no placement): both keep the comparison in the loop's favour."""
    from stages.rules import decide

    warm = _items(images[:1])
    ocr.process_batch(warm)
    vision.process_batch(warm)
    spent = {"ocr": 0.0, "vision": 0.0}
    bins: Counter[str] = Counter()
    started = time.perf_counter()
    for item in _items(images):
        before = time.perf_counter()
        ocr.process_batch([item])
        middle = time.perf_counter()
        vision.process_batch([item])
        spent["ocr"] += middle - before
        spent["vision"] += time.perf_counter() - middle
        bins[decide(item.signals, thresholds).bin] += 1
    seconds = time.perf_counter() - started
    return {"images": len(images), "seconds": round(seconds, 3), "images_per_second": _rate(len(images), seconds),
            "stage_seconds": {name: round(value, 3) for name, value in spent.items()}, "bins": dict(bins),
            "decoded_before_the_clock": True}


# --- the pipeline -----------------------------------------------------------------------------------------------------


def _samples(metrics: Any, name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[label] = sample.value
    return found


def _by_labels(metrics: Any, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    found: dict[tuple[str, ...], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                key = tuple(sample.labels.get(k, "") for k in keys)
                found[key] = found.get(key, 0.0) + sample.value
    return found


@dataclass
class PipelineRun:
    """One pipeline run: the report's record and, beside it, each file's (bin, rule) for comparisons."""

    record: dict[str, Any]
    files: dict[str, tuple[str | None, str | None]]


def _pipeline(config: Any, paths: dict[str, str], images_dir: Path, scratch: Path, name: str, *,
              ocr_devices: list[str] | None, vision_devices: list[str], ocr_batch: int, vision_batch: int,
              precision: str, files: int, isolation: str, signals: str, loader_workers: int,
              sampler: NvmlSampler) -> PipelineRun:
    """The real pipeline (loader, OCR, vision, rules, ledger, placement) over copies of ``images_dir``.

    The clock starts once every stage is set up and warm; throughput is taken between the first and the last placed
    file (steady state) and from the clock's start; utilisation in the steady window. The run's own metrics registry
    is read while it runs, as Prometheus would: busy and host seconds per stage, and the ``binner_gpu_*`` series.
    """
    import anyio

    from app.build import intake_all
    from app.config import load_config
    from app.metrics import Metrics
    from app.service import run_async

    root = scratch / name
    _fill_inbox(images_dir, root / "inbox", files)
    ocr: dict[str, Any] = ({"enabled": False} if ocr_devices is None else
                           {"enabled": True, "backend": "rapidocr", "runtime": "auto", "devices": ocr_devices,
                            "batch_size": ocr_batch, "max_wait_ms": 20, "isolation": isolation,
                            "min_confidence": config.ocr.min_confidence, "max_side": config.ocr.max_side})
    v = config.vision
    overrides = {
        "input": root / "inbox", "output": root / "bins", "state_dir": root / "state", "placement": "move",
        "http": {"enabled": False}, "ocr": ocr, "limits": config.limits.model_dump(),
        "loader": {"workers": loader_workers, "batch_size": 16, "max_wait_ms": 10},
        "queues": {"load": 64, "ocr": 3 * ocr_batch, "vision": 3 * vision_batch, "sink": 256},
        "vision": {"devices": vision_devices, "batch_size": vision_batch, "max_wait_ms": 20, "precision": precision,
                   "backend": "models", "isolation": isolation,
                   "detector": {"enabled": True, "weights": paths["detector"], "confidence": v.detector.confidence},
                   "captioner": {"enabled": True, "model": paths["captioner"], "max_new_tokens": v.captioner.max_new_tokens},
                   "clip": {"enabled": True, "model": paths["clip"]}},
        "rules": {**config.rules.model_dump(), "signals": signals},
    }
    run_config = load_config(None, overrides)
    metrics = Metrics()
    outcomes: dict[str, tuple[str | None, str | None]] = {}

    def on_placed(row: Any, outcome: Any) -> None:
        outcomes[row.rel_path] = (outcome.bin if outcome.status == "done" else "quarantined", outcome.rule)

    runtime, times = clocked_runtime(run_config, metrics, on_placed)
    placed = times.placed
    intake_all(runtime)
    total, _ = runtime.ledger.backlog()
    record: dict[str, Any] = {"files": total, "isolation": isolation, "signals": signals, "ocr_devices": ocr_devices,
                              "vision_devices": vision_devices, "ocr_batch": ocr_batch if ocr_devices else None,
                              "vision_batch": vision_batch, "vision_precision": precision,
                              "loader_workers": loader_workers}
    clock: dict[str, float] = {}

    def steady() -> tuple[float, float] | None:
        times = sorted(placed.values())
        return (times[0], times[-1]) if len(times) >= 2 else None

    async def drive() -> Any:
        pipeline = runtime.local
        try:
            await pipeline.setup()
            clock["ready"] = time.perf_counter()
            peak = PeakRss()
            stats = await pipeline.run(until_idle=True)
            clock["rss"] = peak.mib()
            return stats
        finally:
            with anyio.CancelScope(shield=True):
                await pipeline.teardown()

    series = RegistrySeries(metrics.registry)
    started = time.perf_counter()
    try:
        with sampler.sampling(record, window=steady), series.sampling(record, window=steady):
            stats = run_async(drive)
        counts = runtime.ledger.counts()
    finally:
        runtime.close()
    elapsed = time.perf_counter() - started
    window = steady()
    span = (window[1] - window[0]) if window else 0.0
    ready = clock.get("ready", started)
    clocked = (max(placed.values()) - ready) if placed else 0.0
    busy = _by_labels(metrics, "binner_stage_busy_seconds_total", "stage", "device")
    host = _by_labels(metrics, "binner_stage_host_seconds_total", "stage", "phase")
    latency = latency_summary(times.latencies())
    record.update(
        finished=stats.finished, bins=dict(stats.bins), quarantined=dict(stats.quarantined), ledger=counts,
        seconds_including_model_load=round(elapsed, 2), model_load_seconds=round(ready - started, 2),
        seconds=round(clocked, 3), images_per_second=round((len(placed) - 1) / span, 2) if span > 0 else None,
        images_per_second_from_ready=_rate(len(placed), clocked),
        p50_latency_s=latency["p50_s"], p95_latency_s=latency["p95_s"], p99_latency_s=latency["p99_s"],
        peak_rss_mib=clock.get("rss"),
        stage_utilisation={f"{stage}@{device}": round(seconds / clocked, 3) for (stage, device), seconds in busy.items()
                           if clocked > 0},
        host_seconds={stage: {phase: round(seconds, 3) for (s, phase), seconds in host.items() if s == stage}
                      for stage in sorted({s for s, _ in host})},
        batch_size_limit=_samples(metrics, "binner_batch_size_limit"), oom_total=_samples(metrics, "binner_oom_total"),
        signals_skipped={f"{model}:{reason}": value for (model, reason), value in
                         _by_labels(metrics, "binner_signals_skipped_total", "model", "reason").items() if value},
        rules=_fractions(outcomes),
    )
    return PipelineRun(record, outcomes)


def _fractions(outcomes: dict[str, tuple[str | None, str | None]]) -> dict[str, float]:
    """The share of files each rule settled (``text_area``, ``confident_detection``, ...)."""
    rules = Counter(rule or bin_name or "?" for bin_name, rule in outcomes.values())
    total = sum(rules.values())
    return {rule: round(count / total, 4) for rule, count in sorted(rules.items())} if total else {}


def _bottleneck(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """The busiest stage of a pipeline run and the NVML name of its GPU (``gpu0``; None off CUDA)."""
    utilisation = record.get("stage_utilisation") or {}
    on_gpus = [key for key in utilisation if _on_cuda(key.split("@", 1)[1])]
    candidates = on_gpus or list(utilisation)  # the loader's threads can add up to more busy time than one GPU stage
    if not candidates:
        return None, None
    busiest = max(candidates, key=lambda key: utilisation[key])
    device = busiest.split("@", 1)[1]
    return busiest, (f"gpu{device.split(':', 1)[1] if ':' in device else 0}" if _on_cuda(device) else None)


def _judge_pipeline(record: dict[str, Any], alone: dict[str, float | None]) -> dict[str, Any]:
    """The pipeline's goals: its bottleneck GPU's NVML utilisation, and its images/s against its slowest stage alone."""
    busiest, gpu = _bottleneck(record)
    busy = ((record.get("gpu_utilisation") or {}).get(gpu) or {}).get("mean_util_pct") if gpu else None
    known = {stage: rate for stage, rate in alone.items() if rate}
    slowest = min(known, key=lambda stage: known[stage]) if known else None
    rate = record.get("images_per_second")
    ratio = round(rate / known[slowest], 3) if rate and slowest else None
    shared = _limit([known[stage] for stage in ("ocr", "vision") if stage in known]) if record.get("ocr_devices") \
        and record["ocr_devices"] == record.get("vision_devices") else None
    return {
        "bottleneck_stage": busiest, "bottleneck_gpu": gpu, "bottleneck_gpu_busy_pct": busy,
        "gpu_busy_target": _target(f"bottleneck GPU >= {GPU_BUSY_PCT:.0f}% busy (NVML, steady state)", busy, GPU_BUSY_PCT),
        "stages_alone_images_per_second": alone, "slowest_stage_alone": slowest,
        "ratio_to_slowest_stage": ratio,
        "ratio_target": _target(f"pipeline >= {PIPELINE_TO_SLOWEST} x its slowest stage alone", ratio, PIPELINE_TO_SLOWEST),
        "shared_device_limit_images_per_second": shared,
        "ratio_to_shared_device_limit": round(rate / shared, 3) if rate and shared else None,
    }


def _stages_alone(data: dict[str, Any], plan: Plan) -> dict[str, float | None]:
    """Each pipeline stage alone, at the pipeline's batch and precision, from this run's ``models`` step."""
    models = data.get("models") or {}

    def rate(*path: str) -> float | None:
        node: Any = models
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, (int, float)) else None

    return {"load": rate("load", "images_per_second"),
            "ocr": rate("ocr", plan.ocr_precisions[0], "stage", "images_per_second"),
            "vision": rate("vision", plan.vision_precisions[0], "stage", "images_per_second")}


def _needed_vs_all(needed: PipelineRun, reference: PipelineRun) -> dict[str, Any]:
    """``rules.signals: needed`` against ``all`` on the same files: identical bins, and what was skipped and why."""
    common = sorted(set(needed.files) & set(reference.files))
    differing = [{"file": path, "needed": needed.files[path][0], "all": reference.files[path][0]}
                 for path in common if needed.files[path][0] != reference.files[path][0]]
    files = needed.record.get("files") or 0
    skipped: dict[str, float] = {}
    for key, value in (needed.record.get("signals_skipped") or {}).items():
        model = key.split(":", 1)[0]
        skipped[model] = skipped.get(model, 0.0) + value
    same = len(common) - len(differing)
    speedup = (needed.record["images_per_second"] / reference.record["images_per_second"]
               if needed.record.get("images_per_second") and reference.record.get("images_per_second") else None)
    return {
        "files": files, "bins_identical": same, "of": len(common), "differing": differing[:50],
        "target": {"text": "every bin identical under signals: needed and all",
                   "met": bool(common) and same == len(common) and len(common) == files},
        "skipped_share": {model: round(count / files, 4) for model, count in sorted(skipped.items())} if files else {},
        "skipped": needed.record.get("signals_skipped"),
        "rules": {"needed": needed.record.get("rules"), "all": reference.record.get("rules")},
        "images_per_second": {"needed": needed.record.get("images_per_second"),
                              "all": reference.record.get("images_per_second")},
        "speedup": round(speedup, 3) if speedup else None,
        "needed_run": {key: needed.record.get(key) for key in ("finished", "seconds", "bins", "stage_utilisation")},
    }


# --- OCR bins CPU vs GPU, probes, forced OOM ------------------------------------------------------------------------


def _cpu_detections(images: list[Any], weights: str | None) -> list[list[dict[str, Any]]] | None:
    """The detector's findings on the CPU, shared by both sides of the OCR comparison."""
    from stages.base import BatchPolicy
    from stages.ultralytics_env import resolve_detector_weights
    from stages.vision import DetectorOptions, VisionStage

    if weights is None or resolve_detector_weights(weights) is None:
        return None
    stage = VisionStage(DetectorOptions(weights=weights), None, None, "fp32", ["cpu"], BatchPolicy(max_batch_size=8))
    stage.setup("cpu")
    try:
        return [signals["detections"] for signals in (stage.run_models([image])[0] for image in images)]
    finally:
        stage.teardown()


def _ocr_bins(images: list[Any], names: list[str], precisions: tuple[str, ...], torch_stage: Callable[[str], Any],
              thresholds: Any, detector_weights: str | None) -> dict[str, Any]:
    """Bins of each image with OCR from onnxruntime on the CPU against the torch runtime on the device
    (``torch_stage(precision)``: the loaded stage); the detections (one detector on the CPU) are the same on both
    sides, so only OCR can make a bin differ. A line never depends on the batch, so the stages' batch sizes do not
    matter here."""
    from stages.rules import decide

    def signals(stage: Any) -> list[dict[str, Any]]:
        batch = stage.batch_policy.max_batch_size or 8
        out: list[dict[str, Any]] = []
        for start in range(0, len(images), batch):
            out.extend(item.signals["ocr"] for item in stage.process_batch(_items(images[start:start + batch])))
        return out

    detections = _cpu_detections(images, detector_weights)
    extra = [{} if detections is None else {"detections": found} for found in (detections or [None] * len(images))]
    cpu_stage = _ocr_stage("onnxruntime", None, "cpu", 8)
    try:
        reference = signals(cpu_stage)
    finally:
        cpu_stage.teardown()
    report: dict[str, Any] = {"images": len(images), "detector_on_cpu": detector_weights if detections else None}
    for precision in precisions:
        found = signals(torch_stage(precision))
        same_bins = lines_same = lines_total = 0
        differing: list[dict[str, Any]] = []
        for name, cpu, gpu, more in zip(names, reference, found, extra):
            cpu_bin = decide({"ocr": cpu, **more}, thresholds).bin
            gpu_bin = decide({"ocr": gpu, **more}, thresholds).bin
            same_bins += cpu_bin == gpu_bin
            cpu_lines = [line["text"] for line in cpu["lines"]]
            gpu_lines = {line["text"] for line in gpu["lines"]}
            lines_total += len(cpu_lines)
            lines_same += sum(text in gpu_lines for text in cpu_lines)
            if cpu_bin != gpu_bin:
                differing.append({"file": name, "cpu": str(cpu_bin), "gpu": str(gpu_bin)})
        report[precision] = {"bins_identical": same_bins, "of": len(names), "differing": differing,
                             "cpu_lines_found_identically": lines_same, "cpu_lines": lines_total,
                             "gpu_lines": sum(len(gpu["lines"]) for gpu in found),
                             "target": {"text": "every bin identical (torch on the device against onnxruntime on the "
                                                "CPU)", "met": same_bins == len(names)}}
    return report


def _ocr_probe(stage: Any, device: str, ceiling: int) -> dict[str, Any]:
    """``batch_size: auto`` for OCR on the loaded torch stage: worst-case pages (``max_side`` squares of dense text),
    doubling while they fit (the CPU answers its ceiling)."""
    started = time.perf_counter()
    batch = stage.probe_batch_size(device, ceiling)
    _empty_cache(device)
    return {"ceiling": ceiling, "batch": batch, "seconds": round(time.perf_counter() - started, 2)}


def _forced_oom(config: Any, paths: dict[str, str], images_dir: Path, scratch: Path, device: str, plan: Plan,
                sampler: NvmlSampler) -> dict[str, Any]:
    """Cap this process's CUDA memory just above what a small vision batch needs, then run a batch of ``oom_batch``
    through the real engine: it must halve its cap on each out-of-memory error and finish every item."""
    if not _on_cuda(device):
        return {"skipped": "needs CUDA (torch.cuda.set_per_process_memory_fraction)",
                "target": {"text": "every file finished after backing off", "met": None}}
    import torch

    index = torch.device(device).index or 0
    stage = _vision_stage(paths, "fp16", device, config, 4)
    try:
        small = stage._dummy_images(4)
        torch.cuda.synchronize(index)
        weights = torch.cuda.memory_allocated(index)
        torch.cuda.reset_peak_memory_stats(index)
        stage.run_models(small, worst_case=True)
        peak_small = torch.cuda.max_memory_allocated(index)
    finally:
        stage.teardown()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(index).total_memory
    allowed = weights + 2.0 * (peak_small - weights) + (256 << 20)
    fraction = min(0.95, allowed / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    try:
        run = _pipeline(config, paths, images_dir, scratch, "forced-oom", ocr_devices=None, vision_devices=[device],
                        ocr_batch=plan.ocr_batch, vision_batch=plan.oom_batch, precision="fp16", files=plan.oom_files,
                        isolation="thread", signals="all", loader_workers=plan.loader_workers, sampler=sampler)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    record = run.record
    caps = [value for labels, value in record["batch_size_limit"].items() if "stage=vision" in labels]
    record.update(memory_fraction=round(fraction, 4), allowed_mib=round(allowed / 2**20),
                  model_weights_mib=round(weights / 2**20), peak_batch4_mib=round(peak_small / 2**20),
                  every_item_finished=record["finished"] == record["files"])
    backed_off = bool(caps) and max(caps) < plan.oom_batch
    record["target"] = {"text": f"the batch cap backs off below {plan.oom_batch} and every file is finished",
                        "met": record["every_item_finished"] and backed_off}
    return record


# --- goals ----------------------------------------------------------------------------------------------------------


def _goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure of the run that has a target, with its value and ``met``: nothing missed is left out."""
    goals: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: dict[str, Any] | None) -> None:
        if isinstance(target, dict) and "met" in target:
            goals.append({"goal": name, "value": value, "text": target.get("text"), "met": target.get("met")})

    models = data.get("models") or {}
    for model in ("yolo", "blip", "clip", "vision", "ocr"):
        for precision, record in sorted((models.get(model) or {}).items()):
            if isinstance(record, dict):
                add(f"models.{model}.{precision}", record.get("ratio"), record.get("target"))
    for run in (data.get("blip_batches") or {}).get("runs") or []:
        add(f"blip_batches.{run['batch']}", run.get("ratio"), run.get("target"))
    cudnn = data.get("ocr_cudnn") or {}
    add("ocr_cudnn.on_not_slower", cudnn.get("faster"), cudnn.get("target"))
    blip_cache = (data.get("blip_batches") or {}).get("kv_cache") or {}
    if isinstance(blip_cache, dict) and "identical_tokens" in blip_cache:
        add("blip_batches.kv_cache.identical_tokens", blip_cache["identical_tokens"],
            {"text": "a static KV cache writes the dynamic cache's tokens", "met": blip_cache["identical_tokens"]})
    seeds = data.get("seeds_loop") or {}
    add("seeds_loop.speedup", seeds.get("speedup"), seeds.get("target"))
    for mode, record in sorted((data.get("pipeline") or {}).items()):
        if isinstance(record, dict):
            add(f"pipeline.{mode}.bottleneck_gpu_busy_pct", record.get("bottleneck_gpu_busy_pct"),
                record.get("gpu_busy_target"))
            add(f"pipeline.{mode}.ratio_to_slowest_stage", record.get("ratio_to_slowest_stage"), record.get("ratio_target"))
    needed = data.get("signals_needed_vs_all") or {}
    add("signals_needed_vs_all.bins_identical", needed.get("bins_identical"), needed.get("target"))
    for precision, record in sorted((data.get("ocr_bins_cpu_vs_gpu") or {}).items()):
        if isinstance(record, dict):
            add(f"ocr_bins_cpu_vs_gpu.{precision}", record.get("bins_identical"), record.get("target"))
    oom = data.get("forced_oom_backoff") or {}
    add("forced_oom_backoff", oom.get("finished"), oom.get("target"))
    return goals


def _conclude(data: dict[str, Any], plan: Plan) -> None:
    """Cross-step figures (the pipeline against the seeds' loop and against its stages alone), the keys every
    scenario has (from the thread-isolated pipeline), and the verdict over every goal."""
    pipelines = data.get("pipeline") or {}
    alone = _stages_alone(data, plan)
    for record in pipelines.values():
        if isinstance(record, dict) and "files" in record:
            record.update(_judge_pipeline(record, alone))
    main = pipelines.get("thread") if isinstance(pipelines.get("thread"), dict) else {}
    seeds = data.get("seeds_loop")
    if isinstance(seeds, dict) and "images_per_second" in seeds:
        rate, loop = main.get("images_per_second"), seeds.get("images_per_second")
        speedup = round(rate / loop, 2) if rate and loop else None
        seeds.update(pipeline_images_per_second=rate, speedup=speedup,
                     target=_target(f"pipeline >= {PIPELINE_TO_SEEDS:.0f}x the seeds' loop", speedup, PIPELINE_TO_SEEDS))
    goals = _goals(data)
    data["goals"] = goals
    verdicts = [goal["met"] for goal in goals if goal["met"] is not None]
    missed = [goal["goal"] for goal in goals if goal["met"] is False]
    data["target"] = {"text": "every goal in `goals` (stage >= 0.7 x networks, pipeline >= 20x the seeds' loop, "
                              "bottleneck GPU >= 80% busy, pipeline >= 0.9 x slowest stage, identical bins, OOM back-off)",
                      "met": (not missed) if verdicts else None, "missed": missed}
    data["images_per_second"] = main.get("images_per_second")
    data["p95_latency_s"] = main.get("p95_latency_s")
    data["stage_utilisation"] = main.get("stage_utilisation") or {}
    data["peak_rss_mib"] = main.get("peak_rss_mib")


# --- the scenario ---------------------------------------------------------------------------------------------------


def run_gpu_scenario(config: Any, source: Path | None, partial_path: Path | None = None,
                     budget_s: float | None = None, quick: bool = False, *, device: str | None = None,
                     paths: dict[str, str] | None = None, plan: Plan | None = None) -> dict[str, Any]:
    """Every step of the plan that fits its budget; returns the scenario's dict (see the module doc).

    ``device``, ``paths`` and ``plan`` are for tests (the CLI passes none of them): ``device="cpu"`` runs every step that
    does not need CUDA on the CPU, ``paths`` replaces the vision weights, ``plan`` the sizes.
    """
    import torch

    from app.logs import configure_logging
    from stages.torch_compat import ensure_torchvision
    from stages.ultralytics_env import prepare_ultralytics

    if device is None:
        if not torch.cuda.is_available():
            raise BenchUnavailable("--scenario gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                                   "(check the driver, CUDA_VISIBLE_DEVICES and that torch is a CUDA build)")
        device = "cuda:0"
    plan = plan or (QUICK if quick else FULL)
    ensure_torchvision()
    configure_logging("console", "warning", sys.stderr)  # 4 pipeline runs' per-file lines would bury the step lines
    if partial_path is None and os.environ.get("BINNER_BENCH_PARTIAL"):
        partial_path = Path(os.environ["BINNER_BENCH_PARTIAL"])  # where a cut-off run leaves what it measured
    report = _Report(partial_path, plan.budget_s if budget_s is None else budget_s)
    data = report.data
    data.update(quick=plan.name == "quick", plan=plan.describe(), device=device)
    sampler = NvmlSampler()
    if not sampler.available:
        data["notes"].append("NVML unavailable: no utilisation samples")
    gpus = torch.cuda.device_count() if _on_cuda(device) else 0
    main_vision, main_ocr = plan.vision_precisions[0], plan.ocr_precisions[0]
    with tempfile.TemporaryDirectory(prefix="binner-bench-gpu-") as scratch_name:
        scratch = Path(scratch_name)
        prepare_ultralytics(scratch / "ultralytics")
        paths = dict(paths) if paths is not None else _standin_paths(config, scratch, data["notes"])
        data["models_used"] = paths
        count = max(plan.vision_batch, plan.ocr_batch) * max(plan.stage_batches, 1)
        images, names = _decode(source, count, config.limits.max_side)
        unique = images[:len(names)]
        images_dir = source if source is not None and source.is_dir() else _write_images(unique, names, scratch)
        data["source"] = {"dir": str(images_dir), "images": len(names)}
        loaded = _Loaded(paths, device, plan, config)
        try:
            report.step("models.load", lambda: _loader_rate(images_dir, plan.loader_workers, plan.loader_files,
                                                            config.limits.max_side))
            report.step(f"models.vision.{main_vision}", lambda: _vision_models(loaded.vision(main_vision), device,
                                                                              images, plan, sampler),
                        place=_vision_placer(data, main_vision))
            report.step("ocr_cudnn", lambda: _ocr_cudnn(device, unique, plan, main_ocr))  # before any OCR shape ran
            report.step(f"models.ocr.{main_ocr}", lambda: _ocr_models(loaded.ocr(main_ocr), device, images, plan, sampler))
            report.step("blip_batches", lambda: _blip_batches(loaded.vision(main_vision), device, images, plan, sampler))
            report.step("seeds_loop", lambda: _seeds_loop(loaded.ocr(main_ocr), loaded.vision(main_vision),
                                                          _cycle(unique, 0, plan.seeds_images), config.rules))
            bins_images = unique[:plan.ocr_bins_images] if plan.ocr_bins_images else unique
            report.step("ocr_bins_cpu_vs_gpu", lambda: _ocr_bins(
                bins_images, names[:len(bins_images)], plan.ocr_precisions, loaded.ocr, config.rules,
                _runnable_detector(config.vision.detector.weights, paths["detector"])))
            report.step("auto_batch_probe.ocr", lambda: _ocr_probe(loaded.ocr(main_ocr), device, plan.ocr_probe_ceiling))
            for precision in plan.ocr_precisions[1:]:  # the full plan's other precisions (loaded for the bins above)
                report.step(f"models.ocr.{precision}", lambda: _ocr_models(loaded.ocr(precision), device, images, plan,
                                                                           sampler))
            loaded.release("ocr:")
            for precision in plan.vision_precisions[1:]:
                loaded.release("vision:")
                report.step(f"models.vision.{precision}", lambda: _vision_models(loaded.vision(precision), device,
                                                                                images, plan, sampler),
                            place=_vision_placer(data, precision))
        finally:
            loaded.release()  # the pipelines load their own copies
        runs: dict[str, PipelineRun] = {}

        def pipeline(name: str, isolation: str, signals: str) -> dict[str, Any]:
            run = _pipeline(config, paths, images_dir, scratch, name, ocr_devices=[device], vision_devices=[device],
                            ocr_batch=plan.ocr_batch, vision_batch=plan.vision_batch, precision=main_vision,
                            files=plan.pipeline_files, isolation=isolation, signals=signals,
                            loader_workers=plan.loader_workers, sampler=sampler)
            runs[name] = run
            return run.record

        report.step("pipeline.thread", lambda: pipeline("thread", "thread", "all"))
        _conclude(data, plan)  # the partial report gets the pipeline's verdicts at once
        report.step("pipeline.process", lambda: pipeline("process", "process", "all"))
        _conclude(data, plan)

        def needed_vs_all() -> dict[str, Any]:
            if "thread" not in runs:
                pipeline("thread", "thread", "all")
            pipeline("needed", "thread", "needed")
            return _needed_vs_all(runs["needed"], runs["thread"])

        report.step("signals_needed_vs_all", needed_vs_all)
        report.step("forced_oom_backoff", lambda: _forced_oom(config, paths, images_dir, scratch, device, plan, sampler))
        if gpus >= 2:
            def two_gpus() -> dict[str, Any]:
                run = _pipeline(config, paths, images_dir, scratch, "two-gpus", ocr_devices=["cuda:0"],
                                vision_devices=["cuda:1"], ocr_batch=plan.ocr_batch, vision_batch=plan.vision_batch,
                                precision=main_vision, files=plan.pipeline_files, isolation="process", signals="all",
                                loader_workers=plan.loader_workers, sampler=sampler)
                return run.record

            report.step("pipeline_two_gpus", two_gpus)
        else:
            data["pipeline_two_gpus"] = {"skipped": f"{gpus} CUDA GPU(s) here; needs 2"}
    _conclude(data, plan)
    data["seconds"] = round(time.monotonic() - report.started, 1)
    report.flush()
    return data


def _vision_placer(data: dict[str, Any], precision: str) -> Callable[[Any], None]:
    """Where a vision step's records go: ``models.<model>.<precision>``; an error or a skip goes to each of them."""

    def place(value: Any) -> None:
        models = data.setdefault("models", {})
        measured = isinstance(value, dict) and set(VISION_VIEWS) <= value.keys()
        for model in VISION_VIEWS:
            models.setdefault(model, {})[precision] = value[model] if measured else value

    return place


def _runnable_detector(configured: str | None, standin: str) -> str:
    """The configured detector where it is on disk, else the stand-in: both sides of the OCR comparison share it."""
    from stages.ultralytics_env import resolve_detector_weights

    return configured if configured and resolve_detector_weights(configured) is not None else standin
