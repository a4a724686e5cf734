"""A corpus of awkward and broken input files, written with Pillow (and zlib for the bombs), for loader and
end-to-end tests.

``make_bad_corpus(root)`` returns ``{relative path: expected quarantine reason, or None}``; ``None`` means the
file must decode into a correct RGB image and be binned. The expectations hold under ``CORPUS_LIMITS``
(``limits.*`` in the configuration); the oversized and over-the-pixel-limit files rely on them.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

#: Limits under which the expectations of ``make_bad_corpus`` hold (``limits`` section of the config).
CORPUS_LIMITS: dict[str, int] = {
    "max_file_bytes": 8 * 1024 * 1024,
    "max_pixels": 40_000_000,
    "max_side": 1024,
}

#: Files whose expected reason holds only under CORPUS_LIMITS (under the default limits they decode fine).
LIMIT_DEPENDENT: frozenset[str] = frozenset({"oversized.jpg", "over_pixel_limit_8000x6000.png"})

#: A CMYK ICC profile shipped by Debian's libgs-common; used for the ICC case when present.
CMYK_ICC_CANDIDATES = (
    Path("/usr/share/color/icc/ghostscript/default_cmyk.icc"),
    Path("/usr/share/color/icc/ghostscript/ps_cmyk.icc"),
)

# CMYK quadrant colours (C, M, Y, K) and the RGB each should look like.
CMYK_QUADRANTS: tuple[tuple[tuple[int, int, int, int], tuple[int, int, int]], ...] = (
    ((0, 255, 255, 0), (255, 0, 0)),  # top-left: red
    ((255, 0, 255, 0), (0, 255, 0)),  # top-right: green
    ((255, 255, 0, 0), (0, 0, 255)),  # bottom-left: blue
    ((0, 0, 0, 255), (0, 0, 0)),  # bottom-right: black
)

GIF_FRAME_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_bilevel_png(path: Path, width: int, height: int) -> None:
    """A real, complete, all-black 1-bit PNG of any size, streamed row by row (a 20000x20000 one is ~50 kB)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = max(1, (1 << 20) // len(row))
    idat = bytearray()
    remaining = height
    while remaining:
        count = min(rows_per_chunk, remaining)
        idat += compressor.compress(row * count)
        remaining -= count
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", bytes(idat)) + _png_chunk(b"IEND", b"")
    )


def write_header_only_bomb(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` RGB but whose data is one short row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise_rgb(width: int, height: int, seed: int) -> Image.Image:
    """Incompressible content, so that truncating the file cuts into the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gradient_rgb(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def make_bad_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus under ``root`` and return ``{relative path: expected reason or None}``."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    def put(rel: str, data: bytes, reason: str | None) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[rel] = reason
        return path

    # --- files that must be quarantined --------------------------------------------------------
    put("empty.jpg", b"", "empty_file")
    put("text_named.jpg", b"This is a shopping list, not a picture.\nmilk\neggs\n" * 20, "not_an_image")
    put("random_bytes.png", np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")

    noisy_jpeg = _encoded(_noise_rgb(320, 240, 1), "JPEG", quality=90)
    put("truncated.jpg", noisy_jpeg[: len(noisy_jpeg) * 6 // 10], "truncated")
    noisy_png = _encoded(_noise_rgb(320, 240, 2), "PNG")
    put("truncated.png", noisy_png[: len(noisy_png) * 6 // 10], "truncated")
    put("truncated_header.png", noisy_png[:30], "truncated")
    noisy_gif = _encoded(_noise_rgb(160, 120, 3).convert("P"), "GIF")
    put("truncated.gif", noisy_gif[: len(noisy_gif) // 2], "truncated")
    noisy_tiff = _encoded(_noise_rgb(160, 120, 5), "TIFF")  # no end marker: Pillow itself must notice
    put("truncated.tif", noisy_tiff[: len(noisy_tiff) * 6 // 10], "truncated")
    if features.check("webp"):
        noisy_webp = _encoded(_noise_rgb(160, 120, 4), "WEBP", quality=90)
        put("truncated.webp", noisy_webp[: len(noisy_webp) // 2], "truncated")

    corrupt = bytearray(noisy_jpeg)
    middle = len(corrupt) // 2
    corrupt[middle : middle + 64] = b"\xff" * 64  # damaged entropy data, file still complete (ends with EOI)
    put("corrupt_data.jpg", bytes(corrupt), "decode_error")

    bomb = root / "bomb_20000x20000.png"
    write_bilevel_png(bomb, 20000, 20000)
    expected[bomb.name] = "too_many_pixels"
    write_header_only_bomb(root / "bomb_header_only.png", 20000, 20000)
    expected["bomb_header_only.png"] = "too_many_pixels"
    over = root / "over_pixel_limit_8000x6000.png"  # under Pillow's own limit, over CORPUS_LIMITS: our check
    write_bilevel_png(over, 8000, 6000)
    expected[over.name] = "too_many_pixels"

    oversized = put("oversized.jpg", noisy_jpeg, "file_too_large")
    with oversized.open("r+b") as handle:  # sparse: costs no disk, only a size over max_file_bytes
        handle.truncate(CORPUS_LIMITS["max_file_bytes"] + 1024 * 1024)

    # --- files that must decode correctly --------------------------------------------------------
    cmyk = Image.new("CMYK", (128, 128))
    for index, (ink, _) in enumerate(CMYK_QUADRANTS):
        x, y = (index % 2) * 64, (index // 2) * 64
        cmyk.paste(ink, (x, y, x + 64, y + 64))
    put("cmyk.jpg", _encoded(cmyk, "JPEG", quality=95), None)
    icc = next((path for path in CMYK_ICC_CANDIDATES if path.is_file()), None)
    if icc is not None:
        put("cmyk_icc.jpg", _encoded(cmyk, "JPEG", quality=95, icc_profile=icc.read_bytes()), None)

    gradient16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))
    put("gray16.png", _encoded(Image.fromarray(gradient16), "PNG"), None)  # opens as I;16
    put("gray16.tif", _encoded(Image.fromarray(gradient16), "TIFF"), None)
    put("int32.tif", _encoded(Image.fromarray(gradient16.astype(np.int32)), "TIFF"), None)  # mode I
    ramp = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (16, 1))
    put("float.tif", _encoded(Image.fromarray(ramp), "TIFF"), None)  # mode F

    palette = Image.new("P", (64, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (made transparent), index 1 red
    palette.paste(1, (32, 0, 64, 32))
    put("palette_transparent.png", _encoded(palette, "PNG", transparency=0), None)

    la = Image.new("LA", (96, 32), (0, 0))  # left third: transparent
    la.paste((0, 255), (32, 0, 64, 32))  # middle: opaque black
    la.paste((0, 128), (64, 0, 96, 32))  # right: half-transparent black
    put("gray_alpha.png", _encoded(la, "PNG"), None)

    rgba = Image.new("RGBA", (64, 32), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (32, 0, 64, 32))
    put("rgba.png", _encoded(rgba, "PNG"), None)
    put("rgb_trns.png", _encoded(Image.new("RGB", (32, 32), (10, 20, 30)), "PNG", transparency=(10, 20, 30)), None)

    frames = [Image.new("RGB", (48, 48), colour) for colour in GIF_FRAME_COLOURS]
    put("animated.gif", _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), None)
    put("animated.png", _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100), None)

    marked = Image.new("RGB", (120, 80), (0, 0, 0))
    marked.paste((255, 0, 0), (0, 0, 20, 20))  # red square at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the top-left goes to the top-right
    put("exif_rotated.jpg", _encoded(marked, "JPEG", quality=95, exif=exif.tobytes()), None)

    bilevel = Image.new("1", (64, 32), 0)
    bilevel.paste(1, (32, 0, 64, 32))
    put("bilevel.png", _encoded(bilevel, "PNG"), None)

    lab = Image.new("LAB", (32, 32), (255, 128, 128))  # L*=100: white
    put("lab.tif", _encoded(lab, "TIFF"), None)

    put("café menu ü.png", _encoded(Image.new("RGB", (40, 30), (0, 128, 0)), "PNG"), None)
    put("a/b/c/deep.png", _encoded(Image.new("RGB", (30, 40), (0, 0, 128)), "PNG"), None)
    put("wrong_extension.jpg", _encoded(Image.new("RGB", (30, 30), (200, 100, 50)), "PNG"), None)
    if features.check("webp"):
        webp = Image.new("RGBA", (64, 32), (0, 255, 0, 0))
        webp.paste((0, 255, 0, 255), (32, 0, 64, 32))
        put("alpha.webp", _encoded(webp, "WEBP", lossless=True), None)
    put("large_4000x3000.jpg", _encoded(_gradient_rgb(4000, 3000), "JPEG", quality=85), None)
    return expected
