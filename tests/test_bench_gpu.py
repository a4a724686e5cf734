"""The GPU scenario's building blocks, run on the CPU with tiny models so that its wiring is tested here;
the scenario itself needs CUDA and says so clearly without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bench import gpu as bench_gpu
from app.config import load_config
from tests.conftest_models import IMAGES, YOLO_TFLITE, require_shared

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def tiny_paths(tiny_blip_dir: Path, tiny_clip_dir: Path) -> dict[str, str]:
    require_shared(YOLO_TFLITE)
    return {"detector": str(YOLO_TFLITE), "captioner": str(tiny_blip_dir), "clip": str(tiny_clip_dir)}


def test_sampler_without_nvml_reports_no_samples() -> None:
    sampler = bench_gpu.NvmlSampler()
    record: dict[str, object] = {}
    with sampler.sampling(record):
        pass
    assert "gpu_utilisation" in record
    if not sampler.available:
        assert record["gpu_utilisation"] == {}


def test_vision_models_report_every_model_batch_and_precision(tiny_paths: dict[str, str]) -> None:
    images, names = bench_gpu._decode(IMAGES / "photo", 16, 640)
    assert names and len(images) == 16
    report = bench_gpu._vision_models(images, tiny_paths, "cpu", bench_gpu.NvmlSampler(), max_new_tokens=4)
    for model in ("yolo", "blip", "clip"):
        for precision in bench_gpu.PRECISIONS:
            runs = report[model][precision]
            assert [run["batch"] for run in runs] == list(bench_gpu.BATCHES)
            assert all(run["images_per_second"] > 0 for run in runs)


def test_pipeline_places_every_copy_and_measures_steady_state(tiny_paths: dict[str, str], tmp_path: Path) -> None:
    require_shared(IMAGES)
    config = load_config(None, {"input": tmp_path / "unused-in", "output": tmp_path / "unused-out",
                                "state_dir": tmp_path / "unused-state"})
    record = bench_gpu._pipeline(config, tiny_paths, IMAGES / "photo", tmp_path, "cpu-run", None, ["cpu"], 4,
                                 bench_gpu.NvmlSampler(), files=12)
    assert record["files"] >= 12
    assert record["finished"] == record["files"]
    assert record["images_per_second"] and record["images_per_second"] > 0
    placed = [p for p in (tmp_path / "cpu-run" / "bins").rglob("*") if p.is_file()]
    assert len(placed) == record["files"]


def test_scenario_needs_cuda_and_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "st"})
    from app.bench import BenchUnavailable

    with pytest.raises(BenchUnavailable, match="needs a CUDA GPU"):
        bench_gpu.run_gpu_scenario(config, None)
