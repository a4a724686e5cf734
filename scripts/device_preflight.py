"""What `binner bench -s gpu` needs on a lent GPU machine, checked before the clock starts (scripts/device_check.sh).

The machine comes with torch, torchvision, transformers and the rest preinstalled, in versions this project was not
developed on (Python 3.12, torch 2.11+cu130, transformers 5.17 when this was written), plus the wheels carried in
.whl/. Each API the device path relies on is named here with what needs it, so that a missing one costs a line and
seconds, not a failed step after minutes. Prints one line of versions; on a problem, one ``device_check: MISSING``
line each and exit status 3. ``--allow-cpu`` skips the CUDA check (to try the script on a machine without a GPU).
"""

from __future__ import annotations

import importlib
import sys

# (module, attribute or None, what needs it)
REQUIRED: list[tuple[str, str | None, str]] = [
    ("torch", None, "every model stage"),
    ("torchvision", None, "Ultralytics and transformers' image processors"),
    ("transformers", "BlipForConditionalGeneration", "the BLIP captioner"),
    ("transformers", "CLIPModel", "CLIP similarity"),
    ("transformers.image_processing_backends", "TorchvisionBackend",
     "stages/vision_inputs.py: BLIP/CLIP pre-processing on the device reads the processor's torchvision backend"),
    ("transformers.image_transforms", "get_size_with_aspect_ratio", "stages/vision_inputs.py: resize geometry"),
    ("transformers.image_transforms", "get_resize_output_image_size", "stages/vision_inputs.py: resize geometry"),
    ("transformers.image_utils", "get_image_size_for_max_height_width", "stages/vision_inputs.py: resize geometry"),
    ("transformers.image_utils", "pil_torch_interpolation_mapping", "stages/vision_inputs.py: resample filters"),
    ("transformers.cache_utils", "StaticCache", "BLIP's static KV cache (bench: blip_batches.kv_cache)"),
    ("transformers.cache_utils", "EncoderDecoderCache", "BLIP's static KV cache (bench: blip_batches.kv_cache)"),
    ("ultralytics", "YOLO", "the detector"),
    ("ultralytics.nn.tasks", "DetectionModel", "stages/yolo_direct.py: which weights run without the predictor"),
    ("ultralytics.data.augment", "LetterBox", "stages/yolo_direct.py: the letterbox geometry"),
    ("ultralytics.utils.ops", "xywh2xyxy", "stages/yolo_direct.py: batched NMS"),
    ("ultralytics.utils.nms", "non_max_suppression", "tests of the batched NMS against Ultralytics'"),
    ("onnxruntime", None, "OCR on the CPU (the bins comparison)"),
    ("onnx2torch", None, "OCR on the torch runtime"),
    ("rapidocr_onnxruntime", None, "the PP-OCR models"),
    ("pynvml", None, "GPU utilisation samples"),
    ("stages.vision_inputs", "PixelValues", "the vision stage"),
    ("stages.yolo_direct", "batched_non_max_suppression", "the vision stage"),
    ("app.cli", None, "the binner command"),
    ("app.bench.gpu", "run_gpu_scenario", "the scenario"),
]
# Methods of TorchvisionBackend that stages/vision_inputs.py calls or compares against.
BACKEND_METHODS = ("_preprocess", "resize", "center_crop", "rescale_and_normalize")


def missing(required: list[tuple[str, str | None, str]] = REQUIRED, allow_cpu: bool = False) -> list[str]:
    """One line per requirement that this Python does not meet (empty when all are met)."""
    from stages.torch_compat import ensure_torchvision

    problems: list[str] = []
    try:
        ensure_torchvision()  # as every stage does before torchvision is imported
    except Exception as error:  # noqa: BLE001 - reported, with what needs it
        problems.append(f"torchvision cannot be imported: {type(error).__name__}: {error}")
    for module_name, attribute, why in required:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{module_name} cannot be imported ({why}): {type(error).__name__}: {error}")
            continue
        if attribute is not None and not hasattr(module, attribute):
            version = getattr(sys.modules.get(module_name.split(".")[0]), "__version__", "?")
            problems.append(f"{module_name}.{attribute} is missing ({why}; {module_name.split('.')[0]} {version})")
    backend = getattr(sys.modules.get("transformers.image_processing_backends"), "TorchvisionBackend", None)
    if backend is not None:
        absent = [name for name in BACKEND_METHODS if not hasattr(backend, name)]
        if absent:
            problems.append(f"transformers' TorchvisionBackend lacks {', '.join(absent)} (stages/vision_inputs.py)")
    if not allow_cpu:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA GPU: check the "
                            "driver, CUDA_VISIBLE_DEVICES and that torch is a CUDA build")
    return problems


def main(argv: list[str]) -> int:
    import torch

    problems = missing(allow_cpu="--allow-cpu" in argv)
    versions = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"cuda {torch.version.cuda}",
                f"gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}"]
    for name in ("torchvision", "transformers", "ultralytics", "onnxruntime"):
        module = sys.modules.get(name)
        versions.append(f"{name} {getattr(module, '__version__', 'absent')}")
    print(", ".join(versions))
    for problem in problems:
        print(f"device_check: MISSING {problem}", file=sys.stderr)
    return 3 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
