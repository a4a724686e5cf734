"""The loader stage against real files written by Pillow: every bad file gets its reason, every odd mode a
correct RGB picture, and one bad file never costs the rest of the batch."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from stages.base import BatchPolicy, ImageItem
from stages.loader import LoaderOptions, LoaderStage, to_rgb
from tests.corpus import CMYK_QUADRANTS, CORPUS_LIMITS, GIF_FRAME_COLOURS, LIMIT_DEPENDENT, make_bad_corpus

REASONS = {"empty_file", "not_an_image", "truncated", "too_many_pixels", "file_too_large", "unreadable",
           "vanished", "decode_error"}


def make_stage(**overrides: int) -> LoaderStage:
    options = LoaderOptions(**{**CORPUS_LIMITS, **overrides})
    return LoaderStage(options, devices=["cpu"], batch_policy=BatchPolicy(16, 10.0))


def load(stage: LoaderStage, *paths: Path) -> list[ImageItem]:
    items = [ImageItem(key=index, source=str(path)) for index, path in enumerate(paths)]
    result = stage.process_batch(items)
    assert result is items or result == items
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_bad_corpus(root)


@pytest.fixture(scope="module")
def loaded(corpus: tuple[Path, dict[str, str | None]]) -> dict[str, ImageItem]:
    root, expected = corpus
    names = list(expected)
    items = load(make_stage(), *(root / name for name in names))
    return dict(zip(names, items, strict=True))


def rgb(item: ImageItem, xy: tuple[int, int]) -> tuple[int, int, int]:
    assert item.failure is None, item.failure
    return item.image.getpixel(xy)


def near(actual: tuple[int, ...], wanted: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - w) <= tolerance for a, w in zip(actual, wanted, strict=True))


# --- the whole corpus in one batch ---------------------------------------------------------------------
def test_every_corpus_file_ends_with_its_expected_outcome(corpus, loaded) -> None:
    _, expected = corpus
    wrong = {
        name: (wanted, item.failure.reason if item.failure else None, item.failure.message if item.failure else "")
        for name, wanted in expected.items()
        for item in [loaded[name]]
        if (item.failure.reason if item.failure else None) != wanted
    }
    assert not wrong, wrong
    assert {reason for reason in expected.values() if reason} <= REASONS
    assert set(expected) >= LIMIT_DEPENDENT
    assert sum(reason is None for reason in expected.values()) >= 15  # the batch went on past every bad file


def test_decoded_items_are_rgb_within_max_side_with_hash_and_timing(corpus, loaded) -> None:
    root, expected = corpus
    for name, wanted in expected.items():
        item = loaded[name]
        assert item.timings["load"] > 0
        if wanted is not None:
            assert item.image is None and item.failure.stage == "load"
            assert str(root / name) in item.failure.message  # the user is told which file
            continue
        data = (root / name).read_bytes()
        assert item.sha256 == hashlib.sha256(data).hexdigest()
        assert item.size == len(data)
        assert item.image.mode == "RGB", name
        assert max(item.image.size) <= CORPUS_LIMITS["max_side"], name
        assert item.width and item.height


def test_failures_that_were_never_read_still_report_size(corpus, loaded) -> None:
    root, _ = corpus
    assert loaded["oversized.jpg"].size == (root / "oversized.jpg").stat().st_size
    assert loaded["oversized.jpg"].sha256 is None  # over the limit: never read, so never hashed
    truncated = loaded["truncated.jpg"]
    assert truncated.sha256 == hashlib.sha256((root / "truncated.jpg").read_bytes()).hexdigest()


# --- pixel values ----------------------------------------------------------------------------------------
def test_alpha_is_composited_on_white(loaded) -> None:
    assert rgb(loaded["palette_transparent.png"], (5, 5)) == (255, 255, 255)
    assert rgb(loaded["palette_transparent.png"], (50, 5)) == (255, 0, 0)
    assert rgb(loaded["rgba.png"], (5, 5)) == (255, 255, 255)
    assert rgb(loaded["rgba.png"], (50, 5)) == (0, 0, 255)
    assert rgb(loaded["rgb_trns.png"], (5, 5)) == (255, 255, 255)  # tRNS colour key on an RGB PNG
    gray_alpha = loaded["gray_alpha.png"]
    assert rgb(gray_alpha, (5, 5)) == (255, 255, 255)
    assert rgb(gray_alpha, (40, 5)) == (0, 0, 0)
    assert near(rgb(gray_alpha, (80, 5)), (127, 127, 127), 2)  # half-transparent black over white
    if "alpha.webp" in loaded:
        assert rgb(loaded["alpha.webp"], (5, 5)) == (255, 255, 255)
        assert rgb(loaded["alpha.webp"], (50, 5)) == (0, 255, 0)


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif", "int32.tif", "float.tif"])
def test_high_bit_depth_gradient_spans_the_full_8_bit_range(loaded, name: str) -> None:
    row = np.asarray(loaded[name].image)[0, :, 0].astype(int)
    assert row.min() == 0 and row.max() == 255  # scaled, not clipped (clipping would saturate at x=1)
    assert np.all(np.diff(row) >= 0)  # still a monotonic ramp
    assert abs(int(row[128]) - 128) <= 2
    assert len(set(row.tolist())) >= 200


def test_cmyk_colours_come_out_roughly_right(loaded) -> None:
    item = loaded["cmyk.jpg"]
    for index, (_, wanted) in enumerate(CMYK_QUADRANTS):
        centre = ((index % 2) * 64 + 32, (index // 2) * 64 + 32)
        assert near(rgb(item, centre), wanted, 30), (centre, rgb(item, centre), wanted)


def test_cmyk_with_icc_profile_goes_through_the_profile(loaded) -> None:
    if "cmyk_icc.jpg" not in loaded:
        pytest.skip("no CMYK ICC profile on this machine (Debian package libgs-common provides one)")
    with_icc, plain = loaded["cmyk_icc.jpg"], loaded["cmyk.jpg"]
    red, green, blue, black = (rgb(with_icc, ((i % 2) * 64 + 32, (i // 2) * 64 + 32)) for i in range(4))
    assert red[0] > 180 and max(red[1:]) < 100
    assert green[1] > max(green[0], green[2]) + 50
    assert blue[2] > max(blue[0], blue[1]) + 50
    assert max(black) < 90
    # A press profile renders pure process green far from sRGB (0, 255, 0): proof the profile was applied.
    assert abs(green[1] - rgb(plain, (96, 32))[1]) > 30


def test_animations_give_their_first_frame(loaded) -> None:
    assert rgb(loaded["animated.gif"], (10, 10)) == GIF_FRAME_COLOURS[0]
    assert rgb(loaded["animated.png"], (10, 10)) == GIF_FRAME_COLOURS[0]


def test_exif_orientation_is_applied_and_sizes_swap(loaded) -> None:
    item = loaded["exif_rotated.jpg"]
    assert item.image.size == (80, 120) and (item.width, item.height) == (80, 120)  # stored as 120x80
    assert near(rgb(item, (70, 10)), (255, 0, 0), 40)  # stored top-left is displayed top-right
    assert near(rgb(item, (10, 10)), (0, 0, 0), 40)


def test_bilevel_lab_and_unicode_nested_files(loaded) -> None:
    assert rgb(loaded["bilevel.png"], (5, 5)) == (0, 0, 0)
    assert rgb(loaded["bilevel.png"], (50, 5)) == (255, 255, 255)
    assert min(rgb(loaded["lab.tif"], (5, 5))) >= 240  # L*=100 is white
    assert rgb(loaded["café menu ü.png"], (5, 5)) == (0, 128, 0)
    assert rgb(loaded["a/b/c/deep.png"], (5, 5)) == (0, 0, 128)
    assert rgb(loaded["wrong_extension.jpg"], (5, 5)) == (200, 100, 50)


def test_large_legal_jpeg_is_reduced_but_reports_its_original_size(loaded) -> None:
    item = loaded["large_4000x3000.jpg"]
    assert (item.width, item.height) == (4000, 3000)
    assert item.image.size == (1024, 768)
    assert near(rgb(item, (0, 0)), (0, 0, 255), 12)  # the gradient's corners survive the reduction
    assert near(rgb(item, (1023, 767)), (255, 255, 0), 12)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("YCbCr", (4, 4), (128, 128, 128)),
        Image.new("HSV", (4, 4), (0, 0, 128)),
        Image.new("LAB", (4, 4), (128, 128, 128)),
        Image.new("La", (4, 4), (128, 255)),
        Image.new("RGBa", (4, 4), (128, 128, 128, 255)),
        Image.new("PA", (4, 4), (0, 255)),
        Image.frombytes("I;16B", (4, 4), np.full((4, 4), 32896, ">u2").tobytes()),
        Image.new("RGBX", (4, 4), (128, 128, 128, 0)),
    ],
    ids=lambda image: image.mode,
)
def test_in_memory_modes_convert_to_8_bit_rgb(image: Image.Image) -> None:
    if image.mode == "PA":
        image.putpalette([128, 128, 128] * 256)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    assert near(out.getpixel((1, 1)), (128, 128, 128) if image.mode != "LAB" else (119, 119, 119), 3)


# --- sizes, limits, odd files ----------------------------------------------------------------------------
def test_max_side_downscale_keeps_original_size(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (3000, 1000), (9, 99, 199)).save(wide)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (2000, 1000), (50, 60, 70)).save(rotated, quality=90, exif=exif.tobytes())
    png, jpeg = load(make_stage(max_side=500), wide, rotated)
    assert png.image.size == (500, 167) and (png.width, png.height) == (3000, 1000)
    assert png.image.getpixel((250, 80)) == (9, 99, 199)
    # JPEG: reduced while decoding (draft), then rotated: displayed 1000x2000
    assert jpeg.image.size == (250, 500) and (jpeg.width, jpeg.height) == (1000, 2000)


def test_our_pixel_limit_is_checked_from_the_header_before_decoding(corpus, loaded) -> None:
    # The header-only bomb has almost no pixel data: had it been decoded, it would be "truncated".
    assert loaded["bomb_header_only.png"].failure.reason == "too_many_pixels"
    message = loaded["over_pixel_limit_8000x6000.png"].failure.message
    assert "8000x6000" in message and "limits.max_pixels" in message


def test_pillow_global_limit_is_only_raised_never_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    make_stage(max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 5000
    make_stage(max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == 5000


def test_truncation_is_found_without_changing_pillows_global(loaded) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert loaded["truncated.png"].failure.reason == "truncated"


def test_file_deleted_between_listing_and_loading_is_vanished(tmp_path: Path) -> None:
    good, gone = tmp_path / "good.png", tmp_path / "gone.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(gone)
    gone.unlink()  # listed by the watcher, removed before the loader got to it
    first, second = load(make_stage(), gone, good)
    assert first.failure.reason == "vanished" and str(gone) in first.failure.message
    assert second.failure is None and second.image.getpixel((1, 1)) == (1, 2, 3)


def test_directory_in_place_of_a_file_is_unreadable_and_retryable(tmp_path: Path) -> None:
    folder = tmp_path / "photo.jpg"
    folder.mkdir()
    (item,) = load(make_stage(), folder)
    assert item.failure.reason == "unreadable"
    assert "EISDIR" in item.failure.message and item.failure.retryable


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    (item,) = load(make_stage(), locked)
    assert item.failure.reason == "unreadable" and "EACCES" in item.failure.message


@pytest.mark.timeout(20)
def test_named_pipe_does_not_hang_the_loader(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    (item,) = load(make_stage(), pipe)
    assert item.failure.reason == "unreadable" and "named pipe" in item.failure.message


def test_broken_exif_block_does_not_cost_the_image(tmp_path: Path) -> None:
    path = tmp_path / "bad_exif.jpg"
    Image.new("RGB", (32, 24), (0, 200, 0)).save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff garbage")
    (item,) = load(make_stage(), path)
    assert item.failure is None and (item.width, item.height) == (32, 24)
    assert near(item.image.getpixel((5, 5)), (0, 200, 0), 10)


def test_items_failed_upstream_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "fine.png"
    Image.new("RGB", (8, 8)).save(path)
    item = ImageItem(key=1, source=str(path))
    item.fail("crashed_repeatedly", "interrupted 3 times")
    load_stage = make_stage()
    load_stage.process_batch([item])
    assert item.failure.reason == "crashed_repeatedly" and item.image is None


def test_two_worker_threads_agree_with_one(corpus, loaded) -> None:
    """["cpu", "cpu"]: two replicas on two threads, sharing caches (ICC transforms), give the same pixels."""
    root, expected = corpus
    names = [name for name, reason in expected.items() if reason is None]
    prototype = LoaderStage(LoaderOptions(**CORPUS_LIMITS), devices=["cpu", "cpu"], batch_policy=BatchPolicy(8, 5.0))
    results: dict[int, list[ImageItem]] = {}

    def work(index: int) -> None:
        replica = prototype.replicate()
        replica.setup("cpu")
        results[index] = [load(replica, root / name)[0] for name in names * 2]

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert set(results) == {0, 1}
    for index in range(2):
        for name, item in zip(names * 2, results[index], strict=True):
            reference = loaded[name].image
            assert item.failure is None and item.image.size == reference.size
            assert np.array_equal(np.asarray(item.image), np.asarray(reference)), name


def test_decoded_image_holds_no_open_file(tmp_path: Path) -> None:
    """The item keeps pixels only: the bytes were read once into memory and no file handle stays open."""
    path = tmp_path / "once.png"
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    (item,) = load(make_stage(), path)
    assert item.sha256 == hashlib.sha256(buffer.getvalue()).hexdigest()
    assert item.image.getpixel((0, 0)) == (10, 20, 30)
    assert not hasattr(item.image, "fp") or item.image.fp is None  # no open handle kept with the item


# --- the input root is a boundary: links are never followed ---------------------------------------------
def test_a_file_replaced_by_a_symlink_is_never_read_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(secret)
    inbox = tmp_path / "in"
    inbox.mkdir()
    link = inbox / "a.png"
    link.symlink_to(secret)  # `ln -sfn OUTSIDE/secret.png INPUT/a.png` after the file was taken
    (item,) = load(make_stage(), link)
    assert item.failure.reason == "vanished" and item.image is None and item.sha256 is None
    assert "symbolic link" in item.failure.message


def test_a_directory_replaced_by_a_symlink_is_never_walked_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(outside / "x.png")
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "sub").symlink_to(outside, target_is_directory=True)
    (item,) = load(make_stage(), inbox / "sub" / "x.png")
    assert item.failure.reason == "vanished" and item.image is None and item.sha256 is None


def test_names_that_are_not_utf8_or_255_bytes_long_load(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/bad\xff.png"))
    long_name = tmp_path / ("L" * 251 + ".png")
    for path in (odd, long_name):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format="PNG")
    for item in load(make_stage(), odd, long_name):
        assert item.failure is None and item.image.getpixel((1, 1)) == (1, 2, 3)
