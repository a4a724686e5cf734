"""Names reach people escaped, everywhere: a name that is not UTF-8 shows ``\\xff``, a control character ``\\x1b``
(C0, DEL, C1), in `status`, `explain`, `rebin`, `eval`, `once`'s summary, the lines above the progress bar, and
every ``--json`` line, which stays valid UTF-8. Before, `explain` printed the 0xff byte and sent ``\\x1b[31m`` to
the terminal, and its JSON was not UTF-8."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.store import shown
from tests.daemon_harness import REPO
from tests.test_adversarial import images

SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [0.0, 0.0]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [0.0, 0.0]},
    "http": {"enabled": False}, "settle_ms": 0, "log": {"format": "console"},
}
# What a terminal must never receive from a name: C0 controls other than newline and tab, DEL, C1 controls, and
# the bidirectional overrides; and the output must be UTF-8.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def binner_process(*args: str) -> subprocess.CompletedProcess[bytes]:
    """One `binner` command as a process, its output kept as the bytes it wrote (names may hold any byte)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BINNER_")}
    environment["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=environment, capture_output=True,
                          timeout=120)


def binner(*args: str) -> Any:
    """One `binner` command in this process (its stdout is strict UTF-8: a raw name fails there too)."""
    from typer.testing import CliRunner

    from app.cli import cli

    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_clean(raw: bytes, *wanted: str) -> str:
    text = raw.decode("utf-8")  # strict: a raw 0xff byte fails here
    assert not RAW.search(text), f"a raw control character reached the output: {RAW.findall(text)!r}\n{text}"
    for piece in wanted:
        assert piece in text, f"{piece!r} not shown in:\n{text}"
    assert not any(line.lstrip().startswith(FORGED) for line in text.splitlines()), f"a name forged a line:\n{text}"
    return text


def test_shown_escapes_bytes_that_are_not_utf8_and_every_control_character() -> None:
    assert shown(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert shown("a\x01\x1b[31m\x7f\u009b\u202e.png") == "a\\x01\\x1b[31m\\x7f\\x9b\\u202e.png"
    assert shown("r\xe9pertoire/caf\u00e9 \u65e5\u672c.png") == "r\xe9pertoire/caf\u00e9 \u65e5\u672c.png"
    assert shown("one\ntwo\tthree\r") == "one\\x0atwo\\x09three\\x0d"
    assert shown("one\ntwo\tthree\r", lines=True) == "one\ntwo\tthree\\x0d"
    once = shown(os.fsdecode(b"x\xfe\x1b"))
    assert shown(once) == once, "escaping twice changes nothing"
    assert shown(None) is None and shown(Path("/in/a\x1b.png")) == "/in/a\\x1b.png"


def test_a_phase_of_the_progress_bar_is_neither_markup_nor_raw() -> None:
    from rich.console import Console

    from app.progress import BinningProgress

    screen = io.StringIO()
    progress = BinningProgress(1, True, Console(file=screen, force_terminal=True, width=200, color_system=None))
    with progress.shown("loading"):
        progress.phase("binning [red]x\x1b[2J.png")
    assert "binning [red]x\\x1b[2J.png" in screen.getvalue()


# The last name forges a line of `rebin`'s report and a row of a table when its newline and tab reach the terminal.
FORGED = "B -> A (confident_detection): forged"
NAMES = [b"bad\xff.png", b"esc\x01\x1b[31m.png", b"c1\xc2\x9b2J.png", b"x\n" + FORGED.encode() + b"\t.png"]
SHOWN = ["bad\\xff.png", "esc\\x01\\x1b[31m.png", "c1\\x9b2J.png", "x\\x0a" + FORGED + "\\x09.png"]
NOT_AN_IMAGE, NOT_AN_IMAGE_SHOWN = b"note\x01\x1b]0;owned\x07.jpg", "note\\x01\\x1b]0;owned\\x07.jpg"


class Sorted:
    """A tree sorted once by `binner once` (copy mode) under an input, a state and names that need escaping."""

    def __init__(self, root: Path) -> None:
        raw_root = os.fsencode(root)
        self.inbox, self.state = os.path.join(raw_root, b"in\x1b[1m"), os.path.join(raw_root, b"state\xfe")
        self.out = root / "out"
        os.makedirs(self.inbox)
        for name, data in zip(NAMES, images(len(NAMES), start=4100), strict=True):
            with open(os.path.join(self.inbox, name), "wb") as handle:
                handle.write(data)
        with open(os.path.join(self.inbox, NOT_AN_IMAGE), "wb") as handle:
            handle.write(b"not an image")
        self.config = root / "binner.yaml"
        self.config.write_text(yaml.safe_dump({**SYNTHETIC, "output": str(self.out), "placement": "copy"}))
        self.common = ("--config", str(self.config), "--state", os.fsdecode(self.state))
        # once in a process of its own: the progress bar, and the log lines printed above it
        self.once = binner_process("once", os.fsdecode(self.inbox), "--output", str(self.out), *self.common)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Sorted:
    return Sorted(tmp_path_factory.mktemp("names"))


def test_once_shows_names_escaped_in_its_summary_and_the_lines_above_its_bar(tree: Sorted) -> None:
    assert tree.once.returncode == 0, tree.once.stdout + tree.once.stderr
    assert_clean(tree.once.stdout, "in\\x1b[1m")
    assert_clean(tree.once.stderr, NOT_AN_IMAGE_SHOWN)  # "quarantined file=...", above the bar


def test_status_shows_names_escaped_and_its_json_is_utf8(tree: Sorted) -> None:
    status = binner("status", *tree.common)
    assert status.exit_code == 0, status.stderr_bytes
    assert_clean(status.stdout_bytes, "state\\xfe")
    as_json = binner("status", *tree.common, "--json")
    assert json.loads(assert_clean(as_json.stdout_bytes))["bins"]


def test_explain_shows_names_escaped_and_its_json_is_utf8(tree: Sorted) -> None:
    for name, expected in ((NAMES[0], SHOWN[0]), (NAMES[1], SHOWN[1]), (NAMES[3], SHOWN[3]),
                           (NOT_AN_IMAGE, NOT_AN_IMAGE_SHOWN)):
        explained = binner("explain", os.fsdecode(name), *tree.common)
        assert explained.exit_code == 0, explained.stdout_bytes + explained.stderr_bytes
        assert_clean(explained.stdout_bytes, expected, "in\\x1b[1m")
        as_json = binner("explain", os.fsdecode(name), *tree.common, "--json")
        record = json.loads(assert_clean(as_json.stdout_bytes))
        # JSON encodes a newline itself (it forges nothing there): only the other control characters are escaped
        assert record["input"].endswith("in\\x1b[1m/" + shown(os.fsdecode(name), lines=True)), record["input"]
    missing = binner("explain", "none\x1b[31m.png", *tree.common)
    assert missing.exit_code == 2
    assert_clean(missing.stderr_bytes, "none\\x1b[31m.png")


def test_rebin_shows_names_escaped_in_its_report_and_its_log(tree: Sorted) -> None:
    to_c = tree.config.with_name("to-c.yaml")  # every file moves to C, and each move names it
    to_c.write_text(yaml.safe_dump({**SYNTHETIC, "output": str(tree.out), "placement": "copy",
                                    "rules": {"c_text_area_ratio": 0.0}}))
    rebinned = binner("rebin", "--config", str(to_c), "--state", os.fsdecode(tree.state))
    assert rebinned.exit_code == 0, rebinned.stdout_bytes + rebinned.stderr_bytes
    assert_clean(rebinned.stdout_bytes, *SHOWN)
    # the console log quotes a value with spaces as Python does, doubling its backslashes
    assert_clean(rebinned.stderr_bytes, *SHOWN[:3], SHOWN[3].replace("\\", "\\\\"))


def test_eval_shows_names_escaped_and_its_json_is_utf8(tmp_path: Path) -> None:
    """A labelled file whose name holds control characters, misbinned: listed in the table and in the JSON."""
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / os.fsdecode(NAMES[1])).write_bytes(images(1, start=4200)[0])
    (labelled / os.fsdecode(NAMES[3])).write_bytes(images(1, start=4201)[0])
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,expected_bin,category\n{os.fsdecode(NAMES[1])},A,photo\x1b[7m\n"
                      f'"{os.fsdecode(NAMES[3])}",A,photo\n', encoding="utf-8")
    config = tmp_path / "binner.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC))
    evaluated = binner("eval", "--images", str(labelled), "--labels", str(labels), "--config", str(config))
    assert evaluated.exit_code == 0, evaluated.stdout_bytes + evaluated.stderr_bytes
    assert_clean(evaluated.stdout_bytes, SHOWN[1], SHOWN[3], "photo\\x1b[7m")
    as_json = binner("eval", "--images", str(labelled), "--labels", str(labels), "--config", str(config), "--json")
    result = json.loads(assert_clean(as_json.stdout_bytes))
    assert sorted(item["file"] for item in result["misbinned"]) == sorted(
        [SHOWN[1], shown(os.fsdecode(NAMES[3]), lines=True)])  # JSON encodes the newline itself
