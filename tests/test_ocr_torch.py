"""The torch OCR runtime (PP-OCRv4 converted from the rapidocr wheel) against the onnxruntime one, its batching
across images, and its out-of-memory path through the real engine. CPU only: the same code runs on CUDA."""

from __future__ import annotations

import csv
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.base import BatchPolicy, ImageItem, OutOfDeviceMemory, is_out_of_memory
from stages.ocr import OcrOptions, OcrStage, TorchOcrBackend, resolve_runtime
from stages.ppocr_torch import (
    DET_SIDE_BUCKETS,
    REC_WIDTH_BUCKETS,
    REC_WIDTH_STEP,
    PpOcrTorch,
    bucket,
    count_shapes,
    crop_line,
    ctc_greedy_decode,
    det_resize,
    padded_count,
    prepare_image,
    rec_target_width,
)
from stages.rules import RuleThresholds, decide
from tests.conftest_models import IMAGES, require_shared

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")]

MAX_SIDE = OcrOptions().max_side


def labelled() -> list[tuple[str, str]]:
    require_shared(IMAGES)
    with (IMAGES / "labels.csv").open(newline="") as handle:
        return [(row["file"], row["expected_bin"]) for row in csv.DictReader(handle)]


def load(relative: str) -> Image.Image:
    with Image.open(IMAGES / relative) as image:
        return image.convert("RGB")


def make_stage(runtime: str) -> OcrStage:
    stage = OcrStage(OcrOptions(runtime=runtime), devices=["cpu"], batch_policy=BatchPolicy(max_batch_size=32))
    stage.setup("cpu")
    return stage


def run(stage: OcrStage, images: list[Image.Image]) -> list[dict[str, Any]]:
    items = [ImageItem(key=i, source=f"img{i}", image=image) for i, image in enumerate(images)]
    stage.process_batch(items)
    return [item.signals["ocr"] for item in items]


def det_calls(runtime: PpOcrTorch) -> list[int]:
    """Batch size of every detection forward pass from now on (a forward hook on the det module)."""
    calls: list[int] = []
    runtime.det.register_forward_hook(lambda _module, args, _output: calls.append(int(args[0].shape[0])))
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """torch's CPU thread pool spins; on a shared 2-core box one thread is several times faster and steadier."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_stage() -> Iterator[OcrStage]:
    stage = make_stage("torch")
    assert isinstance(stage.backend, TorchOcrBackend)
    yield stage
    stage.teardown()


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: load(name) for name, _ in labelled()}


@pytest.fixture(scope="module")
def sixteen_names(images: dict[str, Image.Image]) -> list[str]:
    """16 of the labelled images: portrait, landscape, small and large, so several detection buckets."""
    names = sorted(images)
    chosen = names[::2] + [names[1]]
    assert len(chosen) == 16
    return chosen


@pytest.fixture(scope="module")
def both_runtimes(torch_stage: OcrStage, images: dict[str, Image.Image],
                  sixteen_names: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[int]]:
    """signals["ocr"] of every labelled image from the onnxruntime and the torch runtime, and the batch size of
    every detection pass while the torch runtime ran the 16 mixed images as one batch."""
    names = sorted(images)
    onnx_stage = make_stage("onnxruntime")
    try:
        onnx = dict(zip(names, [s for start in range(0, len(names), 8) for s in
                                run(onnx_stage, [images[n] for n in names[start : start + 8]])]))
    finally:
        onnx_stage.teardown()
    assert isinstance(torch_stage.backend, TorchOcrBackend)
    calls = det_calls(torch_stage.backend.runtime)
    torch_signals = dict(zip(sixteen_names, run(torch_stage, [images[n] for n in sixteen_names])))
    sixteen_calls = list(calls)
    rest = [name for name in names if name not in torch_signals]
    torch_signals.update(zip(rest, run(torch_stage, [images[n] for n in rest])))
    return onnx, torch_signals, sixteen_calls


def test_torch_and_onnxruntime_read_the_same_lines_and_bin_the_same(
        both_runtimes: tuple[dict[str, Any], dict[str, Any], list[int]]) -> None:
    onnx, torch_signals, _calls = both_runtimes
    labels = dict(labelled())
    same = total = 0
    for name in onnx:
        a = Counter(line["text"] for line in onnx[name]["lines"])
        b = Counter(line["text"] for line in torch_signals[name]["lines"])
        same += sum((a & b).values())
        total += max(sum(a.values()), sum(b.values()))
    assert total >= 100, "the labelled set should give plenty of text lines"
    assert same / total >= 0.98, f"only {same}/{total} lines identical between the runtimes"
    thresholds = RuleThresholds()
    bins_onnx = {name: decide({"ocr": onnx[name]}, thresholds).bin for name in onnx}
    bins_torch = {name: decide({"ocr": torch_signals[name]}, thresholds).bin for name in onnx}
    assert bins_torch == bins_onnx
    accuracy = [sum(bins[name] == labels[name] for name in bins) / len(bins) for bins in (bins_onnx, bins_torch)]
    assert accuracy[0] == accuracy[1]
    for name in onnx:  # the text measures the rules read agree closely too
        assert torch_signals[name]["text_area_ratio"] == pytest.approx(onnx[name]["text_area_ratio"], abs=0.01), name


def test_one_detection_forward_per_size_bucket(both_runtimes: tuple[dict[str, Any], dict[str, Any], list[int]],
                                               images: dict[str, Image.Image], sixteen_names: list[str]) -> None:
    calls = both_runtimes[2]
    buckets: Counter[tuple[int, int]] = Counter()
    for name in sixteen_names:
        image = images[name]
        scale = min(1.0, MAX_SIDE / max(image.size))
        if scale < 1:  # what the stage hands to the runtime
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        resized = det_resize(prepare_image(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))[0])
        assert resized is not None
        buckets[(bucket(resized.shape[0], DET_SIDE_BUCKETS, 512), bucket(resized.shape[1], DET_SIDE_BUCKETS, 512))] += 1
    assert 2 <= len(buckets) < 16, buckets
    assert len(calls) == len(buckets), f"{len(calls)} detection passes for {len(buckets)} buckets"
    assert sorted(calls) == sorted(buckets.values())


def test_batched_results_equal_one_image_at_a_time(both_runtimes: tuple[dict[str, Any], dict[str, Any], list[int]],
                                                   images: dict[str, Image.Image], sixteen_names: list[str],
                                                   torch_stage: OcrStage) -> None:
    batched = [both_runtimes[1][name] for name in sixteen_names]
    assert sum(s["line_count"] for s in batched) >= 20
    for name, together in zip(sixteen_names, batched):
        alone = run(torch_stage, [images[name]])[0]
        assert [line["text"] for line in alone["lines"]] == [line["text"] for line in together["lines"]], name
        for a, b in zip(alone["lines"], together["lines"]):
            assert a["box"] == b["box"], name
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4), name


def test_ctc_decoding_drops_repeats_and_blanks_per_row() -> None:
    characters = ["blank", "a", "b", " "]
    indices = np.array([[1, 1, 0, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0]])
    probs = np.array([[0.9, 0.8, 0.5, 0.7, 0.6, 0.1, 0.5], [0.9] * 7])
    (text, score), (empty, zero) = ctc_greedy_decode(indices, probs, characters)
    assert text == "aab " and score == pytest.approx((0.9 + 0.7 + 0.6 + 0.5) / 4)
    assert empty == "" and zero == 0.0


def test_runtime_choice() -> None:
    assert resolve_runtime("auto", "cpu") == "onnxruntime"
    assert resolve_runtime("auto", "cuda:1") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="ocr.runtime"):
        OcrStage(OcrOptions(runtime="tensorrt"), ["cpu"], BatchPolicy())


def test_out_of_memory_messages_are_recognised() -> None:
    wrapped = RuntimeError("ONNXRuntimeError: ... Failed to allocate memory for requested buffer of size 123")
    assert is_out_of_memory(wrapped)
    try:
        try:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")
        except RuntimeError as inner:
            raise ValueError("RapidOCR failed") from inner
    except ValueError as outer:
        assert is_out_of_memory(outer)
    assert not is_out_of_memory(ValueError("bad input shape"))
    # what tensor.pin_memory() raises when cudaHostAlloc fails: an OOM (the batch cap halves), not a bad item
    pinned = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other "
                          "API call, so the stacktrace below might be incorrect.")
    assert is_out_of_memory(pinned)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def text_card(index: int) -> Image.Image:
    """A 640x480 card with a few printed lines: every card lands in the same detection bucket."""
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    for row in range(4):
        draw.text((20, 40 + row * 100), f"card {index} line {row} binner", fill="black", font_size=36)
    return image


class FakeDeviceLimitOcr(OcrStage):
    """The real torch OCR stage on a pretend device that holds at most ``limit`` images per detection pass."""

    limit = 2
    replicas: list[FakeDeviceLimitOcr] = []

    def setup(self, device: str) -> None:
        super().setup(device)
        FakeDeviceLimitOcr.replicas.append(self)
        assert isinstance(self.backend, TorchOcrBackend)
        det = self.backend.runtime.det
        forward = det.forward
        self.attempts: list[int] = []
        self.lock = threading.Lock()

        def limited(x: Any) -> Any:
            with self.lock:
                self.attempts.append(int(x.shape[0]))
            if x.shape[0] > self.limit:
                import torch

                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake limit: {x.shape[0]} > {self.limit} images)")
            return forward(x)

        det.forward = limited


def ocr_attempts(stage: OcrStage) -> list[int]:
    return [size for replica in FakeDeviceLimitOcr.replicas for size in replica.attempts]


def test_out_of_memory_converges_to_a_batch_that_fits_without_losing_items(tmp_path: Path) -> None:
    from app.engine import Pipeline
    from app.metrics import Metrics
    from app.store import Ledger, scan, to_discovered
    from stages.loader import LoaderOptions, LoaderStage

    inbox = tmp_path / "in"
    inbox.mkdir()
    count = 10
    for index in range(count):
        text_card(index).save(inbox / f"card{index:02d}.png")
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
    loader = LoaderStage(LoaderOptions(max_file_bytes=10**7, max_pixels=10**7, max_side=1600), ["cpu"],
                         BatchPolicy(16, 5.0))
    ocr = FakeDeviceLimitOcr(OcrOptions(runtime="torch"), ["cpu"], BatchPolicy(max_batch_size=8, max_wait_ms=200))
    metrics = Metrics()
    pipeline = Pipeline(ledger=ledger, metrics=metrics, stages=[loader, ocr], thresholds=RuleThresholds(), placer=None,
                        queue_capacities={"load": 16, "ocr": 16, "sink": 16}, max_attempts=2, feeder_page_size=16,
                        placement_mode="copy")

    async def main() -> None:
        with anyio.fail_after(300):
            await pipeline.setup()
            await pipeline.run(until_idle=True)
            await pipeline.teardown()

    anyio.run(main)
    rows = list(ledger.rows())
    assert len(rows) == count
    assert {row.status for row in rows} == {"done"}, [(row.status, row.reason, row.last_error) for row in rows]
    assert metrics.registry.get_sample_value("binner_oom_total", {"stage": "ocr", "device": "cpu"}) >= 1
    limit = metrics.registry.get_sample_value("binner_batch_size_limit", {"stage": "ocr", "device": "cpu"})
    assert limit is not None and limit <= FakeDeviceLimitOcr.limit
    for row in rows:  # every card was read, by a batch that fitted
        assert row.signals is not None and "card" in row.signals["ocr"]["text"], row.rel_path
    assert any(size > FakeDeviceLimitOcr.limit for size in ocr_attempts(ocr)), "the fake limit was never hit"


def test_oom_inside_the_torch_backend_is_reported_as_out_of_device_memory(torch_stage: OcrStage) -> None:
    assert isinstance(torch_stage.backend, TorchOcrBackend)
    runtime = torch_stage.backend.runtime
    original = runtime.det_maps

    def exhausted(_resized: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runtime.det_maps = exhausted
    try:
        with pytest.raises(OutOfDeviceMemory, match="cpu"):
            torch_stage.backend.recognize([text_card(0), text_card(1)])
    finally:
        runtime.det_maps = original


def test_configuration_reaches_the_stage() -> None:
    from app.build import build_stages
    from app.config import load_config

    config = load_config(overrides={"ocr": {"runtime": "torch", "precision": {"rec": "fp32"}, "devices": ["cpu"]},
                                    "vision": {"backend": "synthetic", "devices": ["cpu"]}})
    ocr = next(stage for stage in build_stages(config, gpu_count=0) if stage.name == "ocr")
    options = getattr(ocr, "options", None) or ocr.inner.options  # thread mode, or the process-isolation driver
    assert options.runtime == "torch"
    assert (options.precision.det, options.precision.rec) == ("auto", "fp32")


def test_host_threads_give_the_same_lines(both_runtimes: tuple[dict[str, Any], dict[str, Any], list[int]],
                                          images: dict[str, Image.Image], torch_stage: OcrStage) -> None:
    """On CUDA the host work (resizes, DB post-processing, crops) runs on a thread pool; same answers."""
    assert isinstance(torch_stage.backend, TorchOcrBackend)
    runtime = torch_stage.backend.runtime
    names = [name for name in sorted(images) if name.startswith("text/")][:4]
    runtime.host_threads = 3
    try:
        threaded = run(torch_stage, [images[name] for name in names])
    finally:
        runtime.shutdown()
        runtime.host_threads = 1
    assert runtime._pool is None
    for name, got in zip(names, threaded):
        assert got["lines"] == both_runtimes[1][name]["lines"], name


def test_count_ladder_and_its_bound() -> None:
    assert [padded_count(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 65)] == [1, 2, 4, 8, 8, 16, 16, 32, 48, 64, 80]
    assert padded_count(5, cap=6) == 6 and padded_count(3, cap=6) == 4  # a capped pass never grows past its cap
    assert count_shapes(64) == [1, 2, 4, 8, 16, 32, 48, 64]  # a detection bucket, batches of up to 64 images
    assert count_shapes(128, cap=128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]  # a CUDA cls/rec pass
    assert count_shapes(6, cap=6) == [1, 2, 4, 6]  # the CPU crop batch


# Differently composed batches of real images, few of them (detection costs about a second per image on one CPU
# thread): three images in one detection bucket (padded to four), one of them with an image of another bucket, and
# a page of 19 lines alone. Then the narrow text lines they read, cut out of the images again, in crop batches of
# changing sizes (what the networks after detection get, without paying for more detections).
LADDER_BATCHES = [["text/rapidocr_devanagari.jpg", "mixed/paddleocr_ger_1.jpg", "mixed/paddleocr_00207393.jpg"],
                  ["mixed/paddleocr_00207393.jpg", "text/paddleocr_11.jpg"], ["text/paddleocr_00056221.jpg"]]
CROP_BATCHES = (3, 5, 6, 7, 9)
LADDER_CROP_BATCH = 8  # crops per cls/rec pass: CUDA's 128 in small, so that the crop counts climb the ladder
NETS = ("det", "cls", "rec")
# A pass's size changes the BLAS kernels' rounding (about 1e-6 on rec's probabilities; a line's score, a mean over
# its characters, moved by up to 6e-5 here). What blank inputs would leak is orders of magnitude more.
SCORES = 5e-4


@dataclass
class LadderRun:
    """One run of the ladder batches: what the stage read and what the networks were given."""

    signals: list[list[dict[str, Any]]]  # per batch of LADDER_BATCHES, per image
    readings: list[list[tuple[str, float]]]  # per crop batch, per crop
    shapes: list[tuple[str, tuple[int, ...]]]  # (network, input shape) of every forward pass


def narrow_crops(signals: list[list[dict[str, Any]]], images: dict[str, Image.Image]) -> list[np.ndarray]:
    """The lines read in ``LADDER_BATCHES`` that fit rec's narrowest width bucket, cut out of their images (none of
    these images is downscaled or letterboxed, so the boxes are in the pixels detection saw)."""
    crops = []
    for names, batch in zip(LADDER_BATCHES, signals):
        for name, signal in zip(names, batch):
            bgr = np.ascontiguousarray(np.asarray(images[name])[:, :, ::-1])
            for line in signal["lines"]:
                crop = crop_line(bgr, np.array(line["box"], dtype=np.float32))
                if bucket(rec_target_width(crop), REC_WIDTH_BUCKETS, REC_WIDTH_STEP) == REC_WIDTH_BUCKETS[0]:
                    crops.append(crop)
    return crops


@pytest.fixture(scope="module")
def ladder_runs(torch_stage: OcrStage, images: dict[str, Image.Image]) -> dict[bool, LadderRun]:
    """``LADDER_BATCHES`` and ``CROP_BATCHES`` through the torch runtime without and with ``pad_counts``. The padded
    run overlaps the stage's phases as the engine does: each batch is prepared on other threads while the device
    phase runs the batches before it."""
    from concurrent.futures import ThreadPoolExecutor

    assert isinstance(torch_stage.backend, TorchOcrBackend)
    runtime = torch_stage.backend.runtime
    runs: dict[bool, LadderRun] = {}
    crops: list[np.ndarray] = []
    crop_batches = runtime.cls_batch, runtime.rec_batch
    for pad in (False, True):
        result = LadderRun([], [], [])
        hooks = [getattr(runtime, net).register_forward_pre_hook(
            lambda _module, args, net=net, shapes=result.shapes: shapes.append((net, tuple(args[0].shape))))
            for net in NETS]
        runtime.pad_counts = pad
        runtime.cls_batch = runtime.rec_batch = LADDER_CROP_BATCH
        try:
            batches = [[ImageItem(key=i, source=name, image=images[name]) for i, name in enumerate(names)]
                       for names in LADDER_BATCHES]
            if pad:
                with ThreadPoolExecutor(2) as host:
                    prepared = [host.submit(torch_stage.prepare, items) for items in batches]
                    finished = [host.submit(torch_stage.finish, items, torch_stage.forward(batch.result()))
                                for items, batch in zip(batches, prepared)]
                    done = [future.result() for future in finished]
            else:
                done = [torch_stage.process_batch(items) for items in batches]
            result.signals = [[item.signals["ocr"] for item in items] for items in done]
            crops = crops or narrow_crops(result.signals, images)
            start = 0
            for size in CROP_BATCHES:
                chosen = [crops[(start + i) % len(crops)] for i in range(size)]
                result.readings.append(runtime.read(runtime.classify(chosen)))
                start += size
        finally:
            runtime.pad_counts = False
            runtime.cls_batch, runtime.rec_batch = crop_batches
            for hook in hooks:
                hook.remove()
        runs[pad] = result
    return runs


def test_padded_counts_read_exactly_the_same_lines(ladder_runs: dict[bool, LadderRun]) -> None:
    """Blank images and crops pad the passes; none of their outputs reaches a real image's lines."""
    plain, padded = ladder_runs[False], ladder_runs[True]
    assert OcrStage(OcrOptions(), ["cpu"], BatchPolicy()).has_host_phases  # so the engine overlaps the phases
    for net in NETS:  # the padded run did pad: more inputs went through every network
        assert sum(s[0] for n, s in padded.shapes if n == net) > sum(s[0] for n, s in plain.shapes if n == net), net
    lines = 0
    for names, batch_plain, batch_padded in zip(LADDER_BATCHES, plain.signals, padded.signals):
        for name, a, b in zip(names, batch_plain, batch_padded):
            assert [line["text"] for line in a["lines"]] == [line["text"] for line in b["lines"]], name
            for line_a, line_b in zip(a["lines"], b["lines"]):
                assert np.allclose(line_a["box"], line_b["box"], atol=1e-3), name
                assert line_a["confidence"] == pytest.approx(line_b["confidence"], abs=SCORES), name
            assert a["text_area_ratio"] == pytest.approx(b["text_area_ratio"], abs=1e-6), name
            lines += a["line_count"]
    assert lines >= 20, "the batches should read enough lines to compare"
    assert [len(crops) for crops in padded.readings] == list(CROP_BATCHES)
    for crops_plain, crops_padded in zip(plain.readings, padded.readings):
        assert [text for text, _ in crops_plain] == [text for text, _ in crops_padded]
        assert np.allclose([score for _, score in crops_plain], [score for _, score in crops_padded], atol=SCORES)


def test_padded_shapes_stay_within_the_ladder_times_buckets_bound(ladder_runs: dict[bool, LadderRun]) -> None:
    """However the batches are composed, a network sees at most the ladder's counts at each input size."""
    limits = {"det": (max(len(names) for names in LADDER_BATCHES), None),
              "cls": (LADDER_CROP_BATCH, LADDER_CROP_BATCH), "rec": (LADDER_CROP_BATCH, LADDER_CROP_BATCH)}
    plain, padded = set(ladder_runs[False].shapes), set(ladder_runs[True].shapes)
    sizes = {(net, shape[1:]) for net, shape in padded}
    assert sizes == {(net, shape[1:]) for net, shape in plain}, "padding changes counts, never sizes"
    for net, shape in padded:
        assert shape[0] in count_shapes(*limits[net]), (net, shape)
    assert len(padded) <= sum(len(count_shapes(*limits[net])) for net, _size in sizes)
    narrow = ("rec", (3, 48, REC_WIDTH_BUCKETS[0]))
    counts = {pad: sorted(shape[0] for net, shape in shapes if (net, shape[1:]) == narrow) for pad, shapes in
              ((False, plain), (True, padded))}
    assert set(counts[True]) <= {1, 4, 8} and {4, 8} <= set(counts[True]), counts  # 3 crops -> 4, 5 to 7 -> 8
    assert len(counts[False]) >= 5 and len(plain) > len(padded) + 4, (sorted(plain), sorted(padded))


def test_cudnn_stays_on_after_loading_the_torch_runtime(torch_stage: OcrStage) -> None:
    """The runtime used to switch cuDNN off for the whole process (slowing YOLO and CLIP there); it leaves it alone."""
    import torch

    assert torch.backends.cudnn.enabled  # after this module's CPU runtime loaded and ran its batches
    if not torch.cuda.is_available():
        return  # the CUDA load below, where the old switch was, runs on GPU machines
    benchmark = torch.backends.cudnn.benchmark
    runtime = PpOcrTorch()
    runtime.load("cuda:0")
    try:
        runtime.recognize([np.ascontiguousarray(np.asarray(text_card(0))[:, :, ::-1])])
        assert torch.backends.cudnn.enabled and torch.backends.cudnn.benchmark == benchmark
    finally:
        runtime.close()
