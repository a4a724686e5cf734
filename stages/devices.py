"""Device names: the one parser of ``cpu`` and ``cuda:N``, for the stages and for the application's resolver.

Light on purpose (no torch import): ``binner config check`` and the Ray driver parse device lists on machines
that may have neither torch's CUDA build nor a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass


class DeviceNameError(ValueError):
    """A device name that is neither ``cpu`` nor ``cuda:N``; the message says what is accepted."""


@dataclass(frozen=True)
class Device:
    """``cpu`` (index None) or ``cuda`` with its index, as torch and onnxruntime number them in this process."""

    kind: str
    index: int | None = None

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.index is None else f"{self.kind}:{self.index}"


def parse_device(name: str, what: str = "device") -> Device:
    """``"cpu"`` -> cpu, ``"cuda:N"`` -> cuda N, ``"cuda"`` -> cuda 0; anything else raises ``DeviceNameError``
    naming ``what`` (e.g. ``vision.devices``)."""
    if name == "cpu":
        return Device("cpu")
    if name == "cuda":
        return Device("cuda", 0)
    if name.startswith("cuda:") and name[5:].isdigit():
        return Device("cuda", int(name[5:]))
    raise DeviceNameError(f"{what}: {name!r} is not a device; use `cpu` or `cuda:N`")


def on_cuda(devices: list[str]) -> bool:
    """Whether a device list names any CUDA device."""
    return any(parse_device(device).is_cuda for device in devices)


def torch_device(name: str, what: str = "device") -> object:
    """``name`` as a ``torch.device`` once it is known to exist here, else an error naming ``what`` and the fix."""
    import torch

    device = parse_device(name, what)
    if not device.is_cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert device.index is not None
    if device.index >= count:
        raise RuntimeError(
            f"{what}: {device} does not exist: this machine has {count} CUDA device(s) visible"
            f"{' (check CUDA_VISIBLE_DEVICES and the driver)' if count == 0 else ''}; fix {what}"
        )
    return torch.device(str(device))
