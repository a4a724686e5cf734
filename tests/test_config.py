"""Configuration cascade (file < environment < flags) and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.config import ConfigError, load_config
from app.devices import resolve_devices
from tests.conftest import REPO


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid_and_name_the_public_weights() -> None:
    config = load_config(None)
    assert config.vision.detector.weights.startswith("yolo")
    assert config.vision.captioner.model == "Salesforce/blip-image-captioning-base"
    assert config.vision.clip.model == "openai/clip-vit-base-patch32"
    assert config.http.host == "127.0.0.1"


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(tmp_path / "c.yaml", "settle_ms: 111\nocr:\n  batch_size: 3\n  max_wait_ms: 7\nhttp:\n  port: 9999\n")
    assert load_config(file).settle_ms == 111
    monkeypatch.setenv("BINNER_SETTLE_MS", "222")
    monkeypatch.setenv("BINNER_OCR__BATCH_SIZE", "5")
    config = load_config(file)
    assert (config.settle_ms, config.ocr.batch_size, config.ocr.max_wait_ms, config.http.port) == (222, 5, 7, 9999)
    config = load_config(file, {"settle_ms": 333, "ocr": {"batch_size": 9}})
    assert (config.settle_ms, config.ocr.batch_size, config.ocr.max_wait_ms) == (333, 9, 7)


def test_unknown_and_invalid_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vision\.detector\.wieghts: unknown key"):
        load_config(write(tmp_path / "a.yaml", "vision:\n  detector:\n    wieghts: x.pt\n"))
    with pytest.raises(ConfigError, match=r"rules\.c_text_area_ratio: .*less than or equal to 1.*got 3"):
        load_config(write(tmp_path / "b.yaml", "rules:\n  c_text_area_ratio: 3\n"))
    with pytest.raises(ConfigError, match=r"placement: .*'move', 'copy' or 'hardlink'"):
        load_config(write(tmp_path / "c.yaml", "placement: teleport\n"))
    with pytest.raises(ConfigError, match="must not be inside input"):
        load_config(None, {"input": tmp_path, "output": tmp_path / "bins"})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "d.yaml", "ocr: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_devices_auto_and_missing_devices() -> None:
    assert resolve_devices("auto", "ocr", gpu_count=0) == ["cpu"]
    assert resolve_devices("auto", "vision", gpu_count=1) == ["cuda:0"]
    assert resolve_devices("auto", "ocr", gpu_count=3) == ["cuda:0"]
    assert resolve_devices("auto", "vision", gpu_count=3) == ["cuda:1", "cuda:2"]
    assert resolve_devices(["cuda:1", "cuda:2"], "vision", gpu_count=3) == ["cuda:1", "cuda:2"]
    with pytest.raises(ConfigError, match=r"vision\.devices: cuda:2 does not exist: this machine shows 2"):
        resolve_devices(["cuda:0", "cuda:2"], "vision", gpu_count=2)
    with pytest.raises(ConfigError, match=r"ocr\.devices: 'gpu0' is not a device"):
        resolve_devices(["gpu0"], "ocr", gpu_count=1)


def test_device_list_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINNER_VISION__DEVICES", "cuda:1,cuda:2")
    assert load_config(None).vision.devices == ["cuda:1", "cuda:2"]


def test_config_show_and_check_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["config", "show", "--config", "deploy/examples/offline-cpu.yaml"])
    assert shown.exit_code == 0, shown.output
    assert "yolov8n_int8.tflite" in shown.output and "c_text_area_ratio" in shown.output
    bad = runner.invoke(cli, ["config", "show", "--config", str(write(tmp_path / "x.yaml", "nope: 1\n"))])
    assert bad.exit_code == 2 and "nope: unknown key" in bad.output
    devices = runner.invoke(cli, ["config", "check"], env={"BINNER_OCR__DEVICES": "cuda:7",
                                                           "BINNER_VISION__BACKEND": "synthetic"})
    assert devices.exit_code == 2 and "ocr.devices: cuda:7 does not exist" in devices.output


def test_a_state_dir_inside_the_input_is_refused_naming_both_keys(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for state in (inbox / ".binner", inbox):
        with pytest.raises(ConfigError, match=r"state_dir \(.*\) must not be inside input \(.*inbox\)"):
            load_config(None, {"input": inbox, "output": tmp_path / "bins", "state_dir": state})
    assert load_config(None, {"input": inbox, "output": tmp_path / "bins", "state_dir": tmp_path / "state"})


def test_a_missing_input_is_refused_unless_configured_to_create_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.build import prepare_dirs

    typo = tmp_path / "inbx"
    places = {"output": tmp_path / "bins", "state_dir": tmp_path / "state"}
    with pytest.raises(ConfigError, match=r"input: .*inbx does not exist.*create_input: true"):
        prepare_dirs(load_config(None, {"input": typo, **places}))
    assert not typo.exists(), "a typo must not become an empty watched folder"
    prepare_dirs(load_config(None, {"input": typo, "create_input": True, **places}))
    assert typo.is_dir()
    monkeypatch.chdir(tmp_path)  # the built-in default ./inbox (what `make run` uses) is created
    prepare_dirs(load_config(None, places))
    assert (tmp_path / "inbox").is_dir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"input: .*a-file is not a directory"):
        prepare_dirs(load_config(None, {"input": tmp_path / "a-file", **places}))


def test_a_misspelled_top_level_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINNER_PLACEMNT", "copy")
    with pytest.raises(ConfigError, match=r"BINNER_PLACEMNT: not a binner setting; did you mean BINNER_PLACEMENT\?"):
        load_config(None)
    monkeypatch.delenv("BINNER_PLACEMNT")
    monkeypatch.setenv("BINNER_CONFIG", "")  # binner's own variables that are not settings stay allowed
    monkeypatch.setenv("BINNER_PLACEMENT", "copy")
    assert load_config(None).placement == "copy"


def test_errors_never_show_pydantic_wording_and_suggest_near_misses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as union:
        load_config(write(tmp_path / "a.yaml", "ocr:\n  batch_size: lots\n"))
    text = str(union.value)
    assert "ocr.batch_size: should be 'auto' or a valid integer (got 'lots')" in text, text
    assert "literal[" not in text and ".int:" not in text and text.count("ocr.batch_size") == 1
    with pytest.raises(ConfigError) as top:
        load_config(None, {"input": tmp_path, "output": tmp_path / "bins"})
    assert "(top level)" not in str(top.value) and "Value error" not in str(top.value)
    with pytest.raises(ConfigError, match=r"placemnt: unknown key; did you mean `placement`\?"):
        load_config(write(tmp_path / "b.yaml", "placemnt: copy\n"))
    with pytest.raises(ConfigError, match=r"vision\.detector\.wieghts: unknown key; did you mean `weights`\?"):
        load_config(write(tmp_path / "c.yaml", "vision:\n  detector:\n    wieghts: x.pt\n"))


def test_cuda_devices_on_a_cpu_only_machine_get_a_sensible_hint() -> None:
    with pytest.raises(ConfigError) as error:
        resolve_devices(["cuda:0"], "ocr", gpu_count=0)
    text = str(error.value)
    assert "shows no CUDA device" in text and "`[cpu]`" in text, text
    assert "``" not in text and "cuda:0..cuda:0" not in text, text


def test_relative_paths_in_a_file_are_taken_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "binner"
    folder.mkdir(parents=True)
    config_file = write(folder / "binner.yaml", "input: ./inbox\noutput: ../bins\nstate_dir: state\n"
                                                "vision:\n  detector:\n    weights: ./models/yolo.pt\n"
                                                "  captioner:\n    model: Salesforce/blip-image-captioning-base\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(config_file)
    assert config.input == folder / "inbox" and config.output == tmp_path / "etc" / "bins"
    assert config.state_dir == folder / "state"
    assert config.vision.detector.weights == str(folder / "models" / "yolo.pt")
    assert config.vision.captioner.model == "Salesforce/blip-image-captioning-base", "model ids stay as they are"
    assert load_config(None, {"input": "flag-inbox"}).input == elsewhere / "flag-inbox", "flags: working directory"
    from app.build import prepare_dirs

    with pytest.raises(ConfigError, match=re.escape(f"input: {folder / 'inbox'} does not exist")):
        prepare_dirs(config)


def test_every_shipped_configuration_loads(shared_images: Path) -> None:
    example = load_config(REPO / "deploy" / "examples" / "offline-cpu.yaml")
    assert Path(example.vision.detector.weights).is_file(), example.vision.detector.weights
    assert example.input == REPO / "inbox" and example.state_dir == REPO / ".binner"  # as `make run` had them
    production = load_config(REPO / "deploy" / "binner.yaml")
    assert production.input.is_absolute() and production.http.port


@pytest.mark.parametrize("kind", ["not_utf8", "directory"])
@pytest.mark.parametrize("command", [["run"], ["config", "check"]])
def test_a_configuration_that_cannot_be_read_stops_start_up_with_one_line(tmp_path: Path, kind: str,
                                                                          command: list[str]) -> None:
    """A config file that is not UTF-8, or a path that is a directory: one line naming the file and what to do, exit 2
    (before, a UnicodeDecodeError or IsADirectoryError traceback and exit 1)."""
    config = tmp_path / "binner.yaml"
    if kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(b"settle_ms: 100\n# r\xe9pertoire\n")
    result = CliRunner().invoke(cli, [*command, "--config", str(config)])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(config) in lines[0], result.stderr
    assert ("not UTF-8" if kind == "not_utf8" else "is a directory") in lines[0], lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize("key, value", [
    ("ocr.batch_size", 0), ("ocr.batch_size", -3), ("vision.batch_size", 0), ("loader.batch_size", 0),
    ("queues.load", 0), ("queues.sink", -1), ("feeder_page_size", 0), ("ocr.max_wait_ms", -1),
    ("vision.max_wait_ms", float("nan")), ("drain_timeout_s", 0), ("stall_timeout_s", -5),
    ("rescan_interval_s", float("inf")), ("ocr.synthetic_ms", [-1.0, 0.0]),
])
def test_every_batch_size_queue_size_and_timeout_is_validated(key: str, value: object) -> None:
    """``ocr.batch_size: 0`` used to pass `config check` and run with a cap of 1; now each is refused, naming it."""
    section, _, name = key.rpartition(".")
    overrides: dict[str, object] = {section: {name: value}} if section else {name: value}
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides)


def test_auto_batch_sizes_stay_allowed_and_config_check_refuses_a_zero(tmp_path: Path) -> None:
    assert load_config(None, {"ocr": {"batch_size": "auto"}, "vision": {"batch_size": "auto"}}).ocr.batch_size == "auto"
    config = write(tmp_path / "zero.yaml", "ocr:\n  batch_size: 0\n")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 2 and "ocr.batch_size" in result.stderr and "configuration OK" not in result.output
