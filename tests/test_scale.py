"""Archives of any size: `once` records its tree chunk by chunk while the engine works, so memory does not grow
with the number of files; a `kill -9` during the scan or during `rebin` leaves every file in exactly one place, and
the ledger agrees with the disk. (Figures at 100,000 and 1,000,000 files: `binner bench -s scale`,
docs/benchmarks.md.)"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from app.bench.scale import make_tree
from tests.daemon_harness import REPO, binner, wait_for

pytestmark = pytest.mark.system

ZERO_COST = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
    "http": {"enabled": False}, "log": {"format": "json", "level": "warning"},
}


def setup_tree(root: Path, files: int) -> tuple[Path, Path, Path, Path]:
    inbox, output, state, config = root / "in", root / "out", root / "state", root / "binner.yaml"
    make_tree(inbox, files)
    config.write_text(yaml.safe_dump({**ZERO_COST, "input": str(inbox), "output": str(output), "state_dir": str(state)}))
    return inbox, output, state, config


def start_once(inbox: Path, output: Path, config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "once", str(inbox), "--output", str(output), "--config",
                             str(config), "--no-progress"], cwd=REPO, env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def rows(state: Path, where: str = "1") -> int:
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=0.5)
        try:
            return int(db.execute(f"SELECT count(*) FROM files WHERE {where}").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a running process; 0 once it has exited (a zombie has no memory left to report)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def assert_one_place_each(inbox: Path, output: Path, state: Path, config: Path, files: int) -> None:
    """Every file once in the output (none left in the input), one finished row per file, `status` equal to disk."""
    placed = [p for p in output.rglob("*") if p.is_file()]
    assert not [p for p in inbox.rglob("*") if p.is_file()], "move mode leaves nothing in the input"
    assert len(placed) == files and len({p.name for p in placed}) == files, "every file exactly once"
    db = sqlite3.connect(state / "ledger.sqlite3")
    try:
        finished = db.execute("SELECT output_path FROM files WHERE status IN ('done', 'quarantined')").fetchall()
        unfinished = db.execute("SELECT count(*) FROM files WHERE status IN ('pending', 'processing')").fetchone()[0]
    finally:
        db.close()
    assert unfinished == 0 and sorted(path for (path,) in finished) == sorted(str(p) for p in placed)
    status = json.loads(binner("status", "--config", str(config), "--json").stdout)
    assert sum(status["bins"].values()) + sum(status["quarantined"].values()) == files


@pytest.mark.timeout(300)
def test_memory_of_once_does_not_grow_with_the_number_of_files(tmp_path: Path) -> None:
    """The memory budget is measured in the same run: `once` over 1,000 files, then over 50,000 (stopped once the
    whole tree is recorded, which is where a scan held in memory peaks). Before, the scan was one list: about
    0.75 KB per file, 36 MiB more at 50,000; now the peak grows by less than a third of that."""
    small = setup_tree(tmp_path / "small", 1000)
    run = start_once(small[0], small[1], small[3])
    baseline = 0.0
    while run.poll() is None:
        baseline = max(baseline, peak_rss_mib(run.pid))
        time.sleep(0.05)
    assert run.returncode == 0, run.stderr.read() if run.stderr else ""
    files = 50_000
    large = setup_tree(tmp_path / "large", files)
    run = start_once(large[0], large[1], large[3])
    try:
        wait_for(lambda: rows(large[2]) >= files or run.poll() is not None, 240, "the whole tree to be recorded",
                 interval=0.1)
        time.sleep(1.0)  # a little of the run after the scan
        assert run.poll() is None, "the run ended early"
        peak = peak_rss_mib(run.pid)
    finally:
        run.kill()
        run.wait(10)
    assert peak - baseline < 12.0, f"peak RSS {peak:.1f} MiB at {files} files against {baseline:.1f} MiB at 1,000"


@pytest.mark.timeout(300)
def test_a_kill_9_during_the_scan_loses_nothing_and_places_nothing_twice(tmp_path: Path) -> None:
    files = 12_000
    inbox, output, state, config = setup_tree(tmp_path, files)
    run = start_once(inbox, output, config)
    try:
        wait_for(lambda: rows(state) >= 1000 or run.poll() is not None, 120, "the first chunk to be recorded",
                 interval=0.002)
        recorded = rows(state)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
    finally:
        if run.poll() is None:
            run.kill()
    assert 0 < recorded < files, f"the kill came after the scan ({recorded} rows): it proves nothing"
    again = start_once(inbox, output, config)
    assert again.wait(240) == 0, again.stderr.read() if again.stderr else ""
    assert_one_place_each(inbox, output, state, config, files)


@pytest.mark.timeout(300)
def test_a_kill_9_during_rebin_leaves_every_file_in_one_bin_and_the_ledger_agreeing(tmp_path: Path) -> None:
    files = 3000
    inbox, output, state, config = setup_tree(tmp_path, files)
    assert start_once(inbox, output, config).wait(240) == 0
    assert len(list((output / "B").rglob("*.png"))) == files  # the zero-cost stages give every file B
    moved_config = tmp_path / "to-c.yaml"  # no text at all is now "text-dominant": every file moves to C
    moved_config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "rules": {"c_text_area_ratio": 0.0}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    rebin = subprocess.Popen([sys.executable, "-m", "app.cli", "rebin", "--config", str(moved_config)], cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: rows(state, "bin = 'C'") >= 300 or rebin.poll() is not None, 120, "rebin to be under way",
                 interval=0.005)
        os.kill(rebin.pid, signal.SIGKILL)
        rebin.wait(10)
    finally:
        if rebin.poll() is None:
            rebin.kill()
    moved_so_far = rows(state, "bin = 'C'")
    assert 0 < moved_so_far < files, f"the kill came after the rebin ({moved_so_far} moved): it proves nothing"
    done = binner("rebin", "--config", str(moved_config), timeout=240)
    assert done.returncode == 0, done.stderr
    assert len(list((output / "C").rglob("*.png"))) == files and not list((output / "B").rglob("*.png"))
    assert rows(state, "bin = 'C'") == files
    assert_one_place_each(inbox, output, state, moved_config, files)
