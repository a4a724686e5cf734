"""Which configured weights are on this machine (no network), and fetching failing fast when offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.weights import MissingWeight, WeightsError, fetch_weights, missing_weights
from tests.conftest_models import YOLO_TFLITE, require_shared


def test_present_weights_are_not_reported(tmp_path: Path, tiny_clip_dir: Path) -> None:
    require_shared(YOLO_TFLITE)
    assert missing_weights(str(YOLO_TFLITE), None, str(tiny_clip_dir), weights_dir=tmp_path) == []
    (tmp_path / "yolo11n.pt").write_bytes(b"weights")  # a bare name is looked up in the weights folder
    assert missing_weights("yolo11n.pt", None, None, weights_dir=tmp_path) == []


def test_missing_weights_name_key_value_and_command(tmp_path: Path) -> None:
    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    missing = missing_weights("yolo11n.pt", "binner-tests/no-such-blip", str(empty), weights_dir=tmp_path)
    assert [m.key for m in missing] == ["vision.detector.weights", "vision.captioner.model", "vision.clip.model"]
    detector, captioner, clip = missing
    assert detector.value == "yolo11n.pt" and detector.fetchable and "binner fetch-weights" in detector.command
    assert str(tmp_path) in detector.command
    assert captioner.fetchable and "binner fetch-weights" in captioner.command
    assert not clip.fetchable and "config.json" in clip.reason
    assert all(isinstance(m, MissingWeight) and m.key in str(m) and m.value in str(m) for m in missing)


def test_a_missing_local_file_is_not_fetchable(tmp_path: Path) -> None:
    (missing,) = missing_weights(str(tmp_path / "custom.pt"), None, None, weights_dir=tmp_path)
    assert not missing.fetchable and "custom.pt" in missing.command
    with pytest.raises(WeightsError, match="cannot be downloaded"):
        fetch_weights(str(tmp_path / "custom.pt"), None, None, weights_dir=tmp_path)


def test_fetch_fails_fast_when_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(WeightsError, match="vision.captioner.model"):
        fetch_weights(None, "binner-tests/no-such-blip", None, weights_dir=tmp_path)
    assert time.monotonic() - started < 10
    assert fetch_weights(None, None, None, weights_dir=tmp_path) == []  # nothing configured: nothing to do
