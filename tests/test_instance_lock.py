"""One writer per state directory: the lock itself, and a second `run` and a `once` refused beside a real daemon
while `status`, `explain` and `rebin --dry-run` keep working."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from app.config import ConfigError
from app.store import InstanceLock, StateDirLocked
from tests.daemon_harness import DaemonProcess, binner, error_lines, files_under, free_port, wait_for
from tests.test_daemon import SYNTHETIC, make_images


def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = InstanceLock(tmp_path).acquire("run")
    assert (tmp_path / "binner.lock").read_text().split()[0] == str(os.getpid())
    with pytest.raises(StateDirLocked) as refused:
        InstanceLock(tmp_path).acquire("once")  # another open file description: flock conflicts, even in-process
    message = str(refused.value)
    assert f"PID {os.getpid()}" in message and str(tmp_path) in message and "\n" not in message
    first.release()
    again = InstanceLock(tmp_path).acquire("once")
    assert again.held and (tmp_path / "binner.lock").read_text().split()[1:] == ["binner", "once"]
    again.release()


def test_an_unwritable_state_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "file-not-dir"
    missing.write_text("x")
    with pytest.raises(ConfigError, match=r"state_dir: cannot create the lock file .*file-not-dir/binner\.lock"):
        InstanceLock(missing).acquire("run")


def _synthetic_config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump({**SYNTHETIC, "state_dir": str(state), "http": {"enabled": False}}))
    return path


def test_read_only_commands_work_while_the_state_is_locked_and_writers_are_refused(tmp_path: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    make_images(inbox, 3)
    config = _synthetic_config(tmp_path, state)
    done = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    lock = InstanceLock(state).acquire("run")  # stands in for a running daemon
    try:
        status = binner("status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["status"] == {"done": 3}
        explained = binner("explain", "img_000001.png", "--config", str(config), "--json")
        assert explained.returncode == 0 and json.loads(explained.stdout)["status"] == "done", explained.stderr
        dry = binner("rebin", "--dry-run", "--config", str(config))
        assert dry.returncode == 0 and "would move" in dry.stdout, dry.stderr
        for refused in (binner("rebin", "--config", str(config)),
                        binner("once", str(inbox), "--output", str(out), "--config", str(config), "--no-progress")):
            assert refused.returncode == 2, refused.stdout + refused.stderr
            (line,) = error_lines(refused.stderr)
            assert f"PID {os.getpid()}" in line and str(state) in line
    finally:
        lock.release()


@pytest.mark.system
def test_a_second_run_and_a_once_are_refused_beside_a_running_daemon(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "first", None, {**SYNTHETIC, "settle_ms": 100, "rescan_interval_s": 1})
    other_out = tmp_path / "copies"
    try:
        daemon.start().wait_ready(60)
        assert daemon.process is not None
        pid = daemon.process.pid
        make_images(daemon.input, 4)
        wait_for(lambda: len(files_under(daemon.output)) == 4, 30, "the first files to be binned")

        second = binner("run", "--config", str(daemon.config_path), timeout=90,
                        env={"BINNER_HTTP__PORT": str(free_port())})  # a port of its own: only the lock may refuse it
        assert second.returncode == 2, second.stdout + second.stderr
        (line,) = error_lines(second.stderr)
        assert f"PID {pid}" in line and str(daemon.state) in line and "binner run" in line

        make_images(daemon.input, 4, start=100)
        once = binner("once", str(daemon.input), "--output", str(other_out), "--config", str(daemon.config_path),
                      "--placement", "copy", "--no-progress", timeout=90)
        assert once.returncode == 2, once.stdout + once.stderr
        (line,) = error_lines(once.stderr)
        assert f"PID {pid}" in line and str(daemon.state) in line
        assert not files_under(other_out), "the refused `once` must not place anything"

        wait_for(lambda: len(files_under(daemon.output)) == 8 and not files_under(daemon.input), 30,
                 "the daemon to keep binning after the refusals")
        status = binner("status", "--config", str(daemon.config_path), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["status"] == {"done": 8}
        explained = binner("explain", "img_000100.png", "--config", str(daemon.config_path), "--json")
        assert explained.returncode == 0, explained.stderr
        assert json.loads(explained.stdout)["status"] == "done"
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    after = binner("once", str(daemon.input), "--output", str(other_out), "--config", str(daemon.config_path),
                   "--no-progress")
    assert after.returncode == 0, after.stderr  # the lock went with the daemon
