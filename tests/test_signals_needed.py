"""Compute only what the decision needs (``rules.signals: needed``): an image whose text decides C or B skips vision,
one whose confident detection decides A skips BLIP and CLIP, and every bin is the bin ``signals: all`` gives.

Three levels: the real models on the 30 labelled images (real OCR, the real YOLOv8n, tiny BLIP/CLIP) through `once`
(everything computed) and through the real daemon (only what is needed); the engine's routing and the vision stage's
own skip under three more threshold sets, on both engines, with the models' outputs replayed from that real run; and
the rules themselves. The Ray engine on a real cluster is in tests/test_ray_engine.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.config import load_config
from app.engine import Pipeline
from app.metrics import Metrics
from app.store import Ledger, scan, to_discovered
from stages.base import BatchPolicy, ImageItem
from stages.rules import MODEL_OF_SIGNAL, RuleThresholds, criteria_of, decide, settled
from stages.vision import CaptionerOptions, ClipOptions, DetectorOptions, VisionStage
from tests.conftest import REPO
from tests.daemon_harness import DaemonProcess, wait_for
from tests.fakes import RecordingStage, run_until_idle

OFFLINE = REPO / "deploy" / "examples" / "offline-cpu.yaml"
SETTLED_EARLY = {"text_area", "text_chars", "text_lines", "incidental_text", "confident_detection"}
# Three threshold sets besides the defaults, chosen so that every rule decides some of the 30 images.
THRESHOLD_SETS = {
    "stricter_detection": {"a_min_detection_confidence": 0.7},  # the rebin example: a 0.6 detection now needs CLIP
    "more_incidental_text": {"c_text_area_ratio": 0.6, "c_char_count": 5000, "c_line_count": 200,
                             "a_max_char_count": 3, "a_max_text_area_ratio": 0.001},
    "caption_decides": {"a_min_detection_confidence": 0.99, "a_min_clip_similarity": -1.0,
                        "a_max_char_count": 1000, "a_max_text_area_ratio": 0.5},
}


def vision_models(blip: Path, clip: Path) -> dict[str, Any]:
    return {"captioner": {"enabled": True, "model": str(blip), "max_new_tokens": 4},
            "clip": {"enabled": True, "model": str(clip)}}


def ledger_rows(state: Path) -> dict[str, dict[str, Any]]:
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = [dict(row) for row in db.execute("SELECT * FROM files")]
    finally:
        db.close()
    return {row["rel_path"]: {**row, "signals": json.loads(row["signals"] or "null")} for row in rows}


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory, shared_images: Path, tiny_blip_dir: Path,
               tiny_clip_dir: Path) -> dict[str, dict[str, Any]]:
    """`once` with ``signals: all`` over the labelled images: every model on every image; the rows by file."""
    from app.once import bin_once

    root = tmp_path_factory.mktemp("all")
    config = load_config(OFFLINE, {"input": shared_images, "output": root / "out", "state_dir": root / "state",
                                   "placement": "copy", "vision": vision_models(tiny_blip_dir, tiny_clip_dir),
                                   "rules": {"signals": "all"}})
    summary = bin_once(config, "local", None, show_progress=False)
    assert summary.not_finished == 0
    rows = {rel: row for rel, row in ledger_rows(root / "state").items() if row["status"] == "done"}
    assert len(rows) == 30
    for row in rows.values():
        assert {"ocr", "detections", "caption", "clip_similarity"} <= row["signals"].keys(), row["rel_path"]
        assert "not_computed" not in row["signals"]
    return rows


def expected_skips(rows: dict[str, dict[str, Any]], rules: RuleThresholds) -> Counter[tuple[str, str]]:
    """(model, reason) -> images that ``needed`` must not run that model on, from the signals of ``all``."""
    from stages.rules import SKIP_REASONS

    skips: Counter[tuple[str, str]] = Counter()
    for row in rows.values():
        decision = decide(row["signals"], rules)
        if decision.rule not in SETTLED_EARLY:
            continue
        reason = SKIP_REASONS[decision.rule]
        models = ("captioner", "clip") if decision.rule == "confident_detection" else ("detector", "captioner", "clip")
        skips.update((model, reason) for model in models)
    return skips


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory: pytest.TempPathFactory, shared_images: Path, tiny_blip_dir: Path,
               tiny_clip_dir: Path) -> tuple[DaemonProcess, dict[tuple[str, str], float]]:
    """The real daemon over the 30 labelled images, computing only what is needed (the default); stopped."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("daemon"), OFFLINE,
                           {"vision": vision_models(tiny_blip_dir, tiny_clip_dir), "settle_ms": 0})
    shutil.copytree(shared_images, daemon.input, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.csv", "*.md"))
    try:
        daemon.start().wait_ready(180)
        wait_for(lambda: sum(row["status"] == "done" for row in ledger_rows(daemon.state).values()) == 30, 240,
                 "the 30 images to be binned", interval=0.5)
        skipped = {(labels["model"], labels["reason"]): value
                   for labels, value in daemon.samples("binner_signals_skipped_total") if value}
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    return daemon, skipped


@pytest.mark.models
@pytest.mark.system
@pytest.mark.timeout(300)
def test_the_daemon_computes_only_what_is_needed_and_bins_like_computing_everything(
        everything: dict[str, dict[str, Any]], daemon_run: tuple[DaemonProcess, dict[tuple[str, str], float]]) -> None:
    daemon, skipped = daemon_run
    needed = ledger_rows(daemon.state)
    assert {rel: row["bin"] for rel, row in needed.items()} == {rel: row["bin"] for rel, row in everything.items()}
    assert skipped == expected_skips(everything, RuleThresholds()), "BLIP and CLIP ran only where rules 1-3 left it open"
    for rel, row in needed.items():
        decision = everything[rel]
        if decision["rule"] == "confident_detection":
            assert row["signals"]["not_computed"] == {"caption": "confident_detection",
                                                      "clip_similarity": "confident_detection"}, rel
            assert "caption" not in row["signals"] and "detections" in row["signals"]
        elif decision["rule"] in SETTLED_EARLY:
            assert set(row["signals"]["not_computed"]) == {"detections", "caption", "clip_similarity"}, rel
        else:
            assert "not_computed" not in row["signals"] and "caption" in row["signals"], rel


# --- the engine's routing and the vision stage's own skip, with the models' outputs replayed ---------------------
class ReplayedVision(VisionStage):
    """The real VisionStage's batch logic (which images get a caption), its three models answering from a real run."""

    def __init__(self, recorded: dict[str, dict[str, Any]]) -> None:
        super().__init__(DetectorOptions("replayed.pt"), CaptionerOptions("replayed"), ClipOptions("replayed"), "fp32",
                         ["cpu"], BatchPolicy(8, 5.0))
        self.recorded = recorded
        self.calls: Counter[str] = Counter()

    def setup(self, device: str) -> None:
        self.device, self.yolo, self.blip, self.clip = device, "replayed", "replayed", "replayed"

    def warmup(self) -> None:
        pass

    def _upload(self, images: list[Any]) -> tuple[list[Any], Any]:
        return list(images), None  # the "pixels" are the files' names: the models answer by name

    def _detect(self, frames: list[Any], images: list[Any]) -> list[list[dict[str, Any]]]:
        self.calls["detector"] += len(frames)
        return [self.recorded[name]["detections"] for name in frames]

    def _caption(self, images: list[Any], min_new_tokens: int | None = None) -> list[str]:
        self.calls["captioner"] += len(images)
        return [self.recorded[name]["caption"] for name in images]

    def _similarity(self, images: list[Any], captions: list[str]) -> list[float]:
        self.calls["clip"] += len(images)
        return [self.recorded[name]["clip_similarity"] for name in images]


def replay(root: Path, recorded: dict[str, dict[str, Any]], rules: RuleThresholds) -> tuple[dict[str, str], Counter[str]]:
    """The local engine over the 30 files with replayed models; the bin of each file and the model calls."""
    inbox = root / "in"
    for rel in recorded:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(rel.encode())
    ledger = Ledger(root / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    by_key = {row.id: row.rel_path for row in ledger.rows()}

    def name_as_image(item: ImageItem) -> dict[str, Any]:
        item.image = by_key[item.key]
        return {}

    load = RecordingStage("load", batch_size=8, signals=name_as_image)
    ocr = RecordingStage("ocr", batch_size=8, signals=lambda item: {"ocr": recorded[by_key[item.key]]["ocr"]})
    vision = ReplayedVision(recorded)
    pipeline = Pipeline(ledger=ledger, metrics=Metrics(), stages=[load, ocr, vision], thresholds=rules, placer=None,
                        queue_capacities={"load": 16, "ocr": 16, "vision": 16, "sink": 16}, max_attempts=2,
                        placement_mode="copy")

    run_until_idle(pipeline)
    bins = {row.rel_path: row.bin for row in ledger.rows()}
    ledger.close()
    return bins, vision.calls


@pytest.mark.models
@pytest.mark.parametrize("name", ["defaults", *THRESHOLD_SETS])
def test_under_each_threshold_set_needed_bins_like_all_and_skips_exactly_the_settled(
        tmp_path: Path, everything: dict[str, dict[str, Any]], name: str) -> None:
    rules = RuleThresholds(**THRESHOLD_SETS.get(name, {}))
    recorded = {rel: row["signals"] for rel, row in everything.items()}
    expected = {rel: decide(signals, rules) for rel, signals in recorded.items()}
    bins, calls = replay(tmp_path, recorded, rules)
    assert bins == {rel: decision.bin for rel, decision in expected.items()}
    open_after_ocr = [rel for rel, d in expected.items() if d.rule not in SETTLED_EARLY - {"confident_detection"}]
    open_after_detection = [rel for rel, d in expected.items() if d.rule not in SETTLED_EARLY]
    assert calls["detector"] == len(open_after_ocr)
    assert calls["captioner"] == calls["clip"] == len(open_after_detection)


@pytest.mark.models
def test_the_threshold_sets_make_every_rule_decide_some_images(everything: dict[str, dict[str, Any]]) -> None:
    fired: Counter[str] = Counter()
    for overrides in [{}, *THRESHOLD_SETS.values()]:
        rules = RuleThresholds(**overrides)
        fired.update(decide(row["signals"], rules).rule for row in everything.values())
    assert {"incidental_text", "confident_detection", "caption_agreement"} <= fired.keys(), fired
    assert fired.keys() & {"text_area", "text_chars", "text_lines"}, fired
    assert fired.keys() & {"content_weak", "content_unconfirmed"}, fired


# --- the rules ----------------------------------------------------------------------------------------------------
def test_settled_equals_decide_whatever_the_missing_signals_say() -> None:
    """Exhaustively over small signal grids: when ``settled`` names a bin, every value of the missing signals gives
    that bin; when it names none, some value of them changes the bin."""
    rules = RuleThresholds()
    texts = [{"char_count": c, "line_count": 1, "text_area_ratio": a} for c in (0, 30, 300) for a in (0.0, 0.05, 0.2)]
    detections = [[], [{"label": "dog", "confidence": 0.3, "box": [0, 0, 1, 1]}],
                  [{"label": "dog", "confidence": 0.9, "box": [0, 0, 1, 1]}]]
    captions = [{"caption": "x", "clip_similarity": s} for s in (0.0, 0.5)]
    for ocr in texts:
        for found in [None, *detections]:
            known: dict[str, Any] = {"ocr": ocr} | ({} if found is None else {"detections": found})
            outcome = settled(known, rules)
            completions = [{**known, "detections": d, **c} for d in (detections if found is None else [found])
                           for c in captions]
            bins = {decide(full, rules).bin for full in completions}
            if outcome is not None:
                assert bins == {outcome.bin}, (known, outcome)
            else:  # open: some value of the missing signals changes the bin (nothing was left out for nothing)
                assert len(bins) > 1, (known, bins)
    assert settled({"ocr": texts[0]}, RuleThresholds(signals="all")) is None
    legacy = RuleThresholds(**{"short_circuit_text": False})
    assert legacy.signals == "all" and "short_circuit_text" not in legacy.model_dump()


def test_the_criteria_measured_again_from_stored_signals_are_those_decide_compared() -> None:
    """The ledger keeps a decision's signals and rule, not its criteria; ``criteria_of`` gives them back, equal to
    what ``decide`` compared, for every rule and every threshold set (signals absent included)."""
    texts = [None, *({"char_count": c, "line_count": n, "text_area_ratio": a}
                     for c in (0, 30, 300) for n in (1, 20) for a in (0.0, 0.05, 0.2))]
    detections = [None, [], [{"label": "dog", "confidence": 0.3, "box": [0, 0, 1, 1]}],
                  [{"label": "dog", "confidence": 0.9, "box": [0, 0, 1, 1]}]]
    captions: list[dict[str, Any]] = [{}, {"caption": "x", "clip_similarity": 0.0}, {"caption": "x", "clip_similarity": 0.5}]
    rules_seen = set()
    for thresholds in [RuleThresholds(), *(RuleThresholds(**changes) for changes in THRESHOLD_SETS.values())]:
        for ocr in texts:
            for found in detections:
                for caption in captions:
                    signals = {**({} if ocr is None else {"ocr": ocr}),
                               **({} if found is None else {"detections": found}), **caption}
                    decision = decide(signals, thresholds)
                    assert criteria_of(signals, decision.rule) == decision.criteria, (signals, decision)
                    rules_seen.add(decision.rule)
    assert rules_seen == {"text_area", "text_chars", "text_lines", "incidental_text", "confident_detection",
                          "caption_agreement", "content_weak", "content_unconfirmed"}


def test_skips_are_counted_per_model_with_the_rule_that_decided() -> None:
    from app.engine.accounting import observe
    from app.store import Outcome, Row

    metrics = Metrics()
    row = Row(id=1, path="/in/a.png", rel_path="a.png", size=1, mtime_ns=1, sha256=None, status="processing",
              attempts=1, bin=None, rule=None, reason=None, decision=None, signals=None, output_path=None,
              last_error=None, timings=None, seen_at=0.0, updated_at=0.0, finished_at=None)
    observe(metrics, row, Outcome(1, "done", bin="A", signals={"not_computed": {"caption": "confident_detection",
                                                                              "clip_similarity": "confident_detection"}}))
    for signal in ("caption", "clip_similarity"):
        value = metrics.registry.get_sample_value("binner_signals_skipped_total",
                                                  {"model": MODEL_OF_SIGNAL[signal], "reason": "confident_detection"})
        assert value == 1.0


# --- rebin knows what is missing --------------------------------------------------------------------------------
@pytest.mark.models
@pytest.mark.system
@pytest.mark.timeout(420)
def test_rebin_lists_computes_and_moves_exactly_the_files_a_raised_threshold_leaves_open(
        tmp_path: Path, everything: dict[str, dict[str, Any]],
        daemon_run: tuple[DaemonProcess, dict[tuple[str, str], float]]) -> None:
    """The daemon computed only what was needed; the detection threshold is then raised past half of the detections
    that decided A. Images whose A rested on a detection below the new threshold now need CLIP, which was never run
    for them: `rebin --dry-run` lists exactly those, plain `rebin` moves only what the stored signals settle and says
    how many it left, and `rebin --infer` computes the missing signals (as computing everything had) and moves
    exactly those files. (Runs after the daemon test: it moves that run's files.)"""
    import yaml

    from tests.daemon_harness import binner

    daemon, _ = daemon_run
    output, state = daemon.output, daemon.state
    first = daemon.config_path
    before = ledger_rows(state)
    confident = sorted(max(d["confidence"] for d in row["signals"]["detections"]) for row in before.values()
                       if row["status"] == "done" and row["rule"] == "confident_detection")
    threshold = round(confident[len(confident) // 2] + 1e-4, 4)  # raised past half of the detections that decided A
    raised_rules = RuleThresholds(a_min_detection_confidence=threshold)
    raised = tmp_path / "raised.yaml"
    raised.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()),
                                      "rules": {"a_min_detection_confidence": threshold}}))
    open_now = {rel for rel, row in before.items() if row["status"] == "done"
                and (row["signals"].get("not_computed") or {}).get("caption") == "confident_detection"
                and max(d["confidence"] for d in row["signals"]["detections"]) < threshold}
    assert open_now, "no image's A rested on a detection below the new threshold: the test would prove nothing"
    settled_moves = {rel for rel, row in before.items() if row["status"] == "done" and rel not in open_now
                     and decide(row["signals"], raised_rules).bin != row["bin"]}

    dry = binner("rebin", "--dry-run", "--config", str(raised), timeout=120)
    assert dry.returncode == 0, dry.stderr
    listed = {line.split("needs the models: ", 1)[1].split(" (", 1)[0] for line in dry.stdout.splitlines()
              if "needs the models: " in line}
    assert {str(Path(before[rel]["output_path"]).relative_to(output)) for rel in open_now} == \
        {str(Path(path).relative_to(output)) for path in listed}
    assert f"{len(open_now)} need models that did not run" in dry.stdout, dry.stdout
    assert "caption not computed: a confident detection decided A" in dry.stdout

    plain = binner("rebin", "--config", str(raised), timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert f"{len(settled_moves)} files moved" in plain.stdout and f"{len(open_now)} need models" in plain.stdout, \
        plain.stdout
    assert {rel for rel, row in ledger_rows(state).items() if row["bin"] != before[rel]["bin"]} == settled_moves

    inferred = binner("rebin", "--infer", "--config", str(raised), timeout=300)
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    assert f"{len(open_now)} decided with the models now" in inferred.stdout, inferred.stdout
    after = ledger_rows(state)
    for rel in open_now:
        signals, truth = after[rel]["signals"], everything[rel]["signals"]
        assert signals["caption"] == truth["caption"], rel
        assert signals["clip_similarity"] == pytest.approx(truth["clip_similarity"], abs=1e-5), rel
        assert "caption" not in (signals.get("not_computed") or {}), rel
    moved = {rel for rel, row in after.items() if row["bin"] != before[rel]["bin"]}
    assert moved == settled_moves | {rel for rel in open_now if decide(everything[rel]["signals"], raised_rules).bin
                                     != before[rel]["bin"]}
    for rel, row in after.items():  # every row's file is where its bin says, and nothing else is in the bins
        if row["status"] == "done":
            assert row["bin"] == decide(everything[rel]["signals"], raised_rules).bin, rel
            assert Path(row["output_path"]).relative_to(output).parts[0] == row["bin"], rel
    on_disk = sorted(str(p) for p in output.rglob("*") if p.is_file())
    assert on_disk == sorted(row["output_path"] for row in after.values() if row["output_path"])
    status = json.loads(binner("status", "--config", str(raised), "--json").stdout)
    assert sum(status["bins"].values()) + sum(status["quarantined"].values()) == len(on_disk)
