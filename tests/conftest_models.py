"""Fixtures for the real-model tests: the shared data folder and tiny CLIP/BLIP checkpoints per session.

Test modules import the fixtures they use (``from tests.conftest_models import tiny_blip_dir``); a
``conftest.py`` may also list this module in ``pytest_plugins``. Each checkpoint is built once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_blip, build_tiny_clip

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGES = SHARED / "data" / "images"
YOLO_TFLITE = SHARED / "models" / "yolov8n_int8.tflite"


def require_shared(*paths: Path) -> None:
    """Skip, saying what is missing, when the shared data or model files are not on this machine."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared test data not found: {path} (expected ../shared next to the repository)")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))
