"""`binner bench`: binner measured side by side with its limit, the seeds' loop, Ray Data, the bare framework,
a steady stream of files, the real models and a GPU (docs/benchmarks.md documents every key).

Each scenario lives in its own module of ``app/bench/`` and returns a dict with at least
``images_per_second``, ``p95_latency_s``, ``stage_utilisation`` and ``peak_rss_mib``, plus its own keys and a
``target`` it is checked against. This module runs the chosen scenarios in order and renders the table.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable
from typing import Any

from app.bench.common import BenchOptions, BenchUnavailable, machine

SCENARIOS: tuple[str, ...] = ("engine", "sequential", "ray", "framework", "stream", "models", "gpu", "scale")
RAY_INSTALL_HINT = ("the ray scenario needs Ray Data, a benchmark-only extra: "
                    "pip install -c constraints.txt -e '.[ray]'  (or: pip install 'ray[data]==2.60.*')")


def run_scenario(name: str, options: BenchOptions, done: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """One scenario; ``done`` holds this run's earlier results (``sequential`` and ``stream`` reuse ``engine``);
    ``quick``: the gpu scenario's short plan (under 5 minutes on one H100-class GPU), ignored by the others."""
    if name == "engine":
        from app.bench.engine import run_engine

        result = run_engine(options)
    elif name == "sequential":
        from app.bench.engine import run_sequential

        result = run_sequential(options, done.get("engine"))
    elif name == "ray":
        try:
            import ray  # noqa: F401
            import ray.data  # noqa: F401
        except ImportError:
            raise BenchUnavailable(RAY_INSTALL_HINT) from None
        from app.bench.ray import run_ray

        result = run_ray(options)
    elif name == "framework":
        from app.bench.framework import run_framework

        result = run_framework(options)
    elif name == "stream":
        from app.bench.stream import run_stream

        result = run_stream(options, done.get("engine"))
    elif name == "models":
        if options.config_file is None or options.source is None:
            raise BenchUnavailable("the models scenario needs --config FILE (the models to measure) and --source DIR "
                                   "(images to repeat), e.g. --config deploy/examples/offline-cpu.yaml "
                                   "--source ../shared/data/images")
        from app.bench.models import run_models

        result = run_models(options)
    elif name == "scale":
        from app.bench.scale import run_scale

        result = run_scale(options)
    elif name == "gpu":
        try:
            from app.bench.gpu import run_gpu_scenario
        except ModuleNotFoundError as error:
            if error.name != "app.bench.gpu":
                raise
            raise BenchUnavailable("the gpu scenario is not part of this build (app/bench/gpu.py is missing)") from None
        from app.config import load_config

        result = run_gpu_scenario(load_config(options.config_file), options.source, **({"quick": True} if quick else {}))
    else:
        raise BenchUnavailable(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    result.setdefault("bottleneck", bottleneck(result.get("stage_utilisation")))
    return result


def run_benchmarks(names: list[str], options: BenchOptions, command: str | None = None,
                   announce: Callable[[str], None] | None = None, quick: bool = False) -> dict[str, Any]:
    """Run ``names`` (each once, in the order given) and return the stable JSON report."""
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise BenchUnavailable(f"unknown scenario {', '.join(map(repr, unknown))}; choose from {', '.join(SCENARIOS)}")
    report: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(["binner", *sys.argv[1:]]),
        "scenarios": {},
    }
    for name in dict.fromkeys(names):
        if announce is not None:
            announce(name)
        report["scenarios"][name] = run_scenario(name, options, report["scenarios"], quick=quick)
    return report


def bottleneck(utilisation: dict[str, float] | None) -> str | None:
    """The busiest stage: the one to make faster (or to give another device)."""
    if not utilisation:
        return None
    stage, busy = max(utilisation.items(), key=lambda pair: pair[1])
    return f"{stage} ({busy:.0%} busy)"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{text}{unit}"
    return f"{value}{unit}"


def _headline(name: str, result: dict[str, Any]) -> str:
    """The scenario's own figure, in words."""
    if name == "engine":
        return f"efficiency {_fmt(result.get('efficiency'))} of {_fmt(result.get('analytic_limit_images_per_second'))}/s"
    if name == "sequential":
        return (f"speedup {_fmt(result.get('speedup'))}x of {_fmt(result.get('theoretical_speedup'))}x theoretical "
                f"(loop {_fmt(result.get('images_per_second'))}/s)")
    if name == "ray":
        parts = []
        for variant in ("default", "tuned"):
            figures = result.get(variant) or {}
            parts.append(f"{variant}: {_fmt(figures.get('throughput_ratio'))}x throughput, "
                         f"p95 ratio {_fmt(figures.get('p95_ratio'))}")
        return "; ".join(parts)
    if name == "framework":
        return (f"{_fmt(result.get('ratio_to_limit'))} of the durable-work loop "
                f"({_fmt(result.get('limit_images_per_second'))}/s on this disk); "
                f"{_fmt(result.get('overhead_us_per_file'))} us/file")
    if name == "stream":
        return (f"p50/p95/p99 {_fmt(result.get('p50_s'))}/{_fmt(result.get('p95_s'))}/{_fmt(result.get('p99_s'))} s "
                f"at 90% load")
    if name == "scale":
        return (f"first file after {_fmt(result.get('first_placed_s'))} s; peak RSS x{_fmt(result.get('rss_ratio'))} "
                f"of a tenth the size (rebin x{_fmt(result.get('rebin_rss_ratio'))}); rebin --dry-run "
                f"{_fmt(result.get('rebin_dry_run_s'))} s, {_fmt(result.get('rebin_peak_rss_mib'))} MiB; "
                f"{_fmt(result.get('ledger_bytes_per_row'))} B/row")
    if name == "models":
        return f"{_fmt(result.get('ratio_to_slowest_stage'))} of the slowest stage alone"
    return ""


def render_table(report: dict[str, Any]) -> Any:
    """A rich table: one row per scenario, its figures, its target and the bottleneck."""
    from rich.table import Table

    table = Table(title=f"binner bench ({report['machine'].get('cpus')} CPUs, {report['date']})")
    for column in ("scenario", "images/s", "p95 latency", "result", "target", "bottleneck", "peak RSS"):
        table.add_column(column, overflow="fold")
    for name, result in report["scenarios"].items():
        target = result.get("target") or {}
        met = target.get("met")
        verdict = "" if met is None else ("met: " if met else "MISSED: ")
        table.add_row(
            name,
            _fmt(result.get("images_per_second")),
            _fmt(result.get("p95_latency_s"), " s"),
            _headline(name, result),
            f"{verdict}{target.get('text', '')}",
            str(result.get("bottleneck") or "-"),
            _fmt(result.get("peak_rss_mib"), " MiB"),
        )
    return table
