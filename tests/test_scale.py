"""Archives of any size: `once` records its tree chunk by chunk while the engine works, so memory does not grow
with the number of files (a hard memory budget measured on a small tree holds on a large one); a `kill -9` during
the scan or during `rebin` leaves every file in exactly one place, and the ledger agrees with the disk; the scan stops
with the engine, hands its errors on, never records what a pause made stale, and never puts back what the engine has
claimed. (Figures at 100,000 and 1,000,000 files: `binner bench -s scale`, docs/benchmarks.md.)"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from app.bench.scale import make_tree
from app.build import ScanError, StreamingIntake, build_runtime, intake_all
from app.config import load_config
from app.engine import RunStats
from app.once import bin_once, scan_beside
from app.store import Outcome, scan, to_discovered
from tests.daemon_harness import REPO, binner, error_lines, wait_for

pytestmark = pytest.mark.system

ZERO_COST = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 64, "synthetic_ms": [0.0, 0.0]},
    "http": {"enabled": False}, "log": {"format": "json", "level": "warning"},
}


def setup_tree(root: Path, files: int, padding: int = 0) -> tuple[Path, Path, Path, Path]:
    inbox, output, state, config = root / "in", root / "out", root / "state", root / "binner.yaml"
    make_tree(inbox, files, padding)
    config.write_text(yaml.safe_dump({**ZERO_COST, "input": str(inbox), "output": str(output), "state_dir": str(state)}))
    return inbox, output, state, config


def once_command(inbox: Path, output: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "app.cli", "once", str(inbox), "--output", str(output), "--config", str(config),
            "--no-progress"]


def start_once(inbox: Path, output: Path, config: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    return subprocess.Popen([*prefix, *once_command(inbox, output, config)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def rows(state: Path, where: str = "1") -> int:
    try:
        db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True, timeout=0.5)
        try:
            return int(db.execute(f"SELECT count(*) FROM files WHERE {where}").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def assert_one_place_each(inbox: Path, output: Path, state: Path, config: Path, files: int,
                          placement: str = "move") -> None:
    """Every file once in the output (none left in the input in move mode), one finished row per file, `status`
    equal to the disk."""
    placed = [p for p in output.rglob("*") if p.is_file()]
    if placement == "move":
        assert not [p for p in inbox.rglob("*") if p.is_file()], "move mode leaves nothing in the input"
    assert len(placed) == files and len({p.name for p in placed}) == files, "every file exactly once"
    db = sqlite3.connect(state / "ledger.sqlite3")
    try:
        finished = db.execute("SELECT output_path FROM files WHERE status IN ('done', 'quarantined')").fetchall()
        unfinished = db.execute("SELECT count(*) FROM files WHERE status IN ('pending', 'processing')").fetchone()[0]
        statuses = Counter(status for (status,) in db.execute("SELECT status FROM files"))
    finally:
        db.close()
    assert unfinished == 0 and sorted(path for (path,) in finished) == sorted(str(p) for p in placed), statuses
    status = json.loads(binner("status", "--config", str(config), "--json").stdout)
    assert sum(status["bins"].values()) + sum(status["quarantined"].values()) == files, status


# --- a hard memory budget ------------------------------------------------------------------------------------------
class MemoryCgroup:
    """A memory cgroup of its own for one command, under this process's group: the peak it charged, and optionally a
    hard limit (past it the kernel kills the command). cgroup v1's memory hierarchy, or v2 with the memory
    controller delegated to this group."""

    def __init__(self, parent: Path, v2: bool, name: str, limit_bytes: int | None = None) -> None:
        self.path, self.v2 = parent / name, v2
        self.path.mkdir()
        if limit_bytes is not None:
            (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))

    def prefix(self) -> tuple[str, ...]:
        """Run a command inside: the shell joins the group, then becomes the command (charged from its first page)."""
        return ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path))

    def peak_bytes(self) -> int:
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def remove(self) -> None:
        self.path.rmdir()


def memory_cgroup_parent() -> tuple[Path, bool]:
    """This process's memory cgroup directory where children with a memory limit can be made, and whether it is
    cgroup v2; skips the test where there is none (not root, no memory controller, not delegated)."""
    mounts: dict[str, tuple[str, str, str]] = {}  # fs type -> (root, mount point, super options), memory ones only
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        kind, _, options = tail.split(" ", 2)
        parts = fields.split()
        if kind == "cgroup2" or (kind == "cgroup" and "memory" in options.split(",")):
            mounts.setdefault(kind, (parts[3], parts[4], options))
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, group = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        mount = mounts.get("cgroup2" if v2 else "cgroup")
        if mount is None:
            continue
        root, point, _ = mount
        relative = group[len(root):] if root != "/" and group.startswith(root) else group
        parent = Path(point) / relative.lstrip("/")
        if v2 and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            continue  # v2: the memory controller must be delegated to this group's children
        if os.access(parent, os.W_OK):
            return parent, v2
    pytest.skip("no memory cgroup to make children in (needs root and the memory controller, v1 or delegated v2)")


def run_in_cgroup(parent: tuple[Path, bool], name: str, tree: tuple[Path, Path, Path, Path],
                  limit_bytes: int | None = None) -> tuple[int, int, str]:
    """`once` over ``tree`` in a memory cgroup of its own: (exit status, peak bytes charged, stderr's tail)."""
    group = MemoryCgroup(*parent, name, limit_bytes)
    try:
        run = start_once(tree[0], tree[1], tree[3], group.prefix())
        _, stderr = run.communicate(timeout=240)
        return run.returncode, group.peak_bytes(), stderr[-2000:]
    finally:
        group.remove()


BUDGET_FILES = 20_000
BUDGET_PADDING = 200  # names of about 620 characters (three components of 200): the tree in memory shows sooner
BUDGET_ALLOWANCE = 16 * 2**20


@pytest.mark.timeout(300)
def test_once_finishes_a_large_tree_within_a_memory_budget_measured_on_a_small_one(tmp_path: Path) -> None:
    """The budget is measured in the same run: the peak memory a cgroup charges `once` over 1,000 files, plus 16 MiB.
    `once` over 20,000 files with the same long names must then finish every file under that hard limit (the kernel
    kills it past the limit; page cache, the ledger's included, is reclaimed first). The long names make a tree held
    in memory show at 20,000 files (with plain names only past about 50,000, too slow for the suite). On the
    development machine the old scan-then-record code (63fb036) was killed in its scan within 1.3 s and first
    finished at +26 MiB; the streaming intake finishes even at +8 MiB (docs/benchmarks.md)."""
    parent = memory_cgroup_parent()
    small = setup_tree(tmp_path / "small", 1000, BUDGET_PADDING)
    code, baseline, stderr = run_in_cgroup(parent, f"binner-small-{os.getpid()}", small)
    assert code == 0, stderr
    large = setup_tree(tmp_path / "large", BUDGET_FILES, BUDGET_PADDING)
    limit = baseline + BUDGET_ALLOWANCE
    code, peak, stderr = run_in_cgroup(parent, f"binner-large-{os.getpid()}", large, limit)
    mib = 2**20
    assert code == 0, (f"`once` over {BUDGET_FILES} files exited {code} (-9: killed at the limit) under "
                       f"{limit / mib:.1f} MiB ({baseline / mib:.1f} MiB at 1,000 files + 16); peak {peak / mib:.1f} "
                       f"MiB\n{stderr}")
    assert_one_place_each(*large, BUDGET_FILES)


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


# --- the scan and the engine ----------------------------------------------------------------------------------------
# `once` with a state disk that fails under it: the pipeline's ledger writes (every `record`) or the scan's (its
# second chunk). The scan pauses after its first chunk (it waits for a backlog of 10), where it waited for ever.
FAILING_ONCE = """
import sqlite3, sys
from app.build import StreamingIntake
from app.cli import main
from app.store import Ledger

fault, sys.argv[1:] = sys.argv[1], sys.argv[2:]
StreamingIntake.ahead = 10
name, after, message = {"pipeline": ("record", 0, "disk I/O error"),
                        "scan": ("intake", 1, "database or disk is full")}[fault]
original, calls = getattr(Ledger, name), []

def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) > after:
        raise sqlite3.OperationalError(message)
    return original(self, *args, **kwargs)

setattr(Ledger, name, failing)
main()
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("fault", "said", "left"), [("pipeline", "disk I/O error", 1500),
                                                     ("scan", "the state disk is full", 500)])
def test_once_ends_with_one_line_and_a_failure_when_the_pipeline_or_the_scan_fails(
        tmp_path: Path, fault: str, said: str, left: int) -> None:
    """A pipeline that fails stops the paused scan at once (before, the task group waited for ever for the scan's
    thread) and removes no input it could not record; a scan that fails lets the pipeline bin the chunk it recorded,
    then fails the run. Either way one line that says what to do."""
    inbox, output, _, config = setup_tree(tmp_path, 1500)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    run = subprocess.Popen([sys.executable, "-c", FAILING_ONCE, fault, *once_command(inbox, output, config)[3:]],
                           cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        raise AssertionError("`once` still ran 60 s after its ledger failed: the scan waited for the pipeline") from None
    assert run.returncode == 1, (stdout, stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1 and said in lines[0] and "run the same command again" in lines[0], stderr
    assert len(list(inbox.rglob("*.png"))) == left


def test_an_error_that_ends_the_scan_is_raised_once_the_engine_has_finished(tmp_path: Path) -> None:
    """What runs the scan beside the Ray driver, without Ray: the scan's error (here the state disk full) is raised
    as one message after the engine returns, never lost on the scan's thread; an engine that fails stops a scan
    that waits for the backlog to fall."""
    inbox = tmp_path / "in"
    make_tree(inbox, 20)
    config = load_config(None, {**ZERO_COST, "input": inbox, "output": tmp_path / "out", "state_dir": tmp_path / "state"})
    runtime = build_runtime(config, command="once", engine="ray")  # no pipeline, no Ray: the driver's side alone
    try:
        def state_disk_full(rel_path: str) -> bool:
            raise sqlite3.OperationalError("database or disk is full")

        def engine(more_coming: Callable[[], bool]) -> RunStats:
            wait_for(lambda: not more_coming(), 30, "the scan to end")
            return RunStats()

        with pytest.raises(ScanError) as caught:
            scan_beside(StreamingIntake(runtime, only=state_disk_full), engine)
        message = str(caught.value)
        assert str(inbox) in message and "state disk is full" in message and "run the same command again" in message

        paused = StreamingIntake(runtime, ahead=0)  # waits after its first chunk for as long as a row is pending

        def failing_engine(more_coming: Callable[[], bool]) -> RunStats:
            wait_for(lambda: runtime.ledger.backlog()[0] == 20, 30, "the first chunk")
            raise RuntimeError("the cluster went away")

        with pytest.raises(RuntimeError, match="the cluster went away"):
            scan_beside(paused, failing_engine)
        assert paused.done.is_set() and paused.error is None
    finally:
        runtime.close()


def test_the_ray_drivers_bar_counts_what_earlier_runs_left_and_what_the_scan_finds(tmp_path: Path) -> None:
    """Beside the Ray driver the bar's total starts at the rows an earlier run left and grows with every chunk the
    scan records, from the scan's thread, before and after the bar is shown (before, the Ray bar had no total)."""
    from app.progress import BinningProgress

    inbox = tmp_path / "in"
    make_tree(inbox, 2500)
    config = load_config(None, {**ZERO_COST, "input": inbox, "output": tmp_path / "out", "state_dir": tmp_path / "state"})
    runtime = build_runtime(config, command="once", engine="ray")
    try:
        runtime.ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox)  # what an earlier run recorded
                              if seen.rel_path.startswith("d00000/"))
        left = runtime.ledger.backlog()[0]
        assert 0 < left < 2500
        progress = BinningProgress(None, False)

        def engine(more_coming: Callable[[], bool]) -> RunStats:
            with progress.shown("binning on Ray"):
                wait_for(lambda: not more_coming(), 30, "the scan to end")
                return RunStats()

        scan_beside(StreamingIntake(runtime), engine, on_recorded=progress.add_total)
        assert progress._total == 2500 == runtime.ledger.backlog()[0]
    finally:
        runtime.close()


def test_the_scan_never_puts_back_rows_the_engine_has_claimed(tmp_path: Path) -> None:
    """The recovery of an interrupted run is `prepare()`, before any claim; the scan itself leaves claimed rows
    alone (before, it recovered on its own thread while the engine claimed, and could hand a file out twice)."""
    inbox = tmp_path / "in"
    make_tree(inbox, 30)
    config = load_config(None, {**ZERO_COST, "input": inbox, "output": tmp_path / "out", "state_dir": tmp_path / "state"})
    runtime = build_runtime(config, command="once", engine="ray")
    try:
        intake_all(runtime)
        claimed = {row.id for row in runtime.ledger.claim_pending(10)}  # the engine's first claim
        StreamingIntake(runtime).run()  # the scan of the same run
        still = {row.id for row in runtime.ledger.rows("processing")}
        assert still == claimed, "the scan put rows the engine holds back to pending"
        assert StreamingIntake(runtime).prepare() == 10  # the next run's start recovers them
    finally:
        runtime.close()


@pytest.mark.parametrize("placement", ["move", "hardlink"])
def test_a_restart_whose_scan_pauses_records_what_the_disk_holds_after_the_pause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placement: str) -> None:
    """A restart with more rows left than the scan lets wait: the scan pauses, the pipeline places those files
    meanwhile (a move removes them, a hardlink changes their ctime), and the scan must not then record what it had
    seen before the pause (before: a `vanished` row per moved file, a second `done` row per linked one)."""
    files = 60
    inbox = tmp_path / "in"
    make_tree(inbox, files)
    config = load_config(None, {**ZERO_COST, "input": inbox, "output": tmp_path / "out",
                                "state_dir": tmp_path / "state", "placement": placement})
    runtime = build_runtime(config, command="once")
    try:
        intake_all(runtime)  # an earlier run recorded the tree and was stopped: every row is left
    finally:
        runtime.close()
    monkeypatch.setattr(StreamingIntake, "ahead", 5)
    summary = bin_once(config, "local", None, show_progress=False)
    assert summary.stats.finished == files and summary.stats.vanished == 0 and summary.not_finished == 0
    config_file = tmp_path / "binner.yaml"
    config_file.write_text(yaml.safe_dump({**ZERO_COST, "input": str(inbox), "output": str(tmp_path / "out"),
                                           "state_dir": str(tmp_path / "state"), "placement": placement}))
    assert rows(tmp_path / "state") == files, {s: rows(tmp_path / "state", f"status = '{s}'") for s in ("done", "vanished")}
    assert_one_place_each(inbox, tmp_path / "out", tmp_path / "state", config_file, files, placement)


def test_the_progress_total_counts_the_refused_files_a_start_tries_again(tmp_path: Path) -> None:
    """Each start gives the files the output refused one more try: they are work of this run, so the bar's total
    counts them from the start (before, they were made pending after the total was taken: "5/3")."""
    inbox = tmp_path / "in"
    make_tree(inbox, 5)
    config = load_config(None, {**ZERO_COST, "input": inbox, "output": tmp_path / "out", "state_dir": tmp_path / "state"})
    runtime = build_runtime(config, command="once")
    try:
        intake_all(runtime)
        refused = runtime.ledger.claim_pending(2)
        runtime.ledger.record([Outcome(row.id, "refused", reason="output_refused", last_error="EROFS") for row in refused])
    finally:
        runtime.close()
    shown = io.StringIO()
    summary = bin_once(config, "local", None, True, Console(file=shown, width=200))
    assert summary.stats.finished == 5
    bar = shown.getvalue().strip().splitlines()[-1]
    assert " 5/5 " in bar, bar
