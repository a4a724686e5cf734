"""Tiny, randomly initialised CLIP and BLIP checkpoints built with the real ``transformers`` classes.

Real CLIP/BLIP weights cannot reach the machines that run the tests; ``app.standin_models`` builds checkpoints
with the same classes and file layout, loaded through the very ``from_pretrained(local_dir)`` path that real
weights take. Both builders reuse a complete checkpoint that is already there, so a session-scoped fixture
builds each once.
"""

from __future__ import annotations

from pathlib import Path

from app.bench.standin_models import TINY_IMAGE_SIZE, build_blip, build_clip

IMAGE_SIZE = TINY_IMAGE_SIZE


def build_tiny_clip(directory: Path) -> Path:
    return build_clip(directory, "tiny")


def build_tiny_blip(directory: Path) -> Path:
    return build_blip(directory, "tiny")
