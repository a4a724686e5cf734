"""Configuration -> stage instances: device lists resolved and checked, batch policies, enabled models.

A part of the build that ``app.runtime`` owns: ``build_runtime`` is the one entry point from configuration to a
ready pipeline, and calls ``build_stages`` here; only ``config check`` calls it directly, to validate.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from app.config import BinnerConfig, ConfigError
from stages.base import BatchPolicy, Stage

_CUDA = re.compile(r"^cuda:(\d+)$")


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without torch or without a GPU)."""
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count())
    except Exception:
        return 0


def resolve_devices(spec: str | list[str], role: Literal["ocr", "vision"], gpu_count: int | None = None) -> list[str]:
    """``auto``: no GPU -> cpu; one GPU -> cuda:0 for both; two or more -> OCR on cuda:0, vision on the rest."""
    if spec == "auto":
        count = cuda_device_count() if gpu_count is None else gpu_count
        if count == 0:
            return ["cpu"]
        if count == 1 or role == "ocr":
            return ["cuda:0"]
        return [f"cuda:{index}" for index in range(1, count)]
    devices = list(spec)
    if not devices:
        raise ConfigError(f"{role}.devices: empty list; use `auto`, `[cpu]` or CUDA devices such as `[cuda:0]`")
    count = None
    for device in devices:
        if device == "cpu":
            continue
        match = _CUDA.match(device)
        if not match:
            raise ConfigError(f"{role}.devices: {device!r} is not a device; use `cpu` or `cuda:N`")
        if count is None:
            count = cuda_device_count() if gpu_count is None else gpu_count
        if int(match.group(1)) >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
            if count == 0:
                raise ConfigError(
                    f"{role}.devices: {device} does not exist: this machine shows no CUDA device "
                    f"(CUDA_VISIBLE_DEVICES={visible}, or a CPU-only torch build). Use `auto` (picks cpu here) or `[cpu]`."
                )
            choices = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            raise ConfigError(
                f"{role}.devices: {device} does not exist: this machine shows {count} CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={visible}). Use `auto`, `[cpu]`, or {choices}."
            )
    return devices


def vision_enabled(config: BinnerConfig) -> bool:
    v = config.vision
    return v.detector.enabled or v.captioner.enabled or v.clip.enabled


def _policy(batch_size: int | str, max_wait_ms: float) -> BatchPolicy:
    return BatchPolicy(max_batch_size=None if batch_size == "auto" else int(batch_size), max_wait_ms=max_wait_ms)


# What ``isolation: auto`` picks, per device kind, from the measurements in docs/benchmarks.md
# ("Thread vs process isolation").
AUTO_ISOLATION: dict[str, Literal["thread", "process"]] = {"cpu": "thread", "cuda": "process"}


def resolve_isolation(mode: str, devices: list[str], backend: str = "") -> Literal["thread", "process"]:
    """``thread`` or ``process`` for a stage: PaddleOCR always gets a process; ``auto`` goes by device kind."""
    if backend == "paddleocr" or mode == "process":
        return "process"
    if mode == "thread":
        return "thread"
    kind = "cuda" if any(device.startswith("cuda") for device in devices) else "cpu"
    return AUTO_ISOLATION[kind]


def isolate(stage: Stage, mode: str, config: BinnerConfig, backend: str = "") -> Stage:
    """``stage`` itself (thread mode), or a driver that runs each replica of it in a spawned child process."""
    if resolve_isolation(mode, stage.devices, backend) == "thread":
        return stage
    from app.process_worker import ProcessStage

    return ProcessStage(stage, stall_timeout_s=config.stall_timeout_s, log_level=config.log.level)


def build_stages(config: BinnerConfig, gpu_count: int | None = None) -> list[Stage]:
    """The enabled stages in pipeline order: load, ocr, vision."""
    from stages.loader import LoaderOptions, LoaderStage

    limits, loader = config.limits, config.loader
    stages: list[Stage] = [
        LoaderStage(
            LoaderOptions(max_file_bytes=limits.max_file_bytes, max_pixels=limits.max_pixels, max_side=limits.max_side),
            devices=["cpu"] * loader.workers,
            batch_policy=BatchPolicy(loader.batch_size, loader.max_wait_ms),
        )
    ]
    ocr = config.ocr
    if ocr.enabled:
        devices = resolve_devices(ocr.devices, "ocr", gpu_count)
        policy = _policy(ocr.batch_size, ocr.max_wait_ms)
        if ocr.backend == "synthetic":
            from stages.synthetic import SyntheticOcrStage

            stages.append(isolate(SyntheticOcrStage(ocr.synthetic_ms[0], ocr.synthetic_ms[1], devices, policy),
                                  ocr.isolation, config))
        else:
            from stages.ocr import OcrOptions, OcrStage
            from stages.ppocr_torch import OcrPrecision

            options = OcrOptions(backend=ocr.backend, min_confidence=ocr.min_confidence, max_side=ocr.max_side,
                                 paddle_model_dir=ocr.paddle_model_dir, runtime=ocr.runtime,
                                 precision=OcrPrecision(**ocr.precision.model_dump()))
            stages.append(isolate(OcrStage(options, devices, policy), ocr.isolation, config, ocr.backend))
    if vision_enabled(config):
        v = config.vision
        devices = resolve_devices(v.devices, "vision", gpu_count)
        policy = _policy(v.batch_size, v.max_wait_ms)
        if v.backend == "synthetic":
            from stages.synthetic import SyntheticVisionStage

            stages.append(isolate(SyntheticVisionStage(v.synthetic_ms[0], v.synthetic_ms[1], devices, policy),
                                  v.isolation, config))
        else:
            from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage

            if v.clip.enabled and not v.captioner.enabled:
                raise ConfigError(
                    "vision.clip.enabled: CLIP scores the image against its BLIP caption, so it needs "
                    "vision.captioner.enabled: true (or set vision.clip.enabled: false)"
                )
            detector = (DetectorOptions(weights=v.detector.weights, confidence=v.detector.confidence,
                                        image_size=v.detector.image_size) if v.detector.enabled else None)
            captioner = (CaptionerOptions(model=v.captioner.model, max_new_tokens=v.captioner.max_new_tokens,
                                          prompt=v.captioner.prompt) if v.captioner.enabled else None)
            clip = ClipOptions(model=v.clip.model) if v.clip.enabled else None
            stages.append(isolate(VisionStage(detector, captioner, clip, v.precision, devices, policy), v.isolation,
                                  config))
    return stages
