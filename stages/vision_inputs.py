"""BLIP and CLIP ``pixel_values`` computed on the device from uint8 images that are already there.

Today ``VisionStage`` hands PIL images to the Hugging Face processors, which resize them on the host CPU and
copy float32 tensors to the device. ``PixelValues`` gives the same tensors from uint8 tensors already on the
device, without a round trip through the host.

Why not simply call the processor with device tensors (transformers 5 processors accept ``device=``):
its resize is ``tvF.resize(uint8, BICUBIC, antialias=True)``, and that is two different algorithms. On CPU,
where today's pixel values come from, PyTorch runs a native uint8 kernel ported from Pillow: int16 fixed-point
weights, a horizontal pass rounded and clamped to uint8, then a vertical pass. On CUDA torchvision converts to
float32, runs one float interpolation and rounds once at the end. On the shared test photos the two differ
by up to 10 grey levels, 0.15 after CLIP normalisation, where one grey level (0.015) is already more than
the 1e-2 these values are tested to. The processor's tensor path also guesses the channel order, and reads 1xN
and 3xN HWC images as CHW. So the resize, and only the resize, is ours: the CPU kernel's fixed-point
arithmetic in exact int32 torch ops, which give its bits on every device. Sizes, crop offsets, rescale and
normalisation are the processor's own code and settings.

Importing this module needs only torch and numpy; the processor's transformers classes are used as given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch

Layout = Literal["HWC", "CHW"]

# Resample filters whose uint8 CPU kernel is reproduced here (PyTorch's HelperInterpLinear / HelperInterpCubic
# with antialias=True, which is how the processors call tvF.resize). Value: the filter's interp_size. Bilinear
# is today's on hosts where torchvision uses PyTorch's uint8 kernel for it (AVX2, AVX-512, arm64); bicubic on all.
_EMULATED = {"bilinear": 2, "bicubic": 4}
_CHUNK_ELEMENTS = 1 << 24  # int32 elements per temporary in a resampling pass (~150 MB of temporaries)
_CPU_CHUNK_ELEMENTS = 1 << 18  # on CPU a reduction over taps is slower than one tap at a time, except for tiny passes
_MAX_PRECISION = 22  # PyTorch caps the fixed-point precision of its uint8 weights here


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5 (Pillow's, PyTorch's antialiased one), operations in PyTorch's order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"bilinear": _triangle, "bicubic": _cubic}


def _axis_taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices (out, K), int16-valued weights (out, K) and precision of one antialiased uint8 pass.

    Follows PyTorch's ``_compute_indices_min_size_weights_aa`` and
    ``_compute_index_ranges_int16_weights`` in float64, in the same order of operations, because the int16
    rounding of these weights decides the output bits. Taps past an image edge get weight 0.
    """
    scale = in_size / out_size
    interp_size = _EMULATED[mode]
    support = (interp_size * 0.5) * scale if scale >= 1.0 else interp_size * 0.5
    max_taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.int64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin, 0, max_taps)
    taps = int(xsize.max()) if out_size else 0  # columns past every row's xsize hold only zeros
    filter_fn = _FILTERS[mode]
    weights = np.zeros((out_size, taps), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(taps):  # sequential sum over j, as in C++
        w = np.where(j < xsize, filter_fn(((xmin + j).astype(np.float64) - center + 0.5) * invscale), 0.0)
        weights[:, j] = w
        total = total + w
    normalisable = total != 0.0
    weights = np.where(normalisable[:, None], weights / np.where(normalisable, total, 1.0)[:, None], weights)
    wt_max = float(weights[normalisable].max(initial=0.0))
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * float(1 << precision)
    fixed = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    index = np.minimum(xmin[:, None] + np.arange(taps, dtype=np.int64)[None, :], in_size - 1)
    return index, fixed, precision


@lru_cache(maxsize=512)
def _device_taps(
    in_size: int, out_size: int, mode: str, start: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The taps of output rows ``start:start+length`` on ``device``, computed and uploaded once per geometry.

    Only the window is kept: the whole axis is needed for the precision (the largest weight of any row),
    but a 1x4000 image resized to a 224 shortest edge has 896000 columns, of which the crop uses 224.
    """
    index, fixed, precision = _axis_taps(in_size, out_size, mode)
    window = slice(start, start + length)
    return (
        torch.from_numpy(np.ascontiguousarray(index[window])).to(device),
        torch.from_numpy(np.ascontiguousarray(fixed[window])).to(device),
        precision,
    )


def _resample_rows(
    images: torch.Tensor, out_size: int, mode: str, start: int, length: int, taps_per_gather: int | None
) -> torch.Tensor:
    """One separable pass of PyTorch's antialiased uint8 resize along the rows (dim 2) of an NCHW uint8
    batch, computing only output rows ``start:start+length``.

    Integer arithmetic throughout (int16-valued weights, int32 sums, rounding shift, clamp to uint8), so
    every device gives the bits of the CPU kernel. Rows are gathered whole (contiguous copies), as many taps
    per gather as fit the budget: a large one off the CPU, to keep kernel launches per pass few; a small
    one on CPU, where summing over taps costs more than looping over them except for tiny passes.
    """
    in_size = images.shape[2]
    if in_size == out_size:  # PyTorch skips a pass whose size does not change
        return images.narrow(2, start, length)
    index, weights, precision = _device_taps(in_size, out_size, mode, start, length, images.device)
    batch, channels, _, width = images.shape
    taps = index.shape[1]
    if taps_per_gather is None:
        per_tap = max(batch * channels * length * width, 1)
        budget = _CPU_CHUNK_ELEMENTS if images.device.type == "cpu" else _CHUNK_ELEMENTS
        taps_per_gather = budget // per_tap
    step = max(1, taps_per_gather)
    total: torch.Tensor | None = None
    for first in range(0, taps, step):
        chunk_index = index[:, first : first + step]
        count = chunk_index.shape[1]
        picked = images.index_select(2, chunk_index.reshape(-1)).to(torch.int32)
        if count == 1:
            term = picked.mul_(weights[:, first, None])
        else:
            picked = picked.view(batch, channels, length, count, width)
            term = (picked * weights[:, first : first + count, None]).sum(dim=3, dtype=torch.int32)
        total = term if total is None else total.add_(term)
    assert total is not None
    total.add_(1 << (precision - 1))
    return torch.bitwise_right_shift(total, precision).clamp_(0, 255).to(torch.uint8)


def resize_uint8(
    images: torch.Tensor,
    size: tuple[int, int],
    mode: str = "bicubic",
    window: tuple[int, int, int, int] | None = None,
    taps_per_gather: int | None = None,
) -> torch.Tensor:
    """``tvF.resize(images, size, mode, antialias=True)`` as PyTorch's CPU uint8 kernel computes it, on the
    images' device; ``window`` = (top, left, height, width) computes only that part of the output.

    Horizontal pass first, then vertical, each rounded to uint8, as the kernel does. ``taps_per_gather``
    overrides the per-device choice of how many filter taps one gather handles (the bits do not depend on it).
    """
    if mode not in _EMULATED:
        raise ValueError(f"mode must be one of {', '.join(_EMULATED)}, got {mode!r}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected an NCHW uint8 batch, got {images.dtype} of shape {tuple(images.shape)}")
    out_height, out_width = size
    top, left, height, width = window if window is not None else (0, 0, out_height, out_width)
    if not (0 <= top and top + height <= out_height and 0 <= left and left + width <= out_width):
        raise ValueError(f"window {window} is not inside the output size {size}")
    columns = _resample_rows(images.transpose(2, 3).contiguous(), out_width, mode, left, width, taps_per_gather)
    return _resample_rows(columns.transpose(2, 3).contiguous(), out_height, mode, top, height, taps_per_gather)


class PixelValues:
    """The ``pixel_values`` of one loaded processor (BLIP, CLIP, or another standard torchvision-backed one),
    computed on the device from uint8 RGB tensors, equal to what the processor gives for the same PIL images.

    Built once per loaded processor: it reads the processor's settings (size, resample, crop, rescale,
    mean/std) so that a checkpoint's ``preprocessor_config.json`` keeps deciding them. Processors with their
    own pipeline (an overridden ``_preprocess``/``resize``), padding, or resample filters whose device result
    is not today's are refused at construction rather than silently approximated.
    """

    def __init__(self, processor: Any) -> None:
        from stages.torch_compat import ensure_torchvision

        ensure_torchvision()
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.image_utils import pil_torch_interpolation_mapping

        image_processor = getattr(processor, "image_processor", processor)
        if not isinstance(image_processor, TorchvisionBackend):
            raise ValueError(
                f"{type(image_processor).__name__} is not a torchvision-backed image processor: load it with "
                "transformers' default (torchvision) backend, whose CPU output is what the device path reproduces"
            )
        overridden = [
            name for name in ("_preprocess", "resize", "center_crop", "rescale_and_normalize")
            if getattr(type(image_processor), name) is not getattr(TorchvisionBackend, name)
        ]
        if overridden:
            raise ValueError(
                f"{type(image_processor).__name__} overrides {', '.join(overridden)}: its pipeline is its own, "
                "so the standard device path would not reproduce it"
            )
        if getattr(image_processor, "do_pad", None):
            raise ValueError(f"{type(image_processor).__name__} pads its images (do_pad); that is not supported here")
        self.image_processor = image_processor
        self.do_resize = bool(image_processor.do_resize)
        self.size = image_processor.size
        resample = image_processor.resample
        if resample is None:
            mode = "bilinear"  # what TorchvisionBackend.resize does without a resample
        else:
            interpolation = resample if not isinstance(resample, int) else pil_torch_interpolation_mapping[resample]
            mode = str(interpolation.value)
        if self.do_resize and image_processor.size is None:
            raise ValueError(f"{type(image_processor).__name__} resizes (do_resize) but has no size")
        if image_processor.do_center_crop and image_processor.crop_size is None:
            raise ValueError(f"{type(image_processor).__name__} crops (do_center_crop) but has no crop_size")
        if self.do_resize and mode not in _EMULATED:
            raise ValueError(
                f"resample {mode!r} is not supported on the device, only {' and '.join(_EMULATED)}: nearest is not "
                "checked against today's output, box and hamming have no tensor kernel, and transformers replaces "
                "lanczos by bicubic off the CPU"
            )
        self.mode = mode
        self.do_center_crop = bool(image_processor.do_center_crop)
        self.crop_size = image_processor.crop_size
        self.do_rescale = bool(image_processor.do_rescale)
        self.rescale_factor = float(image_processor.rescale_factor) if image_processor.rescale_factor else None
        self.do_normalize = bool(image_processor.do_normalize)
        self.image_mean = image_processor.image_mean
        self.image_std = image_processor.image_std
        self.do_convert_rgb = bool(image_processor.do_convert_rgb)

    # -- geometry ---------------------------------------------------------------------------------------

    def _resized_size(self, batch: torch.Tensor) -> tuple[int, int]:
        """The (height, width) TorchvisionBackend.resize would produce, with the helpers it uses."""
        from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
        from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

        size = self.size
        height, width = batch.shape[-2:]
        if size.shortest_edge and size.longest_edge:
            new = get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
        elif size.shortest_edge:
            new = get_resize_output_image_size(
                batch, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        elif size.max_height and size.max_width:
            new = get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
        elif size.height and size.width:
            new = (size.height, size.width)
        else:
            raise ValueError(f"unsupported size {dict(size)!r}: expected height/width, shortest_edge or max_height/max_width")
        return int(new[0]), int(new[1])

    def _crop_window(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, left, height, width) of TorchvisionBackend.center_crop when the crop lies inside the image;
        None when it would pad (then the processor's own center_crop runs on the full resize)."""
        crop_height, crop_width = int(self.crop_size.height), int(self.crop_size.width)
        if crop_height > height or crop_width > width:
            return None
        return int((height - crop_height) / 2.0), int((width - crop_width) / 2.0), crop_height, crop_width

    def _resize_and_crop(self, batch: torch.Tensor) -> torch.Tensor:
        """Resize then center-crop one same-shape NCHW uint8 batch.

        When the crop lies inside the resized image only the cropped window is resampled: each output pixel
        of a separable pass depends only on its own taps, so the bits are those of resize-then-crop, and a
        1x4000 image resized to a 224 shortest edge does not materialise a 224x896000 intermediate.
        """
        if not self.do_resize:
            return self.image_processor.center_crop(batch, self.crop_size) if self.do_center_crop else batch
        out_height, out_width = self._resized_size(batch)
        window = self._crop_window(out_height, out_width) if self.do_center_crop else None
        resized = resize_uint8(batch, (out_height, out_width), self.mode, window)
        if self.do_center_crop and window is None:
            return self.image_processor.center_crop(resized, self.crop_size)
        return resized

    # -- inputs -----------------------------------------------------------------------------------------

    def _as_chw(self, image: torch.Tensor, layout: Layout, device: torch.device) -> torch.Tensor:
        """A 3xHxW uint8 tensor on ``device``; the layout is the caller's word, never guessed from the shape."""
        if image.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 tensors, got {image.dtype}")
        if image.ndim == 2:
            image = image.unsqueeze(0)
        elif image.ndim == 3:
            image = image.permute(2, 0, 1) if layout == "HWC" else image
        else:
            raise ValueError(f"images must be HxW, HxWxC or CxHxW tensors, got shape {tuple(image.shape)}")
        channels, height, width = image.shape
        if height == 0 or width == 0:
            raise ValueError(f"empty image of shape {tuple(image.shape)}")
        if channels == 1 and self.do_convert_rgb:
            image = image.expand(3, height, width)  # what the processor's convert_to_rgb does for grey
        elif channels != 3:
            raise ValueError(f"images must be RGB (3 channels, or 1 for grey), got {channels} in layout {layout}")
        return image.to(device, non_blocking=True)

    def __call__(
        self,
        images: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        layout: Layout = "HWC",
    ) -> torch.Tensor:
        """NCHW ``pixel_values`` in ``dtype`` on ``device`` (default: the first image's), in input order.

        Images of one shape are resampled as one batch; a batch whose images end up with different sizes
        (no resize to a fixed size and no crop) cannot be stacked and is refused, as the processor does.
        """
        if not images:
            raise ValueError("no images to process")
        if layout not in ("HWC", "CHW"):
            raise ValueError(f"layout must be 'HWC' or 'CHW', got {layout!r}")
        target = torch.device(device) if device is not None else images[0].device
        chw = [self._as_chw(image, layout, target) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for position, image in enumerate(chw):
            groups.setdefault((image.shape[1], image.shape[2]), []).append(position)
        output: torch.Tensor | None = None
        for positions in groups.values():
            processed = self._resize_and_crop(torch.stack([chw[position] for position in positions]))
            if output is None:
                output = torch.empty((len(chw), *processed.shape[1:]), dtype=processed.dtype, device=target)
            elif processed.shape[1:] != output.shape[1:]:
                raise ValueError(
                    f"the images end up with different sizes ({tuple(processed.shape[2:])} and {tuple(output.shape[2:])}), "
                    "so they cannot be stacked: this processor neither resizes to a fixed size nor crops"
                )
            output[torch.tensor(positions, device=target)] = processed
        assert output is not None
        values = self.image_processor.rescale_and_normalize(
            output, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean, self.image_std
        )
        return values.to(dtype)


def pixel_values(
    processor: Any,
    images: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    layout: Layout = "HWC",
) -> torch.Tensor:
    """One-shot form of :class:`PixelValues`; keep a ``PixelValues`` per loaded processor in a hot loop."""
    return PixelValues(processor)(images, device=device, dtype=dtype, layout=layout)
