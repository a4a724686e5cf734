"""The house: one containment for both engines, no import circle, sibling packages reached through their faces only.

The engine test runs one poison file and one out-of-memory error through the local engine and through the Ray
engine's own steps (the loader task, the actor adapter, the finish task and the driver's recording), and checks that
both reach the same outcomes, attempts and timings, each batch through ``app.engine.containment.contain``. The Ray
steps run in this process (as Ray Data would call them on a worker), so the patched function is seen there too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app import bench
from app.config import load_config
from app.engine import Pipeline
from app.engine import containment as containment_module
from app.metrics import Metrics
from app.store import Ledger, scan, to_discovered
from stages.base import BatchPolicy, ImageItem, OutOfDeviceMemory, Stage
from stages.loader import LoaderOptions, LoaderStage
from tests.conftest import REPO
from tests.fakes import run_until_idle

POISON = "img_000005.png"


class PoisonAndMemory(Stage):
    """Raises for a batch holding ``POISON``, runs out of memory for a batch of more than two (picklable, stateless)."""

    name = "ocr"
    produces = frozenset({"ocr"})

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        if len(items) > 2:
            raise OutOfDeviceMemory(f"fake: no room for {len(items)}")
        if any(item.source.endswith(POISON) for item in items):
            raise ValueError("poisoned")
        for item in items:
            item.signals["ocr"] = {"text": "", "lines": [], "char_count": 0, "line_count": 0, "text_area_ratio": 0.0,
                                   "mean_confidence": 0.0}
        return items


def stages() -> list[Stage]:
    loader = LoaderStage(LoaderOptions(max_file_bytes=1 << 20, max_pixels=1 << 20, max_side=256), ["cpu"],
                         BatchPolicy(4, 5.0))
    return [loader, PoisonAndMemory(["cpu"], BatchPolicy(4, 5.0))]


def setting(root: Path) -> Any:
    bench.make_images(root / "in", 8, size=24)
    return load_config(None, {"input": root / "in", "output": root / "out", "state_dir": root / "state",
                              "max_attempts": 2, "placement": "copy"})


def run_local(root: Path) -> dict[str, Any]:
    from app.store import Placer

    config = setting(root)
    ledger = Ledger(root / "ledger.sqlite3")
    ledger.intake(to_discovered(config.input, seen) for seen in scan(config.input))
    pipeline = Pipeline(ledger=ledger, metrics=Metrics(), stages=stages(), thresholds=config.rules,
                        placer=Placer(config.output, "copy"), queue_capacities={"load": 8, "ocr": 8, "sink": 8},
                        max_attempts=config.max_attempts, placement_mode="copy")

    run_until_idle(pipeline)
    return outcomes(ledger)


def run_on_ray_steps(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The Ray engine's driver with its window executed here, step by step, as Ray Data runs it on the workers."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from app.ray_data import RayRun
    from app.ray_data import actor as actor_module
    from app.ray_data import tasks as tasks_module
    from app.ray_data.actor import RayStage
    from app.ray_data.dataset import block_size
    from app.ray_data.tasks import finish_batch, run_stateless

    monkeypatch.setattr(actor_module, "node_id", lambda: "this-node")
    monkeypatch.setattr(tasks_module, "node_id", lambda: "this-node")
    monkeypatch.setattr(actor_module, "assigned_gpus", lambda: [])
    config = setting(root)
    ledger = Ledger(root / "ledger.sqlite3")
    ledger.intake(to_discovered(config.input, seen) for seen in scan(config.input))
    built = stages()

    class InProcessRun(RayRun):
        def _wait_for_resources(self, timeout_s: float = 0) -> None:
            pass

        def _run_window(self, blocks: list[Any], left: set[int]) -> str | None:
            import json

            import pyarrow as pa

            actor = RayStage(built[1], config.rules, keep_image=False)
            table = pa.concat_tables([run_stateless(block, built[0], config.rules, keep_image=True) for block in blocks])
            rows = block_size(built)
            results = [actor(table.slice(at, rows)) for at in range(0, table.num_rows, rows)]
            actor.teardown()
            finished = finish_batch(pa.concat_tables(results), config.rules, str(config.output), config.placement,
                                    config.max_attempts)
            done = [self._outcome_of(json.loads(text)) for text in finished.column("result").to_pylist()]
            self._record(done)
            left.difference_update(outcome.id for outcome in done)
            return None

        @staticmethod
        def _outcome_of(result: dict[str, Any]) -> Any:
            from app.store import Outcome

            return Outcome(**result["outcome"])

    InProcessRun(SimpleNamespace(config=config, ledger=ledger, placer=None), built, window_rows=64).run()
    return outcomes(ledger)


def outcomes(ledger: Ledger) -> dict[str, Any]:
    found = {}
    for row in ledger.rows():
        timings = {key: value for key, value in (row.timings or {}).items() if key != "ray_nodes"}
        assert all(type(value) in (int, float) and value >= 0 for value in timings.values()), row.timings
        found[Path(row.path).name] = (row.status, row.bin, row.reason, row.attempts, sorted(timings))
    ledger.close()
    return found


def test_a_poison_file_and_an_out_of_memory_error_end_the_same_on_both_engines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from app.engine import runner as runner_module
    from app.ray_data import actor as actor_module

    # Both engines call the one function: the names at their call sites are that very object.
    assert runner_module.contain is containment_module.contain
    assert actor_module.contain is containment_module.contain
    # Every call of it, from either engine, runs its batches through ``_Containment._attempt``: watched there.
    attempts: list[tuple[str, int, int]] = []  # (stage, batch size, the replica's cap after the attempt)
    original = containment_module._Containment._attempt

    def watched(self: Any, items: list[ImageItem]) -> list[ImageItem]:
        done = original(self, items)
        attempts.append((self.stage, len(items), self.cap.value))
        return done

    monkeypatch.setattr(containment_module._Containment, "_attempt", watched)
    local = run_local(tmp_path / "local")
    local_attempts = list(attempts)
    attempts.clear()
    on_ray = run_on_ray_steps(tmp_path / "ray", monkeypatch)
    assert local == on_ray
    assert local[POISON][:4] == ("quarantined", None, "ocr_error", 2)
    assert {value[:4] for name, value in local.items() if name != POISON} == {("done", "B", None, 1)}
    assert all(value[4] == ["load", "load_batch", "ocr_batch"] for value in local.values()), local
    for seen in (local_attempts, attempts):
        assert {stage for stage, _, _ in seen} == {"load", "ocr"}
        # Out of memory for a batch of four halved the cap to two, and the same items ran again in twos.
        assert ("ocr", 4, 2) in seen, seen
        assert max(size for stage, size, _ in seen if stage == "ocr") == 4
        assert {size for stage, size, cap in seen if stage == "ocr" and cap == 2} >= {1, 2}, seen


# --- the import graph -------------------------------------------------------------------------------------------
def app_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / "app").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) of every ``import``/``from`` in a file, top level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_no_import_circle_and_sibling_packages_only_through_their_faces() -> None:
    modules = app_modules()
    packages = {name for name, path in modules.items() if path.name == "__init__.py" and name != "app"}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    reaching_in = []
    for name, path in modules.items():
        here = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for target, names in imports_of(path):
            if target == "app":
                targets = [f"app.{n}" for n in names if f"app.{n}" in modules]
            else:
                targets = [target] if target in modules else []
            for found in targets:
                edges[name].add(found)
                owner = next((package for package in packages if found.startswith(package + ".")), None)
                if owner is not None and not (here == owner or here.startswith(owner + ".")):
                    reaching_in.append(f"{name} imports {found} (use the face {owner})")
    assert not reaching_in, "\n".join(reaching_in)
    # A circle is a strongly connected component of more than one module (Tarjan).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, circles


def test_hosts_adapt_stages_and_are_not_stages() -> None:
    from app.hosts import ProcessHost, ThreadHost

    assert not issubclass(ProcessHost, Stage) and not issubclass(ThreadHost, Stage)
