"""The real daemon against round two of hostile conditions: configurations that cannot be read on SIGHUP (and
SIGHUPs while it starts), slow HTTP clients, a directory name that is not UTF-8 under the watched input, the input
directory removed and recreated, a small state tmpfs filled and freed, and an output whose quarantine is a link
leading out. In each the daemon never exits, and every file ends in exactly one bin or in quarantine (or, where the
output refuses it, stays in the input, recorded as such).

An input folder inside the output, with every file kept, is tests/test_input_inside_output.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, binner, drip_headers, wait_for
from tests.test_adversarial import images

pytestmark = pytest.mark.system

SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [2.0, 0.5]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [2.0, 0.5]},
    # the watch alone brings files in (well under PICKUP_S): the periodic rescan is a minute away
    "settle_ms": 100, "rescan_interval_s": 60,
}
PICKUP_S = 5.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(root: Path, name: bytes, data: bytes) -> bytes:
    """Write ``data`` at ``root/name`` (bytes: any name) the way a writer that renames into place does."""
    path = os.path.join(os.fsencode(root), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = os.path.join(os.path.dirname(path), b".incoming")
    with open(temp, "wb") as handle:
        handle.write(data)
    os.utime(temp, (time.time() - 60, time.time() - 60))
    os.rename(temp, path)
    return path


def outputs(root: Path) -> dict[bytes, str]:
    """Every regular file under the output root: its path (bytes) and the digest of its content."""
    found = {}
    base = os.fsencode(root)
    for directory, _, files in os.walk(base):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[path[len(base):]] = digest(handle.read())
    return found


def assert_each_placed_once(daemon: DaemonProcess, contents: list[bytes]) -> None:
    """Every content is in exactly one output (a bin or the quarantine), nothing else is, and the input is empty."""
    placed = outputs(daemon.output)
    assert not [p for p in placed if b".binner-tmp" in p], placed
    values = list(placed.values())
    for data in contents:
        assert values.count(digest(data)) == 1, f"{values.count(digest(data))} outputs of one input"
    assert len(values) == len(contents), sorted(placed)
    assert not [p for p in daemon.input.rglob("*") if p.is_file()], "every file left the input"


def assert_alive(daemon: DaemonProcess) -> None:
    assert daemon.process is not None and daemon.process.poll() is None, f"the daemon exited:\n{daemon.log_tail()}"


def taken_within(daemon: DaemonProcess, path: bytes, seconds: float = PICKUP_S) -> float:
    """Seconds until the file at ``path`` left the input (the daemon took and placed it)."""
    started = time.monotonic()
    wait_for(lambda: not os.path.lexists(path), seconds, f"{os.fsdecode(path)!r} to be taken", interval=0.05)
    return time.monotonic() - started


@contextmanager
def running(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    try:
        daemon.start().wait_ready(60)
        yield daemon
        assert_alive(daemon)
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        daemon.kill()


def log_events(daemon: DaemonProcess) -> list[dict[str, object]]:
    events = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def count_events(daemon: DaemonProcess, event: str) -> int:
    return sum(1 for logged in log_events(daemon) if logged.get("event") == event)


# --- a state tmpfs filled and freed ------------------------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(directory: Path) -> Path:
    """Write a filler file until the disk refuses (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.timeout(180)
def test_a_small_state_tmpfs_filled_and_freed_resumes_and_does_not_fill_it_again(tmp_path: Path) -> None:
    """The issue's run: a 4 MB tmpfs as the state directory, 130 files queued, the disk filled for a few seconds and
    freed. Before, the WAL grew back to 4 MB, filled the disk again and the daemon stayed paused with 86 files in
    the input. Now the WAL is folded away while paused and kept small, and the daemon resumes once there is room."""
    # One file per model call: every call is two ledger commits (inside the call, out of it), as many writes as
    # a busy daemon makes, so the WAL grows quickly.
    daemon = DaemonProcess(tmp_path / "run", None, {
        **SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 600, "loader": {"batch_size": 1},
        "ocr": {**SYNTHETIC["ocr"], "batch_size": 1, "synthetic_ms": [40.0, 0.0]},
        "vision": {**SYNTHETIC["vision"], "batch_size": 1}})
    contents = images(130, start=3000)
    for index, data in enumerate(contents):
        put(daemon.input, b"f%03d.png" % index, data)
    with tmpfs(daemon.state, "4m"), running(daemon):
        filler = fill(daemon.state)
        wait_for(lambda: daemon.metric("binner_state_paused") == 1, 30, "the pause on a full state disk")
        time.sleep(2)
        assert_alive(daemon)
        filler.unlink()
        wait_for(lambda: daemon.metric("binner_backlog_files") == 0 and not list(daemon.input.iterdir()), 60,
                 "every queued file to be placed once the disk has room", interval=0.2)
        assert daemon.metric("binner_state_paused") == 0
        wal = daemon.state / "ledger.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size < 1 << 20, "the WAL stays small on a small disk"
        status = json.loads(binner("status", "--config", str(daemon.config_path), "--json").stdout)
    assert_each_placed_once(daemon, contents)
    assert sum(status["bins"].values()) == len(contents), status
    assert count_events(daemon, "state disk has room again: resuming intake and placement") >= 1


# --- SIGHUP while starting, and configurations that cannot be read --------------------------------------------------
@pytest.mark.timeout(120)
def test_sighups_from_the_first_moment_never_end_the_daemon(tmp_path: Path) -> None:
    """SIGHUP every 50 ms from the moment /metrics is served until after READY: before, one in the first second
    killed the process (its handler did not exist yet). Now each is applied (or noted and applied once it can be)."""
    daemon = DaemonProcess(tmp_path, None, SYNTHETIC)
    contents = images(1, start=3300)
    with _started_after_metrics(daemon) as sent:
        assert sent >= 2
        assert count_events(daemon, "rules reloaded") >= 1
        taken_within(daemon, put(daemon.input, b"a.png", contents[0]))
    assert_each_placed_once(daemon, contents)
    assert "Traceback" not in daemon.log_path.read_text(errors="replace")


@contextmanager
def _started_after_metrics(daemon: DaemonProcess) -> Iterator[int]:
    """Start ``daemon`` sending SIGHUP from "serving /metrics" until half a second after /readyz says ready."""
    try:
        daemon.start()
        wait_for(lambda: "serving /metrics" in daemon.log_path.read_text(errors="replace"), 60,
                 "the metrics server", interval=0.01)
        ready_at, sent = None, 0
        while ready_at is None or time.monotonic() < ready_at + 0.5:
            assert_alive(daemon)
            daemon.send(signal.SIGHUP)
            sent += 1
            if ready_at is None and daemon.get("/readyz")[0] == 200:
                ready_at = time.monotonic()
            time.sleep(0.05)
        yield sent
        assert_alive(daemon)
        # And on until it has exited: SIGHUPs while it drains and shuts down (its signal task already gone) are
        # ignored too. Before, the handler was swapped at the end, and a SIGHUP in between ended the process.
        assert daemon.process is not None
        daemon.send(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while daemon.process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                daemon.send(signal.SIGHUP)
            time.sleep(0.005)
        assert daemon.process.wait(5) == 0, daemon.log_tail()
    finally:
        daemon.kill()


@pytest.mark.timeout(120)
def test_a_reload_of_a_configuration_that_cannot_be_read_is_refused_and_the_daemon_goes_on(tmp_path: Path) -> None:
    """A configuration that is not UTF-8, then one that became a directory: each SIGHUP killed the daemon
    (UnicodeDecodeError, IsADirectoryError). Now each reload is refused in one line naming the file, the rules stay,
    and a good configuration afterwards is applied."""
    daemon = DaemonProcess(tmp_path, None, SYNTHETIC)
    contents = images(3, start=3310)
    with running(daemon):
        taken_within(daemon, put(daemon.input, b"a.png", contents[0]))
        original = daemon.config_path.read_bytes()
        daemon.config_path.write_bytes(original + "# r\xe9pertoire\n".encode("latin-1"))
        daemon.send(signal.SIGHUP)
        wait_for(lambda: count_events(daemon, REFUSED) == 1, 10, "the non-UTF-8 reload to be refused")
        taken_within(daemon, put(daemon.input, b"b.png", contents[1]))

        daemon.config_path.unlink()
        daemon.config_path.mkdir()
        daemon.send(signal.SIGHUP)
        wait_for(lambda: count_events(daemon, REFUSED) == 2, 10, "the directory reload to be refused")
        assert_alive(daemon)
        refusals = [event["error"] for event in log_events(daemon) if event.get("event") == REFUSED]
        assert "not UTF-8" in refusals[0] and str(daemon.config_path) in refusals[0], refusals
        assert "is a directory" in refusals[1], refusals

        daemon.config_path.rmdir()
        daemon.write_config({**daemon.config, "rules": {"c_text_area_ratio": 0.0}})  # everything is text now
        daemon.send(signal.SIGHUP)
        wait_for(lambda: count_events(daemon, "rules reloaded") == 1, 10, "the good reload")
        taken_within(daemon, put(daemon.input, b"c.png", contents[2]))
        assert sorted(p.name for p in (daemon.output / "B").iterdir()) == ["a.png", "b.png"]
        assert [p.name for p in (daemon.output / "C").iterdir()] == ["c.png"]
    assert_each_placed_once(daemon, contents)
    assert "Traceback" not in daemon.log_path.read_text(errors="replace")


REFUSED = "reload refused: the configuration cannot be used; keeping the current rules"


# --- slow HTTP clients ----------------------------------------------------------------------------------------------
def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


@pytest.mark.timeout(120)
def test_200_slow_http_clients_never_blind_the_health_check(tmp_path: Path) -> None:
    """200 clients each send a request line and then a header line every half second (before, 4 such clients held
    the 4 workers and every health check timed out): /healthz answers within 1 s every time, files flow, and the
    daemon's thread count does not grow with the clients."""
    daemon = DaemonProcess(tmp_path, None, SYNTHETIC)
    contents = images(2, start=3600)
    stop = threading.Event()
    clients: list[socket.socket] = []
    with running(daemon):
        assert daemon.process is not None
        threads_before = threads_of(daemon.process.pid)
        for _ in range(200):
            client = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            client.sendall(b"GET /healthz HTTP/1.1\r\n")
            clients.append(client)

        dripping = drip_headers(clients, stop, 0.5)
        try:
            slowest = 0.0
            for check in range(10):
                started = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/healthz", timeout=1) as response:
                    assert response.status == 200 and response.read() == b"ok\n"
                slowest = max(slowest, time.monotonic() - started)
                if check == 2:
                    path = put(daemon.input, b"during.png", contents[0])
                time.sleep(0.2)
            taken_within(daemon, path)
            assert threads_of(daemon.process.pid) <= threads_before + 4, "threads grew with the slow clients"
        finally:
            stop.set()
            dripping.join(5)
            for client in clients:
                client.close()
        taken_within(daemon, put(daemon.input, b"after.png", contents[1]))
    assert_each_placed_once(daemon, contents)


# --- a directory name that is not UTF-8 under the watched input ----------------------------------------------------
@pytest.mark.timeout(120)
def test_a_directory_name_that_is_not_utf8_does_not_stop_the_watch(tmp_path: Path) -> None:
    """`mkdir "IN/$(printf 'x\\xfe')"` ended watchfiles' watch for good: pick-up went from 1 s to the rescan
    interval, also after `rmdir`, while /healthz said ok. Files anywhere, that directory included, are still taken
    by the watch alone (the rescan is a minute away)."""
    daemon = DaemonProcess(tmp_path, None, SYNTHETIC)
    contents = images(4, start=3700)
    raw_input = os.fsencode(daemon.input)
    with running(daemon):
        taken_within(daemon, put(daemon.input, b"before.png", contents[0]))
        os.mkdir(os.path.join(raw_input, b"x\xfe"))
        taken_within(daemon, put(daemon.input, b"x\xfe/inside\xff.png", contents[1]))
        taken_within(daemon, put(daemon.input, b"beside.png", contents[2]))
        os.rmdir(os.path.join(raw_input, b"x\xfe"))
        taken_within(daemon, put(daemon.input, b"after.png", contents[3]))
        assert daemon.metric("binner_watch_degraded") == 0
        assert daemon.get("/healthz") == (200, "ok\n")
    assert_each_placed_once(daemon, contents)
    assert b"/B/x\xfe/inside\xff.png" in outputs(daemon.output)
    assert count_events(daemon, "watching the input stopped; re-arming it (rescans find what it missed)") == 0


# --- the input directory removed and recreated ---------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_the_input_directory_removed_and_recreated_is_watched_again(tmp_path: Path) -> None:
    """Removing and recreating the input stopped the watch without a word: pick-up went to the rescan interval. Now
    the removal is logged and shown (degraded), and the new directory is watched again."""
    daemon = DaemonProcess(tmp_path, None, SYNTHETIC)
    contents = images(3, start=3800)
    with running(daemon):
        taken_within(daemon, put(daemon.input, b"first.png", contents[0]))
        daemon.input.rmdir()
        wait_for(lambda: daemon.metric("binner_watch_degraded") == 1, 5, "the watch to be shown degraded")
        status, body = daemon.get("/healthz")
        assert status == 200 and body.startswith("degraded: ") and "does not exist" in body, body
        daemon.input.mkdir()
        taken_within(daemon, put(daemon.input, b"second.png", contents[1]))
        wait_for(lambda: daemon.metric("binner_watch_degraded") == 0, 15, "the watch to be healthy again")
        assert daemon.get("/healthz") == (200, "ok\n")
        daemon.input.rmdir()  # at once, this time: the directory may even get the same inode number back
        daemon.input.mkdir()
        taken_within(daemon, put(daemon.input, b"third.png", contents[2]))
    assert_each_placed_once(daemon, contents)
    assert count_events(daemon, "the input directory is gone: watching it again once it exists; meanwhile nothing "
                                "can arrive (recreate it, or fix the mount it is on)") >= 1
    assert count_events(daemon, "the input directory exists again: watching it") >= 1


# --- a watcher that cannot start ----------------------------------------------------------------------------------
def test_a_watcher_that_cannot_start_is_re_armed_with_a_growing_back_off(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify's limits (instances, watches) make the watcher fail to start, and a process cannot safely exhaust
    them here (they are shared by every process of the user), so the refusal is injected where watchdog reports it.
    The daemon shows the watch degraded, re-arms it at once twice, then backs off (doubling), and once a watch holds
    it is healthy again and its events bring files in. The daemon's own runtime and ledger run for real."""
    import errno

    import anyio
    import structlog
    from watchdog import observers

    import app.service.daemon as daemon_module
    from app.build import build_runtime
    from app.config import load_config
    from app.service import Daemon

    monkeypatch.setattr(daemon_module, "WATCH_BACKOFF_FIRST_S", 0.05)
    monkeypatch.setattr(daemon_module, "WATCH_STABLE_S", 0.3)
    refusals = 4
    starts: list[bool] = []
    real_start = observers.Observer.start

    def start(observer: object) -> None:
        starts.append(len(starts) >= refusals)
        if not starts[-1]:
            raise OSError(errno.EMFILE, "inotify instance limit reached")
        real_start(observer)  # type: ignore[arg-type]

    monkeypatch.setattr(observers.Observer, "start", start)
    synthetic = {"backend": "synthetic", "devices": ["cpu"]}
    (tmp_path / "in").mkdir()
    config = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                "ocr": synthetic, "vision": synthetic, "settle_ms": 0})
    daemon = Daemon(config, None)
    daemon.runtime = runtime = build_runtime(config)

    def degraded() -> float | None:
        return runtime.metrics.registry.get_sample_value("binner_watch_degraded")

    async def watch() -> None:
        async with anyio.create_task_group() as group:
            await group.start(daemon._watch)
            shown_degraded = False
            with anyio.fail_after(20):
                while len(starts) <= refusals or daemon.watch_problem is not None:
                    shown_degraded = shown_degraded or degraded() == 1
                    await anyio.sleep(0.02)
            assert shown_degraded, "the failing watch was never shown in binner_watch_degraded"
            put(config.input, b"seen.png", images(1, start=3900)[0])
            with anyio.fail_after(10):
                while runtime.ledger.backlog()[0] == 0:
                    await anyio.sleep(0.02)
            daemon.stop_intake.set()

    with structlog.testing.capture_logs() as events:
        anyio.run(watch)
    retries = [event["retry_in_s"] for event in events if event.get("event", "").startswith("watching the input stopped")]
    assert retries == [0.0, 0.0, 0.05, 0.1], retries
    assert all("could not start" in event["reason"] and "inotify" in event["reason"]
               for event in events if "retry_in_s" in event)
    assert degraded() == 0 and daemon.watch_problem is None
    runtime.ledger.close()


# --- an output whose quarantine is a link leading out ---------------------------------------------------------------
LEFT = "cannot place or quarantine a file; it stays in the input until it changes or the next start"


@pytest.mark.timeout(120)
def test_a_quarantine_that_is_a_link_leading_out_refuses_the_file_once_and_backs_off(tmp_path: Path) -> None:
    """`OUT/_quarantine` is a link out of the output: the file that needs quarantine correctly stays in the input,
    but its row said `quarantined` and it was tried again, with two warnings, at every rescan. Now it is recorded
    as `refused` (status counts equal the files on disk) and tried again only when it changes (or at a start:
    tests/test_ledger.py)."""
    from tests.test_adversarial import latest_status

    outside = tmp_path / "outside"
    outside.mkdir()
    daemon = DaemonProcess(tmp_path / "run", None, {**SYNTHETIC, "rescan_interval_s": 0.5})
    daemon.output.mkdir(parents=True)
    (daemon.output / "_quarantine").symlink_to(outside, target_is_directory=True)
    good = images(1, start=3900)
    put(daemon.input, b"good.png", good[0])
    notes = put(daemon.input, b"notes.jpg", b"not an image")
    ledger = daemon.state / "ledger.sqlite3"
    with running(daemon):
        wait_for(lambda: latest_status(ledger, b"notes.jpg") == "refused" and count_events(daemon, LEFT) == 1, 30,
                 "the refusal to be recorded")
        time.sleep(1.6)  # three rescans: none tries it again
        assert count_events(daemon, LEFT) == 1
        status = json.loads(binner("status", "--config", str(daemon.config_path), "--json").stdout)
        assert status["quarantined"] == {} and status["refused"] == {"not_an_image": 1}, status
        assert status["bins"] == {"B": 1} and status["status"] == {"done": 1, "refused": 1}, status
        with open(notes, "ab") as handle:  # a change to the file: tried again, once
            handle.write(b" and more")
        os.utime(notes, (time.time() - 60, time.time() - 60))
        wait_for(lambda: count_events(daemon, LEFT) == 2, 10, "the changed file to be tried again")
        time.sleep(1.1)
        assert count_events(daemon, LEFT) == 2
    assert os.path.exists(notes) and list(outside.iterdir()) == []
    assert len(sqlite3.connect(ledger).execute("SELECT id FROM files WHERE rel_path = 'notes.jpg'").fetchall()) == 1
    placed = outputs(daemon.output)
    assert list(placed.values()) == [digest(good[0])], placed
