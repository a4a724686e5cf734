"""Process settings Ultralytics needs before it is imported, so that it never reaches for the network.

Ultralytics reads its environment once, at import: without ``YOLO_OFFLINE=1`` it resolves DNS names to
decide whether it is online, without a writable ``YOLO_CONFIG_DIR`` it falls back to a temporary folder
with a warning, and without ``Arial.ttf`` in that folder it downloads the font the first time it draws.
Its CPU predict path also calls ``torch.set_num_threads(...)`` for the whole process.
``prepare_ultralytics()`` settles the first three; ``preserve_torch_threads()`` undoes the last.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # what ultralytics.utils.checks.check_font looks for
_lock = threading.Lock()


def binner_cache_dir() -> Path:
    """Per-user cache root: ``$XDG_CACHE_HOME/binner`` (``~/.cache/binner`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "binner"


def default_weights_dir() -> Path:
    """Where ``binner`` fetches Ultralytics weights given by bare file name (``yolo11n.pt``)."""
    return binner_cache_dir() / "weights"


def resolve_detector_weights(weights: str, weights_dir: Path | None = None) -> Path | None:
    """The local file a detector weights setting refers to, or None when it is not on disk.

    A value that names an existing file (absolute, ``~``, or relative to the working directory) wins;
    a bare file name is then looked up in the weights directory that ``binner`` fetches into.
    """
    given = Path(weights).expanduser()
    if given.exists():  # a file, or an exported model directory (OpenVINO, saved_model, ...)
        return given
    candidate = (weights_dir or default_weights_dir()) / given.name
    if given.name == weights and candidate.exists():
        return candidate
    return None


def _bundled_font() -> Path | None:
    """A TrueType font that ships inside an installed package (never downloaded)."""
    spec = importlib.util.find_spec("matplotlib")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        font = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if font.is_file():
            return font
    for font in (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),):
        if font.is_file():
            return font
    return None


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError:
        return False
    return True


def prepare_ultralytics(config_dir: Path | None = None) -> Path:
    """Configure Ultralytics for offline, self-contained use; returns the config dir it will use.

    ``config_dir`` is where Ultralytics keeps ``settings.json`` and its fonts (binner passes its state
    directory); default: ``$YOLO_CONFIG_DIR`` if already set, else ``$XDG_CACHE_HOME/binner/ultralytics``.
    Call before the first ``import ultralytics``; calling again is cheap.
    """
    with _lock:
        os.environ["YOLO_OFFLINE"] = "1"  # no DNS probe at import, no telemetry, no hub calls
        if config_dir is not None:
            chosen = Path(config_dir).expanduser()
        elif os.environ.get("YOLO_CONFIG_DIR"):
            chosen = Path(os.environ["YOLO_CONFIG_DIR"]).expanduser()
        else:
            chosen = binner_cache_dir() / "ultralytics"
        if not _writable(chosen):
            if config_dir is not None:
                raise PermissionError(
                    f"Ultralytics config directory {chosen} is not writable: give the service user write access "
                    "or point the state directory elsewhere"
                )
            fallback = Path(tempfile.gettempdir()) / f"binner-ultralytics-{os.getuid()}"
            logger.warning("Ultralytics config directory %s is not writable; using %s", chosen, fallback)
            chosen = fallback
            chosen.mkdir(parents=True, exist_ok=True)
        chosen = chosen.resolve()
        os.environ["YOLO_CONFIG_DIR"] = str(chosen)

        font_dir = chosen / "Ultralytics"
        utils = sys.modules.get("ultralytics.utils")
        if utils is not None and Path(utils.USER_CONFIG_DIR).resolve() != font_dir:
            # Imported already: it read its config dir at import, so put the fonts where it looks.
            logger.info("ultralytics was imported before prepare_ultralytics(); using its %s", utils.USER_CONFIG_DIR)
            font_dir = Path(utils.USER_CONFIG_DIR)
        _install_fonts(font_dir)
        return chosen


def _install_fonts(font_dir: Path) -> None:
    missing = [name for name in _FONT_NAMES if not (font_dir / name).is_file()]
    if not missing:
        return
    source = _bundled_font()
    if source is None:
        logger.warning(
            "no bundled TrueType font found (matplotlib's DejaVuSans.ttf); Ultralytics may try to download "
            "Arial.ttf into %s when it draws boxes",
            font_dir,
        )
        return
    font_dir.mkdir(parents=True, exist_ok=True)
    for name in missing:
        partial = font_dir / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(source, partial)
        os.replace(partial, font_dir / name)  # atomic: a concurrent reader never sees half a font


@contextmanager
def preserve_torch_threads() -> Iterator[None]:
    """Restore ``torch.get_num_threads()`` after a block that may change it (Ultralytics' CPU predict).

    The thread count is process-wide; Ultralytics sets it to ``min(8, cpu_count - 1)`` whenever it
    selects a CPU device, which would silently slow every other CPU stage in the process.
    """
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
