"""Which devices a stage runs on, and how its replicas are hosted: the one resolver of ``auto``, ``cpu`` and
``cuda:N`` lists and of ``isolation``.

Device lists are resolved against the GPUs of the place the stages will run: this machine for the local engine, the
Ray cluster's GPU resources for ``--engine ray`` (a CPU-only driver may send ``cuda:N`` stages to GPU nodes), and
inside a Ray actor, the GPU that Ray assigned to it.
"""

from __future__ import annotations

import os
from typing import Literal

from app.config import BinnerConfig, ConfigError
from stages.devices import DeviceNameError, on_cuda, parse_device

Role = Literal["ocr", "vision"]
Isolation = Literal["thread", "process"]

# What ``isolation: auto`` picks, per device kind, from the measurements in docs/benchmarks.md
# ("Thread vs process isolation").
AUTO_ISOLATION: dict[str, Isolation] = {"cpu": "thread", "cuda": "process"}


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


def resolve_devices(spec: str | list[str], role: Role, gpu_count: int | None = None, where: str = "this machine") -> list[str]:
    """``auto``: no GPU -> cpu; one GPU -> cuda:0 for both; two or more -> OCR on cuda:0, vision on the rest.

    ``gpu_count`` is the number of GPUs where the stages run (default: this process's CUDA devices); an explicit
    ``cuda:N`` beyond it is an error naming the key, ``where`` and the fix.
    """
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
    for name in devices:
        try:
            device = parse_device(name, f"{role}.devices")
        except DeviceNameError as error:
            raise ConfigError(str(error)) from None
        if not device.is_cuda:
            continue
        if count is None:
            count = cuda_device_count() if gpu_count is None else gpu_count
        assert device.index is not None
        if device.index >= count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
            if count == 0:
                detail = (f"(CUDA_VISIBLE_DEVICES={visible}, or a CPU-only torch build)" if where == "this machine"
                          else "(no node offers a GPU resource)")
                raise ConfigError(
                    f"{role}.devices: {name} does not exist: {where} shows no CUDA device {detail}. "
                    "Use `auto` (picks cpu here) or `[cpu]`."
                )
            choices = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
            shown = f" (CUDA_VISIBLE_DEVICES={visible})" if where == "this machine" else ""
            raise ConfigError(
                f"{role}.devices: {name} does not exist: {where} shows {count} CUDA device(s){shown}. "
                f"Use `auto`, `[cpu]`, or {choices}."
            )
    return devices


def resolve_isolation(mode: str, devices: list[str], backend: str = "") -> Isolation:
    """``thread`` or ``process`` for a stage: PaddleOCR always gets a process; ``auto`` goes by device kind."""
    if backend == "paddleocr" or mode == "process":
        return "process"
    if mode == "thread":
        return "thread"
    return AUTO_ISOLATION["cuda" if on_cuda(devices) else "cpu"]


def isolation_of(config: BinnerConfig, stage_name: str, devices: list[str]) -> Isolation:
    """The hosting of one built stage under ``config`` (the loader always runs in threads)."""
    if stage_name == "ocr":
        return resolve_isolation(config.ocr.isolation, devices, config.ocr.backend)
    if stage_name == "vision":
        return resolve_isolation(config.vision.isolation, devices)
    return "thread"


def actor_device(devices: list[str], gpu_ids: list[int | str]) -> str:
    """The device of a Ray actor: Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, which is then
    ``cuda:0`` in the actor; a stage on CPU devices, or an actor given no GPU, runs on the CPU."""
    return "cuda:0" if on_cuda(devices) and gpu_ids else "cpu"
