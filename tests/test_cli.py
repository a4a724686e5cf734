"""The CLI end to end with real models: `binner once` over a bad-input corpus, `eval`, `status`,
`explain`, `rebin`, and the offline start-up error for the default public weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import read_config_file
from tests.conftest import REPO
from tests.corpus import CORPUS_LIMITS, make_bad_corpus
from tests.daemon_harness import error_lines, files_under, sha256

OFFLINE = REPO / "deploy" / "examples" / "offline-cpu.yaml"
SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [1.0, 0.1]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [1.0, 0.1]},
    "http": {"enabled": False},
}


def binner(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    env["COLUMNS"] = "200"
    return env


def config_with(tmp_path: Path, extra: dict) -> Path:
    config = read_config_file(OFFLINE)  # its relative paths anchored at deploy/examples, as binner reads them
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.models
def test_once_accounts_for_every_file_of_a_bad_corpus(tmp_path: Path, shared_images: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    expected = make_bad_corpus(inbox)
    (inbox / "nested").mkdir(exist_ok=True)
    shutil.copyfile(shared_images / "text" / "skimage_page.png", inbox / "nested" / "page.png")
    expected["nested/page.png"] = None
    digests = {rel: sha256(inbox / rel) for rel in expected}
    config = config_with(tmp_path, {"limits": CORPUS_LIMITS})
    result = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--state", str(state),
                    "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images/s" in result.stdout and "not finished" in result.stdout
    placed = {p.relative_to(out).as_posix(): p for p in files_under(out)}
    assert len(placed) == len(expected), sorted(placed)
    assert not files_under(inbox), "move mode leaves nothing behind in the input"
    for rel, reason in expected.items():
        where = [key for key in placed if key.endswith("/" + rel)]
        assert len(where) == 1, f"{rel}: expected exactly one placement, found {where}"
        parts = where[0].split("/")
        if reason is None:
            assert parts[0] in {"A", "B", "C"}, f"{rel} should decode and be binned, went to {where[0]}"
        else:
            assert parts[:2] == ["_quarantine", reason], f"{rel}: expected {reason}, got {where[0]}"
        assert sha256(placed[where[0]]) == digests[rel], f"{rel} was altered"
    assert placed["C/nested/page.png"]
    status = binner("status", "--state", str(state), "--json")
    counts = json.loads(status.stdout)
    assert sum(counts["status"].values()) == len(expected)
    assert counts["status"].get("done", 0) == sum(1 for r in expected.values() if r is None)
    assert counts["backlog"] == 0


@pytest.mark.models
def test_explain_rebin_and_a_second_run_without_model_work(tmp_path: Path, shared_images: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    for rel in ("photo/darknet_dog.jpg", "photo/yolov5_zidane.jpg", "text/skimage_page.png"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_images / rel, inbox / rel)
    config = config_with(tmp_path, {"placement": "copy"})
    first = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--state", str(state),
                   "--no-progress")
    assert first.returncode == 0, first.stderr
    assert sorted(p.relative_to(out).as_posix() for p in files_under(out)) == [
        "A/photo/darknet_dog.jpg", "A/photo/yolov5_zidane.jpg", "C/text/skimage_page.png"]
    second = binner("once", str(inbox), "--output", str(out), "--config", str(config), "--state", str(state),
                    "--no-progress")
    assert second.returncode == 0 and "0 files in" in second.stdout and "already done 3" in second.stdout
    explained = binner("explain", "photo/darknet_dog.jpg", "--state", str(state), "--json")
    record = json.loads(explained.stdout)
    assert record["bin"] == "A" and record["rule"] == "confident_detection"
    assert any(d["label"] == "dog" for d in record["signals"]["detections"])
    text = binner("explain", "skimage_page.png", "--state", str(state))
    assert "bin C by rule 'text_area'" in text.stdout

    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "output": str(out),
                                      "rules": {"a_min_detection_confidence": 0.99}}))
    probe = ("import sys; from app.cli import main; sys.argv=['binner','rebin','--config',%r,'--state',%r];\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('MODELS_IMPORTED', [m for m in ('ultralytics','rapidocr_onnxruntime','transformers') if m in sys.modules])")
    rebinned = subprocess.run([sys.executable, "-c", probe % (str(strict), str(state))], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    assert "2 files moved" in rebinned.stdout, rebinned.stdout + rebinned.stderr
    assert "MODELS_IMPORTED []" in rebinned.stdout, "rebin must not load any model"
    assert sorted(p.relative_to(out).as_posix() for p in files_under(out)) == [
        "B/photo/darknet_dog.jpg", "B/photo/yolov5_zidane.jpg", "C/text/skimage_page.png"]
    after = json.loads(binner("explain", "photo/darknet_dog.jpg", "--state", str(state), "--json").stdout)
    assert after["bin"] == "B" and after["output"].endswith("B/photo/darknet_dog.jpg")


@pytest.mark.models
def test_eval_reports_per_category_accuracy_meeting_the_targets(shared_images: Path) -> None:
    result = binner("eval", "--images", str(shared_images), "--labels", str(shared_images / "labels.csv"),
                    "--config", str(OFFLINE), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    per, confusion = report["per_category"], report["confusion"]
    assert {k: v["n"] for k, v in per.items()} == {"photo": 11, "text": 10, "mixed": 9}
    assert per["text"]["accuracy"] >= 0.9
    assert per["photo"]["accuracy"] >= 0.8
    mixed = confusion["mixed"]
    assert (mixed["B"] + mixed["C"]) / per["mixed"]["n"] >= 0.7
    assert all(c["missing"] == 0 and c["quarantined"] == 0 for c in confusion.values())


@pytest.mark.models
def test_default_public_weights_offline_stop_at_once_with_what_to_do(tmp_path: Path) -> None:
    result = binner("once", str(tmp_path), "--output", str(tmp_path.parent / "out-default"), "--state",
                    str(tmp_path.parent / "state-default"), "--no-progress", timeout=120)
    assert result.returncode == 2
    message = result.stderr
    for needle in ("vision.detector.weights", "vision.captioner.model", "vision.clip.model",
                   "binner fetch-weights", "make run CONFIG=deploy/examples/offline-cpu.yaml"):
        assert needle in message, f"{needle!r} missing from:\n{message}"
    # Said once, as text (no second copy as a log line with escaped newlines), on stderr only.
    assert message.count("model weights are missing") == 1 and "\\n" not in message, message
    assert "model weights are missing" not in result.stdout
    # The command it suggests is one that exists from here: `binner` on PATH, or the executable's own path.
    suggested = message.split("(with internet: `", 1)[1].split(" fetch-weights`", 1)[0]
    executable = shutil.which(suggested) if suggested == "binner" else (REPO / suggested)
    assert executable and Path(executable).exists(), suggested


def _ledger_with_rows(state: Path, count: int = 3000) -> Path:
    from app.store import Discovered, Ledger

    ledger = Ledger(state / "ledger.sqlite3")
    ledger.intake(Discovered(f"/nowhere/{i}.png", f"{i}.png", 1, 1) for i in range(count))
    ledger.close()
    return state / "ledger.sqlite3"


@pytest.mark.parametrize("damage", ["garbage", "half-truncated"])
def test_a_damaged_ledger_stops_with_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    inbox.mkdir()
    path = _ledger_with_rows(state)
    data = path.read_bytes()
    path.write_bytes(b"this is not a ledger\n" * 200 if damage == "garbage" else data[: len(data) // 2])
    config = config_with(tmp_path, SYNTHETIC)
    for command in (["once", str(inbox), "--output", str(out), "--no-progress"], ["status"], ["explain", "x.png"]):
        result = binner(*command, "--config", str(config), "--state", str(state), timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        (line,) = error_lines(result.stderr)
        assert str(path) in line and "move it aside" in line, line
    assert path.read_bytes()[:20] == (b"this is not a ledger" if damage == "garbage" else data[:20]), "left as found"


def test_a_read_only_state_dir_stops_with_one_line(tmp_path: Path) -> None:
    inbox, out, state = tmp_path / "in", tmp_path / "out", tmp_path / "state"
    inbox.mkdir()
    _ledger_with_rows(state, 10)
    config = config_with(tmp_path, SYNTHETIC)
    command = [sys.executable, "-m", "app.cli", "once", str(inbox), "--output", str(out), "--config", str(config),
               "--state", str(state), "--no-progress"]
    if os.geteuid() == 0:  # root writes through permission bits: make the state a read-only mount instead
        if shutil.which("unshare") is None:
            pytest.skip("needs util-linux unshare to mount the state directory read-only as root")
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f'mount --bind -o ro "{state}" "{state}" && exec "$@"', "sh", *command]
    else:
        state.chmod(0o555)
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    finally:
        state.chmod(0o755)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = error_lines(result.stderr)
    assert str(state) in line and "writable" in line, line


def test_fetch_weights_offline_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "weights.yaml"
    config.write_text(yaml.safe_dump({"vision": {"detector": {"enabled": False}, "clip": {"enabled": False},
                                                 "captioner": {"model": "binner-tests/no-such-blip"}}}))
    env = {k: v for k, v in _env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with socket.socket() as closed:  # a hub endpoint that refuses connections: offline, without any real host
        closed.bind(("127.0.0.1", 0))
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}", HF_HOME=str(tmp_path / "hf"))
        result = subprocess.run([sys.executable, "-m", "app.cli", "fetch-weights", "--config", str(config)], cwd=REPO,
                                capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    (line,) = error_lines(result.stderr)
    assert "vision.captioner.model" in line and "binner-tests/no-such-blip" in line and "internet" in line, line


def test_once_in_move_mode_leaves_no_empty_folders_in_its_input(tmp_path: Path) -> None:
    from app.bench import make_images

    inbox = tmp_path / "in"
    make_images(inbox / "2024" / "trip", 3)
    make_images(inbox / "2025", 2, start=3)
    (inbox / "keep").mkdir()
    (inbox / "keep" / "notes.txt").write_text("not an image, quarantined, so its folder empties too")
    config = tmp_path / "synthetic.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC))
    result = binner("once", str(inbox), "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
                    "--config", str(config), "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    assert inbox.is_dir()
    assert list(inbox.iterdir()) == [], f"left behind: {sorted(p for p in inbox.rglob('*'))}"
    assert len(files_under(tmp_path / "out")) == 6
