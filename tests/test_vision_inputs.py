"""BLIP/CLIP ``pixel_values`` on the device (``stages.vision_inputs``) against today's host processors.

The reference is always the processor called with PIL images, as ``VisionStage`` does today. It is compared
for the tiny checkpoints' processors and for the configurations of the real checkpoints
(``Salesforce/blip-image-captioning-base``, ``openai/clip-vit-base-patch32``), written as their
``preprocessor_config.json`` and loaded through ``AutoImageProcessor`` as a real checkpoint is. Deliberately
wrong settings must exceed the tolerance, so that the tolerance means something.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages.torch_compat import ensure_torchvision
from stages.vision_inputs import PixelValues, pixel_values, resize_uint8
from tests.conftest_models import IMAGES, require_shared

ensure_torchvision()

from torchvision.transforms.v2 import functional as tvF  # noqa: E402  (needs ensure_torchvision first)
from transformers import AutoImageProcessor, AutoProcessor, BlipImageProcessor, CLIPImageProcessor  # noqa: E402
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling  # noqa: E402

pytestmark = pytest.mark.models

TOLERANCE = 1e-2  # max abs difference after normalisation; one grey level is 1/255/std ~ 0.015 for CLIP's std
REAL_IMAGES = [  # different sizes and aspect ratios; two of the same size (grouped together); one greyscale
    "photo/darknet_dog.jpg",  # 768x576
    "mixed/paddleocr_12.jpg",  # 720x1150, portrait
    "photo/skimage_chelsea.png",  # 451x300
    "text/skimage_page.png",  # 384x191, mode L
    "photo/darknet_giraffe.jpg",  # 500x500
    "text/paddleocr_11.jpg",  # 500x500
]
# What the real checkpoints ship as preprocessor_config.json (the Hub files; they spell out the classes'
# defaults in transformers/models/{blip,clip}/image_processing_*.py, which the settings tests check).
BLIP_BASE_CONFIG = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_processor_type": "BlipImageProcessor",
    "image_std": list(OPENAI_CLIP_STD),
    "processor_class": "BlipProcessor",
    "size": 384,
}
CLIP_B32_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "resample": 3,
    "size": 224,
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared CPU, spinning worker threads make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_config(directory: Path, config: dict[str, Any]) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")
    return AutoImageProcessor.from_pretrained(directory, local_files_only=True)


@pytest.fixture(scope="module")
def processors(tiny_blip_dir: Path, tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each processor as VisionStage loads it (AutoProcessor for the tiny checkpoints)."""
    configs = tmp_path_factory.mktemp("hub-configs")
    return {
        "tiny-blip": AutoProcessor.from_pretrained(tiny_blip_dir, local_files_only=True),
        "tiny-clip": AutoProcessor.from_pretrained(tiny_clip_dir, local_files_only=True),
        "blip-base": _load_config(configs / "blip", BLIP_BASE_CONFIG),
        "clip-b32": _load_config(configs / "clip", CLIP_B32_CONFIG),
    }


def real_images() -> list[Image.Image]:
    paths = [IMAGES / name for name in REAL_IMAGES]
    require_shared(*paths)
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def synthetic_images() -> list[Image.Image]:
    """Edge cases: tiny, 1xN and Nx1, 3 rows (an HWC shape the processor's tensor path misreads as CHW),
    large, and greyscale already converted to RGB. Noise with hard edges is the worst case for rounding."""
    generator = np.random.default_rng(7)

    def noise(height: int, width: int) -> Image.Image:
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[:, : width // 2] = np.where(pixels[:, : width // 2] > 127, 255, 0)  # hard edges
        return Image.fromarray(pixels, "RGB")

    grey = Image.fromarray(generator.integers(0, 256, (90, 61), dtype=np.uint8), "L").convert("RGB")
    return [noise(8, 8), noise(1, 37), noise(37, 1), noise(3, 50), noise(1, 1), noise(3000, 4000), grey, noise(8, 8)]


def as_tensor(image: Image.Image) -> torch.Tensor:
    """The uint8 HWC tensor of a PIL image, as the loader would upload it."""
    return torch.from_numpy(np.array(image.convert("RGB")))


def reference(processor: Any, images: list[Image.Image]) -> torch.Tensor:
    """Today's pixel values: the processor on PIL images, on the host."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


def max_difference(expected: torch.Tensor, got: torch.Tensor) -> float:
    assert got.shape == expected.shape, f"shape {tuple(got.shape)} != processor's {tuple(expected.shape)}"
    return float((got.float().cpu() - expected.float()).abs().max())


# -- the same pixel values ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["tiny-blip", "tiny-clip", "blip-base", "clip-b32"])
@pytest.mark.parametrize("kind", ["real", "synthetic"])
def test_device_path_matches_the_processor(
    processors: dict[str, Any], name: str, kind: str, device: str, record_property: Callable[[str, object], None]
) -> None:
    images = real_images() if kind == "real" else synthetic_images()
    processor = processors[name]
    expected = reference(processor, images)
    got = PixelValues(processor)([as_tensor(image).to(device) for image in images])
    assert got.device.type == device and got.dtype == torch.float32
    difference = max_difference(expected, got)
    record_property("max_abs_difference", difference)
    assert difference <= TOLERANCE, f"{name} on {kind} images: max abs difference {difference}"


def test_real_checkpoint_settings_are_the_documented_ones(processors: dict[str, Any]) -> None:
    """The configurations under test are BLIP base's and CLIP ViT-B/32's, and the classes' defaults."""
    blip, clip = processors["blip-base"], processors["clip-b32"]
    assert isinstance(blip, BlipImageProcessor) and isinstance(clip, CLIPImageProcessor)
    assert blip.backend == clip.backend == "torchvision"  # what AutoProcessor loads today
    assert dict(blip.size) == {"height": 384, "width": 384} and not blip.do_center_crop
    assert dict(clip.size) == {"shortest_edge": 224} and dict(clip.crop_size) == {"height": 224, "width": 224}
    for processor, defaults in ((blip, BlipImageProcessor()), (clip, CLIPImageProcessor())):
        assert processor.resample == PILImageResampling.BICUBIC
        assert processor.image_mean == tuple(OPENAI_CLIP_MEAN) and processor.image_std == tuple(OPENAI_CLIP_STD)
        assert processor.do_rescale and processor.rescale_factor == pytest.approx(1 / 255)
        for key in ("size", "crop_size", "resample", "image_mean", "image_std", "do_center_crop", "do_rescale"):
            assert getattr(processor, key) == getattr(defaults, key), key


def test_chw_input_grey_channel_and_dtype(processors: dict[str, Any]) -> None:
    """CHW input and a single grey channel give the same values as HWC RGB; dtype is applied last."""
    processor = processors["clip-b32"]
    grey = Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 3), dtype=np.uint8), "L")
    images = [grey.convert("RGB"), Image.effect_noise((3, 40), 90).convert("RGB")]
    expected = reference(processor, images)
    chw = [as_tensor(image).permute(2, 0, 1).contiguous() for image in images]
    assert max_difference(expected, pixel_values(processor, chw, layout="CHW")) <= TOLERANCE
    single = torch.from_numpy(np.array(grey))  # HxW, one channel
    assert max_difference(expected[:1], pixel_values(processor, [single])) <= TOLERANCE
    half = pixel_values(processor, [as_tensor(image) for image in images], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, pixel_values(processor, chw, layout="CHW").to(torch.bfloat16))


# -- the resize kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_kernel_is_bit_exact(mode: str) -> None:
    """resize_uint8 gives exactly the bits of PyTorch's CPU uint8 kernel, with either gather strategy and
    for any window of the output (which is how the crop is fused)."""
    generator = torch.Generator().manual_seed(0)
    cases = [((8, 8), (384, 384)), ((1, 37), (224, 8288)), ((301, 401), (128, 160)), ((2, 3), (5, 7)),
             ((17, 1000), (3, 5)), ((384, 500), (384, 384)), ((1, 1), (32, 32))]
    for (height, width), size in cases:
        images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8, generator=generator)
        images[1] = torch.where(images[1] > 127, 255, 0)  # hard edges: where overshoot is clamped
        expected = tvF.resize(images, list(size), interpolation=tvF.InterpolationMode(mode), antialias=True)
        for taps_per_gather in (None, 1000):  # CPU's one tap at a time, and the accelerators' chunks
            got = resize_uint8(images, size, mode, taps_per_gather=taps_per_gather)
            assert torch.equal(got, expected), f"{(height, width)} -> {size}, {taps_per_gather} taps per gather"
        window = (size[0] // 3, size[1] // 4, max(1, size[0] // 2), max(1, size[1] // 2))
        top, left, rows, columns = window
        assert torch.equal(resize_uint8(images, size, mode, window), expected[..., top : top + rows, left : left + columns])


# -- the tolerance means something ----------------------------------------------------------------------


def _with(processor: Any, **settings: Any) -> Any:
    """A copy of ``processor`` with some settings changed, built the way from_pretrained builds it."""
    image_processor = getattr(processor, "image_processor", processor)
    return type(image_processor)(**{**image_processor.to_dict(), **settings})


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("blip-base", {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),  # ImageNet's
        ("blip-base", {"resample": PILImageResampling.BILINEAR}),
        ("clip-b32", {"resample": PILImageResampling.BILINEAR}),
        ("clip-b32", {"do_center_crop": False, "size": {"height": 224, "width": 224}}),  # squash, no crop
        ("tiny-clip", {"do_rescale": False}),
    ],
)
def test_a_wrong_setting_exceeds_the_tolerance(processors: dict[str, Any], name: str, wrong: dict[str, Any]) -> None:
    images = real_images()
    tensors = [as_tensor(image) for image in images]
    expected = reference(processors[name], images)
    assert max_difference(expected, PixelValues(_with(processors[name]))(tensors)) <= TOLERANCE  # the copy is right
    assert max_difference(expected, PixelValues(_with(processors[name], **wrong))(tensors)) > TOLERANCE


@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (0, -1)])
def test_a_crop_one_pixel_off_exceeds_the_tolerance(processors: dict[str, Any], shift: tuple[int, int]) -> None:
    """The crop's offsets are checked, not just its size: the right resize cropped one pixel off is wrong."""
    processor = processors["clip-b32"]
    images = real_images()
    expected = reference(processor, images)
    crops = []
    for image in images:
        chw = as_tensor(image).permute(2, 0, 1)[None]
        height, width = chw.shape[-2:]
        size = (224, width * 224 // height) if height <= width else (height * 224 // width, 224)  # shortest edge 224
        resized = tvF.resize(chw, list(size), tvF.InterpolationMode.BICUBIC, antialias=True)  # today's resize
        top = int((size[0] - 224) / 2.0) + shift[0]
        left = int((size[1] - 224) / 2.0) + shift[1]
        top, left = min(max(top, 0), size[0] - 224), min(max(left, 0), size[1] - 224)
        crops.append(resized[0, :, top : top + 224, left : left + 224])
    values = processor.rescale_and_normalize(torch.stack(crops), True, 1 / 255, True, processor.image_mean, processor.image_std)
    assert max_difference(expected, values) > TOLERANCE


def test_the_float_resize_torchvision_runs_off_the_cpu_exceeds_the_tolerance(processors: dict[str, Any]) -> None:
    """Why the resize is ours: torchvision's uint8 bicubic off the CPU (float32 interpolation, one rounding)
    is not the CPU kernel's. Simulated on CPU here; on CUDA the processor itself is asked, too."""
    processor = processors["blip-base"]
    images = real_images()
    expected = reference(processor, images)
    floats = [
        tvF.resize(as_tensor(image).permute(2, 0, 1).float(), [384, 384], tvF.InterpolationMode.BICUBIC, antialias=True)
        .clamp(0, 255).round().to(torch.uint8) for image in images
    ]
    values = processor.rescale_and_normalize(torch.stack(floats), True, 1 / 255, True, processor.image_mean, processor.image_std)
    assert max_difference(expected, values) > TOLERANCE
    if torch.cuda.is_available():
        on_device = [as_tensor(image).permute(2, 0, 1).cuda() for image in images]
        library = processor(images=on_device, input_data_format="channels_first", device="cuda", return_tensors="pt")
        assert max_difference(expected, library["pixel_values"]) > TOLERANCE


# -- refusals -------------------------------------------------------------------------------------------


def test_processors_it_cannot_reproduce_are_refused(processors: dict[str, Any]) -> None:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    with pytest.raises(ValueError, match="torchvision-backed"):
        PixelValues(BlipImageProcessorPil())
    for resample in (PILImageResampling.LANCZOS, PILImageResampling.NEAREST, PILImageResampling.BOX):
        with pytest.raises(ValueError, match="only bilinear and bicubic"):
            PixelValues(_with(processors["blip-base"], resample=resample))
    with pytest.raises(ValueError, match="do_pad"):
        PixelValues(_with(processors["blip-base"], do_pad=True))
    device_path = PixelValues(processors["tiny-blip"])
    with pytest.raises(ValueError, match="uint8"):
        device_path([torch.zeros((8, 8, 3), dtype=torch.float32)])
    with pytest.raises(ValueError, match="RGB"):
        device_path([torch.zeros((8, 8, 4), dtype=torch.uint8)])
    with pytest.raises(ValueError, match="no images"):
        device_path([])
