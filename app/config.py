"""Configuration: YAML file < ``BINNER_*`` environment < CLI flags, validated once at start-up.

Errors name the key (``vision.detector.weights``) and the problem, so a user can fix the file they wrote.
"""

from __future__ import annotations

import contextvars
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from stages.rules import RuleThresholds, signals_of

_yaml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("binner_yaml_path", default=None)

Devices = Literal["auto"] | list[str]
DEFAULT_INPUT = Path("./inbox")
# Batch caps, queue capacities and time limits: a zero or negative one is refused where it is read (a cap of 0 ran
# as 1, a timeout of 0 fired at once), like loader.batch_size always was.
Count = Annotated[int, Field(ge=1)]
BatchSize = Literal["auto"] | Count
Milliseconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# Where a model stage's replicas run: in the worker thread, or in a child process that the thread drives;
# auto picks by device kind what measured faster (docs/benchmarks.md, "Thread vs process isolation").
Isolation = Literal["thread", "process", "auto"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _split_devices(value: Any) -> Any:
    if isinstance(value, str) and value != "auto":
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class HttpConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)


class LogConfig(Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class QueueConfig(Section):
    """Capacities of the bounded queues; about two batches each keeps latency low (see docs/benchmarks.md)."""

    load: Count = 32
    ocr: Count = 16
    vision: Count = 32
    sink: Count = 64


class LimitsConfig(Section):
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_pixels: int = Field(120_000_000, ge=1)
    max_side: int = Field(1600, ge=64, description="longest side of the decoded image handed to the models")


class LoaderConfig(Section):
    workers: int = Field(2, ge=1, le=64)
    batch_size: Count = 16
    max_wait_ms: Milliseconds = 10.0


class OcrPrecisionConfig(Section):
    """Per-network precision of the torch OCR runtime on CUDA (CPU always runs fp32); auto: det fp32, cls/rec fp16."""

    det: Literal["auto", "fp16", "fp32"] = "auto"
    cls: Literal["auto", "fp16", "fp32"] = "auto"
    rec: Literal["auto", "fp16", "fp32"] = "auto"


class OcrConfig(Section):
    enabled: bool = True
    backend: Literal["rapidocr", "paddleocr", "synthetic"] = "rapidocr"
    runtime: Literal["auto", "onnxruntime", "torch"] = Field(
        "auto", description="rapidocr models on onnxruntime or torch; auto: torch on cuda devices, onnxruntime on cpu")
    precision: OcrPrecisionConfig = OcrPrecisionConfig()
    devices: Devices = "auto"
    batch_size: BatchSize = 8
    max_wait_ms: Milliseconds = 50.0
    min_confidence: float = Field(0.5, ge=0, le=1)
    max_side: int = Field(1280, ge=64)
    paddle_model_dir: str | None = None
    synthetic_ms: tuple[Milliseconds, Milliseconds] = (20.0, 10.0)
    isolation: Isolation = "auto"

    _split = field_validator("devices", mode="before")(_split_devices)

    @model_validator(mode="after")
    def _paddle_needs_a_process(self) -> OcrConfig:
        if self.backend == "paddleocr" and self.isolation == "thread":
            raise ValueError("ocr.isolation: the paddleocr backend runs only in its own process (PaddlePaddle "
                             "predictors are not thread-safe); set ocr.isolation to process or auto")
        return self


class DetectorConfig(Section):
    enabled: bool = True
    weights: str = "yolo11n.pt"
    confidence: float = Field(0.25, ge=0, le=1)
    image_size: int = Field(640, ge=32)


class CaptionerConfig(Section):
    enabled: bool = True
    model: str = "Salesforce/blip-image-captioning-base"
    max_new_tokens: int = Field(30, ge=1)
    prompt: str | None = None


class ClipConfig(Section):
    enabled: bool = True
    model: str = "openai/clip-vit-base-patch32"


class VisionConfig(Section):
    devices: Devices = "auto"
    batch_size: BatchSize = 16
    max_wait_ms: Milliseconds = 50.0
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    backend: Literal["models", "synthetic"] = "models"
    synthetic_ms: tuple[Milliseconds, Milliseconds] = (15.0, 6.0)
    isolation: Isolation = "auto"
    detector: DetectorConfig = DetectorConfig()
    captioner: CaptionerConfig = CaptionerConfig()
    clip: ClipConfig = ClipConfig()

    _split = field_validator("devices", mode="before")(_split_devices)


class RayConfig(Section):
    """The Ray engine's patience (``binner once --engine ray``)."""

    wait_for_resources_s: float = Field(180.0, gt=0, description="after a lost node, how long to wait for the cluster "
                                        "to have room for one replica per stage again before exiting 2")
    heartbeat_s: float = Field(30.0, gt=0, description="how often a running window logs rows done, rows in flight "
                               "and seconds since the last result")


class BinnerConfig(BaseSettings):
    """The whole effective configuration; ``binner config show`` prints it."""

    model_config = SettingsConfigDict(
        env_prefix="BINNER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    input: Path = DEFAULT_INPUT
    create_input: bool = False
    output: Path = Path("./bins")
    state_dir: Path = Path("./.binner")
    placement: Literal["move", "copy", "hardlink"] = "move"
    settle_ms: int = Field(1000, ge=0)
    rescan_interval_s: Seconds = 60.0
    max_attempts: Count = 3
    drain_timeout_s: Seconds = 60.0
    stall_timeout_s: Seconds = 300.0
    feeder_page_size: Count = 64
    http: HttpConfig = HttpConfig()
    ray: RayConfig = RayConfig()
    log: LogConfig = LogConfig()
    queues: QueueConfig = QueueConfig()
    limits: LimitsConfig = LimitsConfig()
    loader: LoaderConfig = LoaderConfig()
    ocr: OcrConfig = OcrConfig()
    vision: VisionConfig = VisionConfig()
    rules: RuleThresholds = RuleThresholds()

    @field_validator("input", "output", "state_dir", mode="after")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        """Relative paths from the environment and flags are taken from the working directory once, at start-up
        (those in a configuration file were already anchored at the file's folder)."""
        return path.expanduser().absolute()

    @model_validator(mode="after")
    def _input_output_disjoint(self) -> BinnerConfig:
        inp, out, state = self.input.absolute(), self.output.absolute(), self.state_dir.absolute()
        if inp == out or out.is_relative_to(inp):
            raise ValueError(f"output ({self.output}) must not be inside input ({self.input}): pick a sibling folder")
        if state == inp or state.is_relative_to(inp):
            # The daemon would take its own ledger.sqlite3 (and -wal, -shm) as input and quarantine it.
            raise ValueError(f"state_dir ({self.state_dir}) must not be inside input ({self.input}): "
                             "pick a folder outside the watched input")
        return self

    @property
    def creates_input(self) -> bool:
        """Whether a missing input may be created: ``create_input``, or input is the default ``./inbox``
        (so ``make run`` works in a fresh clone, while a typo in any other path is refused)."""
        return self.create_input or self.input == DEFAULT_INPUT.absolute()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    _source_file: Path | None = PrivateAttr(default=None)

    @property
    def source_file(self) -> Path | None:
        """The YAML file this configuration was read from (absolute), or None for defaults, environment and flags."""
        return self._source_file

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def produced_signals(self) -> frozenset[str]:
        """The signals the enabled models write (what the built stages' ``produces`` add up to): a signal outside it
        can never come, so the rules pass the criteria that read it (``rebin`` and ``rebin --infer`` ask here)."""
        models = {"ocr"} if self.ocr.enabled else set()
        v = self.vision
        parts = {"detector": v.detector.enabled, "captioner": v.captioner.enabled, "clip": v.clip.enabled}
        if v.backend == "synthetic":  # the stand-in writes empty detections whenever vision is on
            parts = {"detector": any(parts.values())}
        models.update(model for model, enabled in parts.items() if enabled)
        return signals_of(models)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _yaml_path.get()
        return read_config_file(path) if path else {}


class ConfigError(Exception):
    """A configuration problem, worded for the user: which file or key, what is wrong, what to do."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's top-level mapping; a file that cannot be read (missing, a directory, unreadable, not UTF-8) is a
    ``ConfigError`` naming it, like a file that does not parse: `run` stops with one line, a reload keeps the rules."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path given to --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: give the path of the YAML file (--config)") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                          f"{error.start}): save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}; check its permissions "
                          "(binner reads it as the user it runs as)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys at the top level")
    return data


def _fields_of(loc: tuple[str, ...]) -> dict[str, Any]:
    """The fields of the section that ``loc`` names (``("vision", "detector")``), or {} if it names none."""
    model: Any = BinnerConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return {}
        model = field.annotation
    return dict(getattr(model, "model_fields", {}))


def did_you_mean(name: str, known: Any) -> str:
    """'; did you mean `placement`?' for a near miss among ``known``, else ''."""
    close = difflib.get_close_matches(name.lower(), [str(k).lower() for k in known], n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _field_path(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The configuration key of an error location, without pydantic's union member tags (``literal['auto']``)."""
    path: list[str] = []
    for part in loc:
        text = str(part)
        if isinstance(part, int) or "[" in text or text in _TYPE_TAGS or text.startswith("constrained-"):
            if isinstance(part, int):
                path.append(text)
            continue
        path.append(text)
    return tuple(path)


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "tuple", "dict"}


def read_config_file(path: Path) -> dict[str, Any]:
    """A configuration file's mapping with its relative paths anchored at the file's folder (as binner reads it)."""
    return _resolve_relative(read_yaml(path), path.absolute().parent)


def _describe(error: ValidationError, source: str) -> str:
    """pydantic's errors reworded: one line per key, union alternatives merged, near misses suggested."""
    merged: dict[tuple[str, ...], dict[str, Any]] = {}
    for problem in error.errors():
        loc = _field_path(problem["loc"])
        entry = merged.setdefault(loc, {"messages": [], "input": problem.get("input"), "type": problem["type"]})
        message = problem["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if problem["type"] == "extra_forbidden":
            known = _fields_of(loc[:-1])
            message = "unknown key" + (did_you_mean(loc[-1], known) or "; `binner config show` lists the valid keys")
        elif message.startswith("Input should be "):
            message = "should be " + message.removeprefix("Input should be ")
        if message not in entry["messages"]:
            entry["messages"].append(message)
    lines = [f"invalid configuration ({source}):"]
    for loc, entry in merged.items():
        messages = entry["messages"]
        if len(messages) > 1 and all(m.startswith("should be ") for m in messages):
            message = "should be " + " or ".join(m.removeprefix("should be ").split(", unable")[0] for m in messages)
        else:
            message = "; ".join(messages)
        given = entry["input"]
        shown = "" if isinstance(given, dict) or entry["type"] == "extra_forbidden" or not loc else f" (got {given!r})"
        lines.append(f"  {'.'.join(loc)}: {message}{shown}" if loc else f"  {message}")
    return "\n".join(lines)


# BINNER_* variables that are not settings: the configuration file, and the installer's and tests' own.
_NOT_SETTINGS = {"CONFIG", "USER", "EXTRAS", "CACHE_DIR", "BENCH_PARTIAL", "SYSTEMD_TEST_CONFIG"}


def check_environment(environ: Any = None) -> None:
    """A misspelled top-level ``BINNER_*`` variable is an error, not silently ignored (nested ones pydantic checks)."""
    environ = os.environ if environ is None else environ
    known = BinnerConfig.model_fields
    for name in sorted(environ):
        if not name.upper().startswith("BINNER_"):
            continue
        rest = name[len("BINNER_"):]
        if rest.upper() in _NOT_SETTINGS:
            continue
        top = rest.split("__", 1)[0].lower()
        if top in known:
            continue
        close = difflib.get_close_matches(top, [*known, *(k.lower() for k in _NOT_SETTINGS)], n=1, cutoff=0.6)
        hint = f"; did you mean BINNER_{close[0].upper()}?" if close else (
            "; settings are BINNER_<KEY> (e.g. BINNER_PLACEMENT) and BINNER_<SECTION>__<KEY> (e.g. BINNER_OCR__DEVICES)")
        raise ConfigError(f"environment variable {name}: not a binner setting{hint} (unset it or fix the name)")


# Settings that name a file or folder of a model: (keys, always a path). One that is not always a path may be a
# bare file name or a model id (org/name), looked up elsewhere unless it names something here.
_MODEL_PATHS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("ocr", "paddle_model_dir"), True), (("vision", "detector", "weights"), False),
    (("vision", "captioner", "model"), False), (("vision", "clip", "model"), False),
)


def _model_path_holders(data: dict[str, Any]) -> list[tuple[dict[str, Any], str, bool]]:
    """(mapping, key, always a path) of every model path set in ``data``."""
    found = []
    for keys, always in _MODEL_PATHS:
        holder: Any = data
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and holder.get(keys[-1]):
            found.append((holder, keys[-1], always))
    return found


def _resolve_relative(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a configuration file are taken from the file's own folder, not the working directory."""

    def anchored(value: Any, explicit_only: bool) -> Any:
        if not isinstance(value, str) or not value or value.startswith(("/", "~")):
            return value
        if explicit_only and not value.startswith(("./", "../")):
            return value  # a bare file name or a model id (org/name), looked up elsewhere
        return os.path.normpath(base / value)

    for key in ("input", "output", "state_dir"):
        if key in data:
            data[key] = anchored(data[key], explicit_only=False)
    for holder, key, always in _model_path_holders(data):
        holder[key] = anchored(holder[key], explicit_only=not always)
    return data


def with_model_paths_absolute(config: BinnerConfig) -> BinnerConfig:
    """``config`` with every model path that names something in the working directory made absolute, for processes
    that run elsewhere (Ray workers): there the same relative path would name something else, or nothing."""
    absolute = config.model_copy(deep=True)
    for (*sections, name), _always in _MODEL_PATHS:
        holder: Any = absolute
        for section in sections:
            holder = getattr(holder, section)
        value = getattr(holder, name)
        if value and not os.path.isabs(os.path.expanduser(value)) and os.path.exists(value):
            setattr(holder, name, os.path.abspath(value))
    return absolute


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> BinnerConfig:
    """Build the effective configuration; ``overrides`` are CLI flags as a nested mapping."""
    yaml_path = Path(path) if path else None
    if yaml_path is None and os.environ.get("BINNER_CONFIG"):
        yaml_path = Path(os.environ["BINNER_CONFIG"])
    check_environment()
    token = _yaml_path.set(yaml_path)
    try:
        clean = {key: value for key, value in (overrides or {}).items() if value is not None}
        config = BinnerConfig(**clean)
        config._source_file = yaml_path.absolute() if yaml_path else None
        return config
    except ValidationError as error:
        source = f"{yaml_path}, BINNER_* environment and flags" if yaml_path else "BINNER_* environment and flags"
        raise ConfigError(_describe(error, source)) from None
    finally:
        _yaml_path.reset(token)


def dump_config(config: BinnerConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
