"""`binner bench`: binner measured side by side with its limit, the seeds' loop, Ray Data, the bare framework,
a steady stream of files, the real models and a GPU. One module per scenario, their common part (``common``), the
random stand-in models of the real architectures (``standin_models``) and the runner and table (``suite``)."""

from app.bench.common import BenchOptions, BenchUnavailable, make_images, parse_ms
from app.bench.suite import SCENARIOS, bottleneck, render_table, run_benchmarks, run_scenario

__all__ = ["SCENARIOS", "BenchOptions", "BenchUnavailable", "bottleneck", "make_images", "parse_ms", "render_table",
           "run_benchmarks", "run_scenario"]
