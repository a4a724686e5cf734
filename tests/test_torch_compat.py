"""torchvision compatibility: the pure-PyTorch NMS is exact, and a fresh interpreter can import
transformers' CLIP and run torchvision's NMS after ``ensure_torchvision()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stages.torch_compat import ensure_torchvision, nms

REPO = Path(__file__).resolve().parents[1]


def reference_nms(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Textbook greedy NMS in plain Python: highest score first, drop boxes with IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        suppressed = False
        for j in keep:
            a1, b1, a2, b2 = boxes[j]
            inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
            union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
            if inter / union > threshold:
                suppressed = True
                break
        if not suppressed:
            keep.append(i)
    return keep


def random_boxes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 100
    sizes = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 40 + 1
    boxes = torch.cat([corners, corners + sizes], dim=1)
    scores = torch.rand(count, generator=generator, dtype=torch.float64)
    return boxes, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_compat_nms_equals_reference_greedy_nms(seed: int, threshold: float) -> None:
    boxes, scores = random_boxes(300, seed)
    expected = reference_nms(boxes.tolist(), scores.tolist(), threshold)
    kept = nms(boxes, scores, threshold)
    assert kept.dtype == torch.long
    assert kept.tolist() == expected
    assert 0 < len(expected) < 300  # the boxes overlap enough for suppression to matter


def test_compat_nms_edge_cases() -> None:
    empty = nms(torch.zeros((0, 4)), torch.zeros((0,)), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.long
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    assert nms(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    apart = torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    assert nms(apart, torch.tensor([0.2, 0.8]), 0.5).tolist() == [1, 0]


def test_torchvision_nms_after_ensure_equals_reference() -> None:
    """Whichever kernel is in effect here (compiled or substituted), torchvision.ops.nms is exact."""
    ensure_torchvision()
    ensure_torchvision()  # idempotent
    import torchvision

    boxes, scores = random_boxes(200, 7)
    expected = reference_nms(boxes.tolist(), scores.tolist(), 0.5)
    assert torchvision.ops.nms(boxes.float(), scores.float(), 0.5).tolist() == expected


FRESH_INTERPRETER = textwrap.dedent(
    """
    import json, logging, sys
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("stages.torch_compat").addHandler(Keep())
    from stages.torch_compat import ensure_torchvision, substituted_ops
    ensure_torchvision()
    ensure_torchvision()
    from transformers import CLIPModel, BlipForConditionalGeneration  # noqa: F401
    import torch, torchvision
    kept = torchvision.ops.nms(torch.tensor([[0., 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]),
                               torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
    print(json.dumps({"substituted": list(substituted_ops()),
                      "warnings": records, "kept": kept}))
    """
)


def run_fresh(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )


def test_fresh_interpreter_imports_transformers_clip_after_ensure() -> None:
    plain = run_fresh("import torchvision")  # the premise: does torchvision import on its own here?
    done = run_fresh(FRESH_INTERPRETER)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kept"] == [0, 2]
    if plain.returncode == 0:
        # Healthy torchvision: nothing substituted, nothing logged.
        assert report["substituted"] == [] and report["warnings"] == []
    else:
        # Broken extension (the CPU machines here): nms substituted, exactly one warning naming it.
        assert "operator torchvision::" in plain.stderr, plain.stderr[-2000:]
        assert "nms" in report["substituted"]
        assert len(report["warnings"]) == 1
        assert "torchvision::nms" in report["warnings"][0]
