"""Make ``import torchvision`` work when its compiled C++ operators cannot be loaded.

A torchvision wheel built for CUDA fails to import on a CPU-only host (``operator torchvision::nms does not
exist``): its ``_C`` extension does not load, and the Python half then registers fake kernels for operators
that were never defined. ``transformers`` imports torchvision whenever it is installed and Ultralytics does
so at predict time, so one broken extension takes down every model stage.

``ensure_torchvision()`` fixes exactly that case and nothing else: it tries the import; only when it fails
because torchvision operators are missing does it define those operators itself with pure-PyTorch kernels
(through ``torch.library``, in this process only, never touching site-packages), log one warning that says
which operators were substituted and why, and import torchvision again. On a healthy install it is a no-op.
Call it before importing ``transformers`` or ``ultralytics``.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_done = False
_substituted: tuple[str, ...] = ()
_library: Any = None  # torch.library.Library; kept alive here, since dropping it unregisters the kernels

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

# Schemas exactly as torchvision's C++ extension defines them (torchvision/csrc/ops/*.cpp).
_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
}


def substituted_ops() -> tuple[str, ...]:
    """Names of the torchvision operators this process runs with pure-PyTorch kernels (empty when healthy)."""
    return _substituted


def nms(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy non-maximum suppression with torchvision's semantics, in plain PyTorch.

    Boxes are ``(x1, y1, x2, y2)``; a box is dropped when its IoU with an already kept, higher-scoring box
    is greater than ``iou_threshold``. Returns int64 indices of the kept boxes in decreasing score order.
    Memory stays O(N): each step compares the newest kept box with the boxes still alive, so the loop runs
    once per kept box, which after YOLO's confidence filter is a few hundred at most.
    """
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    boxes = dets[order]
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    alive = torch.arange(boxes.shape[0], device=dets.device)
    keep: list[Any] = []
    while alive.numel() > 0:
        current = alive[0]
        keep.append(current)
        rest = alive[1:]
        if rest.numel() == 0:
            break
        width = (torch.minimum(x2[current], x2[rest]) - torch.maximum(x1[current], x1[rest])).clamp(min=0)
        height = (torch.minimum(y2[current], y2[rest]) - torch.maximum(y1[current], y1[rest])).clamp(min=0)
        inter = width * height
        iou = inter / (areas[current] + areas[rest] - inter)
        alive = rest[~(iou > iou_threshold)]  # NaN IoU (degenerate boxes) keeps the box, as torchvision does
    return order[torch.stack(keep)]


def _qnms(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """``qnms`` receives the integer representation of quantized tensors; the geometry is the same."""
    return nms(dets.float(), scores.float(), iou_threshold)


def _roi_align(
    input: Any,  # torchvision's argument name
    rois: Any,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Any:
    """torchvision's own pure-PyTorch roi_align, run eagerly (its wrapper would torch.compile it first)."""
    from torchvision.ops import roi_align as roi_align_module

    eager = getattr(roi_align_module._roi_align, "__wrapped__", roi_align_module._roi_align)
    return eager(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


# op name -> (kernel, dispatch key). nms/qnms return indices (no autograd), so CompositeExplicitAutograd
# (every backend, no decomposition). roi_align decomposes into differentiable torch ops, so it is
# CompositeImplicitAutograd and gets autograd and fake tensors for free.
_KERNELS: dict[str, tuple[Callable[..., Any], str]] = {
    "nms": (nms, "CompositeExplicitAutograd"),
    "qnms": (_qnms, "CompositeExplicitAutograd"),
    "roi_align": (_roi_align, "CompositeImplicitAutograd"),
}


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _forget_torchvision() -> None:
    """Drop the half-imported torchvision package so that the next import starts from scratch."""
    for module_name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[module_name]


def _register_missing_ops() -> tuple[str, ...]:
    import torch

    global _library
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    registered = []
    for name, schema in _SCHEMAS.items():
        if _op_exists(name):
            continue
        kernel, dispatch_key = _KERNELS[name]
        _library.define(schema)
        _library.impl(name, kernel, dispatch_key)
        registered.append(name)
    return tuple(registered)


def ensure_torchvision() -> None:
    """Import torchvision, substituting pure-PyTorch operators only if its C++ operators are missing.

    Idempotent and thread-safe (stages on several devices set up concurrently). A missing torchvision
    package is left alone; any other import error is raised unchanged.
    """
    global _done, _substituted
    if _done:
        return
    with _lock:
        if _done:
            return
        try:
            importlib.import_module("torchvision")
        except ModuleNotFoundError as error:
            if error.name != "torchvision":
                raise
            _done = True  # not installed: nothing imports it successfully anyway
            return
        except RuntimeError as error:
            match = _MISSING_OP.search(str(error))
            if match is None:
                raise
            _forget_torchvision()
            _substituted = _register_missing_ops()
            try:
                from torchvision import extension  # the retry (imports the whole package) against our operators
            except Exception as retry_error:
                _forget_torchvision()
                raise RuntimeError(
                    f"torchvision cannot be imported ({match.group(0)}), even with pure-PyTorch substitutes for "
                    f"{', '.join(_substituted) or 'its operators'}: {retry_error}. Install the torchvision build "
                    "that matches the installed torch."
                ) from retry_error

            if not extension._has_ops():
                # torchvision.ops.nms asks this flag before calling torch.ops.torchvision.nms; the
                # operators it guards are now defined, so let the calls through.
                extension._has_ops = lambda: True
            logger.warning(
                "torchvision's compiled operators are not available here (%s): PyPI's torchvision wheel is "
                "built for CUDA and this host has no CUDA libraries, as on a CPU-only machine. binner runs "
                "torchvision::%s with pure-PyTorch kernels instead: detection results are the same, NMS is a "
                "little slower. Nothing needs fixing; a CPU build of torchvision "
                "(--index-url https://download.pytorch.org/whl/cpu) makes this note go away.",
                match.group(0),
                ", torchvision::".join(_substituted),
            )
        _done = True
