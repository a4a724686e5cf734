"""The GPU scenario on the CPU: every step of `binner bench -s gpu` runs here with tiny BLIP/CLIP, a random YOLOv8n .pt
and the real OCR on two of the shared images (``device="cpu"``, which the CLI never passes), so that its wiring, its
keys and its verdicts are tested; the figures mean nothing. Without CUDA the command itself refuses, saying why."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily

from app.bench import gpu as bench_gpu
from app.config import load_config
from app.metrics import Metrics
from tests.conftest_models import IMAGES, require_shared

pytestmark = pytest.mark.models

# The quick plan, shrunk to a few images per step (the CPU runs the real OCR at about a third of a second per image).
TINY = replace(bench_gpu.QUICK, ocr_batch=1, vision_batch=2, stage_batches=2, network_calls=1, ocr_replays=1,
               cudnn_images=2, cudnn_rounds=2, blip_batches=(2,), blip_probe_ceiling=4, blip_stage_batches=1,
               seeds_images=1, loader_workers=2, loader_files=4, pipeline_files=2, ocr_bins_images=2, ocr_probe_ceiling=2,
               budget_s=600.0)
SOURCE = ("text/paddleocr_11.jpg", "photo/darknet_dog.jpg")  # one decided by its text (C), one that needs vision
REPORT_KEYS = {"stack", "notes", "step_seconds", "quick", "plan", "device", "models_used", "source", "models",
               "blip_batches", "ocr_cudnn", "seeds_loop", "ocr_bins_cpu_vs_gpu", "auto_batch_probe", "pipeline",
               "signals_needed_vs_all", "forced_oom_backoff", "pipeline_two_gpus", "goals", "target", "images_per_second",
               "p95_latency_s", "stage_utilisation", "peak_rss_mib", "seconds"}


def _config(tmp: Path) -> Any:
    return load_config(None, {"input": tmp / "unused-in", "output": tmp / "unused-out", "state_dir": tmp / "unused-st",
                              "vision": {"detector": {"image_size": 320}, "captioner": {"max_new_tokens": 4}}})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_blip_dir: Path, tiny_clip_dir: Path
             ) -> tuple[dict[str, Any], Path]:
    """The whole scenario once on the CPU; its dict and the partial file it left."""
    from app.bench.standin_models import build_yolo

    require_shared(IMAGES)
    tmp = tmp_path_factory.mktemp("gpu-bench")
    source = tmp / "source"
    for name in SOURCE:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGES / name, source / name)
    paths = {"detector": str(build_yolo(tmp / "yolov8n-random.pt")), "captioner": str(tiny_blip_dir),
             "clip": str(tiny_clip_dir)}
    partial = tmp / "partial.json"
    data = bench_gpu.run_gpu_scenario(_config(tmp), source, partial_path=partial, device="cpu", paths=paths, plan=TINY)
    return data, partial


def test_every_key_is_reported_and_the_partial_file_matches(tiny_run: tuple[dict[str, Any], Path]) -> None:
    data, partial = tiny_run
    assert REPORT_KEYS <= data.keys()
    assert data["quick"] is True and data["plan"]["vision_batch"] == 2
    errors = {key: value for key, value in _walk(data) if key.endswith("error")}
    assert not errors, errors
    assert set(data["step_seconds"]) >= {"models.vision.fp16", "models.ocr.auto", "blip_batches", "ocr_cudnn", "seeds_loop",
                                         "ocr_bins_cpu_vs_gpu", "pipeline.thread", "pipeline.process",
                                         "signals_needed_vs_all", "forced_oom_backoff"}
    written = json.loads(partial.read_text())
    assert written.keys() == data.keys()
    assert written["goals"] == json.loads(json.dumps(data["goals"]))


def _walk(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((f"{prefix}{key}", value))
            found.extend(_walk(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_walk(value, f"{prefix}{index}."))
    return found


@pytest.mark.parametrize(("model", "signals"), [("yolo", ["detections"]), ("blip", ["caption"]),
                                                ("clip", ["caption", "clip_similarity"]),
                                                ("vision", ["caption", "clip_similarity", "detections"])])
def test_each_vision_model_alone_and_as_the_stage_runs_it(tiny_run: tuple[dict[str, Any], Path], model: str,
                                                           signals: list[str]) -> None:
    record = tiny_run[0]["models"][model]["fp16"]
    assert record["batch"] == 2 and record["dtype"] == "float32"  # fp16 is not used on the CPU
    stage = record["stage"]
    assert stage["signals"] == signals  # the stage ran exactly this model's share of the work
    assert stage["failed"] == 0 and stage["images"] == 4 and stage["submitters"] == 3
    assert stage["host_seconds"]["prepare"] > 0 and stage["device_seconds"] > 0
    rates = [network["images_per_second"] for network in record["networks"].values()]
    assert all(rate > 0 for rate in rates) and len(rates) == len(record["stage_models"])
    assert record["limit_images_per_second"] == pytest.approx(1 / sum(1 / rate for rate in rates), rel=0.02)
    assert record["ratio"] == pytest.approx(stage["images_per_second"] / record["limit_images_per_second"], abs=2e-3)
    assert record["target"]["met"] is (record["ratio"] >= 0.7)


def test_ocr_networks_replay_the_stages_own_passes(tiny_run: tuple[dict[str, Any], Path]) -> None:
    record = tiny_run[0]["models"]["ocr"]["auto"]
    network = record["networks"]["det+cls+rec"]
    assert network["images_per_replay"] == 2 and network["passes"]["det"] == 2  # one pass per image at batch 1
    assert network["passes"]["rec"] >= 1 and set(network["seconds_per_replay"]) == {"det", "cls", "rec"}
    assert record["stage"]["signals"] == ["ocr"] and record["stage"]["host_seconds"]["prepare"] > 0
    assert record["ratio"] == pytest.approx(record["stage"]["images_per_second"] / network["images_per_second"], abs=2e-3)


def test_blip_batches_include_the_probed_maximum(tiny_run: tuple[dict[str, Any], Path]) -> None:
    blip = tiny_run[0]["blip_batches"]
    assert blip["probe"] == {"ceiling": 4, "batch": 4, "seconds": blip["probe"]["seconds"]}  # the CPU: the ceiling
    assert [run["batch"] for run in blip["runs"]] == [2, 4] and [run["probed"] for run in blip["runs"]] == [False, True]
    assert blip["attention"] in {"sdpa", "eager"}
    for run in blip["runs"]:
        assert 0 < run["network"]["decoding_steps"] <= run["network"]["max_new_tokens"] == 4
        assert run["stage"]["signals"] == ["caption"] and run["stage"]["images"] == run["batch"]
    caches = blip["kv_cache"]
    assert caches["batch"] == 2 and caches["stage_uses"] == "dynamic" and caches["identical_tokens"] is True
    assert {name: network["kv_cache"] for name, network in caches["networks"].items()} == {"dynamic": "dynamic",
                                                                                           "static": "static"}
    assert all(network["images_per_second"] > 0 for network in caches["networks"].values())


def test_ocr_cudnn_on_and_off_cold_and_warm(tiny_run: tuple[dict[str, Any], Path]) -> None:
    """The step runs both modes and both phases here; cuDNN itself does not apply on the CPU, so no verdict."""
    data = tiny_run[0]
    record = data["ocr_cudnn"]
    assert record["cudnn"]["applicable"] is False and "does not apply on cpu" in record["cudnn"]["why"]
    assert record["batch"] == 1 and record["images_per_round"] == 2 and record["precision"] == "auto"
    for mode in ("on", "off"):
        assert [entry["round"] for entry in record[mode]["rounds"]] == [1, 2]
        assert record[mode]["cold"] == record[mode]["rounds"][0] and record[mode]["cold"]["images_per_second"] > 0
        assert record[mode]["warm"]["images"] == 2 and record[mode]["warm"]["images_per_second"] > 0
    assert record["on"]["lines"] == record["off"]["lines"] > 0 and record["lines_identical"] is True
    assert record["faster"] == {"cold": None, "warm": None} and record["target"]["met"] is None
    assert {goal["goal"]: goal["met"] for goal in data["goals"]}["ocr_cudnn.on_not_slower"] is None
    import torch

    assert torch.backends.cudnn.enabled  # the process-wide switch is restored


def test_pipelines_the_seeds_loop_and_their_verdicts(tiny_run: tuple[dict[str, Any], Path]) -> None:
    data = tiny_run[0]
    thread, process = data["pipeline"]["thread"], data["pipeline"]["process"]
    for run in (thread, process):
        assert run["finished"] == run["files"] == 2 and run["ledger"]["status"] == {"done": 2}
        assert run["images_per_second"] > 0 and run["host_seconds"]["ocr"]["prepare"] > 0
        assert run["daemon_gpu_series"]["scrapes"] >= 1  # the run's own registry was read while it ran
        assert run["slowest_stage_alone"] in {"load", "ocr", "vision"}
        alone = run["stages_alone_images_per_second"][run["slowest_stage_alone"]]
        assert run["ratio_to_slowest_stage"] == pytest.approx(run["images_per_second"] / alone, abs=2e-3)
        assert run["bottleneck_gpu"] is None and run["gpu_busy_target"]["met"] is None  # no GPU, no verdict
    assert process["isolation"] == "process" and process["bins"] == thread["bins"]
    seeds = data["seeds_loop"]
    assert seeds["images"] == 1 and sum(seeds["bins"].values()) == 1
    assert seeds["speedup"] == pytest.approx(thread["images_per_second"] / seeds["images_per_second"], abs=0.01)
    assert data["images_per_second"] == thread["images_per_second"]
    goals = {goal["goal"]: goal for goal in data["goals"]}
    assert goals["seeds_loop.speedup"]["met"] is (seeds["speedup"] >= 20)
    assert data["target"]["missed"] == [goal["goal"] for goal in data["goals"] if goal["met"] is False]
    assert data["target"]["met"] is (not data["target"]["missed"])


def test_needed_against_all_gives_the_same_bins_and_says_what_it_skipped(tiny_run: tuple[dict[str, Any], Path]) -> None:
    compared = tiny_run[0]["signals_needed_vs_all"]
    assert compared["of"] == compared["files"] == 2 and compared["bins_identical"] == 2 and compared["target"]["met"]
    # the text image is decided by OCR under `needed`: no model of the vision stage ran on it
    assert compared["skipped_share"] == {"captioner": 0.5, "clip": 0.5, "detector": 0.5}
    assert compared["rules"]["needed"] == compared["rules"]["all"] and sum(compared["rules"]["all"].values()) == 1


def test_ocr_bins_probe_and_what_needs_cuda(tiny_run: tuple[dict[str, Any], Path]) -> None:
    data = tiny_run[0]
    bins = data["ocr_bins_cpu_vs_gpu"]
    assert bins["images"] == 2 and bins["auto"]["of"] == 2 and bins["auto"]["cpu_lines"] > 0
    assert bins["auto"]["target"]["met"] is (bins["auto"]["bins_identical"] == 2)
    assert data["auto_batch_probe"]["ocr"]["batch"] == 2
    assert data["forced_oom_backoff"]["target"]["met"] is None and "CUDA" in data["forced_oom_backoff"]["skipped"]
    assert "skipped" in data["pipeline_two_gpus"]


def test_a_spent_budget_skips_every_step_but_keeps_every_key(tmp_path: Path, tiny_blip_dir: Path,
                                                             tiny_clip_dir: Path) -> None:
    require_shared(IMAGES)
    partial = tmp_path / "partial.json"
    paths = {"detector": "unused.pt", "captioner": str(tiny_blip_dir), "clip": str(tiny_clip_dir)}
    data = bench_gpu.run_gpu_scenario(_config(tmp_path), IMAGES / "photo", partial_path=partial, device="cpu",
                                      paths=paths, plan=TINY, budget_s=0)
    assert REPORT_KEYS <= data.keys()
    assert data["pipeline"]["thread"]["skipped"].startswith("the plan's time budget")
    assert data["models"]["blip"]["fp16"] == data["models"]["yolo"]["fp16"] == data["seeds_loop"]
    assert data["goals"] == [] and data["target"]["met"] is None
    assert json.loads(partial.read_text())["signals_needed_vs_all"] == data["signals_needed_vs_all"]


def test_pipeline_verdicts_on_a_two_gpu_record() -> None:
    """What only a GPU host produces, judged: the busiest stage's GPU and the slowest stage alone."""
    record = {"files": 480, "ocr_devices": ["cuda:0"], "vision_devices": ["cuda:1"], "images_per_second": 90.0,
              "stage_utilisation": {"load@cpu": 1.4, "ocr@cuda:0": 0.6, "vision@cuda:1": 0.97},
              "gpu_utilisation": {"gpu0": {"mean_util_pct": 55.0}, "gpu1": {"mean_util_pct": 79.5}}}
    judged = bench_gpu._judge_pipeline(record, {"load": 400.0, "ocr": 150.0, "vision": 95.0})
    assert judged["bottleneck_stage"] == "vision@cuda:1" and judged["bottleneck_gpu"] == "gpu1"
    assert judged["bottleneck_gpu_busy_pct"] == 79.5 and judged["gpu_busy_target"]["met"] is False
    assert judged["slowest_stage_alone"] == "vision" and judged["ratio_to_slowest_stage"] == 0.947
    assert judged["ratio_target"]["met"] is True and judged["shared_device_limit_images_per_second"] is None


def test_registry_series_reads_the_binner_gpu_gauges() -> None:
    """The series come from the registry as /metrics serves it; here a collector yields the gauges that ``_GpuCollector``
    yields on a GPU host (this machine has no NVIDIA GPU, so the real one yields nothing)."""
    metrics = Metrics()
    values = iter([0.5, 0.9, 1.0, 0.7] + [0.7] * 1000)

    class OneGpu:
        def describe(self) -> list[Any]:
            return []

        def collect(self) -> Any:
            util = GaugeMetricFamily("binner_gpu_utilization_ratio", "GPU busy ratio", labels=["gpu"])
            util.add_metric(["0"], next(values))
            used = GaugeMetricFamily("binner_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
            used.add_metric(["0"], 2.0**30)
            yield util
            yield used

    metrics.registry.register(OneGpu())
    series = bench_gpu.RegistrySeries(metrics.registry, period_s=0.01)
    assert series.scrape() == {"binner_gpu_utilization_ratio{gpu=0}": 0.5, "binner_gpu_memory_used_bytes{gpu=0}": 2.0**30}
    record: dict[str, Any] = {}
    with series.sampling(record):
        import time

        time.sleep(0.2)
    found = record["daemon_gpu_series"]["series"]
    assert set(found) == {"binner_gpu_utilization_ratio{gpu=0}", "binner_gpu_memory_used_bytes{gpu=0}"}
    util = found["binner_gpu_utilization_ratio{gpu=0}"]
    assert util["max"] == 1.0 and util["samples"] >= 4 and util["last"] == 0.7 and len(util["points"]) == util["samples"]
    assert found["binner_gpu_memory_used_bytes{gpu=0}"]["mean"] == 2.0**30


def test_sampler_without_nvml_reports_no_samples() -> None:
    sampler = bench_gpu.NvmlSampler()
    record: dict[str, object] = {}
    with sampler.sampling(record):
        pass
    assert "gpu_utilisation" in record
    if not sampler.available:
        assert record["gpu_utilisation"] == {}


def _needs_no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")


def test_scenario_needs_cuda_and_says_so(tmp_path: Path) -> None:
    _needs_no_gpu()
    from app.bench import BenchUnavailable

    with pytest.raises(BenchUnavailable, match="needs a CUDA GPU"):
        bench_gpu.run_gpu_scenario(_config(tmp_path), None, quick=True)


def test_cli_quick_refuses_without_cuda() -> None:
    _needs_no_gpu()
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, ["bench", "-s", "gpu", "--quick", "--json"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output


def test_device_preflight_names_what_is_missing() -> None:
    """scripts/device_check.sh stops within seconds on a GPU machine that lacks an API the device path uses, one line
    per missing piece; here (transformers as installed) nothing is missing but CUDA."""
    import importlib.util

    import torch

    path = Path(__file__).resolve().parents[1] / "scripts" / "device_preflight.py"
    spec = importlib.util.spec_from_file_location("device_preflight", path)
    assert spec is not None and spec.loader is not None
    preflight = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preflight)
    assert preflight.missing(allow_cpu=True) == []
    import transformers

    assert preflight.missing([("transformers.image_processing_backends", "NoSuchBackend", "the device path")],
                             allow_cpu=True) == [
        f"transformers.image_processing_backends.NoSuchBackend is missing (the device path; transformers "
        f"{transformers.__version__})"]
    [line] = preflight.missing([("binner_no_such_module", None, "a test")], allow_cpu=True)
    assert line.startswith("binner_no_such_module cannot be imported (a test): ModuleNotFoundError")
    if not torch.cuda.is_available():
        assert [line for line in preflight.missing([]) if "sees no CUDA GPU" in line]
