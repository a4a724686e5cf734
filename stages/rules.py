"""The A/B/C rules: pure functions of the stored signals, so ``binner rebin`` can re-apply new thresholds
without running a model, and ``binner explain`` can say which rule fired and on what values.

- C, text-dominant: much of the image is text (area, characters or lines over a threshold).
- A, clean content: little or no text, and content confirmed by a confident detection or by strong
  image-caption agreement.
- B, everything else: incidental text, or content that is weak, ambiguous or could not be confirmed.
A disabled model leaves its signal out; the criteria that need it are skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Bin = Literal["A", "B", "C"]
BINS: tuple[Bin, ...] = ("A", "B", "C")


class RuleThresholds(BaseModel):
    """Every threshold of the rules; defaults calibrated on shared/data/images (docs/calibration.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    short_circuit_text: bool = Field(True, description="send text-dominant images straight to the sink, skipping vision")
    c_text_area_ratio: float = Field(0.10, ge=0, le=1, description="C when text boxes cover at least this share of the image")
    c_char_count: int = Field(200, ge=0, description="C when OCR reads at least this many characters")
    c_line_count: int = Field(12, ge=0, description="C when OCR reads at least this many text lines")
    a_max_text_area_ratio: float = Field(0.02, ge=0, le=1, description="A needs text area at most this")
    a_max_char_count: int = Field(25, ge=0, description="A needs at most this many characters")
    a_min_detection_confidence: float = Field(0.5, ge=0, le=1, description="a detection this confident confirms content")
    a_min_clip_similarity: float = Field(0.28, ge=-1, le=1, description="image-caption similarity this high confirms content")


@dataclass(frozen=True)
class Decision:
    bin: Bin
    rule: str
    reason: str
    criteria: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_measures(ocr: dict[str, Any]) -> tuple[float, int, int]:
    return float(ocr.get("text_area_ratio", 0.0)), int(ocr.get("char_count", 0)), int(ocr.get("line_count", 0))


def text_dominant(signals: dict[str, Any], t: RuleThresholds) -> Decision | None:
    """The C decision when the OCR signals alone settle it, else None (also used for the short-circuit)."""
    ocr = signals.get("ocr")
    if not ocr:
        return None
    area, chars, lines = _text_measures(ocr)
    criteria = {"text_area_ratio": area, "char_count": chars, "line_count": lines}
    if area >= t.c_text_area_ratio:
        return Decision("C", "text_area", f"text covers {area:.1%} of the image (>= {t.c_text_area_ratio:.1%})", criteria)
    if chars >= t.c_char_count:
        return Decision("C", "text_chars", f"{chars} characters of text (>= {t.c_char_count})", criteria)
    if lines >= t.c_line_count:
        return Decision("C", "text_lines", f"{lines} lines of text (>= {t.c_line_count})", criteria)
    return None


def settled(signals: dict[str, Any], t: RuleThresholds) -> Decision | None:
    """The decision that the signals computed so far already fix, whatever the missing ones would say; None while
    a signal still to come could change the bin. A text-dominant image is C before vision runs
    (``short_circuit_text``); nothing else settles early."""
    if t.short_circuit_text:
        return text_dominant(signals, t)
    return None


# Why a stage was passed by, per rule that settled the bin first (the words ``explain`` shows).
SKIP_REASONS = {"text_area": "text_dominant", "text_chars": "text_dominant", "text_lines": "text_dominant"}


def unneeded(produces: frozenset[str], signals: dict[str, Any], t: RuleThresholds) -> str | None:
    """Why a stage writing ``produces`` is not needed for this image's decision (``"text_dominant"``), or None
    when it is. A stage that writes no signal (the loader) is always needed."""
    if not produces:
        return None
    decision = settled(signals, t)
    if decision is None:
        return None
    return SKIP_REASONS.get(decision.rule, decision.rule)


def decide(signals: dict[str, Any], t: RuleThresholds) -> Decision:
    """The bin for one image's signals under thresholds ``t``."""
    dominant = text_dominant(signals, t)
    if dominant is not None:
        return dominant
    criteria: dict[str, Any] = {}
    ocr = signals.get("ocr")
    if ocr:
        area, chars, lines = _text_measures(ocr)
        criteria.update(text_area_ratio=area, char_count=chars, line_count=lines)
        if area > t.a_max_text_area_ratio or chars > t.a_max_char_count:
            return Decision(
                "B", "incidental_text",
                f"some text ({chars} characters, {area:.1%} of the image) but not text-dominant", criteria,
            )
    detections = signals.get("detections")
    similarity = signals.get("clip_similarity")
    if detections is not None:
        best = max(detections, key=lambda d: d["confidence"], default=None)
        criteria["best_detection"] = best
        if best is not None and best["confidence"] >= t.a_min_detection_confidence:
            return Decision(
                "A", "confident_detection",
                f"little text and a confident detection ({best['label']} {best['confidence']:.2f})", criteria,
            )
    if similarity is not None:
        criteria["clip_similarity"] = similarity
        if similarity >= t.a_min_clip_similarity:
            return Decision(
                "A", "caption_agreement",
                f"little text and image-caption similarity {similarity:.3f} (>= {t.a_min_clip_similarity})", criteria,
            )
    if detections is None and similarity is None:
        return Decision("B", "content_unconfirmed", "little text, but no content model is enabled to confirm it", criteria)
    return Decision("B", "content_weak", "little text, but no confident detection or caption agreement", criteria)
