"""Run `binner run` as a real process for system tests: config, notify socket, metrics, signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from app.config import read_config_file

REPO = Path(__file__).resolve().parents[1]


def binner(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one `binner` command to its end (killed and reported after ``timeout``), without BINNER_* variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    environment.update({"COLUMNS": "200", **(env or {})})
    process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"binner {' '.join(args)} still ran after {timeout} s:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def error_lines(text: str) -> list[str]:
    """The user-facing error lines of a command's output (and proof there is no traceback); under
    ``log.format: json`` the error is a JSON line marked ``fatal``, returned here as ``error: <event>``."""
    assert "Traceback" not in text, text
    lines = []
    for line in text.splitlines():
        if line.startswith("error:"):
            lines.append(line)
        elif line.startswith("{") and '"fatal": true' in line:
            event = json.loads(line)
            lines.append(" ".join(["error:", event["event"], *(event.get("details") or [])]))
    return lines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


class NotifyListener:
    """A real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().splitlines())

    def saw(self, line: str) -> bool:
        return line in self.messages

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class DaemonProcess:
    def __init__(self, root: Path, base_config: Path | None = None, overrides: dict[str, Any] | None = None,
                 notify: NotifyListener | None = None, watchdog_usec: int | None = None,
                 wrapper: list[str] | None = None) -> None:
        self.root = root
        self.wrapper = wrapper or []  # a command prefix, e.g. to run the daemon in its own mount namespace
        self.input, self.output, self.state = root / "inbox", root / "bins", root / "state"
        self.input.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # As binner reads it: relative paths anchored at the base file's folder (the copy lives elsewhere).
        config = read_config_file(base_config) if base_config else {}
        config = deep_merge(config, {
            "input": str(self.input), "output": str(self.output), "state_dir": str(self.state),
            "http": {"enabled": True, "host": "127.0.0.1", "port": self.port}, "log": {"format": "json"},
        })
        config = deep_merge(config, overrides or {})
        self.config_path = root / "binner.yaml"
        self.write_config(config)
        self.notify = notify
        self.watchdog_usec = watchdog_usec
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = root / "daemon.log"
        self.starts = 0

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        if self.watchdog_usec:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "app.cli", "run", "--config", str(self.config_path)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    def wait_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"binner run exited with {self.process.returncode}:\n{self.log_tail()}")
            return self.get("/readyz")[0] == 200

        wait_for(ready, timeout, "the daemon to be ready")

    def metric(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` matching ``labels`` from a real scrape."""
        status, text = self.get("/metrics")
        if status != 200:
            return None
        from prometheus_client.parser import text_string_to_metric_families

        total, seen = 0.0, False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
                    seen = True
        return total if seen else None

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics")
        if status != 200:
            return []
        return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"binner run did not stop within {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def peak_rss_mib(self) -> float | None:
        assert self.process is not None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def drip_headers(clients: list[socket.socket], stop: threading.Event, every_s: float) -> threading.Thread:
    """Each client sends one more header line every ``every_s``: a request that never completes."""

    def drip() -> None:
        while not stop.wait(every_s):
            for client in clients:
                try:
                    client.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    return thread
