"""The real daemon as a process: files in at random moments, bins out, metrics scraped, signals,
crash safety under SIGKILL, and a 20,000-file backlog in bounded memory."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from app import bench
from app.service.http import StatusServer
from tests.conftest import REPO
from tests.daemon_harness import DaemonProcess, NotifyListener, binner, drip_headers, error_lines, files_under, sha256, wait_for

pytestmark = pytest.mark.system
OFFLINE = REPO / "deploy" / "examples" / "offline-cpu.yaml"
SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 8, "synthetic_ms": [2.0, 0.5]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 8, "synthetic_ms": [2.0, 0.5]},
}


def drop(source: Path, target: Path, how: str) -> None:
    """Deliver a file the ways real writers do: copy, write-then-rename, or slow partial writes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    if how == "rename":
        temp = target.with_name(target.name + ".part")
        temp.write_bytes(data)
        os.rename(temp, target)
    elif how == "slow":
        with target.open("wb") as handle:
            step = max(1, len(data) // 4)
            for start in range(0, len(data), step):
                handle.write(data[start : start + step])
                handle.flush()
                time.sleep(0.15)
    else:
        shutil.copyfile(source, target)


def ledger_rows(state: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(state / "ledger.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM files").fetchall()
    finally:
        db.close()


@pytest.mark.models
def test_daemon_bins_files_dropped_at_random_moments(tmp_path: Path, shared_images: Path,
                                                      labels: list[dict[str, str]]) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = DaemonProcess(tmp_path, OFFLINE, {"settle_ms": 800, "rescan_interval_s": 5}, notify,
                           watchdog_usec=2_000_000)
    try:
        daemon.start()
        wait_for(lambda: notify.saw("READY=1"), 240, "READY=1 on the notify socket")
        assert daemon.get("/readyz")[0] == 200 and daemon.get("/healthz")[0] == 200
        rng = random.Random(7)
        order = list(labels)
        rng.shuffle(order)
        expected: dict[str, tuple[str, str]] = {}
        for index, label in enumerate(order):
            how = ("copy", "rename", "slow")[index % 3]
            rel = label["file"] if index % 4 else f"nested/deeper/{label['file']}"
            drop(shared_images / label["file"], daemon.input / rel, how)
            expected[Path(rel).name] = (label["category"], sha256(shared_images / label["file"]))
            time.sleep(rng.uniform(0, 0.3))
        wait_for(lambda: len(files_under(daemon.output)) >= len(labels) and not files_under(daemon.input),
                 300, "every dropped file to be placed", interval=0.5)
        placed = files_under(daemon.output)
        assert len(placed) == len(labels), [str(p) for p in placed]
        by_category: dict[str, Counter[str]] = {}
        for path in placed:
            bin_name = path.relative_to(daemon.output).parts[0]
            assert bin_name in {"A", "B", "C"}, f"{path} should not be quarantined"
            category, digest = expected[path.name]
            assert sha256(path) == digest, f"{path} content differs from what was dropped"
            by_category.setdefault(category, Counter())[bin_name] += 1
        text, photo, mixed = by_category["text"], by_category["photo"], by_category["mixed"]
        assert text["C"] / sum(text.values()) >= 0.9, by_category
        assert photo["A"] / sum(photo.values()) >= 0.8, by_category
        assert (mixed["B"] + mixed["C"]) / sum(mixed.values()) >= 0.7, by_category
        rows = ledger_rows(daemon.state)
        assert len(rows) == len(labels) and {r["status"] for r in rows} == {"done"}
        assert all(Path(r["output_path"]).exists() for r in rows)
        wait_for(lambda: daemon.metric("binner_binned_total") == len(labels), 10, "binned_total in /metrics")
        assert daemon.metric("binner_queue_capacity", queue="ocr") is not None
        assert daemon.metric("binner_stage_busy_seconds_total", stage="ocr") > 0
        assert daemon.metric("binner_build_info") == 1
        wait_for(lambda: notify.saw("WATCHDOG=1"), 5, "WATCHDOG=1 pings")
        assert any(m.startswith("STATUS=") for m in notify.messages)
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0
        assert notify.saw("STOPPING=1")
    finally:
        daemon.kill()
        notify.close()


def make_images(directory: Path, count: int, start: int = 0) -> None:
    bench.make_images(directory, count, size=32, start=start)


def test_sighup_reloads_rules_without_restarting(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, None, {**SYNTHETIC, "settle_ms": 100, "rescan_interval_s": 1})
    try:
        daemon.start().wait_ready(60)
        make_images(daemon.input, 3)
        wait_for(lambda: len(files_under(daemon.output / "B")) == 3, 30, "three files in B")
        pid = daemon.process.pid if daemon.process else None
        daemon.write_config({**daemon.config, "rules": {"c_text_area_ratio": 0.0}})  # everything is text now
        daemon.send(signal.SIGHUP)
        wait_for(lambda: "rules reloaded" in daemon.log_path.read_text(), 10, "the reload to be logged")
        make_images(daemon.input, 3, start=100)
        wait_for(lambda: len(files_under(daemon.output / "C")) == 3, 30, "three new files in C")
        assert daemon.process is not None and daemon.process.pid == pid and daemon.process.poll() is None
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_crash_safety_under_repeated_sigkill(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_images(source, 240)
    (source / "empty.png").write_bytes(b"")
    (source / "notes.jpg").write_text("not an image at all")
    (source / "cut.png").write_bytes((source / "img_000001.png").read_bytes()[:60])
    originals = {p.name: sha256(p) for p in files_under(source)}
    daemon = DaemonProcess(tmp_path / "run", None, {**SYNTHETIC, "settle_ms": 200, "rescan_interval_s": 1})
    pending = sorted(files_under(source))
    rng = random.Random(11)
    stop_feeding = threading.Event()

    def feed() -> None:
        for path in pending:
            if stop_feeding.is_set():
                return
            drop(path, daemon.input / path.name, "rename" if rng.random() < 0.5 else "copy")
            time.sleep(rng.uniform(0, 0.02))

    feeder = threading.Thread(target=feed, daemon=True)
    kills = 0
    try:
        feeder.start()
        while kills < 12:
            daemon.start()
            daemon.wait_ready(60)
            time.sleep(rng.uniform(0.05, 0.8))
            daemon.kill()
            kills += 1
        feeder.join(60)
        daemon.start()
        daemon.wait_ready(60)
        wait_for(lambda: not files_under(daemon.input) and daemon.metric("binner_backlog_files") == 0,
                 120, "the backlog to drain after the last restart", interval=0.3)
        assert daemon.stop() == 0
    finally:
        stop_feeding.set()
        daemon.kill()
    placed = files_under(daemon.output)
    names = Counter(p.name for p in placed)
    assert not [p for p in placed if ".binner-tmp" in p.name], "temporary files left behind"
    assert set(names) == set(originals) and set(names.values()) == {1}, f"duplicates or losses: {names}"
    for path in placed:
        assert sha256(path) == originals[path.name]
    quarantined = {p.name: p.parent.name for p in placed if p.relative_to(daemon.output).parts[0] == "_quarantine"}
    assert quarantined == {"empty.png": "empty_file", "notes.jpg": "not_an_image", "cut.png": "truncated"}
    rows = ledger_rows(daemon.state)
    assert len(rows) == len(originals)
    assert {r["status"] for r in rows} <= {"done", "quarantined"}
    for row in rows:
        assert row["output_path"] and Path(row["output_path"]).is_file(), dict(row)
    assert kills >= 10


def test_a_backlog_far_larger_than_the_queues_stays_in_them(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, None, {
        **SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 600,
        "ocr": {**SYNTHETIC["ocr"], "synthetic_ms": [1.0, 0.05], "batch_size": 32},
        "vision": {**SYNTHETIC["vision"], "synthetic_ms": [1.0, 0.05], "batch_size": 32},
        "loader": {"workers": 2, "batch_size": 32},
        "queues": {"load": 64, "ocr": 64, "vision": 64, "sink": 128},
    })
    total = 5_000  # 15x what all queues hold together; memory at scale is tests/test_scale.py's and bench -s scale's
    make_images(daemon.input, total)
    capacities: dict[str, float] = {}
    deepest: dict[str, float] = {}
    try:
        daemon.start().wait_ready(120)
        started = time.monotonic()

        def drained() -> bool:
            for labels, value in daemon.samples("binner_queue_capacity"):
                capacities[labels["queue"]] = value
            for labels, value in daemon.samples("binner_queue_depth"):
                deepest[labels["queue"]] = max(deepest.get(labels["queue"], 0), value)
            binned = daemon.metric("binner_binned_total") or 0
            return binned >= total

        wait_for(drained, 600, f"{total} files to be binned", interval=0.25)
        elapsed = time.monotonic() - started
        peak = daemon.peak_rss_mib()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    print(f"\nbacklog {total}: {elapsed:.1f} s, {total / elapsed:.0f} files/s, peak RSS {peak:.0f} MiB, "
          f"deepest queues {deepest} of {capacities}")
    assert set(capacities) == {"load", "ocr", "vision", "sink"}
    for queue, depth in deepest.items():
        assert depth <= capacities[queue]
    assert peak is not None and peak < 1024, f"peak RSS {peak} MiB: memory should not grow with the backlog"
    assert len(files_under(daemon.output)) == total


def test_watchdog_stops_while_a_model_call_is_stuck(tmp_path: Path) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    stuck_ms = 4000.0
    daemon = DaemonProcess(tmp_path, None, {
        **SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 1, "stall_timeout_s": 1.0,
        "ocr": {**SYNTHETIC["ocr"], "synthetic_ms": [stuck_ms, 0.0]},
    }, notify, watchdog_usec=400_000)
    try:
        daemon.start().wait_ready(60)
        wait_for(lambda: notify.messages.count("WATCHDOG=1") >= 2, 10, "watchdog pings while idle")
        make_images(daemon.input, 1)

        def names_the_stuck_call() -> bool:
            # "nothing placed" may say 503 first (both clocks start with the file); the stuck call must follow
            code, body = daemon.get("/healthz")
            return code == 503 and "model call has been running" in body

        wait_for(names_the_stuck_call, 15, "/healthz to report the stuck call")
        time.sleep(0.3)  # a ping decided just before the stall may still arrive: wait out one interval (0.2 s)
        pings = notify.messages.count("WATCHDOG=1")
        time.sleep(0.8)  # four ping intervals without a ping
        assert notify.messages.count("WATCHDOG=1") == pings, "no WATCHDOG=1 while a stage is stuck"
        wait_for(lambda: len(files_under(daemon.output)) == 1, 15, "the slow call to finish and the file to land")
        wait_for(lambda: notify.messages.count("WATCHDOG=1") > pings, 5, "pings to resume")
        assert daemon.get("/healthz")[0] == 200
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_sigterm_during_a_stuck_call_exits_0_within_the_drain_timeout(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, None, {
        **SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 1, "drain_timeout_s": 1.0,
        "ocr": {**SYNTHETIC["ocr"], "synthetic_ms": [60_000.0, 0.0]},  # a model call that will not finish
    })
    try:
        daemon.start().wait_ready(60)
        make_images(daemon.input, 2)
        wait_for(lambda: (daemon.metric("binner_backlog_files") or 0) >= 2, 15, "the files to be taken")
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=30) == 0
        assert time.monotonic() - started < 15, "drain must end near drain_timeout_s plus teardown"
    finally:
        daemon.kill()
    rows = ledger_rows(daemon.state)
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"processing", "pending"}, "interrupted rows resume next start"


def _why_no_private_mounts() -> str | None:
    """Why this host cannot give the daemon a read-only bind mount of its own (root and util-linux needed)."""
    if os.geteuid() != 0:
        return "needs root to mount the output read-only in a private mount namespace"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs util-linux unshare and nsenter"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=30)
    return None if probe.returncode == 0 else f"cannot create a mount namespace: {probe.stderr.decode().strip()}"


def test_healthz_and_watchdog_report_a_stalled_placement_not_only_stuck_model_calls(tmp_path: Path) -> None:
    reason = _why_no_private_mounts()
    if reason:
        pytest.skip(reason)
    notify = NotifyListener(tmp_path / "notify.sock")
    daemon = DaemonProcess(tmp_path, None, {**SYNTHETIC, "settle_ms": 0, "rescan_interval_s": 1, "stall_timeout_s": 2.0},
                           notify, watchdog_usec=400_000)
    daemon.output.mkdir()
    # The daemon sees its output as a read-only mount (EROFS: the whole output refuses writes, placement pauses);
    # the test's own view stays writable. Every model call is quick: only the sink is stuck.
    daemon.wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount --bind -o ro "$0" "$0" && exec "$@"', str(daemon.output)]
    try:
        daemon.start().wait_ready(60)
        wait_for(lambda: notify.messages.count("WATCHDOG=1") >= 2, 10, "watchdog pings while idle")
        assert daemon.get("/healthz")[0] == 200
        make_images(daemon.input, 3)
        wait_for(lambda: daemon.metric("binner_placement_paused") == 1, 15, "placement to pause on the read-only output")

        def names_the_paused_placement() -> bool:
            code, body = daemon.get("/healthz")
            return code == 503 and "nothing placed for" in body and "placement paused" in body

        wait_for(names_the_paused_placement, 15, "/healthz to report the stalled placement")
        time.sleep(0.3)  # a ping decided just before the stall may still arrive: wait out one interval (0.2 s)
        pings = notify.messages.count("WATCHDOG=1")
        time.sleep(0.8)  # four ping intervals (0.2 s each) without a ping
        assert notify.messages.count("WATCHDOG=1") == pings, "no WATCHDOG=1 while nothing is placed"
        assert daemon.process is not None
        subprocess.run(["nsenter", "-t", str(daemon.process.pid), "-m", "mount", "-o", "remount,bind,rw",
                        str(daemon.output)], check=True, timeout=30)
        wait_for(lambda: len(files_under(daemon.output)) == 3, 60, "placement to resume once the output is writable")
        wait_for(lambda: daemon.get("/healthz")[0] == 200, 10, "/healthz to recover")
        wait_for(lambda: notify.messages.count("WATCHDOG=1") > pings, 5, "pings to resume")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        notify.close()


def test_a_port_in_use_is_one_line_naming_the_port_and_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(tmp_path, None, {**SYNTHETIC, "http": {"port": port}})
        try:
            daemon.start()
            assert daemon.process is not None
            code = daemon.process.wait(60)
        finally:
            daemon.kill()
    assert code == 2, daemon.log_tail()
    (line,) = error_lines(daemon.log_path.read_text())
    assert f":{port}" in line and "http.port" in line and "BINNER_HTTP__PORT" in line, line


def test_run_refuses_an_input_that_does_not_exist(tmp_path: Path) -> None:
    config = tmp_path / "binner.yaml"
    config.write_text(yaml.safe_dump({**SYNTHETIC, "output": str(tmp_path / "bins"), "state_dir": str(tmp_path / "state"),
                                      "http": {"enabled": False}}))
    typo = tmp_path / "inbxo"
    result = binner("run", "--config", str(config), "--input", str(typo), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert str(typo) in line and "does not exist" in line and "create_input" in line, line
    assert not typo.exists()


def test_idle_connections_hold_no_threads_and_200_concurrent_scrapes_succeed() -> None:
    registry = CollectorRegistry()
    PromCounter("binner_probe", "a metric to scrape", registry=registry).inc()
    server = StatusServer("127.0.0.1", 0, registry, lambda: (True, "ok"), lambda: True).start()  # the daemon's defaults
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(300)]

        def scrape(_: int) -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=20) as response:
                return response.status if b"binner_probe_total 1.0" in response.read() else -1

        with ThreadPoolExecutor(max_workers=200) as clients:
            statuses = list(clients.map(scrape, range(200)))
        assert statuses == [200] * 200
        grown = threading.active_count() - before
        assert grown <= 8, f"{grown} more threads with 300 idle connections: threads must be bounded"
    finally:
        for connection in idle:
            connection.close()
        server.stop()


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"), lambda: True,
                          idle_timeout_s=0.5).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b"", "the server closes a connection that sends nothing"
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.0\r\n")  # a request that never finishes frees its worker in time
            started = time.monotonic()
            slow.recv(1024)
            assert time.monotonic() - started < 5
        assert urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status == 200
    finally:
        server.stop()


def test_200_dripping_clients_never_delay_a_health_check_and_hold_no_threads() -> None:
    """Before, a started request held one of the 4 workers and every read restarted its 10 s timeout: 4 clients
    dripping a header line every few seconds made every health check time out. Now a request reaches a worker only
    once its headers are complete."""
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"), lambda: True).start()
    clients: list[socket.socket] = []
    stop = threading.Event()
    dripping: threading.Thread | None = None
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status == 200
        before = threading.active_count()
        for _ in range(200):
            clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            clients[-1].sendall(b"GET /healthz HTTP/1.1\r\n")
        dripping = drip_headers(clients, stop, 0.2)
        for _ in range(12):
            started = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=1) as response:
                assert response.status == 200 and response.read() == b"ok\n"
            assert time.monotonic() - started < 1.0
            time.sleep(0.1)
        assert threading.active_count() - before <= 1, "threads grew with the dripping clients (1: the dripper)"
    finally:
        stop.set()
        if dripping is not None:
            dripping.join(5)
        for client in clients:
            client.close()
        server.stop()


def test_a_request_that_never_completes_is_closed_at_its_deadline_however_it_drips() -> None:
    """The whole request has one deadline (request_timeout_s, here the 1 s idle timeout), not one per read."""
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, "ok"), lambda: True,
                          idle_timeout_s=1.0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            started, closed = time.monotonic(), False
            slow.settimeout(0.1)
            while not closed and time.monotonic() - started < 6:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                    closed = slow.recv(1024) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
            assert closed and time.monotonic() - started < 3, "a dripping request must not keep its connection"
    finally:
        server.stop()


def test_the_stall_clock_starts_when_work_arrives_not_at_the_last_placement(tmp_path: Path) -> None:
    """After a long idle spell the first new file is not a stall; a backlog that stops moving, or a ledger that
    stops answering, is one (the daemon's health logic on a stand-in pipeline, no process)."""
    from types import SimpleNamespace

    from app.config import load_config
    from app.service import Daemon
    from queues.bounded import BoundedQueue

    config = load_config(None, {**SYNTHETIC, "input": tmp_path / "in", "output": tmp_path / "out",
                                "state_dir": tmp_path / "state", "stall_timeout_s": 5.0})
    daemon = Daemon(config, None)
    now = time.monotonic()
    pipeline = SimpleNamespace(last_progress=now - 3600, in_flight=0, placement_paused=False, stalled_for=lambda: 0.0,
                               queues={"load": BoundedQueue("load", 4)}, sink_queue=BoundedQueue("sink", 4))
    daemon.runtime = SimpleNamespace(pipeline=pipeline)  # type: ignore[assignment]
    daemon.housekept_at = now
    assert daemon.healthy() == (True, "ok")  # idle for an hour: nothing waits
    daemon.backlog, daemon.work_since = 5, now - 1  # work just arrived
    assert daemon.healthy()[0]
    daemon.work_since = now - 10  # waiting 10 s with nothing placed, last placement an hour ago
    ok, detail = daemon.healthy()
    assert not ok and "nothing placed for 10 s while 5 files wait" in detail and "load=0" in detail, detail
    pipeline.last_progress = now - 1  # something was placed a second ago: moving again
    assert daemon.healthy()[0]
    daemon.housekept_at = now - 10  # the housekeeping task has not got an answer from the ledger for 10 s
    ok, detail = daemon.healthy()
    assert not ok and "ledger has not answered" in detail, detail
