"""What an operator sees: commands that find the daemon's configuration, `eval`'s misbinned list, `--version`
and help, unwrapped piped output, readable `explain`, Ctrl-C drain progress, and a house without back-imports.

Everything here runs the real CLI with the sleep-based model stand-ins (no model weights needed)."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from app import __version__
from app.cli import cli
from tests.conftest import REPO
from tests.daemon_harness import DaemonProcess, NotifyListener, binner, wait_for

SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [1.0, 0.1]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [1.0, 0.1]},
    "http": {"enabled": False},
}


def images(root: Path, *rels: str) -> None:
    for index, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64 + index, 48), (index * 40 % 255, 90, 160)).save(root / rel)


def write_config(path: Path, **extra: object) -> Path:
    path.write_text(yaml.safe_dump({**SYNTHETIC, **extra}))
    return path


# -- commands find the daemon's configuration ------------------------------------------------------------------
def test_read_commands_use_the_configuration_the_writer_recorded(tmp_path: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    images(inbox, "a.png", "b.png")
    config = write_config(tmp_path / "daemon.yaml", state_dir=str(state), output=str(out), settle_ms=1234,
                          rules={"c_char_count": 77})
    done = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads((state / "config-source.json").read_text())["config_file"] == str(config)

    shown = binner("config", "show", "--state", str(state))
    assert shown.returncode == 0, shown.stderr
    assert "settle_ms: 1234" in shown.stdout and "c_char_count: 77" in shown.stdout
    assert f"using the configuration {config}" in shown.stderr
    status = binner("status", "--state", str(state), "--json")
    assert json.loads(status.stdout)["status"] == {"done": 2}
    assert f"using the configuration {config}" in status.stderr
    rebin = binner("rebin", "--state", str(state), "--dry-run")
    assert rebin.returncode == 0 and f"using the configuration {config}" in rebin.stderr, rebin.stderr
    explain = binner("explain", "a.png", "--state", str(state))
    assert explain.returncode == 0 and str(config) in explain.stderr

    other = write_config(tmp_path / "other.yaml", settle_ms=4321)
    given = binner("config", "show", "--state", str(state), "--config", str(other))
    assert "settle_ms: 4321" in given.stdout and f"using the configuration {other} (--config)" in given.stderr

    config.unlink()
    gone = binner("status", "--state", str(state))
    assert gone.returncode == 2 and str(config) in gone.stderr and "--config" in gone.stderr


def test_without_a_record_the_defaults_are_named(tmp_path: Path) -> None:
    result = binner("config", "show", "--state", str(tmp_path / "fresh"))
    assert result.returncode == 0
    assert "using the built-in defaults" in result.stderr and "records none" in result.stderr


# -- eval ---------------------------------------------------------------------------------------------------------
def test_eval_lists_each_misbinned_file_and_counts_only_images(tmp_path: Path) -> None:
    data = tmp_path / "data"
    images(data, "photo/p1.png", "photo/p2.png", "text/t1.png", "mixed/m1.png")
    (data / "README.md").write_text("not an image\n")
    labels = data / "labels.csv"
    labels.write_text("file,category,expected_bin\nphoto/p1.png,photo,A\nphoto/p2.png,photo,A\n"
                      "text/t1.png,text,C\nmixed/m1.png,mixed,B\n")
    config = write_config(tmp_path / "c.yaml", log={"format": "console"})
    # The stand-ins find no text and no content: everything goes to B by rule content_weak.
    report = binner("eval", "--images", str(data), "--labels", str(labels), "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    result = json.loads(report.stdout)
    misbinned = {item["file"]: item for item in result["misbinned"]}
    assert set(misbinned) == {"photo/p1.png", "photo/p2.png", "text/t1.png"}
    assert misbinned["text/t1.png"] | {"acceptable": None, "reason": None} == {
        "file": "text/t1.png", "category": "text", "expected": "C", "actual": "B", "rule": "content_weak",
        "acceptable": None, "reason": None}
    assert result["per_category"]["mixed"]["acceptable_bins"] == ["B", "C"]
    assert sum(line["n"] for line in result["per_category"].values()) == 4, "README.md and labels.csv are not images"

    table = binner("eval", "--images", str(data), "--labels", str(labels), "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert re.search(r"photo/p1\.png\s*│\s*A\s*│\s*B\s*│\s*content_weak", table.stdout), table.stdout
    assert "100% exactly B, 100% B or C" in table.stdout
    assert "4/4" in table.stderr and "5/5" not in table.stderr and "6/6" not in table.stderr, table.stderr


# -- version, help, piped width, explain ---------------------------------------------------------------------------
def test_version_and_help_without_placeholders() -> None:
    runner = CliRunner()
    version = runner.invoke(cli, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"binner {__version__}"
    for command in (["once"], ["eval"], ["status"], ["explain"], ["rebin"], ["run"], ["config", "show"]):
        shown = runner.invoke(cli, [*command, "--help"], env={"COLUMNS": "200"})
        assert shown.exit_code == 0, shown.output
        assert "<bool>" not in shown.output, f"{command}: {shown.output}"
        for line in shown.output.splitlines():
            if "--json" in line:
                assert len(line.split("--json", 1)[1].strip(" │")) > 5, f"{command}: --json has no help: {line}"


def _run_piped(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_") and k != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_piped_output_is_not_wrapped_and_explain_is_readable(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 4)
    inbox, out, state = deep / "in", deep / "out", deep / "state"
    images(inbox, "photo.png")
    config = write_config(tmp_path / "c.yaml")
    assert binner("once", str(inbox), "--output", str(out), "--state", str(state), "--config", str(config),
                  "--no-progress").returncode == 0
    status = _run_piped("status", "--state", str(state))
    assert f"ledger {state / 'ledger.sqlite3'}" in status.stdout.splitlines(), status.stdout
    # The values the rules compared, as `once` recorded them (the ledger keeps the signals they come from).
    compared = _run_piped("explain", "photo.png", "--state", str(state))
    assert compared.returncode == 0, compared.stderr
    assert "by rule 'content_weak'" in compared.stdout and "    text_area_ratio: 0" in compared.stdout, compared.stdout
    assert "    char_count: 0" in compared.stdout and "    best_detection: none" in compared.stdout, compared.stdout
    as_json = json.loads(_run_piped("explain", "photo.png", "--state", str(state), "--json").stdout)
    assert as_json["decision"]["criteria"] == {"text_area_ratio": 0.0, "char_count": 0, "line_count": 0,
                                               "best_detection": None}, as_json["decision"]

    # Give the row the long floats real models produce, then read it back as a person would.
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        db.execute("UPDATE files SET signals = ?, decision = ?, timings = ?", (
            json.dumps({"ocr": {"text": "EXIT", "char_count": 4, "line_count": 1, "text_area_ratio": 0.0123456789012345,
                                "mean_confidence": 0.91234567890123}, "detections": [
                {"label": "dog", "confidence": 0.87654321098765, "box": [1.23456789, 2.0, 30.5, 40.25]}]}),
            json.dumps({"bin": "A", "rule": "confident_detection", "reason": "little text and a confident detection",
                        "criteria": {"text_area_ratio": 0.0123456789012345, "char_count": 4,
                                     "best_detection": {"label": "dog", "confidence": 0.87654321098765}}}),
            json.dumps({"load": 0.01234567891, "ocr_batch": 0.3456789012}),
        ))
    explained = _run_piped("explain", "photo.png", "--state", str(state))
    assert explained.returncode == 0, explained.stderr
    text = explained.stdout
    assert not re.search(r"\d\.\d{6,}", text), text
    assert "{'" not in text and "[{" not in text, text
    assert "text_area_ratio: 0.0123" in text and "confidence=0.877" in text and "ocr_batch 346 ms" in text, text


# -- Ctrl-C drain ------------------------------------------------------------------------------------------------
def test_ctrl_c_drain_shows_progress_and_how_to_stop_at_once(tmp_path: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    images(inbox, *(f"{n}.png" for n in range(6)))
    slow = {**SYNTHETIC, "ocr": {**SYNTHETIC["ocr"], "synthetic_ms": [5000.0, 0.0], "batch_size": 8}}
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump({**slow, "log": {"format": "json", "level": "debug"}}))
    log = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    with log.open("wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "once", str(inbox), "--output", str(out),
                                    "--state", str(state), "--config", str(config)], cwd=REPO, env=env,
                                   stdout=subprocess.DEVNULL, stderr=sink)
    try:
        wait_for(lambda: '"stage": "vision"' in log.read_text(), 60, "the stages to be ready")
        time.sleep(0.5)  # let the feeder hand the batch to the 5-second OCR call
        process.send_signal(signal.SIGINT)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    said = [event["event"] for event in events]
    assert any("press Ctrl-C again to stop now" in line for line in said), said
    assert any(line.startswith("draining: ") and "in flight" in line for line in said), said


@pytest.mark.system
def test_daemon_says_what_it_runs_records_its_configuration_and_reports_its_drain(tmp_path: Path) -> None:
    slow = {"ocr": {**SYNTHETIC["ocr"], "synthetic_ms": [5000.0, 0.0], "batch_size": 8},
            "vision": SYNTHETIC["vision"], "settle_ms": 100, "rescan_interval_s": 1.0}
    daemon = DaemonProcess(tmp_path, None, slow)
    try:
        daemon.start().wait_ready(120)
        record = json.loads((daemon.state / "config-source.json").read_text())
        assert record["config_file"] == str(daemon.config_path) and record["command"] == "binner run"
        images(daemon.input, "a.png", "b.png")
        wait_for(lambda: "files taken" in daemon.log_path.read_text(), 30, "the files to be taken")
        time.sleep(0.5)  # the OCR stand-in now sleeps 5 s on the batch
        assert daemon.stop(signal.SIGTERM, timeout=60) == 0
    finally:
        daemon.kill()
    lines = [line for line in daemon.log_path.read_text().splitlines() if line and not line.startswith("--- start")]
    events = [json.loads(line) for line in lines]  # log.format json: every line is JSON
    (start,) = [e for e in events if e["event"] == "starting binner"]
    assert start["version"] == __version__ and start["config"] == str(daemon.config_path)
    assert start["devices"] == {"load": ["cpu", "cpu"], "ocr": ["cpu"], "vision": ["cpu"]}
    stopping = [e for e in events if e["event"].startswith("stopping: draining")]
    assert stopping and "second Ctrl-C or SIGTERM stops at once" in stopping[0]["event"]
    draining = [e for e in events if e["event"] == "draining"]
    assert draining and draining[0]["in_flight"] >= 1 and "stops at once" in draining[0]["hint"], events


# -- systemd start timeout during a first-start download -----------------------------------------------------------
def test_a_first_start_download_extends_the_systemd_start_timeout(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import app.weights
    from app.config import load_config
    from app.service import Daemon
    from app.weights import MissingWeight

    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        fetched: list[str] = []
        missing = [MissingWeight("vision.captioner.model", "org/model", "fetch")]
        monkeypatch.setattr(app.weights, "missing_weights", lambda *wanted: [] if fetched else missing)
        monkeypatch.setattr(app.weights, "can_download", lambda wanted: True)
        monkeypatch.setattr(app.weights, "fetch_weights", lambda *wanted, progress: fetched.append("x") or [])
        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        config = load_config(None, {"vision": {"detector": {"enabled": False}, "clip": {"enabled": False}}})
        Daemon(config, None).fetch_missing_weights()
        assert fetched == ["x"]
        wait_for(lambda: any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in listener.messages), 5,
                 "EXTEND_TIMEOUT_USEC on the notify socket")
    finally:
        listener.close()


# -- the house --------------------------------------------------------------------------------------------------
def test_nothing_but_the_entry_point_imports_the_cli() -> None:
    """The CLI parses and prints; the runtime, daemon and benchmarks must not reach back into it."""
    offenders = []
    for path in sorted((REPO / "app").rglob("*.py")):
        if path == REPO / "app" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {name}" for name in names if name == "app.cli"]
            if isinstance(node, ast.ImportFrom) and node.module == "app" and any(a.name == "cli" for a in node.names):
                offenders.append(f"{path.name}: from app import cli")
    assert not offenders, offenders
