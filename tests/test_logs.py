"""Logs stay JSON under ``log.format: json``: binner's events, stdlib logging, warnings, and what libraries and
native code print on fd 1 and 2, with real models loaded."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from app.config import read_config_file
from app.logs import configure_logging
from tests.conftest import REPO
from tests.daemon_harness import binner

OFFLINE = REPO / "deploy" / "examples" / "offline-cpu.yaml"


def json_lines(text: str, where: str) -> list[dict]:
    """Every line of ``text`` as a JSON object; the assertion names the first line that is not one."""
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"{where} line {number} is not JSON: {line!r}\n--- all of {where}:\n{text}") from None
        assert isinstance(event, dict), f"{where} line {number} is not a JSON object: {line!r}"
        events.append(event)
    return events


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging.captureWarnings(False)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


def test_stdlib_logging_and_warnings_render_as_json_events(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    structlog.get_logger("binner.test").info("own event", answer=42)
    logging.getLogger("ultralytics").warning("a library warning\nwith a second line")
    logging.getLogger("stages.torch_compat").warning("binner's own stdlib logger")
    logging.getLogger("transformers").info("library info is below the library threshold")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated thing", UserWarning, stacklevel=1)
    events = json_lines(stream.getvalue(), "the log stream")
    by_event = {event["event"]: event for event in events}
    assert by_event["own event"]["answer"] == 42
    assert by_event["a library warning\nwith a second line"]["logger"] == "ultralytics"
    assert by_event["binner's own stdlib logger"]["level"] == "warning"
    assert not any("below the library threshold" in event["event"] for event in events)
    (warned,) = [event for event in events if "a deprecated thing" in event["event"]]
    assert warned["logger"] == "py.warnings" and warned["event"].startswith("UserWarning: a deprecated thing")


def test_native_writes_to_fd_1_and_2_become_json_events(tmp_path: Path) -> None:
    """What C code (TFLite's XNNPACK line) or a library's own handler writes to the raw descriptors."""
    script = textwrap.dedent("""
        import os, sys, ctypes
        from app.logs import capture_output, configure_logging
        assert capture_output()
        configure_logging("json", "info", sys.stderr)
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
        os.write(1, b"Loading model.tflite for LiteRT inference...\\n")
        print("a bare print from a library")
        sys.stderr.write("a partial line, then the rest\\n")
        libc = ctypes.CDLL(None)
        libc.puts(b"from C stdio")
        libc.fflush(None)
        os.write(2, b'{"event": "a child process line", "level": "info"}\\n')
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stdout, "stdout") + json_lines(result.stderr, "stderr")
    texts = {event["event"]: event for event in events}
    assert texts["INFO: Created TensorFlow Lite XNNPACK delegate for CPU."]["source"] == "stderr"
    assert texts["Loading model.tflite for LiteRT inference..."]["source"] == "stdout"
    assert texts["a bare print from a library"]["source"] == "stdout"
    assert "a partial line, then the rest" in texts and "from C stdio" in texts
    assert "source" not in texts["a child process line"], "JSON lines (model processes) pass unchanged"


def test_a_traceback_written_to_fd_2_is_one_event_with_the_line_that_introduced_it(tmp_path: Path) -> None:
    """A Ray worker's failure reaches the driver's stderr as a headline plus a (chained) Python traceback."""
    trace = (
        "(MapWorker pid=123) ray::MapBatches(RayStage) failed\n"
        "Traceback (most recent call last):\n"
        '  File "/app/ray_data/actor.py", line 61, in __init__\n'
        "    self.replica.setup()\n"
        "    ^^^^^^^^^^^^^^^^^^^^\n"
        "ValueError: no such model\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "<string>", line 1, in <module>\n'
        "RuntimeError: stage ocr could not start\n"
    )
    script = textwrap.dedent(f"""
        import os, sys, time
        from app.logs import capture_output, configure_logging
        assert capture_output()
        configure_logging("json", "info", sys.stderr)
        os.write(2, b"a line before\\n")
        for part in {trace.encode()!r}.split(b"File"):  # arrives in pieces, as a pipe may deliver it
            os.write(2, part if part.startswith(b"(") else b"File" + part)
            time.sleep(0.02)
        os.write(2, b"a line after\\n")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [event["event"] for event in json_lines(result.stderr, "stderr")]
    assert events[0] == "a line before" and events[-1] == "a line after", events
    assert len(events) == 3, events
    failure = events[1]
    assert failure.startswith("(MapWorker pid=123)") and failure.endswith("RuntimeError: stage ocr could not start")
    assert "ValueError: no such model" in failure and failure.count("Traceback") == 2


@pytest.mark.models
def test_once_with_real_models_writes_only_json_lines(tmp_path: Path, shared_images: Path) -> None:
    """The real OCR and YOLO (LiteRT) stages load and run; under log.format json every line parses, at debug
    level too (where the library banners are not silenced and must be captured)."""
    inbox = tmp_path / "in"
    for rel in ("photo/darknet_dog.jpg", "text/skimage_page.png"):
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_images / rel, inbox / rel)
    config = read_config_file(OFFLINE)
    config["log"] = {"format": "json", "level": "debug"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = binner("once", str(inbox), "--output", str(tmp_path / "out"), "--state", str(tmp_path / "state"),
                    "--config", str(path), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (summary,) = json_lines(result.stdout, "stdout")
    assert summary["bins"] == {"A": 1, "B": 0, "C": 1}
    events = json_lines(result.stderr, "stderr")
    ready = [(e["stage"], e["replica"], e["device"]) for e in events if e["event"] == "stage ready"]
    assert ("load", 0, "cpu") in ready and ("load", 1, "cpu") in ready and ("vision", 0, "cpu") in ready
    assert len(set(ready)) == len(ready), f"two 'stage ready' lines cannot be told apart: {ready}"
    for note in [e["event"] for e in events if "torchvision's compiled operators" in e["event"]]:
        # On a CPU-only host with PyPI's CUDA torchvision: say what it is, not that the user installed wrongly.
        assert "Nothing needs fixing" in note and "results are the same" in note and "matches torch" not in note
    finished = {Path(e["path"]).name: e for e in events if e["event"] == "file finished"}
    assert finished["darknet_dog.jpg"]["bin"] == "A" and finished["skimage_page.png"]["rule"] == "text_area"


def test_log_lines_print_above_the_progress_bar_in_a_terminal(tmp_path: Path) -> None:
    """In a terminal, `once` shows a live bar; a warning printed meanwhile must be a whole line above it, not text
    glued onto the bar (and then erased by its next redraw)."""
    import os
    import pty
    import re

    from PIL import Image

    inbox = tmp_path / "in"
    inbox.mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (index * 60, 80, 120)).save(inbox / f"{index}.png")
    for name in ("README.md", "notes.txt"):
        (inbox / name).write_text("not an image\n")
    synthetic = {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [300.0, 0.0]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ocr": synthetic, "vision": synthetic, "http": {"enabled": False}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")} | {"COLUMNS": "150", "TERM": "xterm"}
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "once", str(inbox), "--output", str(tmp_path / "out"),
                                "--state", str(tmp_path / "state"), "--config", str(config)], cwd=REPO, env=env,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(120) == 0, b"".join(chunks).decode(errors="replace")
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode(errors="replace"))
    segments = [segment for segment in re.split(r"[\r\n]+", screen) if segment.strip()]
    assert any("━" in segment for segment in segments), "no progress bar was drawn"
    warned = [segment for segment in segments if "quarantined" in segment and "warning" in segment]
    assert len(warned) == 2, segments
    for segment in warned:
        assert re.match(r"^\d{4}-\d\d-\d\dT", segment), f"a log line glued onto the bar: {segment!r}"
