"""`binner bench --scenario gpu`: what only a GPU can show, in one command of a few minutes.

It measures, on the CUDA devices of this machine:
- each model alone (OCR on the torch runtime, YOLO, BLIP, CLIP) at batch 1, 8 and 32, in fp16 and fp32;
- the whole pipeline with both model stages on one GPU (and OCR / vision on two GPUs where two exist);
- GPU utilisation sampled with NVML every 0.2 s per GPU during each of those runs;
- the ``batch_size: auto`` probes of both model stages;
- a forced out-of-memory back-off (``torch.cuda.set_per_process_memory_fraction``) through the real engine,
  which must converge to a smaller batch without losing an item;
- OCR bins on the source images: the torch runtime on CUDA against onnxruntime on the CPU.

Where the configured BLIP/CLIP/YOLO weights are not on the machine, randomly initialised models of the real
architectures (BLIP base, CLIP ViT-B/32, YOLOv8n) stand in, and the report says so: their throughput and
memory are the real ones, their captions are not. Captions are generated to full length (``min_new_tokens``),
the worst case, so figures do not depend on when a random model happens to emit its end token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from app.bench.common import BenchUnavailable

BATCHES = (1, 8, 32)
PRECISIONS = ("fp16", "fp32")
OCR_PRECISIONS = ("fp16", "fp32", "auto")  # auto: the shipped default per network (det fp32, cls and rec fp16)
SAMPLE_PERIOD_S = 0.2
DEFAULT_BUDGET_S = 420.0  # stop starting new measurements after this, so the command ends inside 8 minutes


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
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


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
        paths = [p for p in sorted(source.rglob("*")) if p.is_file() and p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}]
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


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _throughput(run: Callable[[list[Any]], Any], images: list[Any], batch: int, sampler: NvmlSampler) -> dict[str, Any]:
    """images/s of ``run`` over ``images`` in chunks of ``batch`` (after one warm-up chunk), with NVML samples."""
    run(images[:batch])
    _cuda_sync()
    record: dict[str, Any] = {"batch": batch, "images": len(images)}
    with sampler.sampling(record):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            run(images[start:start + batch])
        _cuda_sync()
        elapsed = time.perf_counter() - started
    record["seconds"] = round(elapsed, 3)
    record["images_per_second"] = round(len(images) / elapsed, 2)
    return record


def _count_for(batch: int) -> int:
    return max(16, 2 * batch)


class _Report:
    """The scenario's dict, written to ``partial_path`` after every step so that a cut-off run keeps its figures."""

    def __init__(self, partial_path: Path | None, budget_s: float) -> None:
        self.data: dict[str, Any] = {"stack": _stack(), "notes": []}
        self.partial_path = partial_path
        self.deadline = time.monotonic() + budget_s

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def step(self, key: str, fn: Callable[[], Any]) -> None:
        if self.out_of_time():
            self.data[key] = {"skipped": "time budget of the scenario spent"}
        else:
            started = time.monotonic()
            try:
                self.data[key] = fn()
            except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
                self.data[key] = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
            print(f"[bench gpu] {key}: {time.monotonic() - started:.1f} s", flush=True)
        self.flush()

    def flush(self) -> None:
        if self.partial_path is not None:
            self.partial_path.write_text(json.dumps(self.data, indent=2, default=str))


def _ocr_options(runtime: str, precision: str | None = None, **extra: Any) -> Any:
    from stages.ocr import OcrOptions

    known = {f.name for f in fields(OcrOptions)}
    wanted: dict[str, Any] = {"backend": "rapidocr", **extra}
    if "runtime" in known:
        wanted["runtime"] = runtime
    if precision is not None and "precision" in known:
        from stages.ppocr_torch import OcrPrecision

        wanted["precision"] = OcrPrecision(det=precision, cls=precision, rec=precision)
    return OcrOptions(**{key: value for key, value in wanted.items() if key in known})


def _ocr_stage(runtime: str, precision: str | None, device: str, batch: int) -> Any:
    from stages.base import BatchPolicy
    from stages.ocr import OcrStage

    stage = OcrStage(_ocr_options(runtime, precision), [device], BatchPolicy(max_batch_size=batch))
    stage.setup(device)
    stage.warmup()
    return stage


def _items(images: list[Any]) -> list[Any]:
    from stages.base import ImageItem

    return [ImageItem(key=index, source=f"mem:{index}", image=image) for index, image in enumerate(images)]


def _ocr_models(images: list[Any], device: str, sampler: NvmlSampler) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for precision in OCR_PRECISIONS:
        stage = _ocr_stage("torch", precision, device, max(BATCHES))
        try:
            runs = [_throughput(lambda chunk: stage.process_batch(_items(chunk)), images[:_count_for(b)], b, sampler)
                    for b in BATCHES]
        finally:
            stage.teardown()
        results[precision] = runs
    return results


def _vision_stage(paths: dict[str, str], precision: str, device: str, max_new_tokens: int) -> Any:
    from stages.base import BatchPolicy
    from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage

    stage = VisionStage(
        DetectorOptions(weights=paths["detector"], confidence=0.25, image_size=640),
        CaptionerOptions(model=paths["captioner"], max_new_tokens=max_new_tokens),
        ClipOptions(model=paths["clip"]),
        precision, [device], BatchPolicy(max_batch_size=max(BATCHES)),
    )
    stage.setup(device)
    stage.warmup()
    return stage


def _vision_models(images: list[Any], paths: dict[str, str], device: str, sampler: NvmlSampler,
                   max_new_tokens: int) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {"yolo": {}, "blip": {}, "clip": {}}
    for precision in PRECISIONS:
        stage = _vision_stage(paths, precision, device, max_new_tokens)
        captions = ["a photo of a street with people and a bus"] * len(images)
        try:
            with torch.inference_mode():
                results["yolo"][precision] = [
                    _throughput(stage._detect, images[:_count_for(b)], b, sampler) for b in BATCHES]
                results["blip"][precision] = [
                    _throughput(lambda chunk: stage._caption(chunk, min_new_tokens=max_new_tokens),
                                images[:_count_for(b)], b, sampler) for b in BATCHES]
                results["clip"][precision] = [
                    _throughput(lambda chunk: stage._similarity(chunk, captions[:len(chunk)]),
                                images[:_count_for(b)], b, sampler) for b in BATCHES]
        finally:
            stage.teardown()
    results["blip_tokens_per_caption"] = max_new_tokens
    return results


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
                     "for the configured detector (a .pt is needed to run on CUDA)")
    if paths["captioner"] in missing:
        paths["captioner"] = str(build_blip(scratch / "blip-base-random", "base"))
        notes.append("BLIP: randomly initialised BLIP base architecture (real weights absent): real throughput, "
                     "gibberish captions")
    if paths["clip"] in missing:
        paths["clip"] = str(build_clip(scratch / "clip-vit-b32-random", "base"))
        notes.append("CLIP: randomly initialised CLIP ViT-B/32 architecture (real weights absent): real throughput, "
                     "meaningless similarities")
    return paths


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic"}


def _fill_inbox(images_dir: Path, inbox: Path, at_least: int) -> int:
    """Copies of the image files of ``images_dir`` (repeated until ``at_least``) under ``inbox``."""
    images_dir = images_dir.resolve()
    files = [p for p in sorted(images_dir.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    copies = 0
    repeat = 0
    while copies < at_least and files:
        for path in files:
            target = inbox / f"r{repeat}" / path.relative_to(images_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            copies += 1
        repeat += 1
    return copies


def _pipeline(config: Any, paths: dict[str, str], images_dir: Path, scratch: Path, name: str,
              ocr_devices: list[str] | None, vision_devices: list[str], batch: int | str, sampler: NvmlSampler,
              ocr_batch: int | str = 16, precision: str = "auto", files: int = 240,
              isolation: str = "thread") -> dict[str, Any]:
    """The real pipeline (loader, OCR, vision, rules, ledger, placement) over copies of ``images_dir``.

    Throughput and utilisation are taken between the first and the last placed file (steady state, without
    model loading); the wall time including model loading is reported beside them.
    """
    from app.build import build_runtime, intake_all
    from app.config import load_config
    from app.metrics import Metrics
    from app.once import run_to_idle

    root = scratch / name
    _fill_inbox(images_dir, root / "inbox", files)
    v = config.vision
    ocr: dict[str, Any] = ({"enabled": False} if ocr_devices is None else
                           {"enabled": True, "devices": ocr_devices, "batch_size": ocr_batch, "max_wait_ms": 20})
    if ocr_devices is not None and "runtime" in type(config.ocr).model_fields:
        ocr["runtime"] = "auto"
    isolated = "isolation" in type(config.vision).model_fields
    if isolated and ocr_devices is not None:
        ocr["isolation"] = isolation
    overrides = {
        "input": root / "inbox", "output": root / "bins", "state_dir": root / "state", "placement": "move",
        "http": {"enabled": False}, "ocr": ocr,
        "queues": {"load": 64, "ocr": 2 * (ocr_batch if isinstance(ocr_batch, int) else 32),
                   "vision": 2 * (batch if isinstance(batch, int) else 32), "sink": 128},
        "vision": {"devices": vision_devices, "batch_size": batch, "max_wait_ms": 20, "precision": precision,
                   "backend": "models", **({"isolation": isolation} if isolated else {}),
                   "detector": {"enabled": True, "weights": paths["detector"], "confidence": v.detector.confidence},
                   "captioner": {"enabled": True, "model": paths["captioner"], "max_new_tokens": v.captioner.max_new_tokens},
                   "clip": {"enabled": True, "model": paths["clip"]}},
        "rules": {"signals": "all"},
    }
    run_config = load_config(None, overrides)
    metrics = Metrics()
    finished_at: list[float] = []
    runtime = build_runtime(run_config, metrics=metrics, on_finished=lambda row, outcome: finished_at.append(time.perf_counter()))
    intake_all(runtime)
    total, _ = runtime.ledger.backlog()
    record: dict[str, Any] = {"files": total, "ocr_devices": ocr_devices, "vision_devices": vision_devices,
                              "vision_batch_size": batch, "isolation": isolation if isolated else "thread"}

    def steady_window() -> tuple[float, float] | None:
        return (finished_at[0], finished_at[-1]) if len(finished_at) >= 2 else None

    with sampler.sampling(record, window=steady_window):
        started = time.perf_counter()
        stats = run_to_idle(runtime, total, False)
        elapsed = time.perf_counter() - started
    counts = runtime.ledger.counts()
    runtime.close()
    window = steady_window()
    span = (window[1] - window[0]) if window else 0.0
    record.update(
        finished=stats.finished, seconds_including_model_load=round(elapsed, 2),
        images_per_second=round((len(finished_at) - 1) / span, 2) if span > 0 else None,
        ledger=counts, batch_size_limit=_samples(metrics, "binner_batch_size_limit"),
        oom_total=_samples(metrics, "binner_oom_total"),
        stage_utilisation={k: round(v / span, 3) for k, v in
                           _samples(metrics, "binner_stage_busy_seconds_total").items()} if span > 0 else None,
    )
    return record


def _samples(metrics: Any, name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[label] = sample.value
    return found


def _probes(paths: dict[str, str], device: str, ceiling: int, max_new_tokens: int) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {"ceiling": ceiling}
    for name, load in (("ocr", lambda: _ocr_stage("torch", None, device, ceiling)),
                        ("vision", lambda: _vision_stage(paths, "fp16", device, max_new_tokens))):
        loaded = load()
        try:
            started = time.perf_counter()
            found[name] = loaded.probe_batch_size(device, ceiling)
            found[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
        finally:
            loaded.teardown()
        torch.cuda.empty_cache()
    return found


def _forced_oom(config: Any, paths: dict[str, str], images_dir: Path, scratch: Path, device: str,
                sampler: NvmlSampler, max_new_tokens: int) -> dict[str, Any]:
    """Cap this process's CUDA memory just above what a small vision batch needs, then run a batch of 64
    through the real engine: it must halve its cap on each out-of-memory error and finish every item."""
    import torch

    index = torch.device(device).index or 0
    stage = _vision_stage(paths, "fp16", device, max_new_tokens)
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
        record = _pipeline(config, paths, images_dir, scratch, "forced-oom", None, [device], 64, sampler, files=128)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    record["memory_fraction"] = round(fraction, 4)
    record["allowed_mib"] = round(allowed / 2**20)
    record["model_weights_mib"] = round(weights / 2**20)
    record["peak_batch4_mib"] = round(peak_small / 2**20)
    record["every_item_finished"] = record["finished"] == record["files"]
    return record


def _cpu_detections(images: list[Any], weights: str | None) -> list[list[dict[str, Any]]] | None:
    """The configured detector's findings on the CPU, shared by both sides of the OCR comparison."""
    from stages.base import BatchPolicy
    from stages.ultralytics_env import resolve_detector_weights
    from stages.vision import DetectorOptions, VisionStage

    if weights is None or resolve_detector_weights(weights) is None:
        return None
    stage = VisionStage(DetectorOptions(weights=weights), None, None, "fp32", ["cpu"], BatchPolicy(max_batch_size=8))
    stage.setup("cpu")
    try:
        return [stage._detect([image])[0] for image in images]
    finally:
        stage.teardown()


def _ocr_bins(images: list[Any], names: list[str], device: str, thresholds: Any,
              detector_weights: str | None) -> dict[str, Any]:
    """Bins of each image with OCR from onnxruntime on the CPU against the torch runtime on ``device``; the
    detections (the configured detector on the CPU, where it is on disk) are the same on both sides."""
    from stages.rules import decide

    def signals(runtime: str, where: str, precision: str | None) -> list[dict[str, Any]]:
        stage = _ocr_stage(runtime, precision, where, 8)
        try:
            out: list[dict[str, Any]] = []
            for start in range(0, len(images), 8):
                out.extend(item.signals["ocr"] for item in stage.process_batch(_items(images[start:start + 8])))
            return out
        finally:
            stage.teardown()

    detections = _cpu_detections(images, detector_weights)
    extra = [{} if detections is None else {"detections": found} for found in (detections or [None] * len(images))]
    reference = signals("onnxruntime", "cpu", None)
    report: dict[str, Any] = {"images": len(images), "detector_on_cpu": detector_weights if detections else None}
    for precision in OCR_PRECISIONS:
        found = signals("torch", device, precision)
        same_bins = 0
        lines_same = lines_total = 0
        differing: list[dict[str, Any]] = []
        bins: dict[str, str] = {}
        for name, cpu, gpu, more in zip(names, reference, found, extra):
            cpu_bin = decide({"ocr": cpu, **more}, thresholds).bin
            gpu_bin = decide({"ocr": gpu, **more}, thresholds).bin
            bins[name] = str(gpu_bin)
            same_bins += cpu_bin == gpu_bin
            cpu_lines = [line["text"] for line in cpu["lines"]]
            gpu_lines = {line["text"] for line in gpu["lines"]}
            lines_total += len(cpu_lines)
            lines_same += sum(text in gpu_lines for text in cpu_lines)
            if cpu_bin != gpu_bin:
                differing.append({"file": name, "cpu": str(cpu_bin), "gpu": str(gpu_bin)})
        report[precision] = {"bins_identical": same_bins, "of": len(names), "differing": differing,
                             "cpu_lines_found_identically": lines_same, "cpu_lines": lines_total, "bins": bins}
    return report


def run_gpu_scenario(config: Any, source: Path | None, partial_path: Path | None = None,
                     budget_s: float = DEFAULT_BUDGET_S) -> dict[str, Any]:
    """Run every GPU measurement that fits the budget and return the scenario's dict (see the module doc)."""
    import torch

    from stages.torch_compat import ensure_torchvision
    from stages.ultralytics_env import prepare_ultralytics

    if not torch.cuda.is_available():
        raise BenchUnavailable("--scenario gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                           "(check the driver, CUDA_VISIBLE_DEVICES and that torch is a CUDA build)")
    ensure_torchvision()
    if partial_path is None and os.environ.get("BINNER_BENCH_PARTIAL"):
        partial_path = Path(os.environ["BINNER_BENCH_PARTIAL"])  # where a cut-off run leaves what it measured
    report = _Report(partial_path, budget_s)
    sampler = NvmlSampler()
    if not sampler.available:
        report.data["notes"].append("NVML unavailable: no utilisation samples")
    gpus = torch.cuda.device_count()
    device = "cuda:0"
    max_new_tokens = int(config.vision.captioner.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="binner-bench-gpu-") as scratch_name:
        scratch = Path(scratch_name)
        prepare_ultralytics(scratch / "ultralytics")
        paths = _standin_paths(config, scratch, report.data["notes"])
        images, names = _decode(source, _count_for(max(BATCHES)), config.limits.max_side)
        images_dir = source if source is not None and source.is_dir() else _write_images(images[:len(names)], names, scratch)
        unique = images[:len(names)]
        report.data["source"] = {"dir": str(images_dir), "images": len(names)}
        report.step("ocr_bins_cpu_vs_gpu", lambda: _ocr_bins(unique, names, device, config.rules,
                                                             config.vision.detector.weights))
        report.step("ocr", lambda: _ocr_models(images, device, sampler))
        report.step("vision", lambda: _vision_models(images, paths, device, sampler, max_new_tokens))
        report.step("pipeline_one_gpu", lambda: _pipeline(config, paths, images_dir, scratch, "one-gpu", [device],
                                                          [device], 32, sampler))
        if gpus >= 2:
            report.step("pipeline_two_gpus", lambda: _pipeline(config, paths, images_dir, scratch, "two-gpus",
                                                               ["cuda:0"], ["cuda:1"], 32, sampler))
        else:
            report.data["pipeline_two_gpus"] = {"skipped": f"{gpus} GPU on this machine"}
        report.step("auto_batch_probe", lambda: _probes(paths, device, 64, max_new_tokens))
        report.step("forced_oom_backoff", lambda: _forced_oom(config, paths, images_dir, scratch, device, sampler,
                                                              max_new_tokens))
        if "isolation" in type(config.vision).model_fields:
            report.step("pipeline_one_gpu_process_isolation", lambda: _pipeline(
                config, paths, images_dir, scratch, "one-gpu-process", [device], [device], 32, sampler,
                isolation="process"))
    report.flush()
    return report.data


def _write_images(images: list[Any], names: list[str], scratch: Path) -> Path:
    folder = scratch / "source"
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        image.save(folder / name)
    return folder
