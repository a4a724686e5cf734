"""Compute only what the decision needs (``rules.signals: needed``): an image whose text decides C or B skips vision,
one whose confident detection decides A skips BLIP and CLIP, and every bin is the bin ``signals: all`` gives.

Four levels: the real models on the 30 labelled images (real OCR, the real YOLOv8n, tiny BLIP/CLIP) through `once`
(everything computed, then only what is needed) and through the real daemon (only what is needed); the real engine
with the real loader and vision models under three more threshold sets, switched as SIGHUP switches them (OCR
replayed); the engine's routing and the vision stage's own skip with the models' outputs replayed (every threshold
set, each model disabled, process isolation, a reload in flight); and the rules themselves, over exhaustive grids.
The Ray engine on a real cluster is in tests/test_ray_engine.py.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.config import load_config
from app.engine import Hosting, Pipeline
from app.metrics import Metrics
from app.store import Ledger, Row, scan, to_discovered
from stages.base import ImageItem, Stage
from stages.rules import MODEL_OF_SIGNAL, SKIP_REASONS, RuleThresholds, criteria_of, decide, settled, signals_of
from tests.conftest import REPO
from tests.daemon_harness import DaemonProcess, wait_for
from tests.fakes import RecordingStage, ReplayedVision, run_until_idle

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
    skips: Counter[tuple[str, str]] = Counter()
    for row in rows.values():
        for signal, reason in expected_not_computed(decide(row["signals"], rules).rule).items():
            skips[(MODEL_OF_SIGNAL[signal], reason)] += 1
    return skips


def expected_not_computed(rule: str) -> dict[str, str]:
    """What ``needed`` leaves out (all models enabled) for an image that computing everything decides by ``rule``."""
    if rule == "confident_detection":
        return dict.fromkeys(("caption", "clip_similarity"), "confident_detection")
    if rule in SETTLED_EARLY:
        return dict.fromkeys(("detections", "caption", "clip_similarity"), SKIP_REASONS[rule])
    return {}


def assert_needed_like_all(needed: dict[str, dict[str, Any]], everything: dict[str, dict[str, Any]],
                           rules: RuleThresholds) -> None:
    """File by file: the bin and rule that computing everything gives under ``rules``, and exactly the signals the
    rules did not need left out, with why (``needed``: rel -> row as ``ledger_rows`` gives it)."""
    assert needed.keys() == everything.keys()
    for rel, row in needed.items():
        truth = decide(everything[rel]["signals"], rules)
        assert (row["bin"], row["rule"]) == (truth.bin, truth.rule), rel
        left_out = expected_not_computed(truth.rule)
        assert row["signals"].get("not_computed", {}) == left_out, rel
        assert not left_out.keys() & row["signals"].keys(), rel
        computed = {"ocr", "detections", "caption", "clip_similarity"} - left_out.keys()
        assert computed <= row["signals"].keys(), rel


@pytest.mark.models
@pytest.mark.timeout(300)
def test_once_computes_only_what_is_needed_and_bins_like_computing_everything(
        tmp_path: Path, shared_images: Path, tiny_blip_dir: Path, tiny_clip_dir: Path,
        everything: dict[str, dict[str, Any]]) -> None:
    """`binner once` on the local engine with the default ``signals: needed``, file by file against ``all``."""
    from app.once import bin_once

    config = load_config(OFFLINE, {"input": shared_images, "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                   "placement": "copy", "vision": vision_models(tiny_blip_dir, tiny_clip_dir)})
    assert config.rules.signals == "needed"
    summary = bin_once(config, "local", None, show_progress=False)
    assert summary.not_finished == 0
    needed = {rel: row for rel, row in ledger_rows(tmp_path / "state").items() if row["status"] == "done"}
    assert_needed_like_all(needed, everything, RuleThresholds())


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
    assert skipped == expected_skips(everything, RuleThresholds()), "BLIP and CLIP ran only where rules 1-3 left it open"
    assert_needed_like_all(ledger_rows(daemon.state), everything, RuleThresholds())


# --- the real engine under three more threshold sets, switched as SIGHUP switches them -------------------------
@pytest.mark.models
@pytest.mark.timeout(300)
def test_the_real_engine_under_three_more_threshold_sets_bins_like_computing_everything(
        tmp_path: Path, shared_images: Path, tiny_blip_dir: Path, tiny_clip_dir: Path,
        everything: dict[str, dict[str, Any]]) -> None:
    """The local engine with the real loader, the real YOLOv8n and tiny BLIP/CLIP, one pipeline whose thresholds are
    switched (as SIGHUP switches them) before each of three copies of the 30 images is admitted. OCR is replayed
    from the run that computed everything: it is the costly model, and no threshold changes what it reads. Each
    copy is binned as computing everything bins it under the thresholds it was admitted under, and skips exactly
    what those thresholds settled (the vision stage's own skip included)."""
    from app.build import build_stages

    inbox = tmp_path / "in"
    config = load_config(OFFLINE, {"input": shared_images, "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                   "vision": vision_models(tiny_blip_dir, tiny_clip_dir)})
    load, _, vision = build_stages(config)

    def recorded_ocr(item: ImageItem) -> dict[str, Any]:
        rel = Path(item.source).relative_to(inbox.resolve())
        return {"ocr": everything[str(Path(*rel.parts[1:]))]["signals"]["ocr"]}

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    finished: list[int] = []
    ocr = RecordingStage("ocr", batch_size=8, signals=recorded_ocr)
    pipeline = Pipeline(ledger=ledger, metrics=Metrics(), stages=[load, ocr, vision], thresholds=RuleThresholds(),
                        placer=None, queue_capacities={"load": 16, "ocr": 16, "vision": 16, "sink": 16}, max_attempts=2,
                        placement_mode="copy", on_finished=lambda row, outcome: finished.append(row.id))

    async def main() -> None:
        with anyio.fail_after(240):
            await pipeline.setup()
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(pipeline.run, False)
                    for copies, (name, overrides) in enumerate(THRESHOLD_SETS.items(), start=1):
                        pipeline.thresholds = RuleThresholds(**overrides)  # what the daemon's SIGHUP does
                        shutil.copytree(shared_images, inbox / name, ignore=shutil.ignore_patterns("*.csv", "*.md"))
                        seen = scan(inbox / name)
                        await pipeline.ledger_thread.run(ledger.intake, [to_discovered(inbox / name, s) for s in seen])
                        pipeline.wake()
                        while len(finished) < 30 * copies:
                            await anyio.sleep(0.05)  # a poll, bounded by fail_after
                    pipeline.request_stop()
            finally:
                await pipeline.teardown()

    anyio.run(main)
    rows = list(ledger.rows())
    ledger.close()
    assert len(rows) == 30 * len(THRESHOLD_SETS) and {row.status for row in rows} == {"done"}
    for name, overrides in THRESHOLD_SETS.items():
        copy = {row.rel_path: {"bin": row.bin, "rule": row.rule, "signals": row.signals} for row in rows
                if Path(row.path).relative_to(inbox.resolve()).parts[0] == name}
        assert_needed_like_all(copy, everything, RuleThresholds(**overrides))


# --- the engine's routing and the vision stage's own skip, with the models' outputs replayed ---------------------
def build_replay(root: Path, recorded: dict[str, dict[str, Any]], rules: RuleThresholds, vision: Stage | None = None,
                 ocr: bool = True, after: list[Stage] | None = None,
                 hosting: dict[str, Hosting] | None = None) -> tuple[Pipeline, Ledger]:
    """The local engine over one file per ``recorded`` name, its models answering from ``recorded`` (OCR only when
    ``ocr``; ``vision`` by default a ``ReplayedVision`` of every model); ``after``: stages that follow vision."""
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

    stages: list[Stage] = [RecordingStage("load", batch_size=8, signals=name_as_image)]
    if ocr:
        stages.append(RecordingStage("ocr", batch_size=8, signals=lambda item: {"ocr": recorded[by_key[item.key]]["ocr"]}))
    stages.append(vision or ReplayedVision(recorded))
    stages += after or []
    pipeline = Pipeline(ledger=ledger, metrics=Metrics(), stages=stages, thresholds=rules, placer=None,
                        queue_capacities={stage.name: 16 for stage in stages} | {"sink": 16}, max_attempts=2,
                        placement_mode="copy", hosting=hosting)
    return pipeline, ledger


def replay(root: Path, recorded: dict[str, dict[str, Any]], rules: RuleThresholds, vision: Stage | None = None,
           **options: Any) -> dict[str, Row]:
    """``build_replay``, run until idle; the ledger's row of each file."""
    pipeline, ledger = build_replay(root, recorded, rules, vision, **options)
    run_until_idle(pipeline)
    rows = {row.rel_path: row for row in ledger.rows()}
    ledger.close()
    return rows


@pytest.mark.models
@pytest.mark.parametrize("name", ["defaults", *THRESHOLD_SETS])
def test_under_each_threshold_set_needed_bins_like_all_and_skips_exactly_the_settled(
        tmp_path: Path, everything: dict[str, dict[str, Any]], name: str) -> None:
    rules = RuleThresholds(**THRESHOLD_SETS.get(name, {}))
    recorded = {rel: row["signals"] for rel, row in everything.items()}
    expected = {rel: decide(signals, rules) for rel, signals in recorded.items()}
    vision = ReplayedVision(recorded)
    rows = replay(tmp_path, recorded, rules, vision)
    assert {rel: row.bin for rel, row in rows.items()} == {rel: decision.bin for rel, decision in expected.items()}
    open_after_ocr = [rel for rel, d in expected.items() if d.rule not in SETTLED_EARLY - {"confident_detection"}]
    open_after_detection = [rel for rel, d in expected.items() if d.rule not in SETTLED_EARLY]
    assert vision.calls["detector"] == len(open_after_ocr)
    assert vision.calls["captioner"] == vision.calls["clip"] == len(open_after_detection)


@pytest.mark.models
def test_skips_inside_the_vision_stage_come_back_from_its_child_process(
        tmp_path: Path, everything: dict[str, dict[str, Any]]) -> None:
    """Process isolation (the default on CUDA): what the vision stage chose not to compute in its child comes back
    with the signals, as in thread mode, so the decision record, ``explain``, the skip counts and ``rebin`` know."""
    recorded = {rel: row["signals"] for rel, row in everything.items()}
    rules = RuleThresholds()
    in_thread = replay(tmp_path / "thread", recorded, rules)
    in_child = replay(tmp_path / "child", recorded, rules, hosting={"vision": Hosting("process")})
    skipped_in_stage = {rel for rel, row in in_thread.items()
                        if (row.signals or {}).get("not_computed", {}).get("caption") == "confident_detection"}
    assert skipped_in_stage, "no image's caption was skipped inside the vision stage: the test would prove nothing"
    assert {rel: (row.bin, row.rule, row.signals) for rel, row in in_child.items()} == \
        {rel: (row.bin, row.rule, row.signals) for rel, row in in_thread.items()}


def test_a_reload_in_flight_never_decides_on_signals_skipped_under_other_thresholds(tmp_path: Path) -> None:
    """SIGHUP between a file's admission and its decision: the router, the vision stage and the sink all keep the
    thresholds the file was admitted under, so no bin rests on a signal that was skipped under other thresholds (the
    reload is for the files admitted after it; files already placed are ``rebin``'s)."""
    def ocr(chars: int) -> dict[str, Any]:
        return {"text": "x" * chars, "lines": [], "char_count": chars, "line_count": 1 if chars else 0,
                "text_area_ratio": 0.01 if chars else 0.0, "mean_confidence": 0.9}

    def found(confidence: float) -> list[dict[str, Any]]:
        return [{"label": "dog", "confidence": confidence, "box": [0, 0, 1, 1]}]

    recorded = {  # incidental text decides B (vision skipped); a 0.6 detection decides A (caption and CLIP skipped)
        "sign.png": {"ocr": ocr(30), "detections": found(0.9), "caption": "a sign", "clip_similarity": 0.9},
        "dog.png": {"ocr": ocr(0), "detections": found(0.6), "caption": "a dog", "clip_similarity": 0.1},
    }
    admitted = RuleThresholds()
    reloaded = RuleThresholds(a_min_detection_confidence=0.7, a_max_char_count=1000, a_max_text_area_ratio=0.5)
    holder: dict[str, Pipeline] = {}

    def reload(item: ImageItem) -> dict[str, Any]:  # every file passes here after vision, before the sink
        holder["pipeline"].thresholds = reloaded
        return {}

    after = RecordingStage("after", batch_size=8, signals=reload)
    pipeline, ledger = build_replay(tmp_path, recorded, admitted, after=[after])
    holder["pipeline"] = pipeline
    run_until_idle(pipeline)
    rows = {row.rel_path: row for row in ledger.rows()}
    ledger.close()
    assert pipeline.thresholds is reloaded and len(after.log.processed()) == 2
    assert (rows["sign.png"].bin, rows["sign.png"].rule) == ("B", "incidental_text")  # not "no content model enabled"
    assert (rows["dog.png"].bin, rows["dog.png"].rule) == ("A", "confident_detection")  # not content_weak without CLIP
    for rel, row in rows.items():  # as computing everything under the thresholds it was admitted under
        assert (row.bin, row.rule) == (decide(recorded[rel], admitted).bin, decide(recorded[rel], admitted).rule), rel


# Configurations with a model disabled: (models on, and which of OCR and the vision models those are).
DISABLED = {"no_ocr": {"detector", "captioner", "clip"}, "no_detector": {"ocr", "captioner", "clip"},
            "no_clip": {"ocr", "detector", "captioner"}, "detector_only": {"ocr", "detector"}}


@pytest.mark.models
@pytest.mark.parametrize("name", list(DISABLED))
def test_with_a_model_disabled_needed_bins_like_all_and_never_counts_its_signal_as_skipped(
        tmp_path: Path, everything: dict[str, dict[str, Any]], name: str) -> None:
    """A disabled model's signal never comes: the rules pass its criteria as ``decide`` does (so an image is settled as
    soon as nothing an enabled model still writes could change it), and it is never recorded as not computed (so
    ``rebin`` never waits for a model that cannot run)."""
    models = DISABLED[name]
    produced = signals_of(models)
    recorded = {rel: {key: value for key, value in row["signals"].items() if key in produced}
                for rel, row in everything.items()}  # what `all` computes with these models
    rules = RuleThresholds()
    truth = {rel: decide(signals, rules) for rel, signals in recorded.items()}
    vision = ReplayedVision(recorded, *(model in models for model in ("detector", "captioner", "clip")))
    assert vision.produces == produced - {"ocr"}
    rows = replay(tmp_path, recorded, rules, vision, ocr="ocr" in models)
    assert {rel: (row.bin, row.rule) for rel, row in rows.items()} == {rel: (d.bin, d.rule) for rel, d in truth.items()}
    for rel, row in rows.items():
        left_out = (row.signals or {}).get("not_computed", {})
        assert left_out.keys() <= produced, (rel, left_out)
        assert produced - left_out.keys() <= (row.signals or {}).keys(), rel  # whatever was not left out is there
    by_detection = sum(d.rule == "confident_detection" for d in truth.values())
    by_text = sum(d.rule in SETTLED_EARLY - {"confident_detection"} for d in truth.values())
    if name == "no_ocr":  # a confident detection settles A without OCR: BLIP and CLIP skip those images
        assert by_detection and vision.calls["captioner"] == vision.calls["clip"] == len(rows) - by_detection
    if name == "no_detector":  # text-settled images skip vision, and only BLIP and CLIP are said to be skipped
        assert by_text and vision.calls["captioner"] == vision.calls["clip"] == len(rows) - by_text
    if name == "no_clip":  # without CLIP no rule reads a caption: BLIP never runs
        assert vision.calls["captioner"] == 0 and vision.calls["detector"] == len(rows) - by_text


def test_the_configuration_and_the_built_stages_agree_on_what_the_enabled_models_write(tmp_path: Path) -> None:
    """``rebin`` reads from the configuration what the engine's stages declare: the two never differ."""
    from app.build import build_stages

    for ocr_on, detector, captioner, clip in product((True, False), repeat=4):
        if (clip and not captioner) or not (detector or captioner or clip):
            continue
        config = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                    "ocr": {"enabled": ocr_on, "devices": ["cpu"]},
                                    "vision": {"devices": ["cpu"], "detector": {"enabled": detector},
                                               "captioner": {"enabled": captioner}, "clip": {"enabled": clip}}})
        built = frozenset().union(*(stage.produces for stage in build_stages(config)))
        assert built == config.produced_signals, (ocr_on, detector, captioner, clip)
    synthetic = load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out", "state_dir": tmp_path / "state",
                                   "ocr": {"backend": "synthetic", "devices": ["cpu"]},
                                   "vision": {"backend": "synthetic", "devices": ["cpu"]}})
    assert frozenset().union(*(stage.produces for stage in build_stages(synthetic))) == synthetic.produced_signals


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
# Every set of enabled models the configuration allows (CLIP needs the captioner), and the order the stages write.
MODELS = ("ocr", "detector", "captioner", "clip")
ENABLED_SETS = [frozenset(model for model, on in zip(MODELS, bits) if on) for bits in product((True, False), repeat=4)
                if not (bits[3] and not bits[2])]
STEPS = (("ocr",), ("detections",), ("caption", "clip_similarity"))


def assignments(keys: list[str], values: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of the grid's values for ``keys``."""
    for combination in product(*(values[key] for key in keys)):
        yield dict(zip(keys, combination))


def test_settled_equals_decide_whatever_the_signals_still_coming_say() -> None:
    """Exhaustively over small signal grids, for every set of enabled models and every point of the computation:
    when ``settled`` names a decision, every value of the signals the enabled models still write gives that bin and
    rule (and it is what ``decide`` makes of the signals at hand, as the sink records it); when it names none, some
    value of them changes the bin. A disabled model's signal is never waited for."""
    rules = RuleThresholds()
    dog = [[{"label": "dog", "confidence": c, "box": [0, 0, 1, 1]}] for c in (0.3, 0.9)]
    values: dict[str, list[Any]] = {
        "ocr": [{"char_count": c, "line_count": 1, "text_area_ratio": a} for c in (0, 30, 300) for a in (0.0, 0.05, 0.2)],
        "detections": [[], *dog], "caption": ["x"], "clip_similarity": [0.0, 0.5]}
    outcomes: Counter[str] = Counter()
    for enabled in ENABLED_SETS:
        produced = signals_of(enabled)
        steps = [step for step in ([key for key in step if key in produced] for step in STEPS) if step]
        for done in range(len(steps) + 1):
            known_keys = [key for step in steps[:done] for key in step]
            coming_keys = [key for step in steps[done:] for key in step]
            for known in assignments(known_keys, values):
                outcome = settled(known, rules, frozenset(coming_keys))
                decisions = {(d.bin, d.rule) for d in (decide({**known, **rest}, rules)
                                                        for rest in assignments(coming_keys, values))}
                if outcome is not None:
                    assert decisions == {(outcome.bin, outcome.rule)}, (enabled, known, outcome, decisions)
                    assert decide(known, rules).rule == outcome.rule, (enabled, known)
                    outcomes["settled"] += 1
                else:  # open: some value of the signals still coming changes the bin (nothing left out for nothing)
                    assert len({bin_ for bin_, _ in decisions}) > 1, (enabled, known, decisions)
                    outcomes["open"] += 1
    assert outcomes["settled"] > 100 and outcomes["open"] > 10, outcomes
    little_text = {"char_count": 0, "line_count": 0, "text_area_ratio": 0.0}
    # OCR disabled: a confident detection settles A although "ocr" never comes.
    assert settled({"detections": dog[1]}, rules, frozenset({"caption", "clip_similarity"})).rule == "confident_detection"
    # The captioner without CLIP: no rule reads a caption, so a weak detection settles B before BLIP runs.
    assert settled({"ocr": little_text, "detections": dog[0]}, rules, frozenset({"caption"})).rule == "content_weak"
    assert settled({"ocr": little_text}, RuleThresholds(signals="all"), frozenset()) is None
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
LITTLE_TEXT = {"text": "", "lines": [], "char_count": 0, "line_count": 0, "text_area_ratio": 0.0, "mean_confidence": 0.0}


def dog(confidence: float) -> list[dict[str, Any]]:
    return [{"label": "dog", "confidence": confidence, "box": [0, 0, 1, 1]}]


def test_rebin_waits_only_for_signals_an_enabled_model_can_compute(tmp_path: Path) -> None:
    """A signal that was not computed keeps a file open under new thresholds only while an enabled model can compute
    it (and only those are listed); one whose model is disabled now never comes, and the file is decided as the
    engine would decide it, never listed as needing a model `rebin --infer` cannot run."""
    from app.store import Discovered, Outcome, rebin_all

    skipped = ("detections", "caption", "clip_similarity")
    stored = {  # a 0.6 detection decided A (BLIP and CLIP skipped); incidental text decided B (vision skipped)
        "dog.png": ("A", "confident_detection", {"ocr": LITTLE_TEXT, "detections": dog(0.6), "not_computed": dict.fromkeys(
            skipped[1:], "confident_detection")}),
        "sign.png": ("B", "incidental_text", {"ocr": {**LITTLE_TEXT, "char_count": 30}, "not_computed": dict.fromkeys(
            skipped, "incidental_text")}),
    }
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(Discovered(str(tmp_path / "in" / name), name, 1, 1) for name in stored)
    ledger.record([Outcome(row.id, "done", bin=stored[row.rel_path][0], rule=stored[row.rel_path][1],
                           signals=stored[row.rel_path][2], output_path=str(tmp_path / "out" / row.rel_path))
                   for row in ledger.claim_pending(10)])

    def rebin_under(models: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
        """A dry run with ``models`` enabled and raised thresholds: what waits for which models, and what moves."""
        vision = {"devices": ["cpu"], **{model: {"enabled": model in models} for model in ("detector", "captioner",
                                                                                          "clip")}}
        config = load_config(None, {"input": tmp_path / "in", "create_input": True, "output": tmp_path / "out",
                                    "state_dir": tmp_path / "state", "ocr": {"enabled": "ocr" in models},
                                    "vision": vision,
                                    "rules": {"a_min_detection_confidence": 0.7, "a_max_char_count": 1000}})
        waiting: dict[str, set[str]] = {}
        moves: dict[str, str] = {}
        rebin_all(config, ledger, dry_run=True, on_move=lambda move: moves.update({Path(move.path).name: move.rule}),
                  on_needs_models=lambda row, missing: waiting.update({row.rel_path: set(missing)}))
        return waiting, moves

    assert rebin_under(set(MODELS)) == ({"dog.png": set(skipped[1:]), "sign.png": set(skipped)}, {})
    # CLIP disabled now: no rule reads a caption, so the 0.6 detection decides B as the engine would.
    assert rebin_under({"ocr", "detector", "captioner"}) == ({"sign.png": {"detections", "caption"}},
                                                             {"dog.png": "content_weak"})
    # The detector alone (offline-cpu.yaml), and no vision model at all.
    assert rebin_under({"ocr", "detector"}) == ({"sign.png": {"detections"}}, {"dog.png": "content_weak"})
    assert rebin_under({"ocr"}) == ({}, {"dog.png": "content_weak"})  # sign.png stays B: content_unconfirmed
    ledger.close()


def test_the_vision_stage_computes_only_the_signals_an_item_lacks() -> None:
    """`rebin --infer` hands the vision stage items that carry their stored detections: they are not detected again,
    and whether a caption is needed is judged on the stored detections, the ones the decision reads."""
    fresh = {"strong.png": dog(0.3), "weak.png": dog(0.9), "new.png": dog(0.9)}  # what detecting again would say
    recorded = {name: {"detections": found, "caption": f"a {name}", "clip_similarity": 0.5}
                for name, found in fresh.items()}
    vision = ReplayedVision(recorded)
    vision.setup("cpu")
    rules = RuleThresholds()
    stored = {"strong.png": dog(0.6), "weak.png": dog(0.2)}
    items = [ImageItem(key=index, source=name, image=name, rules=rules,
                       signals={"ocr": LITTLE_TEXT, **({"detections": stored[name]} if name in stored else {})})
             for index, name in enumerate(fresh)]
    vision.process_batch(items)
    strong, weak, new = items
    assert vision.calls["detector"] == 1 and new.signals["detections"] == dog(0.9)
    assert strong.signals["detections"] == dog(0.6) and weak.signals["detections"] == dog(0.2)
    assert "caption" not in strong.signals and strong.not_computed["caption"] == "confident_detection"
    assert weak.signals["caption"] == "a weak.png" and weak.signals["clip_similarity"] == 0.5
    assert vision.calls["captioner"] == vision.calls["clip"] == 1


def test_rebin_infer_runs_every_configured_device_with_the_engine_s_hosting_and_batch_caps(tmp_path: Path) -> None:
    """`rebin --infer` runs the stages as the engine does: a replica per configured device, hosted as configured (here
    child processes), each with its configured batch cap, and files flow through only the stages they need."""
    from app import bench
    from app.infer import MissingSignals

    config = load_config(None, {
        "input": tmp_path / "in", "create_input": True, "output": tmp_path / "out", "state_dir": tmp_path / "state",
        "ocr": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 4, "synthetic_ms": [0, 0]},
        "vision": {"backend": "synthetic", "devices": ["cpu", "cpu"], "batch_size": 3, "synthetic_ms": [0, 0],
                   "isolation": "process"}})
    bench.make_images(tmp_path / "out" / "B", 10, size=24)
    placed = sorted((tmp_path / "out" / "B").glob("*.png"))
    rows = [Row(id=index, path=str(path), rel_path=path.name, size=1, mtime_ns=1, sha256=None, status="done",
                attempts=1, bin="B", rule="incidental_text", reason=None, decision=None, output_path=str(path),
                signals={"ocr": LITTLE_TEXT, "not_computed": {"detections": "incidental_text"}}, last_error=None,
                timings=None, seen_at=0.0, updated_at=0.0, finished_at=None) for index, path in enumerate(placed, 1)]
    models = MissingSignals(config)
    try:
        vision = models.runners[2]
        assert [(type(replica.host).__name__, replica.batch_cap) for replica in vision.replicas] == \
            [("ProcessHost", 3)] * 2
        assert models.rows_per_call >= 256
        done = models(rows)
    finally:
        models.close()
    assert [row.id for row, _ in done] == [row.id for row in rows]
    for _row, signals in done:
        assert signals["detections"] == [] and signals["ocr"] == LITTLE_TEXT and "not_computed" not in signals
    sizes = models.metrics.registry.get_sample_value("binner_stage_batch_size_sum", {"stage": "vision"})
    batches = models.metrics.registry.get_sample_value("binner_stage_batch_size_count", {"stage": "vision"})
    assert sizes == len(rows) and batches >= len(rows) / 3
    assert not models.metrics.registry.get_sample_value("binner_stage_batch_size_count", {"stage": "ocr"}), \
        "OCR ran again for a missing detection"


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


@pytest.mark.timeout(60)
def test_rebin_infer_stops_with_an_error_when_a_model_stage_dies(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage whose runner dies (not a failing item, which containment handles: the runner itself) must end the
    call with an error and let `close` return; before, the items handed to it waited for ever, and so did rebin."""
    from app import bench
    from app.engine import StageRunner
    from app.infer import MissingSignals

    real_run = StageRunner.run

    async def dies_on_vision(runner: StageRunner) -> None:
        if runner.stage.name == "vision":
            raise RuntimeError("the vision host went away")
        await real_run(runner)

    monkeypatch.setattr(StageRunner, "run", dies_on_vision)
    config = load_config(None, {
        "input": tmp_path / "in", "create_input": True, "output": tmp_path / "out", "state_dir": tmp_path / "state",
        "drain_timeout_s": 5, "ocr": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [0, 0]},
        "vision": {"backend": "synthetic", "devices": ["cpu"], "batch_size": 2, "synthetic_ms": [0, 0]}})
    bench.make_images(tmp_path / "out" / "B", 40, size=24)  # more than the vision queue holds
    rows = [Row(id=index, path=str(path), rel_path=path.name, size=1, mtime_ns=1, sha256=None, status="done",
                attempts=1, bin="B", rule="incidental_text", reason=None, decision=None, output_path=str(path),
                signals={"ocr": LITTLE_TEXT, "not_computed": {"detections": "incidental_text"}}, last_error=None,
                timings=None, seen_at=0.0, updated_at=0.0, finished_at=None)
            for index, path in enumerate(sorted((tmp_path / "out" / "B").glob("*.png")), 1)]
    models = MissingSignals(config)
    try:
        with pytest.raises(RuntimeError, match="a model stage stopped: the vision host went away"):
            models(rows)
    finally:
        models.close()
