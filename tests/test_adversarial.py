"""The real daemon over one hostile input tree: symlinks out of the root and inside it, a symlink loop, names
that are not UTF-8 or 255 bytes long, a name reused with new content, a FIFO, a file replaced while in flight,
a file re-pointed to an outside secret while in flight, and an outside directory that must end byte-for-byte
untouched. Every regular file ends in exactly one bin or in quarantine, ``binner status`` counts equal the
files on disk, and the daemon never exits."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from app import bench
from tests.daemon_harness import DaemonProcess, binner, wait_for

pytestmark = pytest.mark.system

# OCR batches take 0.4 s, so a file stays in flight long enough to be replaced under the daemon's feet.
SLOW_SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [400.0, 0.0]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 8, "synthetic_ms": [2.0, 0.5]},
}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict[bytes, tuple[str, bytes]]:
    """Every entry under ``root`` (never following links): its kind and its bytes (or link target)."""
    found: dict[bytes, tuple[str, bytes]] = {}
    base = os.fsencode(root)
    for directory, dirs, files in os.walk(base):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[path[len(base):]] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    found[path[len(base):]] = ("file", handle.read())
            elif stat.S_ISDIR(info.st_mode):
                found[path[len(base):]] = ("dir", b"")
            else:
                found[path[len(base):]] = ("other", b"")
    return found


def images(count: int, start: int) -> list[bytes]:
    """Distinct small PNGs, as bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        bench.make_images(Path(scratch), count, size=32, start=start)
        return [path.read_bytes() for path in sorted(Path(scratch).iterdir())]


def latest_status(ledger: Path, rel_path: bytes) -> str | None:
    if not ledger.exists():
        return None
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        key: str | bytes
        try:
            key = rel_path.decode()
        except UnicodeDecodeError:
            key = rel_path
        row = db.execute("SELECT status FROM files WHERE rel_path = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return row[0] if row else None


def replace_while_processing(daemon: DaemonProcess, name: str, swap) -> None:  # noqa: ANN001
    """Wait until ``name`` is inside the pipeline, then ``swap()`` it."""
    ledger = daemon.state / "ledger.sqlite3"
    wait_for(lambda: latest_status(ledger, name.encode()) == "processing", 30, f"{name} to be in flight",
             interval=0.01)
    swap()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["move", "copy"])
def test_hostile_input_tree(tmp_path: Path, mode: str) -> None:
    pictures = images(12, start=500)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    secret = pictures[0]
    (outside / "secret.png").write_bytes(secret)
    (outside / "sub" / "deep.png").write_bytes(pictures[1])

    daemon = DaemonProcess(tmp_path / "run", None, {**SLOW_SYNTHETIC, "settle_ms": 200, "rescan_interval_s": 1,
                                                     "placement": mode})
    inbox = daemon.input
    raw_inbox = os.fsencode(inbox)
    expected: list[bytes] = []  # contents that must each end in exactly one output
    optional: list[bytes] = []  # contents that may end in one output (replaced while in flight) or none

    def put(name: bytes, data: bytes, must: bool = True) -> None:
        path = os.path.join(raw_inbox, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        os.utime(path, (time.time() - 60, time.time() - 60))  # arrived complete
        (expected if must else optional).append(data)

    # links out of the root, inside it, and a loop; none is ever followed or taken
    (inbox / "ext").symlink_to(outside, target_is_directory=True)
    (inbox / "escape.png").symlink_to(outside / "secret.png")
    put(b"real/x.png", pictures[2])
    (inbox / "inside.png").symlink_to(inbox / "real" / "x.png")
    (inbox / "loop-a.png").symlink_to(inbox / "loop-b.png")
    (inbox / "loop-b.png").symlink_to(inbox / "loop-a.png")
    (inbox / "self").symlink_to(inbox, target_is_directory=True)  # a directory loop the watcher may follow
    os.mkfifo(inbox / "pipe.png")
    # names of any bytes
    put(b"bad\xff.png", pictures[3])
    put(b"dir\xfe/pic\xe9.png", pictures[4])
    put(b"L" * 251 + b".png", pictures[5])
    put(b"notes\xfd.jpg", b"not an image, and a name that is not UTF-8")  # quarantined, its message stored
    put(b"IMG_0001.png", pictures[6])
    outside_before = tree(outside)

    try:
        daemon.start().wait_ready(60)
        ledger = daemon.state / "ledger.sqlite3"
        wait_for(lambda: latest_status(ledger, b"IMG_0001.png") == "done", 60, "the first IMG_0001.png placed")
        first_row = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True).execute(
            "SELECT output_path FROM files WHERE rel_path = 'IMG_0001.png'").fetchone()
        # the scanner reuses the name: new content, and (copy mode) the old size and mtime where they match
        old = os.stat(inbox / "IMG_0001.png") if mode == "copy" else None
        with open(inbox / "IMG_0001.png", "wb") as handle:
            handle.write(pictures[7])
        if old is not None:
            os.utime(inbox / "IMG_0001.png", ns=(old.st_atime_ns, old.st_mtime_ns))
        else:
            os.utime(inbox / "IMG_0001.png", (time.time() - 60, time.time() - 60))
        expected.append(pictures[7])

        # a file replaced by another (new inode, new bytes) while it is in flight
        put(b"mid.png", pictures[8], must=False)

        def swap_mid() -> None:
            temp = inbox / ".mid.next"
            temp.write_bytes(pictures[9])
            os.utime(temp, (time.time() - 60, time.time() - 60))
            os.replace(temp, inbox / "mid.png")

        replace_while_processing(daemon, "mid.png", swap_mid)
        expected.append(pictures[9])

        # a file re-pointed at an outside secret while in flight (`ln -sfn OUTSIDE/secret.png INPUT/repoint.png`)
        put(b"repoint.png", pictures[10], must=False)

        def repoint() -> None:
            (inbox / ".repoint.link").symlink_to(outside / "secret.png")
            os.replace(inbox / ".repoint.link", inbox / "repoint.png")

        replace_while_processing(daemon, "repoint.png", repoint)

        # files created in the outside directory after start, seen by the watcher through INPUT/ext
        (outside / "late.png").write_bytes(pictures[11])
        (outside / "sub" / "late.png").write_bytes(pictures[11])
        outside_before.update({b"/late.png": ("file", pictures[11]), b"/sub/late.png": ("file", pictures[11])})

        def settled() -> bool:
            assert daemon.process is not None and daemon.process.poll() is None, daemon.log_tail()
            return daemon.metric("binner_backlog_files") == 0 and latest_status(ledger, b"mid.png") in (
                "done", "quarantined")

        wait_for(settled, 90, "the backlog to drain", interval=0.2)
        time.sleep(2.5)  # two more rescans over the same tree: nothing new may be taken
        wait_for(settled, 30, "the backlog to stay drained", interval=0.2)
        status = binner("status", "--config", str(daemon.config_path), "--json")
        explained = binner("explain", first_row[0], "--config", str(daemon.config_path), "--json")
        assert daemon.process is not None and daemon.process.poll() is None, "the daemon must never exit"
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    # the outside directory is byte-for-byte untouched, including the files created while the daemon ran
    assert tree(outside) == outside_before

    outputs = tree(daemon.output)
    assert not [p for p, (kind, _) in outputs.items() if kind in ("link", "other")], "never a link in the output"
    placed = {path: data for path, (kind, data) in outputs.items() if kind == "file"}
    assert not [p for p in placed if b".binner-tmp" in p]
    contents = [digest(data) for data in placed.values()]
    for data in (secret, pictures[1], pictures[11]):
        assert digest(data) not in contents, "outside bytes were placed"
    for data in expected:
        assert contents.count(digest(data)) == 1, f"{contents.count(digest(data))} outputs of one input"
    for data in optional:
        assert contents.count(digest(data)) <= 1
    assert set(contents) <= {digest(d) for d in expected + optional}
    names = {os.path.basename(p) for p in placed}
    assert b"bad\xff.png" in names and b"pic\xe9.png" in names and b"L" * 251 + b".png" in names
    assert b"/_quarantine/not_an_image/notes\xfd.jpg" in placed

    counts = json.loads(status.stdout)
    in_bins = [p for p in placed if not p.startswith(b"/_quarantine/")]
    assert sum(counts["bins"].values()) == len(in_bins), (counts, sorted(placed))
    assert sum(counts["quarantined"].values()) == len(placed) - len(in_bins), (counts, sorted(placed))
    assert json.loads(explained.stdout)["status"] == "done", "the first IMG_0001.png keeps its own record"

    inputs_left = tree(inbox)
    assert inputs_left[b"/escape.png"][0] == "link" and inputs_left[b"/ext"][0] == "link"
    assert inputs_left[b"/pipe.png"][0] == "other"
    if mode == "move":
        assert not [p for p, (kind, _) in inputs_left.items() if kind == "file"], "every regular file was taken"
    log = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "skipping a symbolic link" in log


@pytest.mark.timeout(240)
def test_repeated_kill_9_right_after_start_up_quarantines_no_good_image(tmp_path: Path) -> None:
    """Only rows inside a model call when the process dies are charged; claimed rows waiting in queues are not."""
    daemon = DaemonProcess(tmp_path, None, {**SLOW_SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 600,
                                            "max_attempts": 3})
    bench.make_images(daemon.input, 40, size=32)
    ledger = daemon.state / "ledger.sqlite3"

    def claimed() -> bool:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM files WHERE status = 'processing'").fetchone()[0] > 0
        except sqlite3.Error:
            return False
        finally:
            db.close()

    try:
        for _ in range(5):
            daemon.start().wait_ready(60)
            wait_for(claimed, 30, "rows to be claimed", interval=0.01)
            time.sleep(0.05)
            daemon.kill()
        daemon.start().wait_ready(60)
        wait_for(lambda: daemon.metric("binner_backlog_files") == 0, 120, "the backlog to drain", interval=0.2)
        status = json.loads(binner("status", "--config", str(daemon.config_path), "--json").stdout)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert status["quarantined"] == {}, status
    assert sum(status["bins"].values()) == 40, status


@pytest.mark.timeout(180)
def test_once_over_links_loops_and_odd_names_in_copy_mode(tmp_path: Path) -> None:
    """`binner once` walks the same hostile tree: no crash, nothing outside read or touched."""
    import yaml

    pictures = images(4, start=700)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(pictures[0])
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    inbox.mkdir()
    (inbox / "ext").symlink_to(outside, target_is_directory=True)
    (inbox / "escape.png").symlink_to(outside / "secret.png")
    (inbox / "loop-a.png").symlink_to(inbox / "loop-b.png")
    (inbox / "loop-b.png").symlink_to(inbox / "loop-a.png")
    os.mkfifo(inbox / "pipe.png")
    for name, data in ((b"bad\xff.png", pictures[1]), (b"L" * 251 + b".png", pictures[2]), (b"ok.png", pictures[3])):
        with open(os.path.join(os.fsencode(inbox), name), "wb") as handle:
            handle.write(data)
    before = tree(outside)
    config = tmp_path / "binner.yaml"
    config.write_text(yaml.safe_dump({**SLOW_SYNTHETIC, "placement": "copy", "log": {"format": "json"},
                                      "ocr": {**SLOW_SYNTHETIC["ocr"], "synthetic_ms": [1.0, 0.0]}}))
    result = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--state", str(state),
                    "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert tree(outside) == before
    placed = {os.path.basename(p): data for p, (kind, data) in tree(out).items() if kind == "file"}
    assert sorted(placed) == sorted([b"bad\xff.png", b"L" * 251 + b".png", b"ok.png"])
    assert digest(pictures[0]) not in {digest(d) for d in placed.values()}


def test_a_full_state_disk_at_intake_pauses_without_crashing_and_resumes(tmp_path: Path) -> None:
    import anyio

    from app.build import build_runtime
    from app.config import load_config
    from app.service import Daemon

    synthetic = {"backend": "synthetic", "devices": ["cpu"]}
    config = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                "ocr": synthetic, "vision": synthetic, "settle_ms": 0})
    (tmp_path / "in").mkdir()
    for index, data in enumerate(images(3, start=900)):
        (tmp_path / "in" / f"{index}.png").write_bytes(data)
    daemon = Daemon(config, None)
    daemon.runtime = runtime = build_runtime(config)
    real_intake = runtime.ledger.intake

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def paused() -> float | None:
        return runtime.metrics.registry.get_sample_value("binner_state_paused")

    assert paused() == 0
    runtime.ledger.intake = full  # type: ignore[method-assign]
    anyio.run(daemon._rescan)
    assert paused() == 1 and runtime.pipeline.state_paused and runtime.ledger.backlog()[0] == 0
    runtime.ledger.intake = real_intake  # type: ignore[method-assign]
    anyio.run(daemon._rescan)  # still paused: nothing is written until the disk is known to have room
    assert paused() == 1 and runtime.ledger.backlog()[0] == 0 and daemon.rescan_when_resumed
    anyio.run(runtime.pipeline.wait_for_state_room)  # there is room here: it resumes
    anyio.run(daemon._rescan)
    assert paused() == 0 and runtime.ledger.backlog()[0] == 3
    runtime.ledger.close()


def test_prune_empty_dirs_removes_only_empty_real_directories(tmp_path: Path) -> None:
    from app.store import prune_empty_dirs

    root = tmp_path / "in"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "keep").mkdir()
    (root / "keep" / ".hidden").write_bytes(b"x")
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert prune_empty_dirs(root) == 3
    assert sorted(p.name for p in root.iterdir()) == ["keep", "link"]
    assert (outside / "empty").is_dir(), "a linked directory is never walked into"
    assert root.is_dir()
