"""Which configured model weights are on this machine, and fetching the public ones.

``missing_weights`` never touches the network: it looks at local paths, the Hugging Face cache and the
folder binner downloads Ultralytics assets into, so start-up can stop at once with a list of what is
missing and the command that provides each. ``fetch_weights`` downloads them with progress bars; it
first checks, with short timeouts, that the hosts are reachable, so that it fails fast offline instead
of hanging in retries.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from app.config import ConfigError
from stages.ultralytics_env import default_weights_dir, resolve_detector_weights

_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_CONNECT_TIMEOUT_S = 4.0


def binner_command() -> str:
    """How the user can run this binner again: ``binner`` when that is on PATH, else the executable's path
    (``.venv/bin/binner`` after ``make run``, relative to the working directory where it can be)."""
    candidates = [Path(sys.argv[0])] if Path(sys.argv[0]).name == "binner" else []
    candidates.append(Path(sys.executable).parent / "binner")
    for candidate in candidates:
        if not candidate.is_file():
            continue
        found = shutil.which("binner")
        if found and Path(found).resolve() == candidate.resolve():
            return "binner"
        absolute = candidate.absolute()
        try:
            return str(absolute.relative_to(Path.cwd()))
        except ValueError:
            return str(absolute)
    return f"{sys.executable} -m app.cli"


def fetch_command() -> str:
    """The command that downloads the configured weights, as it can be typed here."""
    return f"{binner_command()} fetch-weights"


class WeightsError(ConfigError):
    """Weights cannot be provided (offline, unknown name, failed download); the message says what to do."""


@dataclass(frozen=True)
class MissingWeight:
    """One configured model that is not on this machine."""

    key: str  # configuration key, e.g. "vision.captioner.model"
    value: str  # what it is set to
    command: str  # what provides it
    reason: str = ""
    fetchable: bool = True  # whether `binner fetch-weights` can download it

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.key} = {self.value!r}{why}: {self.command}"


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith("/")


def _hf_cached(repo_id: str) -> bool:
    """True when the HF cache holds the repo's config and a weights file (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in _HF_WEIGHT_FILES)


def _check_transformers_model(key: str, value: str) -> MissingWeight | None:
    local = Path(value).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return None
        return MissingWeight(
            key,
            value,
            f"save a complete checkpoint there (save_pretrained) or set {key} to a model id",
            reason="folder has no config.json",
            fetchable=False,
        )
    if _looks_like_path(value) or not _REPO_ID.match(value):
        return MissingWeight(
            key,
            value,
            f"copy the checkpoint folder to {value} or set {key} to a Hugging Face model id",
            reason="no such folder",
            fetchable=False,
        )
    if _hf_cached(value):
        return None
    return MissingWeight(
        key,
        value,
        f"run `{fetch_command()}` with internet (or `hf download {value}`)",
        reason="not in the Hugging Face cache",
    )


def _check_detector(value: str, weights_dir: Path | None) -> MissingWeight | None:
    key = "vision.detector.weights"
    if resolve_detector_weights(value, weights_dir) is not None:
        return None
    if Path(value).name == value and value.endswith(".pt"):
        where = weights_dir or default_weights_dir()
        return MissingWeight(
            key,
            value,
            f"run `{fetch_command()}` with internet (downloads into {where})",
            reason="not a file here nor in the weights folder",
        )
    return MissingWeight(
        key,
        value,
        f"copy the weights file to {value}, or set {key} to a file that exists",
        reason="no such file",
        fetchable=False,
    )


def missing_weights(
    detector_weights: str | None,
    captioner_model: str | None,
    clip_model: str | None,
    *,
    weights_dir: Path | None = None,
) -> list[MissingWeight]:
    """The configured models that are not on this machine (None = that model is disabled). No network."""
    missing: list[MissingWeight] = []
    if detector_weights:
        found = _check_detector(detector_weights, weights_dir)
        if found:
            missing.append(found)
    for key, value in (("vision.captioner.model", captioner_model), ("vision.clip.model", clip_model)):
        if value:
            found = _check_transformers_model(key, value)
            if found:
                missing.append(found)
    return missing


def hub_offline() -> bool:
    """The user has declared this machine offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(name, "").strip().lower() in truthy for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def reachable(host: str, port: int = 443, timeout: float = _CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds, DNS included.

    Name resolution has no timeout of its own, so the attempt runs in a daemon thread that is abandoned
    when the time is up: an offline machine answers False in ``timeout`` seconds, never hangs.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, name=f"reachable-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _hf_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def can_download(missing: list[MissingWeight]) -> bool:
    """True when every missing weight is fetchable and its host answers (quick, bounded check)."""
    if not missing or not all(m.fetchable for m in missing):
        return False
    hosts = {"github.com" if m.key == "vision.detector.weights" else _hf_host() for m in missing}
    if hub_offline() and any(host != "github.com" for host in hosts):
        return False
    return all(reachable(host) for host in hosts)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line (hub and HTTP errors span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fetch_detector(name: str, weights_dir: Path, progress: bool) -> Path:
    from stages.ultralytics_env import prepare_ultralytics

    prepare_ultralytics()
    from ultralytics.utils.downloads import attempt_download_asset

    target = weights_dir / name
    try:
        weights_dir.mkdir(parents=True, exist_ok=True)
        attempt_download_asset(str(target), progress=progress)
    except Exception as error:  # noqa: BLE001 - network, disk and Ultralytics errors all mean "not fetched"
        raise WeightsError(f"vision.detector.weights = {name!r}: download into {weights_dir} failed "
                           f"({_one_line(error)}); run again with internet, or set the key to a local file") from None
    if not target.is_file():
        raise WeightsError(
            f"vision.detector.weights = {name!r}: Ultralytics has no downloadable asset of that name; "
            "use e.g. yolo11n.pt or set the key to a local file"
        )
    return target


def _fetch_transformers_model(key: str, repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception as error:  # noqa: BLE001 - any hub error means the same thing to the user
        raise WeightsError(f"{key} = {repo_id!r}: cannot list that model on the Hugging Face Hub "
                           f"({_one_line(error)}); check the name and the connection") from None
    weights = "*.safetensors" if any(name.endswith(".safetensors") for name in files) else "*.bin"
    # Only what transformers loads: configs, tokenizer files and one weights format (not TF/Flax copies).
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.model", weights], etag_timeout=10)
    except Exception as error:  # noqa: BLE001 - a failed download, whatever the cause
        raise WeightsError(f"{key} = {repo_id!r}: download failed ({_one_line(error)}); run "
                           f"`{fetch_command()}` again with internet, or set {key} to a local folder") from None
    return Path(path)


def fetch_weights(
    detector_weights: str | None,
    captioner_model: str | None,
    clip_model: str | None,
    *,
    weights_dir: Path | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download the configured public weights that are missing; returns what was downloaded.

    Fails fast with a ``WeightsError`` (listing what is missing) when a weight is not downloadable or
    the machine is offline.
    """
    missing = missing_weights(detector_weights, captioner_model, clip_model, weights_dir=weights_dir)
    if not missing:
        return []
    unfetchable = [m for m in missing if not m.fetchable]
    if unfetchable:
        raise WeightsError("these weights cannot be downloaded: " + "; ".join(str(m) for m in unfetchable))
    if not can_download(missing):
        hosts = sorted({"github.com" if m.key == "vision.detector.weights" else _hf_host() for m in missing})
        raise WeightsError(
            f"cannot download model weights: no connection to {', '.join(hosts)}"
            + (" (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if hub_offline() else "")
            + "; missing " + ", ".join(f"{m.key} = {m.value!r}" for m in missing)
            + "; run this with internet, or point those keys at local copies"
        )
    fetched: list[Path] = []
    for item in missing:
        if item.key == "vision.detector.weights":
            fetched.append(_fetch_detector(item.value, weights_dir or default_weights_dir(), progress))
        else:
            fetched.append(_fetch_transformers_model(item.key, item.value))
    still = missing_weights(detector_weights, captioner_model, clip_model, weights_dir=weights_dir)
    if still:
        raise WeightsError("downloads finished but these are still missing: " + "; ".join(str(m) for m in still))
    return fetched
