"""Model stages in their own processes: crashes and hangs contained to a child, poison items quarantined,
children that never outlive the daemon, serialised model loading in thread mode, and PaddleOCR in a child."""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from structlog.testing import capture_logs

from app import bench
from app.build import build_stages
from app.config import ConfigError, load_config
from app.devices import isolation_of, resolve_isolation
from app.engine import Hosting, Pipeline
from app.hosts import ProcessHost
from app.metrics import Metrics
from app.store import Ledger, scan, to_discovered
from stages.base import ImageItem, WorkerCrashed
from stages.rules import RuleThresholds
from tests.conftest import REPO
from tests.daemon_harness import DaemonProcess, files_under, wait_for
from tests.fakes import RecordingStage, run_until_idle
from tests.process_fakes import MisbehavingStage

SYNTHETIC_PROCESS = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [20.0, 5.0],
            "isolation": "process"},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [20.0, 5.0],
               "isolation": "process"},
}


class PictureLoader(RecordingStage):
    """A load stage that hands real pixels on (each file a different size), so shared memory is exercised."""

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        for item in items:
            item.image = Image.new("RGB", (40 + item.key, 30), (item.key % 256, 0, 0))
        return items


def build(tmp_path: Path, stages: list[Any], count: int, max_attempts: int,
          in_process: dict[str, float] | None = None) -> tuple[Pipeline, Ledger, Metrics]:
    """The pipeline over ``count`` files; stages named in ``in_process`` run in child processes with that
    ``stall_timeout_s``."""
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(count):
        (inbox / f"f{i:04d}.png").write_bytes(b"x" * (i + 1))
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    metrics = Metrics()
    pipeline = Pipeline(ledger=ledger, metrics=metrics, stages=stages, thresholds=RuleThresholds(), placer=None,
                        queue_capacities={s.name: 8 for s in stages} | {"sink": 8}, max_attempts=max_attempts,
                        feeder_page_size=8, placement_mode="copy",
                        hosting={name: Hosting("process", stall_timeout_s=limit) for name, limit in (in_process or {}).items()})
    return pipeline, ledger, metrics


def restarts(metrics: Metrics, stage: str, cause: str) -> float:
    value = metrics.registry.get_sample_value("binner_worker_restarts_total",
                                              {"stage": stage, "device": "cpu", "cause": cause})
    return value or 0.0


def alive(pid: int) -> bool:
    """Running (a zombie left for a parent that does not reap counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # ESRCH while the kernel tears it down: not a zombie yet
        return True
    return "\nState:\tZ" not in status


def children_by_title(pid: int) -> dict[str, int]:
    """The daemon's child processes by the name the worker gives itself (``ocr@cpu``, ``vision@cpu``)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                found[Path(f"/proc/{kid}/comm").read_text().strip()] = int(kid)
            except OSError:
                continue
    return found


# --- the engine with real child processes and fake stages -------------------------------------------
def test_a_poison_item_that_aborts_its_child_is_quarantined_and_its_batch_is_binned(tmp_path: Path) -> None:
    journal = tmp_path / "ocr.journal"
    poison = "f0013.png"
    ocr = MisbehavingStage("ocr", journal, abort_on={poison}, batch_size=8, max_wait_ms=200)
    pipeline, ledger, metrics = build(tmp_path, [PictureLoader("load", batch_size=8), ocr], count=30, max_attempts=2,
                                      in_process={"ocr": 60})
    run_until_idle(pipeline)
    rows = {Path(row.path).name: row for row in ledger.rows()}
    bad = rows.pop(poison)
    assert bad.status == "quarantined" and bad.reason == "crashed_repeatedly", (bad.status, bad.reason)
    assert bad.attempts == 2
    assert "ocr" in (bad.last_error or "") and "SIGABRT" in (bad.last_error or ""), bad.last_error
    assert {row.status for row in rows.values()} == {"done"}, {n: r.status for n, r in rows.items()}
    for name, row in rows.items():  # pixels crossed into the child through shared memory
        assert row.signals is not None and row.signals["ocr_pixels"] == [40 + row.id, 30], name
    seen = MisbehavingStage("ocr", journal).seen()
    aborted = [names for _, names in seen if poison in names]
    assert len(aborted) >= 2 and any(len(names) > 1 for names in aborted), "the poison shared a batch at least once"
    assert restarts(metrics, "ocr", "crashed") == len(aborted), "one restart per aborted child"
    assert sum(1 for _, names in seen if names == [poison]) == 2, "alone once per attempt, then quarantined"


def test_a_stuck_child_is_killed_and_replaced_and_items_flow_again(tmp_path: Path) -> None:
    journal = tmp_path / "vision.journal"
    vision = MisbehavingStage("vision", journal, hang_once_on={"f0005.png"}, batch_size=4)
    pipeline, ledger, metrics = build(tmp_path, [PictureLoader("load", batch_size=4), vision], count=24,
                                      max_attempts=2, in_process={"vision": 2.0})
    started = time.monotonic()
    run_until_idle(pipeline, timeout=90)
    assert time.monotonic() - started < 60, "a hang of an hour must not hold the pipeline"
    assert {row.status for row in ledger.rows()} == {"done"}
    assert restarts(metrics, "vision", "stuck") == 1 and restarts(metrics, "vision", "crashed") == 0
    pids = [pid for pid, _ in MisbehavingStage("vision", journal).seen()]
    stuck_pid = next(pid for pid, names in MisbehavingStage("vision", journal).seen() if "f0005.png" in names)
    assert len(set(pids)) == 2 and not alive(stuck_pid), "the stuck child was killed and a new one took over"


def test_driver_replaces_a_child_that_died_while_idle_at_once_and_reports_crashes(tmp_path: Path) -> None:
    causes: list[str] = []
    stage = ProcessHost(MisbehavingStage("ocr", tmp_path / "j", abort_on={"bad.png"}), "cpu", stall_timeout_s=30,
                        on_restart=causes.append)
    with capture_logs() as logs:
        stage.setup()
    try:
        first = stage.pid
        assert first is not None
        forwarded = {entry["event"]: entry for entry in logs if entry.get("pid") == first}
        assert {"stage": "ocr", "device": "cpu", "log_level": "info"}.items() <= forwarded["fake stage set up"].items()
        library = forwarded["a library warning through stdlib logging"]
        assert library["log_level"] == "warning" and library["logger"] == "fake.library" and library["stage"] == "ocr"
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: causes == ["crashed"] and stage.pid not in (None, first), 20, "a new child without any call")
        good = [ImageItem(key=i, source=f"/in/g{i}.png", image=Image.new("L", (7, 5))) for i in range(3)]
        stage.process_batch(good)
        assert [item.signals["ocr_pixels"] for item in good] == [[7, 5]] * 3
        with pytest.raises(WorkerCrashed, match="SIGABRT"):
            stage.process_batch([ImageItem(key=9, source="/in/bad.png", image=Image.new("RGB", (3, 3)))])
        assert causes == ["crashed", "crashed"]
        assert stage.process_batch(good[:1])[0].failure is None
        last = stage.pid
    finally:
        stage.teardown()
    assert stage.pid is None and last is not None and not alive(last)


# --- the real daemon ---------------------------------------------------------------------------------
@pytest.mark.system
def test_sigkill_of_ocr_and_vision_children_while_files_flow(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, None, {**SYNTHETIC_PROCESS, "settle_ms": 100, "rescan_interval_s": 2,
                                            "max_attempts": 5})
    total = 160
    try:
        daemon.start().wait_ready(120)
        assert daemon.process is not None
        pid = daemon.process.pid
        rng = random.Random(11)
        kills = {"ocr": 0, "vision": 0}
        dropped = 0
        while dropped < total:
            bench.make_images(daemon.input, 20, size=48, start=dropped)
            dropped += 20
            time.sleep(rng.uniform(0.05, 0.4))
            stage = ("ocr", "vision")[dropped // 20 % 2]
            if dropped < total and rng.random() < 0.8:
                child = wait_for(lambda s=stage: children_by_title(pid).get(f"{s}@cpu"), 30, f"the {stage} child")
                os.kill(child, signal.SIGKILL)
                kills[stage] += 1
                expected = kills[stage]
                wait_for(lambda s=stage, n=expected: (daemon.metric("binner_worker_restarts_total", stage=s) or 0) >= n,
                         30, f"{stage} restart number {expected}")
        wait_for(lambda: len(files_under(daemon.output)) >= total and not files_under(daemon.input), 120,
                 "every file to be placed", interval=0.3)
        placed = files_under(daemon.output)
        names = [path.name for path in placed]
        assert len(names) == len(set(names)) == total, "every file exactly once"
        assert daemon.process.poll() is None, "the daemon survived every kill"
        wait_for(lambda: daemon.get("/healthz")[0] == 200, 30, "/healthz to recover")
        assert kills["ocr"] >= 1 and kills["vision"] >= 1
        for stage, count in kills.items():
            assert daemon.metric("binner_worker_restarts_total", stage=stage, cause="crashed") == count, stage
        log = daemon.log_path.read_text()
        assert '"stage": "ocr"' in log and "stage worker process lost" in log
        assert daemon.stop() == 0
    finally:
        daemon.kill()


@pytest.mark.system
def test_kill_9_of_the_daemon_leaves_no_child_behind(tmp_path: Path) -> None:
    slow = {"ocr": {**SYNTHETIC_PROCESS["ocr"], "synthetic_ms": [60_000.0, 0.0]},
            "vision": SYNTHETIC_PROCESS["vision"], "settle_ms": 100}
    daemon = DaemonProcess(tmp_path, None, slow)
    try:
        daemon.start().wait_ready(120)
        assert daemon.process is not None
        pid = daemon.process.pid
        children = wait_for(lambda: (lambda c: c if {"ocr@cpu", "vision@cpu"} <= c.keys() else None)(children_by_title(pid)),
                            30, "both worker children")
        bench.make_images(daemon.input, 4, size=32)
        wait_for(lambda: (daemon.metric("binner_items_total", stage="load") or 0) >= 4, 30, "the files to be loaded")
        time.sleep(1.5)  # the OCR child is now inside a one-minute call: only the kernel's signal can end it soon
        mapped = [line for line in Path(f"/proc/{children['ocr@cpu']}/maps").read_text().splitlines() if "/dev/shm/" in line]
        assert mapped and all(line.endswith("(deleted)") for line in mapped), "a SIGKILL of the group would leak these"
        os.kill(pid, signal.SIGKILL)  # the daemon alone, not its process group
        daemon.process.wait(10)
        survivors = [c for c in children.values() if alive(c)]
        deadline = time.monotonic() + 10
        while survivors and time.monotonic() < deadline:
            time.sleep(0.1)
            survivors = [c for c in survivors if alive(c)]
        assert not survivors, f"children outlived the daemon: {survivors}"
    finally:
        if daemon.process is not None:
            try:
                os.killpg(daemon.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- configuration and wiring ------------------------------------------------------------------------
def test_isolation_is_chosen_per_stage_and_paddleocr_forces_a_process(tmp_path: Path) -> None:
    base = {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state"}
    config = load_config(None, {**base, **SYNTHETIC_PROCESS, "vision": {**SYNTHETIC_PROCESS["vision"],
                                                                          "isolation": "thread"}})
    load, ocr, vision = build_stages(config)
    assert isolation_of(config, ocr.name, ocr.devices) == "process"
    assert isolation_of(config, vision.name, vision.devices) == "thread" == isolation_of(config, load.name, load.devices)
    # the pipeline hosts them so, with the configured limit for a stuck child
    from app.build import build_pipeline
    from app.metrics import Metrics

    runtime_config = load_config(None, {**base, **SYNTHETIC_PROCESS, "stall_timeout_s": 7.5,
                                        "vision": {**SYNTHETIC_PROCESS["vision"], "isolation": "thread"}})
    hosting = {runner.stage.name: runner.hosting
               for runner in build_pipeline(runtime_config, None, Metrics(), None).runners}  # type: ignore[arg-type]
    assert hosting["ocr"].isolation == "process" and hosting["ocr"].stall_timeout_s == 7.5
    assert hosting["vision"].isolation == "thread"
    assert resolve_isolation("auto", ["cpu"], "paddleocr") == "process"
    assert resolve_isolation("thread", ["cuda:0"]) == "thread"
    with pytest.raises(ConfigError, match="ocr.isolation"):
        load_config(None, {**base, "ocr": {"backend": "paddleocr", "isolation": "thread"}})
    paddle = load_config(None, {**base, "ocr": {"backend": "paddleocr", "devices": ["cpu"]}, "vision":
                                {"backend": "synthetic", "devices": ["cpu"]}})
    assert isolation_of(paddle, "ocr", build_stages(paddle)[1].devices) == "process"


def test_paddleocr_loads_in_a_child_and_a_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("paddleocr") is None:  # found, not imported: paddle must load in the child only
        pytest.skip("PaddleOCR is the optional [paddle] extra: pip install -c constraints.txt -e '.[paddle]'")
    from stages.base import BatchPolicy
    from stages.ocr import OcrOptions, OcrStage

    missing = tmp_path / "no-models"
    stage = ProcessHost(OcrStage(OcrOptions(backend="paddleocr", paddle_model_dir=str(missing)), ["cpu"],
                                 BatchPolicy()), "cpu", stall_timeout_s=120)
    try:
        with pytest.raises(FileNotFoundError, match=r"ocr.paddle_model_dir .*no-models does not exist"):
            stage.setup()
        child = stage.pid
    finally:
        stage.teardown()
    assert child is None or not alive(child)
    assert "paddle" not in sys.modules and "paddleocr" not in sys.modules, "paddle was imported in the child only"


# --- thread mode: model loading is serialised ---------------------------------------------------------
class CountingSetup(RecordingStage):
    """Counts how many replicas are inside ``setup`` at the same time."""

    lock = threading.Lock()
    inside = 0
    most = 0

    def setup(self, device: str) -> None:
        cls = type(self)
        with cls.lock:
            cls.inside += 1
            cls.most = max(cls.most, cls.inside)
        time.sleep(0.05)
        with cls.lock:
            cls.inside -= 1
        super().setup(device)


def test_thread_mode_loads_one_replica_at_a_time(tmp_path: Path) -> None:
    stages = [CountingSetup("load", devices=["cpu"] * 3), CountingSetup("ocr", devices=["cpu"] * 3)]
    pipeline, ledger, _ = build(tmp_path, stages, count=6, max_attempts=2)
    run_until_idle(pipeline)
    assert CountingSetup.most == 1
    assert {row.status for row in ledger.rows()} == {"done"}


LOAD_TWO_VISION_REPLICAS = """
import sys, anyio
from app.engine import StageRunner
from app.metrics import Metrics
from queues import BoundedQueue
from stages.base import BatchPolicy
from stages.vision import CaptionerOptions, ClipOptions, VisionStage

stage = VisionStage(None, CaptionerOptions(model=sys.argv[1], max_new_tokens=4, prompt=None),
                    ClipOptions(model=sys.argv[2]), "auto", ["cpu", "cpu"], BatchPolicy(max_batch_size=2))

async def route(item):
    pass

async def main():
    runner = StageRunner(stage, BoundedQueue("vision", 4), route, Metrics())
    await runner.setup()
    assert len(runner.replicas) == 2
    await runner.teardown()

anyio.run(main)
print("loaded")
"""


@pytest.mark.models
def test_two_vision_replicas_load_at_once_without_import_errors(tiny_blip_dir: Path, tiny_clip_dir: Path) -> None:
    """transformers' lazy imports race when two threads import at once: each run is a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", LOAD_TWO_VISION_REPLICAS, str(tiny_blip_dir), str(tiny_clip_dir)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(4)]  # four interpreters at once: each races only within itself, and the suite waits less
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and "loaded" in stdout, stderr[-3000:]
