"""sd_notify against a real unix datagram socket, the way systemd listens for it."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.service.notify import SystemdNotifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket in a short temp dir (unix paths are limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)
        os.rmdir(directory)


def _received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_unset_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = SystemdNotifier()
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval_s() is None


def test_exact_datagrams_on_a_path_socket(listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = SystemdNotifier()
    assert notifier.enabled is True

    assert notifier.ready() is True
    assert _received(sock) == b"READY=1"
    assert notifier.ready(status="sorting: 0 pending") is True
    assert _received(sock) == b"READY=1\nSTATUS=sorting: 0 pending"
    assert notifier.status("loading models\non cuda:0") is True
    assert _received(sock) == b"STATUS=loading models on cuda:0"
    assert notifier.watchdog() is True
    assert _received(sock) == b"WATCHDOG=1"
    assert notifier.stopping() is True
    assert _received(sock) == b"STOPPING=1"
    assert notifier.stopping(status="draining 3 items") is True
    assert _received(sock) == b"STOPPING=1\nSTATUS=draining 3 items"
    assert notifier.extend_timeout(2.5) is True
    assert _received(sock) == b"EXTEND_TIMEOUT_USEC=2500000"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _received(sock).split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()
    assert notifier.watchdog() is True  # reopens after close
    assert _received(sock) == b"WATCHDOG=1"


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"binner-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SystemdNotifier()
        assert notifier.enabled
        assert notifier.ready() is True
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_concurrent_senders_deliver_every_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    got: list[bytes] = []
    receiver = threading.Thread(target=lambda: got.extend(sock.recv(4096) for _ in range(100)))
    receiver.start()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(25)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in [*threads, receiver]:
        thread.join(timeout=10)
    assert results == [True] * 100
    assert got == [b"WATCHDOG=1"] * 100


def test_full_receive_queue_does_not_block_forever(listener: tuple[socket.socket, str]) -> None:
    """Nobody reads the socket: sends time out (bounded) and report failure instead of hanging the caller."""
    _sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    outcomes: list[bool] = []
    started = time.monotonic()
    for _ in range(5000):  # the kernel queues only net.unix.max_dgram_qlen datagrams (10 by default)
        outcomes.append(notifier.watchdog())
        if not outcomes[-1]:
            break
    elapsed = time.monotonic() - started
    assert outcomes[0] is True
    assert outcomes[-1] is False, "the receive queue never filled up"
    assert elapsed < 10


def test_send_failure_never_raises_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": os.path.join(directory, "nobody-listens")})
        with caplog.at_level(logging.WARNING, logger="app.service.notify"):
            assert notifier.ready() is False
            assert notifier.watchdog() is False
            assert notifier.stopping() is False
        warnings = [r for r in caplog.records if r.name == "app.service.notify"]
        assert len(warnings) == 1
        assert "nobody-listens" in warnings[0].getMessage()
    finally:
        os.rmdir(directory)


def test_unsupported_transport_is_disabled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.service.notify"):
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert any("vsock:2:1234" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(environ).watchdog_interval_s() == expected
