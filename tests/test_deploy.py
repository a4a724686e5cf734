"""The deployment files: the systemd unit (verify, security score), the production config, install.sh."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from app.config import BinnerConfig, load_config

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "binner.service"
CONFIG = REPO / "deploy" / "binner.yaml"
INSTALL = REPO / "deploy" / "install.sh"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
MAX_EXPOSURE = 2.5
# Keys whose production value deliberately differs from the code's default (paths, logs for journald).
PRODUCTION_OVERRIDES = {"input", "output", "state_dir", "log.format"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing (Debian package `systemd`)"
)


def _unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def _seconds(value: str) -> float:
    """A systemd time span such as ``90``, ``90s``, ``1min 30s``, ``2min``."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def _render_unit(tmp_path: Path, **env: str) -> tuple[Path, Path]:
    """The unit as install.sh installs it, with PREFIX in tmp_path so that ExecStart= exists for `verify`."""
    prefix = tmp_path / "opt" / "binner"
    binary = prefix / "venv" / "bin" / "binner"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    rendered = subprocess.run(
        ["bash", str(INSTALL), "--print-unit"], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, **env, "PREFIX": str(prefix)},
    ).stdout
    # Only the path prefix differs from the shipped unit: every other line is the real content.
    assert rendered.replace(str(prefix), "/opt/binner").splitlines() == [
        line for line in _install_view(UNIT.read_text(), env).splitlines()
    ]
    unit = tmp_path / "binner.service"
    unit.write_text(rendered)
    return unit, binary


def _install_view(text: str, env: dict[str, str]) -> str:
    """What install.sh should make of the unit for ``env`` (only ReadWritePaths= changes for other dirs)."""
    if "INPUT_DIR" in env or "OUTPUT_DIR" in env:
        parent = os.path.commonpath([env.get("INPUT_DIR", "/srv/binner/inbox"), env.get("OUTPUT_DIR", "/srv/binner/bins")])
        text = re.sub(r"(?m)^ReadWritePaths=.*$", f"ReadWritePaths={parent}", text)
    return text


@needs_analyze
@pytest.mark.parametrize("env", [{}, {"INPUT_DIR": "/data/in", "OUTPUT_DIR": "/data/out"}], ids=["default", "data"])
def test_unit_verifies_without_any_message(tmp_path: Path, env: dict[str, str]) -> None:
    unit, _ = _render_unit(tmp_path, **env)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", (
        f"systemd-analyze verify {unit}:\n{result.stdout}{result.stderr}"
    )


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a directive is reported on stderr."""
    unit, _ = _render_unit(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert "ProtectSytem" in result.stderr


@needs_analyze
def test_security_exposure_is_ok(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    match = re.search(r"Overall exposure level for binner\.service: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, result.stdout[-2000:]
    score = float(match.group(1))
    assert score <= MAX_EXPOSURE, f"exposure {score} {match.group(2)} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_lifecycle_settings() -> None:
    text = UNIT.read_text()
    assert _unit_values(text, "Type") == ["notify"]
    assert _unit_values(text, "NotifyAccess") == ["main"]
    assert _unit_values(text, "ExecStart") == ["/opt/binner/venv/bin/binner run --config /etc/binner/binner.yaml"]
    assert _unit_values(text, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _unit_values(text, "Restart") == ["on-failure"]
    assert _seconds(_unit_values(text, "WatchdogSec")[0]) > 0
    assert _seconds(_unit_values(text, "TimeoutStartSec")[0]) >= 300, "model loading needs minutes"


def test_stop_timeout_covers_the_drain() -> None:
    """systemd must not SIGKILL the daemon while it still drains within drain_timeout_s."""
    drain = load_config(CONFIG).drain_timeout_s
    stop = _seconds(_unit_values(UNIT.read_text(), "TimeoutStopSec")[0])
    assert stop > drain, f"TimeoutStopSec={stop:.0f}s must exceed drain_timeout_s={drain:.0f}s (plus teardown)"


def test_unit_lets_the_service_write_where_the_config_points() -> None:
    config = load_config(CONFIG)
    text = UNIT.read_text()
    writable = [Path(p) for value in _unit_values(text, "ReadWritePaths") for p in value.split()]
    for path in (config.input, config.output):
        assert any(path == w or path.is_relative_to(w) for w in writable), f"{path} is not under {writable}"
    # input and output share one ReadWritePaths= entry: separate bind mounts would make rename() fail (EXDEV)
    assert any(config.input.is_relative_to(w) and config.output.is_relative_to(w) for w in writable)
    assert config.state_dir == Path("/var/lib") / _unit_values(text, "StateDirectory")[0]


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.update(_leaves(annotation, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = field.default
    return leaves


def _yaml_leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            leaves.update(_yaml_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_production_config_loads_with_the_production_values() -> None:
    config = load_config(CONFIG)
    assert config.input == Path("/srv/binner/inbox")
    assert config.output == Path("/srv/binner/bins")
    assert config.state_dir == Path("/var/lib/binner")
    assert (config.http.host, config.http.port) == ("127.0.0.1", 9108)
    assert config.log.format == "json"


def test_production_config_lists_every_key_at_its_default() -> None:
    """Every key of BinnerConfig is in deploy/binner.yaml, at the code's default unless deliberately changed."""
    expected = _leaves(BinnerConfig)
    written = _yaml_leaves(yaml.safe_load(CONFIG.read_text()))
    missing = sorted(set(expected) - set(written))
    unknown = sorted(set(written) - set(expected))
    assert not missing, f"deploy/binner.yaml lacks {missing}: add them with their defaults and a comment"
    assert not unknown, f"deploy/binner.yaml has keys BinnerConfig does not know: {unknown}"
    effective = _yaml_leaves(load_config(CONFIG).model_dump(mode="json"))
    defaults = _yaml_leaves(BinnerConfig.model_construct().model_dump(mode="json"))
    drifted = {key: (effective[key], defaults[key]) for key in expected
               if key not in PRODUCTION_OVERRIDES and effective[key] != defaults[key]}
    assert not drifted, f"deploy/binner.yaml differs from the defaults (value, default): {drifted}"


def _comment_defaults() -> dict[str, str]:
    """key path -> the text after "Default:" in the comment block right above that key in deploy/binner.yaml."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    for line in CONFIG.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            comment = []
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([name for _, name in stack] + [key])
        if value.strip():
            match = re.search(r"Default: (.+?)(?:\.\s|\.?$)", " ".join(comment))
            found[path] = match.group(1) if match else ""
        else:
            stack.append((indent, key))
        comment = []
    return found


def test_every_key_explains_its_true_default() -> None:
    """The "Default: X" in each key's comment is the code's default (so the comments cannot go stale)."""
    defaults = _yaml_leaves(BinnerConfig.model_construct().model_dump(mode="json"))
    stated = _comment_defaults()
    assert set(stated) == set(defaults), sorted(set(stated) ^ set(defaults))
    wrong = {}
    for key, text in stated.items():
        if not text:
            wrong[key] = "no 'Default: ...' in the comment above it"
            continue
        value = yaml.safe_load(re.sub(r"\s*\(.*\)$", "", text))  # "268435456 (256 MiB)" -> 268435456
        expected = defaults[key]
        if key in ("input", "output", "state_dir"):
            same = Path(str(value)) == Path(str(expected))
        else:
            same = value == expected
        if not same:
            wrong[key] = f"comment says {value!r}, the code's default is {expected!r}"
    assert not wrong, f"deploy/binner.yaml comments: {wrong}"


def test_prometheus_example_scrapes_the_configured_port() -> None:
    config = load_config(CONFIG)
    scrape = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in scrape["scrape_configs"] if job["job_name"] == "binner"
               for group in job["static_configs"] for t in group["targets"]]
    assert f"{config.http.host}:{config.http.port}" in targets


def test_install_script_syntax() -> None:
    result = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = INSTALL.read_text()
    assert "set -euo pipefail" in text
    assert "$REPO/constraints.txt" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is missing (Debian package `shellcheck`)")
def test_install_script_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_script_renders_paths(tmp_path: Path) -> None:
    env = {**os.environ, "PREFIX": "/usr/local/binner", "INPUT_DIR": "/data/in", "OUTPUT_DIR": "/data/out",
           "BINNER_USER": "sorter"}
    unit = subprocess.run(["bash", str(INSTALL), "--print-unit"], capture_output=True, text=True, env=env,
                          timeout=60, check=True).stdout
    assert _unit_values(unit, "ExecStart") == ["/usr/local/binner/venv/bin/binner run --config /etc/binner/binner.yaml"]
    assert _unit_values(unit, "ReadWritePaths") == ["/data"]
    assert _unit_values(unit, "User") == ["sorter"] and _unit_values(unit, "Group") == ["sorter"]
    config_text = subprocess.run(["bash", str(INSTALL), "--print-config"], capture_output=True, text=True, env=env,
                                 timeout=60, check=True).stdout
    rendered = tmp_path / "binner.yaml"
    rendered.write_text(config_text)
    config = load_config(rendered)
    assert (config.input, config.output) == (Path("/data/in"), Path("/data/out"))

    apart = subprocess.run(["bash", str(INSTALL), "--print-unit"], capture_output=True, text=True, timeout=60,
                           env={**env, "INPUT_DIR": "/in", "OUTPUT_DIR": "/out"}, check=True)
    assert _unit_values(apart.stdout, "ReadWritePaths") == ["/in /out"]
    assert "will copy" in apart.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INPUT_DIR": "relative/in"}, "absolute path"),
        ({"INPUT_DIR": "/srv/x", "OUTPUT_DIR": "/srv/x/bins"}, "must not be inside"),
        ({"INPUT_DIR": "/home/me/in", "OUTPUT_DIR": "/home/me/out"}, "ProtectHome"),
        ({"BINNER_USER": "Bad User"}, "not a valid user name"),
    ],
)
def test_install_script_rejects_bad_options(env: dict[str, str], message: str) -> None:
    result = subprocess.run(["bash", str(INSTALL), "--print-unit"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert result.returncode != 0
    assert message in result.stderr


def test_a_non_editable_install_ships_every_package(tmp_path: Path) -> None:
    """install.sh installs binner as a wheel, not editable: every package of the tree (app.engine, app.hosts, ...)
    must be in it. Before, only the top-level modules were, and `binner run` failed to import its engine."""
    import zipfile

    source = tmp_path / "source"  # a copy without build outputs: setuptools would package a stale build/lib
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests",
                                                                "inbox", "bins", "docs", "grafana", "deploy"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("binner-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(path.relative_to(REPO)) for top in ("app", "stages", "queues") for path in (REPO / top).rglob("*.py")
               if "__pycache__" not in path.parts}
    assert modules - shipped == set(), f"left out of the wheel: {sorted(modules - shipped)}"
