"""The A/B/C rules: pure functions of the stored signals, so ``binner rebin`` can re-apply new thresholds
without running a model, and ``binner explain`` can say which rule fired and on what values.

- C, text-dominant: much of the image is text (area, characters or lines over a threshold).
- A, clean content: little or no text, and content confirmed by a confident detection or by strong
  image-caption agreement.
- B, everything else: incidental text, or content that is weak, ambiguous or could not be confirmed.
A disabled model leaves its signal out; the criteria that need it are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Bin = Literal["A", "B", "C"]
BINS: tuple[Bin, ...] = ("A", "B", "C")


class RuleThresholds(BaseModel):
    """Every threshold of the rules; defaults calibrated on shared/data/images (docs/calibration.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    signals: Literal["needed", "all"] = Field(
        "needed", description="needed: run a model only while its signal can still change the bin; all: compute every "
        "enabled model's signal for every image (to keep captions as dataset metadata, say)")
    c_text_area_ratio: float = Field(0.10, ge=0, le=1, description="C when text boxes cover at least this share of the image")
    c_char_count: int = Field(200, ge=0, description="C when OCR reads at least this many characters")
    c_line_count: int = Field(12, ge=0, description="C when OCR reads at least this many text lines")
    a_max_text_area_ratio: float = Field(0.02, ge=0, le=1, description="A needs text area at most this")
    a_max_char_count: int = Field(25, ge=0, description="A needs at most this many characters")
    a_min_detection_confidence: float = Field(0.5, ge=0, le=1, description="a detection this confident confirms content")
    a_min_clip_similarity: float = Field(0.28, ge=-1, le=1, description="image-caption similarity this high confirms content")

    @model_validator(mode="before")
    @classmethod
    def _short_circuit_text(cls, data: Any) -> Any:
        """``short_circuit_text`` (binner 0.1) is read as ``signals``: false meant "run vision on every image"."""
        if isinstance(data, dict) and "short_circuit_text" in data:
            data = dict(data)
            legacy = data.pop("short_circuit_text")
            data.setdefault("signals", "needed" if legacy else "all")
        return data


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


def text_dominant(signals: dict[str, Any], t: RuleThresholds, criteria: dict[str, Any] | None = None) -> Decision | None:
    """Rule 1: C when the text is dominant (area, characters or lines over a threshold)."""
    ocr = signals.get("ocr")
    if not ocr:
        return None
    area, chars, lines = _text_measures(ocr)
    criteria = {} if criteria is None else criteria
    criteria.update(text_area_ratio=area, char_count=chars, line_count=lines)
    if area >= t.c_text_area_ratio:
        return Decision("C", "text_area", f"text covers {area:.1%} of the image (>= {t.c_text_area_ratio:.1%})", criteria)
    if chars >= t.c_char_count:
        return Decision("C", "text_chars", f"{chars} characters of text (>= {t.c_char_count})", criteria)
    if lines >= t.c_line_count:
        return Decision("C", "text_lines", f"{lines} lines of text (>= {t.c_line_count})", criteria)
    return None


def incidental_text(signals: dict[str, Any], t: RuleThresholds, criteria: dict[str, Any]) -> Decision | None:
    """Rule 2: B when there is more than a little text (but not dominant)."""
    ocr = signals.get("ocr")
    if not ocr:
        return None
    area, chars, _ = _text_measures(ocr)
    if area > t.a_max_text_area_ratio or chars > t.a_max_char_count:
        return Decision("B", "incidental_text",
                        f"some text ({chars} characters, {area:.1%} of the image) but not text-dominant", criteria)
    return None


def confident_detection(signals: dict[str, Any], t: RuleThresholds, criteria: dict[str, Any]) -> Decision | None:
    """Rule 3: A when a detection is confident."""
    detections = signals.get("detections")
    if detections is None:
        return None
    best = max(detections, key=lambda d: d["confidence"], default=None)
    criteria["best_detection"] = best
    if best is not None and best["confidence"] >= t.a_min_detection_confidence:
        return Decision("A", "confident_detection",
                        f"little text and a confident detection ({best['label']} {best['confidence']:.2f})", criteria)
    return None


def caption_agreement(signals: dict[str, Any], t: RuleThresholds, criteria: dict[str, Any]) -> Decision | None:
    """Rule 4: A when image and caption agree."""
    similarity = signals.get("clip_similarity")
    if similarity is None:
        return None
    criteria["clip_similarity"] = similarity
    if similarity >= t.a_min_clip_similarity:
        return Decision("A", "caption_agreement",
                        f"little text and image-caption similarity {similarity:.3f} (>= {t.a_min_clip_similarity})",
                        criteria)
    return None


# The decision list, in order, with the signals each rule reads. The first rule that fires decides; rule 5 (B) is
# what is left. ``decide`` and ``settled`` both walk this one list, so nothing re-implements a threshold.
RULES: tuple[tuple[Any, frozenset[str]], ...] = (
    (text_dominant, frozenset({"ocr"})),
    (incidental_text, frozenset({"ocr"})),
    (confident_detection, frozenset({"detections"})),
    (caption_agreement, frozenset({"caption", "clip_similarity"})),
)
# The signals each model writes, for the skip counts, the decision record and what a configuration can compute.
VISION_SIGNALS = ("detections", "caption", "clip_similarity")
MODEL_OF_SIGNAL = {"ocr": "ocr", "detections": "detector", "caption": "captioner", "clip_similarity": "clip"}


def signals_of(models: Iterable[str]) -> frozenset[str]:
    """The signals that the models named (``"ocr"``, ``"detector"``, ``"captioner"``, ``"clip"``) write."""
    wanted = set(models)
    return frozenset(signal for signal, model in MODEL_OF_SIGNAL.items() if model in wanted)


def _walk(signals: dict[str, Any], t: RuleThresholds, coming: frozenset[str]) -> Decision | None:
    """The decision list over ``signals``; None at the first rule whose missing signals are all still ``coming``
    (their values could make it fire). A rule whose missing signals can never come is passed, as in ``decide``."""
    criteria: dict[str, Any] = {}
    for rule, reads in RULES:
        missing = reads - signals.keys()
        if missing and missing <= coming:
            return None
        decision = rule(signals, t, criteria)
        if decision is not None:
            return decision
    if signals.get("detections") is None and signals.get("clip_similarity") is None:
        return Decision("B", "content_unconfirmed", "little text, but no content model is enabled to confirm it", criteria)
    return Decision("B", "content_weak", "little text, but no confident detection or caption agreement", criteria)


def decide(signals: dict[str, Any], t: RuleThresholds) -> Decision:
    """The bin for one image's signals under thresholds ``t`` (a signal that is absent skips the rules that read it)."""
    decision = _walk(signals, t, frozenset())
    assert decision is not None  # nothing is coming: every rule is either evaluated or passed
    return decision


def settled(signals: dict[str, Any], t: RuleThresholds, coming: frozenset[str]) -> Decision | None:
    """The decision that the signals computed so far already fix, whatever the signals still ``coming`` (those the
    enabled models that have not run yet would write) say; None while one of them could change the bin (and always
    None under ``signals: all``).

    The rules are walked in order: a rule whose signals are all here either fires (that is the bin) or not (on to the
    next); a rule that reads a signal no enabled model will write is passed, exactly as ``decide`` passes it; the first
    rule whose missing signals are still coming could fire, so the bin stays open there. When the walk ends without
    either, the bin is ``decide``'s fallback (B), which nothing still to come can change.
    """
    if t.signals == "all":
        return None
    return _walk(signals, t, coming)


def criteria_of(signals: dict[str, Any], rule: str) -> dict[str, Any]:
    """The values a decision by ``rule`` compared, measured again from the stored ``signals`` (the ledger keeps the
    signals, not these copies of them): ``RULES`` walked in order up to the rule that fired (all of them for rule 5's
    B), each adding what it measures. What a rule measures does not depend on the thresholds."""
    criteria: dict[str, Any] = {}
    fired = SKIP_REASONS.get(rule, rule)  # text_area, text_chars and text_lines are all decided by text_dominant
    thresholds = RuleThresholds()
    for check, _reads in RULES:
        check(signals, thresholds, criteria)
        if check.__name__ == fired:
            break
    return criteria


# Why a signal was not computed: the rule that settled the bin first.
SKIP_REASONS = {"text_area": "text_dominant", "text_chars": "text_dominant", "text_lines": "text_dominant",
                "incidental_text": "incidental_text", "confident_detection": "confident_detection",
                "content_weak": "content_weak", "content_unconfirmed": "content_unconfirmed"}
SKIP_WORDS = {"text_dominant": "the text decided C", "incidental_text": "incidental text decided B",
              "confident_detection": "a confident detection decided A",
              "content_weak": "no model still to run could confirm the content, so B",
              "content_unconfirmed": "no enabled model could confirm the content, so B"}


def unneeded(produces: frozenset[str], signals: dict[str, Any], t: RuleThresholds, coming: frozenset[str]) -> str | None:
    """Why signals ``produces`` are not needed for this image's decision (``"confident_detection"``), or None when
    one of them still is. ``coming``: the signals the enabled models of the stages after it may still write
    (``produces`` is added here). Nothing written (the loader) is always needed."""
    if not produces:
        return None
    decision = settled(signals, t, coming | produces)
    if decision is None:
        return None
    return SKIP_REASONS.get(decision.rule, decision.rule)


def not_computed_words(reason: str) -> str:
    """``confident_detection`` -> "a confident detection decided A" (``binner explain``)."""
    return SKIP_WORDS.get(reason, reason.replace("_", " "))
