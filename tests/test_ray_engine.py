"""`binner once --engine ray` on a real two-node Ray cluster started on this machine's loopback addresses.

The cluster is started with the README's own commands (one token made once, a head, a second node) and the
labelled images are binned with the README's own `binner once` line; only loopback addresses, free ports, paths and
a private temp dir and HOME are added. The second node offers its own custom resource ``node2`` and one GPU. Both
are killed by that temp dir at the end (never ``ray stop``, which would stop every Ray of this user on the machine).

Why 127.0.0.2 and 127.0.0.3: Ray 2.60 rewrites ``127.0.0.1`` and ``localhost`` in ``--node-ip-address`` and
``--address`` to the machine's routable address (``services.resolve_ip_for_localhost``), so a cluster asked to use
127.0.0.1 would listen on the LAN address instead. Other addresses of ``127.0.0.0/8`` are loopback too and are
kept as given.

Only the "same bins as the local engine" test runs the real models (offline-cpu.yaml); the crash tests use the
synthetic stages, since what they test is the engine's bookkeeping, not the models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IMAGES, REPO, require_shared

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
SYNTHETIC = """
loader: {workers: 2, batch_size: 4}
ocr: {backend: synthetic, devices: [cpu], batch_size: 4, synthetic_ms: [100, 20]}
vision: {backend: synthetic, devices: [cpu, cpu], batch_size: 4, synthetic_ms: [60, 10]}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.2):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, command line) of every process we can read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        yield int(entry), ppid, cmdline


def _without_comment(line: str) -> str:
    """A shell line without its trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def readme_cluster_commands() -> list[str]:
    """The README's cluster commands (between its ray-cluster-commands markers), one shell line each."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- ray-cluster-commands -->", 1)[1].split("<!-- /ray-cluster-commands -->", 1)[0]
    lines = [_without_comment(line) for line in block.splitlines() if line.strip() and not line.startswith("```")]
    assert [line.split()[0] for line in lines] == ["export", "export", "ray", "ray", "binner"], lines
    return lines


ALIVE_NODES = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo

nodes = GcsClient(address=sys.argv[1]).get_all_node_info().values()
print(json.dumps([{"id": node.node_id.hex(), "ip": node.node_manager_address} for node in nodes
                  if node.state == GcsNodeInfo.ALIVE]))
"""


class LoopbackCluster:
    """A two-node Ray cluster on loopback addresses, private to one test module, started with the README's own
    commands: one token made once and given to every node and to the drivers."""

    def __init__(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="binray-"))  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.home = self.temp_dir / "home"  # no ~/.ray/auth_token of this machine's user reaches the cluster
        self.home.mkdir()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), "HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HEAD": HEAD_IP}
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)

    def _isolation(self, node_ip: str) -> str:
        """Only where the node runs: its loopback address, a private temp dir and free ports."""
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
        return " ".join([f"--node-ip-address={node_ip}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *ports])

    def readme_line(self, index: int) -> str:
        return readme_cluster_commands()[index].replace("6379", str(self.port))

    def _start(self, line: str) -> None:
        done = subprocess.run(["bash", "-c", f"set -e\n{line}"], env=self.env, capture_output=True, text=True,
                              timeout=90)
        assert done.returncode == 0, f"{line} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"

    def start(self) -> None:
        exports = readme_cluster_commands()[:2]
        token = subprocess.run(["bash", "-c", "set -e\n" + "\n".join(exports) + '\necho "$RAY_AUTH_MODE $RAY_AUTH_TOKEN"'],
                               env=self.env, capture_output=True, text=True, timeout=60)
        assert token.returncode == 0, token.stderr
        mode, value = token.stdout.split()
        assert mode == "token" and len(value) >= 32, token.stdout
        self.env.update(RAY_AUTH_MODE=mode, RAY_AUTH_TOKEN=value)  # the one token every node and driver gets
        # Health checks every half second, three misses: a lost node (its port refuses at once) is known in about
        # 1.5 s, not 30 (the tests kill one); a live one is declared dead only after three answers of over 1 s.
        checks = '{"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}'
        self._start(f"{self.readme_line(2)} {self._isolation(HEAD_IP)} --num-cpus=4 --include-dashboard=false "
                    f"--dashboard-port={free_port()} --system-config='{checks}'")
        self.start_node2()

    def start_node2(self) -> None:
        # The second node declares one GPU (a resource only: this machine has none), so that a driver without a
        # GPU can be seen sending a cuda:0 stage there.
        self._start(f"{self.readme_line(3)} {self._isolation(NODE2_IP)} --num-cpus=3 --num-gpus=1 "
                    "--resources='{\"node2\": 3}'")
        nodes = wait_for(lambda: [found for found in [self.alive_nodes()] if len(found) == 2], 60,
                         "both Ray nodes to be alive")[0]
        self.node_ids = {node["id"][:12] for node in nodes}
        self.node2_id = next(node["id"][:12] for node in nodes if node["ip"] == NODE2_IP)

    def alive_nodes(self) -> list[dict]:
        """The live nodes as the head's GCS knows them (a bare GCS client: about half the time of ``ray.init``)."""
        done = subprocess.run([sys.executable, "-c", ALIVE_NODES, self.address], env=self.env, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def _kill(self, wanted: callable) -> int:  # noqa: ANN001
        table = list(_processes())
        roots = {pid for pid, _, cmd in table if str(self.temp_dir) in cmd and wanted(cmd) and pid != os.getpid()}
        family = set(roots)
        grew = True
        while grew:  # workers and agents are children of the raylet and name no temp dir themselves
            more = {pid for pid, ppid, _ in table if ppid in family} - family
            family |= more
            grew = bool(more)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(family)

    def stop_node2(self) -> int:
        return self._kill(lambda cmd: NODE2_IP in cmd)

    def kill_node2_raylet(self) -> bool:
        """``kill -9`` of the second node's raylet alone, as a node lost with its machine would look to the head."""
        for pid, _, cmd in _processes():
            if str(self.temp_dir) in cmd and NODE2_IP in cmd and "raylet" in cmd.split()[0]:
                os.kill(pid, signal.SIGKILL)
                return True
        return False

    def restart_node2(self) -> None:
        """The second node back (whatever of it is left is ended first), as `ray start --address` again."""
        if len(self.alive_nodes()) == 2:
            return
        self.stop_node2()
        wait_for(lambda: len(self.alive_nodes()) == 1, 120, "the head to see the second node gone")
        self.start_node2()

    def stop(self) -> None:
        self._kill(lambda cmd: True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    pytest.importorskip("ray", reason="ray is not installed: `pip install -e '.[ray]'` (make test installs it)")
    running = LoopbackCluster()
    try:
        running.start()
        yield running
    finally:
        running.stop()


def binner(cluster: LoopbackCluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "binner"), *args], env=cluster.env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def start_binner(cluster: LoopbackCluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "binner"), *args], env=cluster.env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def summary_of(stdout: str) -> dict:
    """What `once` reported: its JSON summary line (stdout is not a terminal), or the rows of its table."""
    for line in stdout.splitlines():
        if line.startswith("{") and '"once finished"' in line:
            record = json.loads(line)
            return {key: record[key] for key in ("bins", "quarantined", "vanished", "not_finished", "finished")}
    rows = [line for line in stdout.splitlines() if "bin " in line or "quarantined" in line or "not finished" in line]
    assert rows, f"no summary in the output:\n{stdout}"
    return {"table": rows}


def placed_files(output: Path) -> dict[str, str]:
    """relative path inside its bin -> bin (or _quarantine/<reason>) of every file in the output tree."""
    found: dict[str, str] = {}
    for path in output.rglob("*"):
        if path.is_file():
            parts = path.relative_to(output).parts
            where, rel = (parts[:2], parts[2:]) if parts[0] == "_quarantine" else (parts[:1], parts[1:])
            key = "/".join(rel)
            assert key not in found, f"{key} placed twice: in {found[key]} and {'/'.join(where)}"
            found[key] = "/".join(where)
    return found


def ledger_rows(state: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM files ORDER BY id")]
    finally:
        db.close()


def count_finished(state: Path) -> int:
    try:
        return sum(row["status"] in ("done", "quarantined") for row in ledger_rows(state))
    except sqlite3.Error:
        return 0


def assert_ledger_matches(state: Path, output: Path) -> None:
    """Every finished row names a file that is where its bin says, and every placed file has exactly one row."""
    rows = [row for row in ledger_rows(state) if row["status"] in ("done", "quarantined")]
    placed = {str(p) for p in output.rglob("*") if p.is_file()}
    assert sorted(row["output_path"] for row in rows) == sorted(placed)
    for row in rows:
        where = row["bin"] if row["status"] == "done" else f"_quarantine/{row['reason']}"
        assert Path(row["output_path"]).relative_to(output).parts[0] == where.split("/")[0]
    assert not [row for row in ledger_rows(state) if row["status"] in ("pending", "processing")]


def synthetic_inbox(root: Path, count: int) -> tuple[Path, Path, Path, Path]:
    from app.bench.common import make_images

    inbox, output, state, config = root / "in", root / "out", root / "state", root / "synthetic.yaml"
    make_images(inbox / "sub", count)
    (inbox / "broken.png").write_bytes(b"not an image at all")
    config.write_text(SYNTHETIC)
    return inbox, output, state, config


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path) -> None:
    """A Python that cannot import ray gets one line with the install command and exit code 2."""
    blocker = tmp_path / "no_ray"
    (blocker / "ray").mkdir(parents=True)
    (blocker / "ray" / "__init__.py").write_text("raise ImportError('ray is not installed (test)')\n")
    (tmp_path / "in").mkdir()
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    done = subprocess.run([str(BIN / "binner"), "once", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--state",
                           str(tmp_path / "state"), "--engine", "ray"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install" in lines[0] and "[ray]" in lines[0], done.stderr


def test_adapter_fails_only_the_poison_item_and_halves_its_batch_on_out_of_memory() -> None:
    """The containment the Ray actors apply to any Stage (no cluster needed): as the local StageRunner does."""
    from app.ray_data.actor import run_contained
    from stages.base import ImageItem
    from tests.fakes import RecordingStage

    stage = RecordingStage("ocr", poison={"bad.png"}, oom_above=2)
    stage.setup("cpu")
    items = [ImageItem(key=index, source=f"/in/{name}") for index, name in enumerate(["a.png", "b.png", "bad.png",
                                                                                         "c.png", "d.png"])]
    items[3].fail("truncated", "already failed upstream")
    assert run_contained(stage, items, cap=8) == 2
    assert items[2].failure is not None and items[2].failure.reason == "ocr_error" and items[2].failure.retryable
    assert items[3].failure is not None and items[3].failure.reason == "truncated"  # not run again
    assert all(items[i].failure is None and items[i].image == "decoded" for i in (0, 1, 4))
    assert 3 not in {key for _, _, keys in stage.log.batches for key in keys}


def test_a_stateless_stage_runs_as_a_fresh_replica_per_block_with_its_own_setup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader runs as a Ray task in a process whose Pillow limit nobody raised: its own ``setup`` raises it, so
    that ``limits.max_pixels`` above Pillow's default decides there too (no cluster needed)."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    import pyarrow as pa
    from PIL import Image

    from app.ray_data import tasks as tasks_module
    from app.ray_data.codec import decode_items, row_record, schema
    from app.store import Discovered, Ledger
    from stages.base import BatchPolicy
    from stages.loader import LoaderOptions, LoaderStage
    from stages.rules import RuleThresholds

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "wide.png")
    stage = LoaderStage(LoaderOptions(max_file_bytes=1 << 20, max_pixels=10_000, max_side=64), ["cpu"],
                        BatchPolicy(4, 5.0))
    assert stage.stateless
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a fresh worker: Pillow's limit, under half the image
    monkeypatch.setattr(tasks_module, "node_id", lambda: "this-node")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake([Discovered(str(tmp_path / "wide.png"), "wide.png", 1, 1)])
    block = pa.Table.from_pylist([row_record(row, 3) for row in ledger.claim_pending(4)], schema=schema())
    ledger.close()
    ((item, carried),) = decode_items(tasks_module.run_stateless(block, stage, RuleThresholds(), keep_image=True))
    assert item.failure is None and item.image.size == (40, 30), item.failure
    assert Image.MAX_IMAGE_PIXELS == 10_000 and carried.nodes == {"load": "this-node"}
    assert stage.device is None, "the stage handed over is not the replica that ran"


AFTER_SHUTDOWN = """
import sys
import ray
from app.ray_data.driver import no_auto_init

if sys.argv[1] == "driver":
    no_auto_init()
try:
    ray.put(1)  # as a stopped window's Ray Data thread does after ray.shutdown
except Exception as error:  # noqa: BLE001
    print(type(error).__name__)
print("initialized" if ray.is_initialized() else "not initialized")
ray.shutdown()
"""


def test_a_ray_call_after_shutdown_does_not_start_a_local_ray_in_the_driver() -> None:
    """Left to Ray, a call made while the driver is not connected starts a local Ray (seen racing the reconnection
    after a lost node); in the driver it fails instead."""
    pytest.importorskip("ray", reason="ray is not installed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", AFTER_SHUTDOWN, "driver"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.stdout.splitlines()[-1:] == ["not initialized"], done.stdout + done.stderr[-2000:]


def test_model_paths_relative_to_the_driver_reach_the_workers_as_absolute_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.config import with_model_paths_absolute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "det.pt").write_bytes(b"x")
    config = synthetic_config(tmp_path)
    config.vision.detector.weights = "weights/det.pt"
    config.vision.clip.model = "openai/clip-vit-base-patch32"  # a model id: nothing of that name here
    absolute = with_model_paths_absolute(config)
    assert absolute.vision.detector.weights == str(tmp_path / "weights" / "det.pt")
    assert absolute.vision.clip.model == "openai/clip-vit-base-patch32"
    assert config.vision.detector.weights == "weights/det.pt", "the driver's own configuration is left as it is"


def run_without_a_cluster(tmp_path: Path, files: int, window: Callable[[list[dict]], list]) -> tuple[Any, Any, list]:
    """The driver's window logic (``RayRun``) over ``files`` pending rows with no cluster: ``window(records)`` stands
    for the cluster, giving each window's outcomes (or raising as a failed window). Returns the run's stats (or the
    error it raised), the ledger and the size of every window."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from types import SimpleNamespace

    from app.build import build_stages
    from app.ray_data import RayRun

    config, ledger = synthetic_config(tmp_path), pending_ledger(tmp_path, files)
    sizes: list[int] = []

    class Clusterless(RayRun):
        def _wait_for_resources(self, timeout_s: float = 0) -> None:
            pass

        def _run_window(self, blocks: list, left: set[int]) -> str | None:
            records = [record for block in blocks for record in block.to_pylist()]
            sizes.append(len(records))
            outcomes = window(records)
            self._record(outcomes)
            left.difference_update(outcome.id for outcome in outcomes)
            return None

    runtime = SimpleNamespace(config=config, ledger=ledger, placer=None)
    try:
        result: Any = Clusterless(runtime, build_stages(config), window_rows=32).run()
    except Exception as error:  # noqa: BLE001 - the caller asserts on it
        result = error
    return result, ledger, sizes


def test_a_file_that_kills_its_worker_ends_quarantined_alone(tmp_path: Path) -> None:
    """The driver's window logic without a cluster: a window holding a file that crashes its Ray worker fails as a
    whole; it is run again, then split until that file fails alone. Only that file is charged attempts and ends
    quarantined, which the driver logs; every other file is done on its first attempt."""
    from structlog.testing import capture_logs

    from app.store import Outcome

    poison = 23

    def window(records: list[dict]) -> list:
        outcomes = []
        for record in records:
            if record["failure"]:  # past its attempts: the finish task quarantines it without running it
                failure = json.loads(record["failure"])
                outcomes.append(Outcome(record["key"], "quarantined", reason=failure["reason"],
                                        last_error=failure["message"]))
            elif record["key"] == poison:
                raise RuntimeError("ray.exceptions.ActorDiedError: the worker process died unexpectedly")
            else:
                outcomes.append(Outcome(record["key"], "done", bin="B", rule="weak"))
        return outcomes

    with capture_logs() as events:
        stats, ledger, windows = run_without_a_cluster(tmp_path, 40, window)
    rows = {row.id: row for row in ledger.rows()}
    assert rows[poison].status == "quarantined" and rows[poison].reason == "retries_exhausted"
    # the driver says so in its own log (a finish task's log line stays on its worker's node)
    (said,) = [event for event in events if event["event"] == "quarantined"]
    assert said["file"] == f"/in/{poison - 1}.png" and said["reason"] == "retries_exhausted", said
    assert "ActorDiedError" in (rows[poison].last_error or "")
    assert all(row.status == "done" and row.attempts == 1 for key, row in rows.items() if key != poison)
    assert stats.finished == 40 and stats.quarantined == {"retries_exhausted": 1}
    assert windows[:3] == [32, 32, 16] and windows.count(1) >= 3, windows  # max_attempts: 3


def test_a_ledger_that_cannot_record_stops_the_run_without_charging_any_file(tmp_path: Path) -> None:
    """The driver's own failure (its state disk full) is not a lost window: before, the window ran again, then was
    bisected as if a file killed its worker, and a file was charged for it. Now the run stops with one line that
    names the ledger and says how to resume, and every row is back to pending, uncharged."""
    from app.ray_data import RayEngineError
    from app.store import Ledger, Outcome

    def full(_ledger: Ledger, outcomes: list) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def window(records: list[dict]) -> list:
        Ledger.record = full  # type: ignore[method-assign]  # the state disk fills while the window runs
        return [Outcome(record["key"], "done", bin="B", rule="weak") for record in records]

    real_record = Ledger.record
    try:
        error, ledger, windows = run_without_a_cluster(tmp_path, 10, window)
    finally:
        Ledger.record = real_record  # type: ignore[method-assign]
    assert isinstance(error, RayEngineError), error
    assert re.search("could not record .* disk is full.*run the same command again", str(error)), error
    assert windows == [10], "one window, not run again nor bisected"
    assert [(row.status, row.attempts, row.last_error) for row in ledger.rows()] == [("pending", 0, None)] * 10


def pending_ledger(tmp_path: Path, files: int):  # noqa: ANN201
    """A ledger with ``files`` pending rows (``/in/0.png`` ...), for the driver's window logic without a cluster."""
    from app.store import Discovered, Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(Discovered(f"/in/{index}.png", f"{index}.png", 1, 1) for index in range(files))
    return ledger


def synthetic_config(tmp_path: Path, ocr: object = ("cpu",), vision: object = ("cpu",), **ray: float):  # noqa: ANN201
    from app.config import load_config

    def devices(spec: object) -> object:
        return spec if isinstance(spec, str) else list(spec)

    return load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state",
                              "ocr": {"backend": "synthetic", "devices": devices(ocr)},
                              "vision": {"backend": "synthetic", "devices": devices(vision)}, "ray": ray})


def test_a_shrunk_cluster_moves_auto_devices_to_the_cpu_and_trims_replicas(tmp_path: Path) -> None:
    """``fit_stages`` with the cluster's resources as data: ``devices: auto`` follows the GPUs the cluster has left,
    an explicit ``cuda:N`` list does not fall back, and a stage with several replicas loses some to fit the CPUs."""
    from app.build import build_stages
    from app.ray_data.dataset import fit_stages, needed_resources, pooled

    def devices_of(stages: list) -> dict[str, list[str]]:
        return {stage.name: stage.devices for stage in pooled(stages)}

    auto = synthetic_config(tmp_path, ocr="auto", vision="auto")

    def rebuild(gpus: int) -> list:
        return build_stages(auto, gpu_count=gpus, where="the Ray cluster")

    on_gpu = rebuild(1)
    assert devices_of(on_gpu) == {"ocr": ["cuda:0"], "vision": ["cuda:0"]}
    assert needed_resources(on_gpu) == {"CPU": 3, "GPU": 2}
    fitted = fit_stages(on_gpu, {"CPU": 4, "GPU": 0}, rebuild)
    assert fitted is not None and devices_of(fitted) == {"ocr": ["cpu"], "vision": ["cpu"]}
    assert [stage.name for stage in fitted] == ["load", "ocr", "vision"]
    assert devices_of(on_gpu) == {"ocr": ["cuda:0"], "vision": ["cuda:0"]}, "the running stages are left as they are"
    assert fit_stages(on_gpu, {"CPU": 2, "GPU": 0}, rebuild) is None, "three CPUs needed even on the CPU"

    explicit = synthetic_config(tmp_path, ocr=["cuda:0"])
    pinned = build_stages(explicit, gpu_count=1, where="the Ray cluster")
    assert fit_stages(pinned, {"CPU": 8, "GPU": 0},
                      lambda gpus: build_stages(explicit, gpu_count=gpus, where="the Ray cluster")) is None

    several = build_stages(synthetic_config(tmp_path, vision=["cpu", "cpu", "cpu"]))
    trimmed = fit_stages(several, {"CPU": 4, "GPU": 0})
    assert trimmed is not None and devices_of(trimmed) == {"ocr": ["cpu"], "vision": ["cpu", "cpu"]}


class WindowsWithoutCluster:
    """A ``RayRun`` whose windows run here (each row done at once) on a cluster described by ``have``."""

    @staticmethod
    def make(config, ledger, have: dict[str, int], after_window=None, **kwargs):  # noqa: ANN001, ANN205
        from types import SimpleNamespace

        from app.build import build_stages
        from app.ray_data import RayRun
        from app.store import Outcome

        class Run(RayRun):
            def _cluster(self) -> dict[str, int]:
                return dict(have)

            def _run_window(self, blocks: list, left: set[int]) -> str | None:
                keys = [record["key"] for block in blocks for record in block.to_pylist()]
                self._record([Outcome(key, "done", bin="B", rule="weak") for key in keys])
                left.difference_update(keys)
                if after_window is not None:
                    after_window()
                return None

        return Run(SimpleNamespace(config=config, ledger=ledger, placer=None), build_stages(config), **kwargs)


def test_a_node_lost_after_the_last_rows_ends_the_run_and_one_lost_before_them_waits_then_exits(tmp_path: Path) -> None:
    """The driver waits for the cluster only with rows to run: a node lost once every row is in is no matter. With
    rows left, it waits ``ray.wait_for_resources_s`` and stops naming the files still pending, left pending."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from app.ray_data import RayEngineError
    from app.store import Discovered, Ledger

    config = synthetic_config(tmp_path, wait_for_resources_s=3)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(Discovered(f"/in/{index}.png", f"{index}.png", 1, 1) for index in range(10))
    have = {"CPU": 4, "GPU": 0}
    started = time.monotonic()
    stats = WindowsWithoutCluster.make(config, ledger, have, after_window=lambda: have.update(CPU=0)).run()
    assert stats.finished == 10 and time.monotonic() - started < 2, "no wait once every row is in"

    ledger.intake(Discovered(f"/in/more{index}.png", f"more{index}.png", 1, 1) for index in range(6))
    run = WindowsWithoutCluster.make(config, ledger, have)
    started = time.monotonic()
    with pytest.raises(RayEngineError) as stopped:
        run.run()
    assert 3 <= time.monotonic() - started < 10
    assert "6 files are still pending" in str(stopped.value) and "run the same command again" in str(stopped.value)
    assert {row.status for row in ledger.rows() if "more" in row.path} == {"pending"}, "claimed rows are given back"
    ledger.close()


class ClaimRacesTheScan:
    """A ledger whose first empty claim is followed at once by the scan's last chunk and its end, as when the scan
    thread commits between the driver's claim and its look at ``more_coming``."""

    @staticmethod
    def make(path: Path):  # noqa: ANN205
        from app.store import Discovered, Ledger

        class RacedLedger(Ledger):
            scan_done = False

            def claim_pending(self, limit: int, after_id: int = 0) -> list:
                rows = super().claim_pending(limit, after_id)
                if not rows and not self.scan_done:
                    self.intake(Discovered(f"/in/last{index}.png", f"last{index}.png", 1, 1) for index in range(5))
                    self.scan_done = True
                return rows

        return RacedLedger(path)


def test_rows_the_scan_records_just_before_it_ends_are_run_too(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    ledger = ClaimRacesTheScan.make(tmp_path / "ledger.sqlite3")
    config = synthetic_config(tmp_path)
    run = WindowsWithoutCluster.make(config, ledger, {"CPU": 4, "GPU": 0}, more_coming=lambda: not ledger.scan_done)
    assert run.run().finished == 5
    assert {row.status for row in ledger.rows()} == {"done"}
    ledger.close()


def result_tables(count: int, every_s: float, first_after_s: float, yielded: list[int]) -> Iterator:
    """What a window's finish tasks hand back: one table per row, ``every_s`` apart, the first after the pools
    started (``first_after_s``)."""
    import pyarrow as pa

    from app.store import Outcome

    time.sleep(first_after_s)
    for key in range(1, count + 1):
        yielded.append(key)
        yield pa.table({"key": [key], "result": [json.dumps({"outcome": Outcome(key, "done", bin="B").__dict__})]})
        time.sleep(every_s)


def test_a_window_whose_results_keep_coming_still_beats_and_checks_the_cluster(tmp_path: Path) -> None:
    """The heartbeat and the cluster check run on a timer, not only after a second without results; before the
    first result the window says its pools are starting, not that it stalled."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from structlog.testing import capture_logs

    from app.ray_data.driver import ClusterShrank
    from app.store import Ledger

    config = synthetic_config(tmp_path, heartbeat_s=0.3)
    have = {"CPU": 4, "GPU": 0}
    beats: list = []
    run = WindowsWithoutCluster.make(config, Ledger(tmp_path / "ledger.sqlite3"), have, on_heartbeat=beats.append)
    recorded: list[int] = []
    run._record = lambda outcomes: recorded.extend(outcome.id for outcome in outcomes)
    run.cluster_check_s = 0.3
    left = set(range(1, 37))
    with capture_logs() as logs:  # results 0.05 s apart: a pause of 0.25 s still is not a stall of 0.3 s
        assert run._follow(result_tables(36, 0.05, 1.2, []), left) is None
    assert recorded == list(range(1, 37)) and not left
    said = [entry["event"] for entry in logs if entry["event"].startswith("Ray window")]
    first_running = said.index("Ray window running")
    assert first_running >= 2 and set(said[:first_running]) == {"Ray window starting the pools: no result yet"}, said
    assert said[first_running:].count("Ray window running") >= 3, "heartbeats while results keep coming"
    assert not [event for event in said if "stalled" in event], said
    assert beats[0].since_last_result_s is None and beats[-1].since_last_result_s is not None, beats

    yielded: list[int] = []
    tables = result_tables(100, 0.1, 0.0, yielded)
    threading.Timer(0.5, lambda: have.update(CPU=1)).start()  # a node lost while results keep coming
    started = time.monotonic()
    with pytest.raises(ClusterShrank):
        run._follow(tables, set(range(1, 101)))
    assert time.monotonic() - started < 2.5
    taken = len(yielded)
    time.sleep(1.0)
    assert len(yielded) <= taken + 1, "a stopped window's results are no longer taken"


def test_items_cross_the_wire_as_arrow_rows_with_pixels_and_byte_paths() -> None:
    pytest.importorskip("pyarrow", reason="pyarrow comes with the [ray] extra")
    from PIL import Image

    from app.ray_data.codec import Carried, decode_items, encode_items
    from stages.base import ImageItem

    source = os.fsdecode(b"/in/caf\xe9.png")  # not UTF-8: must round-trip byte for byte
    item = ImageItem(key=7, source=source, size=10, sha256="ab" * 32, width=3, height=2)
    item.image = Image.new("RGB", (3, 2), (10, 20, 30))
    item.signals = {"ocr": {"char_count": 3}}
    item.opened = (10, 5, 123, 6)  # the file the loader read: finishing checks the input is still that one
    carried = Carried(os.fsencode("caf\udce9.png"), 10, 5, 1, {"load": "node-a"})
    failed = ImageItem(key=8, source="/in/x.png")
    failed.fail("not_an_image", "nope", "load")
    back = decode_items(encode_items([(item, carried), (failed, Carried(b"x.png", 1, 1, 2, {}))], keep_image=True))
    (got, got_carried), (got_failed, _) = back
    assert os.fsencode(got.source) == b"/in/caf\xe9.png" and got_carried.rel_path == carried.rel_path
    assert got.image.size == (3, 2) and got.image.getpixel((2, 1)) == (10, 20, 30)
    assert got.signals == item.signals and got.sha256 == item.sha256 and got_carried.nodes == {"load": "node-a"}
    assert got.opened == (10, 5, 123, 6) and got_failed.opened is None
    assert got_failed.failure is not None and got_failed.failure.reason == "not_an_image" and got_failed.image is None
    dropped = decode_items(encode_items([(item, carried)], keep_image=False))[0][0]
    assert dropped.image is None  # after the last model stage no pixels travel


COUNTED_ONCE = """
import json, sys
import app.build, app.once
from app.config import load_config
from app.devices import cuda_device_count

assert cuda_device_count() == 0, "this driver must have no GPU"
builds = []
real = app.build.build_stages

def counting(*args, **kwargs):
    builds.append(1)
    return real(*args, **kwargs)

app.build.build_stages = app.once.build_stages = counting
config = load_config(sys.argv[1])
summary = app.once.bin_once(config, "ray", sys.argv[2], show_progress=False)
print(json.dumps({"builds": len(builds), "finished": summary.stats.finished, "left": summary.not_finished}))
"""


def test_a_driver_without_a_gpu_builds_its_stages_once_and_sends_cuda_stages_to_a_gpu_node(
        cluster: LoopbackCluster, tmp_path: Path) -> None:
    """Device lists are checked against the cluster's GPUs, not the driver's: this driver has none, the second node
    declares one, and ``ocr.devices: [cuda:0]`` runs there. The stages are built once, on the driver."""
    inbox, output, state, config = synthetic_inbox(tmp_path, 12)
    config.write_text(f"""input: {inbox}
output: {output}
state_dir: {state}
loader: {{workers: 1, batch_size: 4}}
ocr: {{backend: synthetic, devices: [cuda:0], batch_size: 4, synthetic_ms: [5, 1]}}
vision: {{backend: synthetic, devices: [cpu], batch_size: 4, synthetic_ms: [5, 1]}}
""")
    done = subprocess.run([sys.executable, "-c", COUNTED_ONCE, str(config), cluster.address], env=cluster.env,
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"builds": 1, "finished": 13, "left": 0}, report
    rows = [row for row in ledger_rows(state) if row["status"] == "done"]
    assert len(rows) == 12
    assert {json.loads(row["timings"])["ray_nodes"]["ocr"] for row in rows} == {cluster.node2_id}


def test_two_nodes_bin_the_labelled_images_like_the_local_engine(cluster: LoopbackCluster, tmp_path: Path,
                                                                  tiny_blip_dir: Path, tiny_clip_dir: Path) -> None:
    """Real OCR, the real YOLOv8n and tiny BLIP/CLIP: the local engine computing every signal (``signals: all``) and
    the Ray engine computing only what each decision needs give the same bins, rules and summary."""
    import yaml

    from app.config import read_config_file

    require_shared()
    base = read_config_file(REPO / "deploy" / "examples" / "offline-cpu.yaml")
    base["vision"].update({"captioner": {"enabled": True, "model": str(tiny_blip_dir), "max_new_tokens": 4},
                           "clip": {"enabled": True, "model": str(tiny_clip_dir)}})
    results, summaries = {}, {}
    for engine in ("local", "ray"):
        inbox = tmp_path / engine / "in"
        shutil.copytree(IMAGES, inbox)
        output, state = tmp_path / engine / "out", tmp_path / engine / "state"
        config = tmp_path / engine / "binner.yaml"
        config.write_text(yaml.safe_dump({**base, "state_dir": str(state),
                                          "rules": {"signals": "all" if engine == "local" else "needed"}}))
        if engine == "ray":  # the README's own command line, on this test's paths
            line = (cluster.readme_line(4).replace("/shared/archive", str(inbox)).replace("/shared/bins", str(output))
                    .replace("prod.yaml", str(config)))
            done = subprocess.run(["bash", "-c", line], env=cluster.env, capture_output=True, text=True, timeout=300,
                                  cwd=REPO)
        else:
            done = binner(cluster, "once", str(inbox), "-o", str(output), "--state", str(state), "-c", str(config),
                          "--no-progress")
        assert done.returncode == 0, f"{engine}:\n{done.stdout}\n{done.stderr[-4000:]}"
        summaries[engine] = summary_of(done.stdout)
        assert not [p for p in inbox.rglob("*") if p.is_file()], "move mode leaves no input behind"
        assert_ledger_matches(state, output)
        results[engine] = (placed_files(output), state, output)
    assert summaries["ray"] == summaries["local"]  # the same summary (table in a terminal, one JSON line here)
    local, ray_bins = results["local"][0], results["ray"][0]
    assert len(local) == 32
    assert ray_bins == local, {k: (local.get(k), ray_bins.get(k)) for k in set(local) | set(ray_bins)
                               if local.get(k) != ray_bins.get(k)}
    # The ledgers agree row by row on the decisions, and `status` reads the Ray run's ledger unchanged.
    decisions = {engine: {(row["rel_path"], row["status"], row["bin"], row["rule"], row["reason"])
                          for row in ledger_rows(results[engine][1])} for engine in results}
    assert decisions["ray"] == decisions["local"]
    skipped = [json.loads(row["signals"] or "{}").get("not_computed") for row in ledger_rows(results["ray"][1])
               if row["status"] == "done"]
    assert any(skipped), "the Ray engine skipped what the decisions did not need"
    assert not any(json.loads(row["signals"] or "{}").get("not_computed") for row in ledger_rows(results["local"][1]))
    status = binner(cluster, "status", "--state", str(results["ray"][1]), "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == {"done": 30, "quarantined": 2}
    # Both nodes did work: each row records the Ray node of every step it went through.
    used = set()
    for row in ledger_rows(results["ray"][1]):
        used.update(json.loads(row["timings"] or "{}").get("ray_nodes", {}).values())
    assert used == cluster.node_ids, f"work ran on {used}, the cluster has {cluster.node_ids}"


def test_a_stage_that_cannot_start_on_the_cluster_stops_the_run_with_its_reason(cluster: LoopbackCluster,
                                                                                 tmp_path: Path) -> None:
    """PaddleOCR is not installed here: the actor's setup fails, and the run stops at once naming the stage and
    what to do (exit 2), leaving the files pending for the next run instead of charging them attempts."""
    inbox, output, state, config = synthetic_inbox(tmp_path, 2)
    config.write_text(SYNTHETIC.replace("backend: synthetic, devices: [cpu], batch_size: 4, synthetic_ms: [100, 20]",
                                        "backend: paddleocr, devices: [cpu], batch_size: 4"))
    done = binner(cluster, "once", str(inbox), "-o", str(output), "--state", str(state), "-c", str(config),
                  "--no-progress", "--engine", "ray", "--ray-address", cluster.address, timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert "stage ocr could not start" in last and "pip install" in last, last
    assert {row["status"] for row in ledger_rows(state)} == {"pending"}
    assert all(row["attempts"] == 0 for row in ledger_rows(state))


def test_driver_killed_with_sigkill_then_run_again_places_everything_once(cluster: LoopbackCluster,
                                                                          tmp_path: Path) -> None:
    """The kill lands while files are placed but not yet in the ledger: the second run must place them again
    onto themselves (placement is idempotent by content), never as ``name (1).png``."""
    inbox, output, state, config = synthetic_inbox(tmp_path, 48)
    args = ("once", str(inbox), "-o", str(output), "--state", str(state), "-c", str(config), "--no-progress",
            "--engine", "ray", "--ray-address", cluster.address)

    def placed_ahead_of_ledger() -> bool:
        finished = count_finished(state)
        return finished >= 4 and len([p for p in output.rglob("*") if p.is_file()]) > finished

    first = start_binner(cluster, *args)
    try:
        wait_for(lambda: placed_ahead_of_ledger() or first.poll() is not None, 120, "files placed ahead of the ledger",
                 every_s=0.02)
        assert first.poll() is None, f"the run ended before it could be killed:\n{first.stdout.read()}"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    time.sleep(2)  # the driver's Ray workers are stopped by Ray once it notices the driver is gone
    finished_before = count_finished(state)
    assert 0 < finished_before < 49, "the kill must land in the middle of the run"
    assert len(placed_files(output)) > finished_before, "some files were placed but not yet recorded at the kill"
    second = binner(cluster, *args)
    assert second.returncode == 0, second.stdout + second.stderr[-4000:]
    placed = placed_files(output)  # asserts that no file was placed twice
    assert len(placed) == 49
    assert not [name for name in placed if " (" in name], "a second copy was placed beside the first"
    assert placed["broken.png"] == "_quarantine/not_an_image"
    assert not [p for p in inbox.rglob("*") if p.is_file()]
    assert_ledger_matches(state, output)


LOST_NODE = """
loader: {{workers: 1, batch_size: 8}}
ocr: {{backend: synthetic, devices: {ocr}, batch_size: 8, synthetic_ms: [1000, 50]}}
vision: {{backend: synthetic, devices: {vision}, batch_size: 8, synthetic_ms: [30, 4]}}
ray: {{wait_for_resources_s: {wait}, heartbeat_s: 2}}
"""


# OCR is by far the slowest stage (1.4 s a batch of 8, 14 s in all): on a loaded 2-core box results reach the driver
# seconds after OCR made them, and with less OCR work all of it was done before the first files were placed.
LOST_NODE_FILES = 80
# The lost GPU node is killed as its window starts, before any result (they come in bursts from a node that was
# started again): OCR cannot end without that node, so a few batches are enough.
LOST_GPU_FILES = 24
WINDOW_STARTED = "Ray window starting the pools"  # an info line: `once` shows it when asked for debug


def run_logged(cluster: LoopbackCluster, log_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """`binner` in the background (``env`` added to the cluster's), its output (JSON log lines, the summary) going to
    ``log_path``."""
    with log_path.open("w") as handle:
        return subprocess.Popen([str(BIN / "binner"), *args], env={**cluster.env, "BINNER_LOG__FORMAT": "json", **env},
                                cwd=REPO, text=True, stdout=handle, stderr=subprocess.STDOUT)


def events_of(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def lost_node_run(cluster: LoopbackCluster, tmp_path: Path, ocr: str, vision: str, wait: float, files: int,
                  kill_when: Callable[[Path, Path], bool]
                  ) -> tuple[subprocess.Popen[str], Path, Path, Path, list[str], Path]:
    """`once` on ``files`` synthetic files; the second node's raylet is killed once ``kill_when(state, log)``."""
    inbox, output, state, config = synthetic_inbox(tmp_path, files)
    config.write_text(LOST_NODE.format(ocr=ocr, vision=vision, wait=wait))
    args = ["once", str(inbox), "-o", str(output), "--state", str(state), "-c", str(config), "--no-progress",
            "--engine", "ray", "--ray-address", cluster.address]
    log_path = tmp_path / "driver.log"
    run = run_logged(cluster, log_path, *args, BINNER_LOG__LEVEL="debug")
    wait_for(lambda: kill_when(state, log_path) or run.poll() is not None, 180, "the moment to lose the node",
             every_s=0.05)
    assert run.poll() is None, "the run ended before the node could be lost: " + log_path.read_text()[-3000:]
    assert cluster.kill_node2_raylet(), "no raylet of the second node to kill"
    return run, output, state, inbox, args, log_path


def first_files_placed(state: Path, _log: Path) -> bool:
    """At the first results OCR still has most of its batches to do (see LOST_NODE_FILES)."""
    return count_finished(state) >= 8


def window_started(_state: Path, log: Path) -> bool:
    return WINDOW_STARTED in log.read_text()


def assert_every_file_once(cluster: LoopbackCluster, state: Path, output: Path, files: int) -> None:
    assert count_finished(state) == files + 1
    placed = placed_files(output)
    assert len(placed) == files + 1 and placed["broken.png"] == "_quarantine/not_an_image"
    assert_ledger_matches(state, output)
    status = json.loads(binner(cluster, "status", "--state", str(state), "--json").stdout)
    assert sum(status["bins"].values()) + sum(status["quarantined"].values()) == files + 1


def test_a_lost_node_shrinks_the_pools_and_the_run_finishes_on_the_head(cluster: LoopbackCluster,
                                                                         tmp_path: Path) -> None:
    """Three vision replicas and one OCR replica need five CPUs; the head has four. When the second node's raylet is
    killed, the window stops (Ray Data would wait for ever), the vision pool shrinks to two, and the run finishes."""
    try:
        run, output, state, _, _, log_path = lost_node_run(cluster, tmp_path, "[cpu]", "[cpu, cpu, cpu]", 60,
                                                           LOST_NODE_FILES, first_files_placed)
        run.wait(timeout=240)
        text = log_path.read_text()
        assert run.returncode == 0, text[-4000:]
        assert "running smaller pools" in text and "stopping the window to size the pools again" in text, text[-3000:]
        assert "Started a local Ray instance" not in text, "the driver stays on the cluster after it reconnected"
        worked_on = [row for row in ledger_rows(state) if cluster.node2_id in json.loads(row["timings"] or "{}")
                     .get("ray_nodes", {}).values()]
        assert worked_on, "the second node did no work before it was lost: the test proves nothing"
        assert_every_file_once(cluster, state, output, LOST_NODE_FILES)
    finally:
        cluster.restart_node2()


def test_a_lost_gpu_node_makes_the_driver_wait_then_exit_2_or_resume_when_it_is_back(cluster: LoopbackCluster,
                                                                                      tmp_path: Path) -> None:
    """OCR asks for cuda:0, which only the second node has: without it no replica fits. First run: the driver waits
    ``ray.wait_for_resources_s`` (saying what is missing), then exits 2 with one line. The node comes back; the
    same command runs again, loses the node again mid-window, waits, and when the node is back resumes and finishes
    on it, without a restart of the command."""
    try:
        first = cluster.node2_id
        run, output, state, _, args, log_path = lost_node_run(cluster, tmp_path, "[cuda:0]", "[cpu]", 3,
                                                              LOST_GPU_FILES, window_started)
        run.wait(timeout=240)
        text = log_path.read_text()
        assert run.returncode == 2, text[-4000:]
        events = events_of(log_path)
        assert any(e["event"].startswith("waiting for the Ray cluster") for e in events), text[-3000:]
        (fatal,) = [e for e in events if e.get("fatal")]
        assert "1 GPU (the cluster has 0)" in fatal["event"] and "still pending" in fatal["event"], fatal
        assert "run the same command again" in fatal["event"], fatal
        assert any("stopping the window to size the pools again" in e["event"] for e in events), text[-3000:]
        assert not any(e["event"].lstrip().startswith(("File \"", "^")) for e in events), "tracebacks are one event"
        assert count_finished(state) < LOST_GPU_FILES + 1, "files were left for the second run"

        cluster.restart_node2()
        lost = cluster.node2_id
        again_log = tmp_path / "again.log"
        again = run_logged(cluster, again_log, *args, BINNER_RAY__WAIT_FOR_RESOURCES_S="180", BINNER_LOG__LEVEL="debug")
        # The node is lost as soon as the window says it is starting its pools (2 s in): the window cannot end
        # before OCR has run on that node (1.4 s a batch after its actor started), so the loss is seen mid-window
        # (the head declares the node dead in 1.5 s; the window compares the cluster with its pools every second).
        # Waiting for results instead raced them: from a node started again they come in bursts, even all at the end.
        wait_for(lambda: window_started(state, again_log) or again.poll() is not None, 120,
                 "the second run's window to start", every_s=0.05)
        assert again.poll() is None, again_log.read_text()[-3000:]
        assert cluster.kill_node2_raylet()
        wait_for(lambda: "waiting for the Ray cluster" in again_log.read_text() or again.poll() is not None, 60,
                 "the driver to wait for the lost GPU")
        assert again.poll() is None, again_log.read_text()[-3000:]
        said = [event["event"] for event in events_of(again_log)]
        assert any("stopping the window to size the pools again" in event for event in said), said
        cluster.restart_node2()
        back = cluster.node2_id
        again.wait(timeout=240)
        assert again.returncode == 0, again_log.read_text()[-4000:]
        assert "Started a local Ray instance" not in text + again_log.read_text()
        assert_every_file_once(cluster, state, output, LOST_GPU_FILES)
        # The same process ran OCR on the node once it was back (a node started again has a new id).
        ocr_nodes = [json.loads(row["timings"] or "{}").get("ray_nodes", {}).get("ocr") for row in ledger_rows(state)
                     if row["status"] == "done"]
        assert back not in (first, lost) and back in ocr_nodes, (first, lost, back, ocr_nodes)
        assert set(ocr_nodes) <= {first, lost, back}, (first, lost, back, ocr_nodes)
    finally:
        cluster.restart_node2()


@pytest.mark.parametrize("token", [None, "not-the-clusters-token-000000000000"])
def test_a_driver_without_the_clusters_token_stops_at_once_with_one_line(cluster: LoopbackCluster, tmp_path: Path,
                                                                         token: str | None) -> None:
    inbox, output, state, config = synthetic_inbox(tmp_path, 3)
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    started = time.monotonic()
    done = subprocess.run([str(BIN / "binner"), "once", str(inbox), "-o", str(output), "--state", str(state), "-c",
                           str(config), "--no-progress", "--engine", "ray", "--ray-address", cluster.address],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0] and "refused" in lines[0], done.stderr
    assert time.monotonic() - started < 30, "no twenty seconds of retries"
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()], "no file was touched"
    assert sum(1 for p in inbox.rglob("*") if p.is_file()) == 4
