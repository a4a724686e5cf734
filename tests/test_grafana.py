"""The dashboard and the alerts: PromQL checked by promtool, alert logic unit-tested, and every panel queried
against a real Prometheus scraping a real /metrics endpoint served from app.metrics.Metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as sdk_dashboard
from grafana_foundation_sdk.models import prometheus as sdk_prometheus
from prometheus_client import start_http_server

from app.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
BUILDER = REPO / "grafana" / "build_dashboard.py"
DASHBOARD = REPO / "grafana" / "binner.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).resolve().parent / "prometheus_alerts_test.yml"
# Metrics the design names that only exist on a host with an NVIDIA GPU (NVML).
GPU_METRICS = ("binner_gpu_utilization_ratio", "binner_gpu_memory_used_bytes", "binner_gpu_memory_total_bytes")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is missing (apt-get install -y --no-install-recommends prometheus)",
)
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus is missing (apt-get install -y --no-install-recommends prometheus)",
)


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_dashboard", BUILDER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _concrete(expr: str, rate_interval: str = "1m") -> str:
    """A panel expression with Grafana's variables replaced, as Grafana would send it."""
    return expr.replace("$__rate_interval", rate_interval).replace('"$instance"', '".+"')


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return _builder().panel_queries(dashboard)


# -- the dashboard as a file ---------------------------------------------------------------------------------
def test_committed_dashboard_is_up_to_date() -> None:
    module = _builder()
    assert DASHBOARD.read_text() == module.render(module.build_dashboard()), (
        "grafana/binner.json is stale: run `python grafana/build_dashboard.py` and commit the result"
    )
    result = subprocess.run([sys.executable, str(BUILDER), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every scalar (and empty container) of a JSON document by its path; named list items (variables) by name."""
    if isinstance(value, dict) and value:
        children = [(f"{path}.{key}", item) for key, item in value.items()]
    elif isinstance(value, list) and value:
        children = [(f"{path}[{item.get('name', index) if isinstance(item, dict) else index}]", item)
                    for index, item in enumerate(value)]
    else:
        return {path: value}
    return {key: leaf for child_path, child in children for key, leaf in _leaves(child, child_path).items()}


# Keys build_dashboard.py merges in by hand because the SDK's models cannot hold them (see _hand_built there).
HAND_BUILT = {".templating.list[instance].definition"}


def test_dashboard_is_the_sdk_model_plus_the_hand_built_parts(dashboard: dict[str, Any]) -> None:
    """The file decodes into the SDK's typed models (panel options, Prometheus queries) and encodes back to itself:
    a key the SDK does not know would be dropped here, so anything built by hand has to be declared above."""
    register_default_plugins()  # typed stat/timeseries options and Prometheus queries instead of raw dicts
    model = sdk_dashboard.Dashboard.from_json(dashboard)
    targets = [target for panel in model.panels or [] if isinstance(panel, sdk_dashboard.Panel)
               for target in panel.targets or []]
    assert targets and all(isinstance(target, sdk_prometheus.Dataquery) for target in targets)
    before, after = _leaves(dashboard), _leaves(json.loads(json.dumps(model, cls=JSONEncoder)))
    changed = {key for key in before.keys() | after.keys() if before.get(key, ...) != after.get(key, ...)}
    assert changed == HAND_BUILT, (f"keys outside the SDK's model: {sorted(changed - HAND_BUILT)}; "
                                   f"declared hand-built but not in the file: {sorted(HAND_BUILT - changed)}")


def test_the_sdk_is_a_build_time_dependency_only() -> None:
    """grafana-foundation-sdk is in the `test` extra, not in binner's dependencies: no installed package may use it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert not any(dep.startswith("grafana-foundation-sdk") for dep in project["project"]["dependencies"])
    assert any(dep.startswith("grafana-foundation-sdk") for dep in project["project"]["optional-dependencies"]["test"])
    users = [str(path.relative_to(REPO)) for package in project["tool"]["setuptools"]["packages"]
             for path in (REPO / package).rglob("*.py") if "grafana_foundation_sdk" in path.read_text()]
    assert not users, f"binner's runtime imports the dashboard SDK: {users}"


def test_dashboard_structure(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["includeAll"]
    assert variables["instance"]["current"]["value"] == ["$__all"], "the dashboard starts on every instance"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}  # the SDK lays the grid out: no two panels may share a cell
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        for cell in ((x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]} at {cell}"
            cells[cell] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "timeseries":  # the SDK's legend model defaults showLegend to false: a hidden legend
            assert panel["options"]["legend"]["showLegend"] is True, f"{panel['title']}: legend hidden"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: not filtered by $instance"
    titles = {title for title, _ in queries}
    for wanted in ("Throughput by bin", "Items by stage and outcome", "Stage utilisation (bottleneck finder)",
                   "Queue depth vs capacity", "Backpressure", "Batch size p50/p95", "Batch seconds p95",
                   "End-to-end latency", "Backlog", "Oldest pending", "Quarantined by reason",
                   "OOM events and batch size limit", "GPU utilisation", "GPU memory", "Version", "Placement", "Watch"):
        assert wanted in titles, f"panel {wanted!r} is missing"


def test_every_exported_metric_is_on_the_dashboard(queries: list[tuple[str, str]]) -> None:
    exprs = " ".join(expr for _, expr in queries)
    names = {family.name for family in Metrics().registry.collect() if family.name.startswith("binner_")}
    names |= set(GPU_METRICS) | {"process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"}
    missing = sorted(name for name in names if name not in exprs)
    assert not missing, f"metrics without a panel: {missing}"


# -- promtool ---------------------------------------------------------------------------------------------------
@needs_promtool
def test_panel_expressions_pass_promtool(queries: list[tuple[str, str]], tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"binner_dashboard:panel_{index}", "expr": _concrete(expr)} for index, (_, expr) in enumerate(queries)
    ]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    titles = "\n".join(f"panel_{i}: {title}" for i, (title, _) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{titles}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check above can fail."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"record": "x:y", "expr": "sum by (bin) (rate(binner_binned_total[1m])"}]}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    names = {rule["alert"] for group in groups for rule in group["rules"]}
    assert {"BinnerDown", "BinnerMetricsAbsent", "BinnerNoProgress", "BinnerBacklogGrowing",
            "BinnerOldestPendingTooOld", "BinnerPlacementPaused", "BinnerQuarantineSpike",
            "BinnerOOMRepeated", "BinnerWatchDegraded"} <= names
    for group in groups:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on a synthetic history that should trigger it, not otherwise.

    Annotations are removed from the copy under test (their templates are validated by `check rules`), so the
    expectations pin expressions, `for:` and labels.
    """
    alerts = yaml.safe_load(ALERTS.read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = subprocess.run(["promtool", "test", "rules", ALERT_TESTS.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    declared = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert declared <= tested, f"alerts without a unit test: {sorted(declared - tested)}"


# -- a real Prometheus scraping a real /metrics -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _populate(metrics: Metrics, step: int) -> None:
    """Observations on every instrument, with every label a real run produces; called repeatedly."""
    m = metrics
    for stage, device in (("load", "cpu"), ("ocr", "cuda:0"), ("vision", "cuda:1")):
        m.items.labels(stage=stage, outcome="ok").inc(8)
        m.batch_seconds.labels(stage=stage, device=device).observe(0.02 + 0.01 * (step % 5))
        m.batch_size.labels(stage=stage).observe(8 + step % 8)
        m.busy_seconds.labels(stage=stage, device=device).inc(0.05)
        m.batch_limit.labels(stage=stage, device=device).set(16)
        m.worker_restarts.labels(stage=stage, device=device, cause="crashed").inc(step % 2)
        for phase in ("prepare", "finish"):
            m.host_seconds.labels(stage=stage, device=device, phase=phase).inc(0.01)
    m.signals_skipped.labels(model="captioner", reason="confident_detection").inc(3)
    m.items.labels(stage="sink", outcome="binned").inc(6)
    m.items.labels(stage="sink", outcome="quarantined").inc(1)
    for queue, capacity in (("load", 32), ("ocr", 16), ("vision", 32), ("sink", 64)):
        m.queue_capacity.labels(queue=queue).set(capacity)
        m.queue_depth.labels(queue=queue).set(step % capacity)
        m.queue_wait.labels(queue=queue).observe(0.01 * (1 + step % 7))
        m.backpressure.labels(queue=queue).inc(0.01)
    for bin_name in ("A", "B", "C"):
        m.binned.labels(bin=bin_name).inc(2)
    m.quarantined.labels(reason="truncated").inc()
    m.end_to_end.observe(0.5 + 0.1 * (step % 10))
    m.backlog.set(100 - step % 50)
    m.oldest_pending_age.set(3.0 + step)
    m.oom.labels(stage="vision", device="cuda:1").inc()
    m.placement_paused.set(0)
    m.watch_degraded.set(step % 2)
    m.placement_errors.labels(error="ENOSPC").inc()


class _Prometheus:
    def __init__(self, work: Path, target_port: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(ALERTS, work / "alerts.yml")
        (work / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "binner", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))
        self.log = work / "prometheus.log"
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", query=expr)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"Prometheus did not become ready:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[_Prometheus, Metrics]]:
    metrics = Metrics()
    _populate(metrics, 0)
    port = _free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    stop = threading.Event()

    def keep_observing() -> None:  # rates and quantiles need increments between scrapes
        step = 1
        while not stop.wait(0.2):
            _populate(metrics, step)
            step += 1

    observer = threading.Thread(target=keep_observing, daemon=True)
    observer.start()
    prometheus = _Prometheus(tmp_path, port)
    try:
        prometheus.wait_ready(timeout=60)
        yield prometheus, metrics
    finally:
        prometheus.stop()
        stop.set()
        observer.join(timeout=5)
        server.shutdown()
        server.server_close()


def _values(result: dict[str, Any]) -> list[float]:
    data = result["data"]
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    return [float(sample["value"][1]) for sample in data["result"]]


@needs_prometheus
@pytest.mark.system
@pytest.mark.timeout(180)
def test_every_panel_returns_data_from_a_real_prometheus(
    live: tuple[_Prometheus, Metrics], queries: list[tuple[str, str]]
) -> None:
    prometheus, _ = live
    # A 1 s scrape shows up in queries after a few seconds; a rate needs two samples in its window.
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline and not ready:
        try:
            up = _values(prometheus.query('up{job="binner"}'))
            rate = _values(prometheus.query("sum(rate(binner_binned_total[1m]))"))
            quantile = _values(prometheus.query(
                "histogram_quantile(0.5, sum by (le) (rate(binner_end_to_end_seconds_bucket[1m])))"))
            ready = up == [1.0] and bool(rate) and rate[0] > 0 and bool(quantile) and math.isfinite(quantile[0])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if not ready:
            time.sleep(0.5)
    assert ready, f"no usable samples from the binner target within 60 s\n{prometheus.logs()}"

    problems = []
    for title, expr in queries:
        concrete = _concrete(expr)
        result = prometheus.query(concrete)
        if result.get("status") != "success":
            problems.append(f"{title}: {concrete}: {result}")
            continue
        values = _values(result)
        if not values:
            if any(name in expr for name in GPU_METRICS):
                continue  # NVML gauges exist only on a host with an NVIDIA GPU
            problems.append(f"{title}: {concrete}: empty result")
        elif "histogram_quantile" in expr and not any(math.isfinite(v) for v in values):
            problems.append(f"{title}: {concrete}: no finite quantile {values}")
    assert not problems, "\n".join(problems)

    rules = prometheus.api("/api/v1/rules")
    loaded = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert "BinnerNoProgress" in loaded and "BinnerDown" in loaded, rules
    assert all(rule["health"] == "ok" for group in rules["data"]["groups"] for rule in group["rules"]
               if rule.get("lastEvaluation", "").startswith("2")), rules


# -- provisioning -----------------------------------------------------------------------------------------------
PROVISIONING = REPO / "grafana" / "provisioning"


def test_provisioning_files_load_the_dashboard_on_the_shipped_data_source(dashboard: dict[str, Any]) -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "binner.yaml").read_text())
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "binner.yaml").read_text())
    assert sources["apiVersion"] == 1 and providers["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    # The README's install step puts the committed dashboard into the provider's folder; the Docker recipe
    # mounts grafana/ there. Either way the dashboard file must exist and land where the provider reads.
    readme = (REPO / "README.md").read_text()
    assert f"grafana/binner.json {folder}/binner.json" in readme, "README install step and provider path disagree"
    assert f'"$PWD/grafana:{folder}"' in readme
    assert DASHBOARD.is_file() and json.loads(DASHBOARD.read_text())["uid"]
    # The dashboard's data source variable starts on the provisioned data source.
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == source["uid"], (variable["current"], source["uid"])
    assert variable["query"] == source["type"]
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"] if "datasource" in panel)
