"""`binner bench`: every scenario but gpu and ray runs at a tiny size and emits the documented JSON keys.

These are not timed tests: the figures are whatever this machine gives; only completion and the report's
layout (docs/benchmarks.md) are checked.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from app import bench
from app.bench.common import BenchOptions, parse_ms, percentile, stage_limit
from app.cli import cli

COMMON_KEYS = {"images_per_second", "p95_latency_s", "stage_utilisation", "peak_rss_mib", "target", "bottleneck"}
SCENARIO_KEYS = {
    "engine": {"efficiency", "analytic_limit_images_per_second"},
    "sequential": {"speedup", "theoretical_speedup"},
    "framework": {"images_per_second", "overhead_us_per_file", "large_jpeg", "limit_images_per_second",
                  "ratio_to_limit", "disk", "busy_us_per_file"},
    "stream": {"p50_s", "p95_s", "p99_s", "levels"},
    "models": {"ratio_to_slowest_stage", "standalone", "signals"},
    "scale": {"files", "first_placed_s", "once_seconds", "rebin_dry_run_s", "rebin_peak_rss_mib",
              "ledger_bytes_per_row", "sizes", "rss_ratio", "rebin_rss_ratio"},
}


def bench_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["bench", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_layout(report: dict[str, Any], names: list[str]) -> None:
    assert {"machine", "date", "command", "scenarios"} <= report.keys()
    assert report["machine"]["cpus"] >= 1
    assert list(report["scenarios"]) == names
    for name in names:
        result = report["scenarios"][name]
        missing = (COMMON_KEYS | SCENARIO_KEYS[name]) - result.keys()
        assert not missing, f"{name} lacks {missing}"
        assert result["images_per_second"] > 0
        assert isinstance(result["stage_utilisation"], dict)
        assert {"text", "met"} <= result["target"].keys()


def test_engine_sequential_framework_and_stream_complete_with_the_documented_keys() -> None:
    names = ["engine", "sequential", "framework", "stream"]
    args = [arg for name in names for arg in ("--scenario", name)]
    report = bench_json(*args, "--images", "32", "--large-images", "2", "--stream-seconds", "1")
    check_layout(report, names)
    scenarios = report["scenarios"]
    assert scenarios["engine"]["finished"] == 32
    assert 0 < scenarios["engine"]["efficiency"] <= 1.05
    assert scenarios["sequential"]["finished"] == 32
    assert scenarios["sequential"]["theoretical_speedup"] == pytest.approx(88.89 / 19.61, rel=0.01)
    assert scenarios["framework"]["large_jpeg"]["finished"] == 2
    framework = scenarios["framework"]
    assert framework["limit"]["files"] == 32 and framework["limit_images_per_second"] > 0
    assert framework["ratio_to_limit"] == pytest.approx(framework["images_per_second"] / framework["limit_images_per_second"],
                                                        rel=1e-2)
    assert framework["disk"]["write_2kb_us"] > 0 and framework["disk"]["fsync_us"] > 0
    for level in scenarios["stream"]["levels"].values():
        assert level["placed"] == level["files"], level


def test_scale_runs_a_tenth_and_the_whole_size_as_processes_and_compares_their_memory() -> None:
    report = bench_json("--scenario", "scale", "--files", "200")
    check_layout(report, ["scale"])
    scale = report["scenarios"]["scale"]
    small, large = scale["sizes"]
    assert (small["files"], small["ledger_rows"], large["files"], large["ledger_rows"]) == (20, 20, 200, 200)
    assert scale["files"] == 200 and scale["peak_rss_mib"] == large["peak_rss_mib"] > 20
    assert scale["rss_ratio"] == pytest.approx(large["peak_rss_mib"] / small["peak_rss_mib"], abs=1e-3)
    assert scale["rebin_rss_ratio"] == pytest.approx(large["rebin_peak_rss_mib"] / small["rebin_peak_rss_mib"], abs=1e-3)
    assert 0 < scale["first_placed_s"] < scale["once_seconds"] and 100 < scale["ledger_bytes_per_row"] < 100_000


def test_zero_cost_stages_do_not_divide_by_zero() -> None:
    """`--ocr-ms 0,0` crashed with ZeroDivisionError: a free stage has no finite limit, so no efficiency."""
    report = bench_json("--ocr-ms", "0,0", "--vision-ms", "0,0", "--images", "16")
    engine = report["scenarios"]["engine"]
    assert engine["finished"] == 16
    assert engine["analytic_limit_images_per_second"] is None and engine["efficiency"] is None
    assert engine["target"]["met"] is None


def pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width * image.height


def test_models_scenario_measures_the_pipeline_and_each_stage_alone(shared_images: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for category in ("photo", "text"):  # the smallest image of each: real models on CPU, kept quick
        path = min((p for p in (shared_images / category).iterdir() if p.suffix in {".jpg", ".png"}), key=pixels)
        (source / path.name).write_bytes(path.read_bytes())
    config = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "offline-cpu.yaml"
    report = bench_json("--scenario", "models", "--config", str(config), "--source", str(source), "--repeat", "1")
    check_layout(report, ["models"])
    models = report["scenarios"]["models"]
    assert models["finished"] == 2
    assert {"load", "ocr", "vision"} <= models["standalone"].keys()
    assert models["ratio_to_slowest_stage"] > 0
    signals = models["signals"]
    assert signals["files"] == 2 and signals["bins_identical"] == 2, signals  # needed bins as all does
    assert signals["needed_images_per_second"] > 0 and signals["all_images_per_second"] > 0


def test_models_scenario_without_config_says_what_to_pass() -> None:
    result = CliRunner().invoke(cli, ["bench", "--scenario", "models"])
    assert result.exit_code == 2
    assert "--config" in result.output and "--source" in result.output


def test_ray_scenario_without_ray_prints_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when it is absent
    result = CliRunner().invoke(cli, ["bench", "--scenario", "ray", "--images", "8"])
    assert result.exit_code == 2
    assert "pip install" in result.output and "[ray]" in result.output
    assert "Traceback" not in result.output


def test_gpu_scenario_dispatches_to_the_gpu_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[Any, Any]] = []

    def run_gpu_scenario(config: Any, source: Path | None) -> dict[str, Any]:
        calls.append((config, source))
        return {"images_per_second": 1.0, "p95_latency_s": None, "stage_utilisation": {"ocr": 0.5},
                "peak_rss_mib": 1.0}

    monkeypatch.setitem(sys.modules, "app.bench.gpu", types.SimpleNamespace(run_gpu_scenario=run_gpu_scenario))
    report = bench.run_benchmarks(["gpu"], BenchOptions(source=tmp_path))
    assert len(calls) == 1 and calls[0][1] == tmp_path
    assert type(calls[0][0]).__name__ == "BinnerConfig"
    assert report["scenarios"]["gpu"]["bottleneck"] == "ocr (50% busy)"


def test_unknown_scenario_and_bad_costs_are_refused_with_the_option_named() -> None:
    result = CliRunner().invoke(cli, ["bench", "--scenario", "warp"])
    assert result.exit_code == 2 and "warp" in result.output and "engine" in result.output
    result = CliRunner().invoke(cli, ["bench", "--ocr-ms", "20"])
    assert result.exit_code == 2 and "--ocr-ms" in result.output
    with pytest.raises(ValueError, match="--vision-ms"):
        parse_ms("-1,2", "--vision-ms")


def test_limits_and_percentiles() -> None:
    assert stage_limit((20.0, 10.0), 16) == pytest.approx(88.89, rel=1e-3)
    assert math.isinf(stage_limit((0.0, 0.0), 16))
    assert percentile([], 95) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0


def test_table_names_the_bottleneck() -> None:
    from rich.console import Console

    report = {"machine": {"cpus": 2}, "date": "today", "scenarios": {
        "engine": {"images_per_second": 87.0, "p95_latency_s": 0.9, "efficiency": 0.98,
                   "analytic_limit_images_per_second": 88.9, "stage_utilisation": {"ocr": 0.98, "vision": 0.6},
                   "peak_rss_mib": 80.0, "target": {"text": "efficiency >= 0.98", "met": True},
                   "bottleneck": bench.bottleneck({"ocr": 0.98, "vision": 0.6})}}}
    console = Console(width=200, record=True)
    console.print(bench.render_table(report))
    text = console.export_text()
    assert "ocr (98% busy)" in text and "met: efficiency >= 0.98" in text
