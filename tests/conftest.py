"""Shared fixtures: where ../shared is, the labelled images, and a clean environment for subprocesses."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.conftest_models"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMAGES = SHARED / "data" / "images"
YOLO_WEIGHTS = SHARED / "models" / "yolov8n_int8.tflite"


def require_shared() -> None:
    if not IMAGES.is_dir() or not YOLO_WEIGHTS.is_file():
        pytest.skip(f"needs the shared data beside the repository ({SHARED}): labelled images and YOLO weights")


@pytest.fixture(scope="session")
def shared_images() -> Path:
    require_shared()
    return IMAGES


@pytest.fixture(scope="session")
def labels(shared_images: Path) -> list[dict[str, str]]:
    with (shared_images / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never reach a hub from tests; keep Ultralytics' settings out of the home directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))
