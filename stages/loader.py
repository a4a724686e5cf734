"""The loader stage: read a file once, hash it, validate it and decode it into an 8-bit RGB image.

Every problem with one file becomes a per-item failure with a stable reason slug (the quarantine folder
name), never an exception for the batch:

``empty_file``, ``file_too_large``, ``vanished``, ``unreadable``, ``not_an_image``, ``too_many_pixels``,
``truncated``, ``decode_error``. Only ``unreadable`` (permissions, I/O errors) and running out of memory are
marked ``retryable``: the rest are properties of the file's bytes and will not change on a second try.

Why it is written this way:

- The bytes are read once (``fstat`` on the open descriptor checks the size limit first), hashed and decoded
  from memory, so a file costs one open, one read and no second pass.
- A path is opened without following a symlink in any of its components (``open_no_symlinks``): the caller
  hands over real paths, and a file or directory replaced by a link since is ``vanished``, never followed.
- Pixel limits are checked from the header, before any pixel is decoded. ``Image.MAX_IMAGE_PIXELS`` is
  process-global, so it is never lowered per call from worker threads; construction and ``setup`` (which may run
  in another process) only raise it, when the configured limit is above Pillow's, so that our own check decides.
- Truncated files are detected by forcing a full ``load()`` with ``ImageFile.LOAD_TRUNCATED_IMAGES`` left
  at its default (off): a partially written file must be quarantined, not silently padded with grey.
- Pillow's own ``convert()`` clips 16-bit and 32-bit data to 0..255 and drops alpha onto black; both are
  wrong for models, so those modes are converted here: 16-bit is scaled, alpha is composited on white.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import stat
import time
from dataclasses import dataclass

import numpy as np
import structlog
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from stages.base import BatchPolicy, ImageItem, Stage
from stages.paths import open_no_symlinks

log = structlog.get_logger(__name__)

Image.init()  # register every plugin once, at import, not lazily from a worker thread

def _register_heif() -> None:
    """HEIC/HEIF (phone photos) through pi-heif. Registering it ourselves also keeps Ultralytics, which
    registers an opener that imports pi_heif lazily, from turning every undecodable file into an ImportError."""
    try:
        from pi_heif import register_heif_opener
    except ImportError:
        return
    register_heif_opener()


_register_heif()

#: Formats the loader will decode. Deliberately excludes EPS/PDF (they shell out to Ghostscript) and the
#: exotic scientific and legacy formats whose parsers see little hardening.
DEFAULT_FORMATS: tuple[str, ...] = tuple(
    fmt
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF", "HEIF", "JPEG2000", "PPM", "QOI")
    if fmt in Image.OPEN
)

_WHITE = (255, 255, 255)
_PERCEPTUAL = 0  # ImageCms.Intent.PERCEPTUAL
_LCMS_NOCACHE = 0x0040  # ImageCms.Flags.NOCACHE (lcms2 cmsFLAGS_NOCACHE): no per-transform pixel cache


@dataclass(frozen=True)
class LoaderOptions:
    """Limits applied to every input file; see ``LimitsConfig`` in the application config."""

    max_file_bytes: int
    max_pixels: int
    max_side: int
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pixels", "max_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderOptions.{name} must be at least 1, got {getattr(self, name)}")
        unknown = [fmt for fmt in self.formats if fmt.upper() not in Image.OPEN]
        if unknown:
            raise ValueError(f"LoaderOptions.formats names formats this Pillow cannot open: {unknown}")


class _Rejected(Exception):
    """Internal: the current file fails with ``reason``; turned into ``item.fail`` by the batch loop."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # Only an unreadable file may heal by itself (permissions fixed, a flaky disk): retried before quarantine.
        self.retryable = reason == "unreadable"


class LoaderStage(Stage):
    """Decode files into RGB images; one instance per CPU worker thread (``devices=["cpu", "cpu"]``)."""

    name = "load"
    stateless = True  # no model: a fresh replica per batch costs nothing

    def __init__(
        self,
        options: LoaderOptions,
        devices: list[str] | None = None,
        batch_policy: BatchPolicy | None = None,
    ) -> None:
        super().__init__(devices or ["cpu"], batch_policy)
        self.options = options
        _allow_pillow_pixels(options.max_pixels)

    def setup(self, device: str) -> None:
        """A replica in another process (a Ray task) gets the pixel limit there too."""
        _allow_pillow_pixels(self.options.max_pixels)
        super().setup(device)

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        for item in items:
            if item.failure is not None:
                continue
            started = time.perf_counter()
            try:
                self._load(item)
            except _Rejected as rejected:
                item.fail(rejected.reason, rejected.message, stage=self.name, retryable=rejected.retryable)
            except MemoryError:
                # The machine is short of memory right now; the file may be fine. Retried, then quarantined.
                item.fail("decode_error", f"{item.source}: ran out of memory while decoding it", stage=self.name,
                          retryable=True)
            except Exception as error:  # noqa: BLE001 - one bad file never fails the batch
                item.fail("decode_error", f"{item.source}: {type(error).__name__}: {error}", stage=self.name)
            finally:
                item.timings["load"] = time.perf_counter() - started
        return items

    # --- one file ---------------------------------------------------------------------------------
    def _load(self, item: ImageItem) -> None:
        data = self._read(item)
        image, width, height = self._decode(item.source, data)
        item.width, item.height = width, height
        item.image = image

    def _read(self, item: ImageItem) -> bytes:
        """The whole file, after checking it is a regular file within the size limit; sets size and sha256."""
        path = item.source
        limit = self.options.max_file_bytes
        try:
            fd = open_no_symlinks(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise _Rejected("vanished", f"{path}: the file disappeared before it could be read") from None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise _Rejected(
                    "unreadable", f"{path}: cannot open it ({_errno_text(error)}); check its permissions"
                ) from None
            raise _Rejected(
                "vanished", f"{path}: a symbolic link now stands in its path; links are never followed"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                code = "EISDIR" if stat.S_ISDIR(info.st_mode) else "EINVAL"
                raise _Rejected("unreadable", f"{path}: not a regular file ([{code}] {_file_kind(info.st_mode)})")
            item.size = info.st_size
            item.opened = (info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
            if info.st_size == 0:
                raise _Rejected("empty_file", f"{path}: the file is empty (0 bytes)")
            if info.st_size > limit:
                raise _Rejected(
                    "file_too_large",
                    f"{path}: {info.st_size} bytes is over the limit of {limit} bytes (limits.max_file_bytes)",
                )
            with io.FileIO(fd, "rb", closefd=False) as handle:
                data = handle.readall()
        except OSError as error:
            raise _Rejected("unreadable", f"{path}: reading failed ({_errno_text(error)})") from None
        finally:
            os.close(fd)
        if not data:
            raise _Rejected("empty_file", f"{path}: the file is empty (it was emptied while being read)")
        if len(data) > limit:
            raise _Rejected(
                "file_too_large",
                f"{path}: {len(data)} bytes is over the limit of {limit} bytes (limits.max_file_bytes)",
            )
        item.size = len(data)
        item.sha256 = hashlib.sha256(data).hexdigest()
        return data

    def _decode(self, path: str, data: bytes) -> tuple[Image.Image, int, int]:
        """Header check, reduced decode, full load, EXIF orientation, RGB and the max_side bound."""
        options = self.options
        try:
            image = Image.open(io.BytesIO(data), formats=options.formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _Rejected(
                "too_many_pixels",
                f"{path}: {error} Rejected from its header (limits.max_pixels is {options.max_pixels})",
            ) from None
        except UnidentifiedImageError:
            kind = _signature(data)
            if kind is None:
                supported = ", ".join(options.formats)
                raise _Rejected("not_an_image", f"{path}: not an image in a supported format ({supported})") from None
            raise self._broken(path, kind, data, "its header cannot be read") from None
        except Exception as error:  # noqa: BLE001 - Pillow's plugins raise many types for bad headers
            raise self._broken(path, _signature(data), data, f"{type(error).__name__}: {error}") from None

        width, height = image.size
        if width < 1 or height < 1:
            raise _Rejected("decode_error", f"{path}: the header claims an empty {width}x{height} image")
        if width * height > options.max_pixels:
            raise _Rejected(
                "too_many_pixels",
                f"{path}: {width}x{height} = {width * height} pixels is over the limit of {options.max_pixels} "
                "(limits.max_pixels); a decompression bomb or a scan far larger than needed",
            )
        longest = max(width, height)
        if longest > options.max_side:
            # JPEG only: libjpeg decodes at 1/2, 1/4 or 1/8 scale directly, never smaller than asked for.
            wanted = (max(1, width * options.max_side // longest), max(1, height * options.max_side // longest))
            image.draft("RGB", wanted)

        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _Rejected("too_many_pixels", f"{path}: {error}") from None
        except Exception as error:  # noqa: BLE001 - and many more for bad pixel data
            kind = _signature(data) or image.format
            raise self._broken(path, kind, data, f"{type(error).__name__}: {error}") from None

        decoded = image.size
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as error:  # noqa: BLE001 - a broken EXIF block must not cost a good image
            log.warning("exif orientation ignored", file=os.fsencode(path).decode("utf-8", "backslashreplace"),
                        error=f"{type(error).__name__}: {error}")
        if image.size != decoded:  # rotated by 90 degrees: the original size swaps too
            width, height = height, width

        rgb = to_rgb(image)
        if max(rgb.size) > options.max_side:
            scale = options.max_side / max(rgb.size)
            target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
        elif rgb is image and getattr(image, "n_frames", 1) > 1:
            rgb = image.copy()  # an MPO keeps its whole file open for the other frames: detach from it
        return rgb, width, height

    @staticmethod
    def _broken(path: str, kind: str | None, data: bytes, detail: str) -> _Rejected:
        """``truncated`` when the data ends early (Pillow says so, or the container's end marker is missing)."""
        if "truncated" in detail.lower() or "EOFError" in detail or _container_incomplete(kind, data):
            return _Rejected(
                "truncated",
                f"{path}: the image data ends early ({detail}); the file was probably cut off while being "
                "copied: copy it again",
            )
        label = f"{kind} " if kind else ""
        return _Rejected("decode_error", f"{path}: the {label}image cannot be decoded ({detail})")


# --- mode conversion -------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, high bit depths scaled, CMYK via its ICC."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("La", "RGBa"):  # premultiplied alpha
        image = image.convert(mode[:-1] + "A")
        mode = image.mode
    if mode == "F" or mode == "I" or mode.startswith("I;"):
        return _scale_to_l(image).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.has_transparency_data:
        return _flatten_on_white(image.convert("RGBA"))
    return image.convert("RGB")


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=alpha)
    return out


def _scale_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images to 8-bit grey, scaled rather than clipped.

    ``I;16*``: the full 0..65535 range maps to 0..255. ``I`` (32-bit): the same when its values fit 16 bits,
    else its own min..max. ``F``: 0..1 or 0..255 as is, else its own min..max.
    """
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = (array.astype(np.uint32) + 128) // 257
    else:
        values = array.astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            values = np.where(finite, values, 0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            scaled = values * 255.0
        elif image.mode == "F" and low >= 0.0 and high <= 255.0:
            scaled = values
        elif image.mode != "F" and low >= 0.0 and high <= 65535.0:
            scaled = values / 257.0
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)
        scaled = np.rint(scaled)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            return ImageCms.applyTransform(image, _cmyk_transform(bytes(icc)))
        except Exception as error:  # noqa: BLE001 - a damaged profile: the plain formula is still fair
            log.warning("cmyk icc profile ignored", error=f"{type(error).__name__}: {error}")
    return image.convert("RGB")


@functools.lru_cache(maxsize=16)
def _cmyk_transform(icc: bytes) -> ImageCms.ImageCmsTransform:
    """Built once per distinct embedded profile; NOCACHE makes one transform safe to share between threads."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(
        source, _srgb_profile(), "CMYK", "RGB",
        renderingIntent=_PERCEPTUAL, flags=_LCMS_NOCACHE,
    )


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


# --- helpers ---------------------------------------------------------------------------------------
def _allow_pillow_pixels(max_pixels: int) -> None:
    """Make Pillow's global bomb check no stricter than ours, so that our limit is the one that decides.

    Only ever raised, on stage construction and in ``setup``: a raise to the same value from two threads is harmless.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _signature(data: bytes) -> str | None:
    """The format a file's first bytes announce, whatever its name says."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, kind in _SIGNATURES:
        if data.startswith(magic):
            return kind
    return None


def _container_incomplete(kind: str | None, data: bytes) -> bool:
    """True when the format's end marker (or declared length) shows that the file stops early."""
    if kind == "PNG":
        return data.rfind(b"IEND\xaeB`\x82") == -1
    if kind == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if kind == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    if kind == "WEBP":
        return len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _errno_text(error: OSError) -> str:
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    return f"[{code}] {error.strerror or error}"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"
