"""An input folder inside the output: every command refuses it at start-up (exit 2, one line), however the paths
are spelled (``..``, a symlinked parent, a bind mount), and placement never removes an input that is the very
output it was placed at. Before this, ``once OUT/B --output OUT`` said ``B: 1`` and left ``OUT/B`` empty."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.build import check_disjoint, prepare_dirs
from app.config import ConfigError, load_config
from app.store import Placer
from tests.daemon_harness import binner, error_lines

SYNTHETIC = {
    "ocr": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [0.0, 0.0]},
    "vision": {"backend": "synthetic", "devices": ["cpu"], "synthetic_ms": [0.0, 0.0]},
    "http": {"enabled": False},
    "settle_ms": 0,
}


def png(path: Path, seed: int = 0) -> bytes:
    from app import bench

    scratch = path.parent / f".gen-{seed}"
    scratch.mkdir(parents=True, exist_ok=True)
    bench.make_images(scratch, 1, size=32, start=seed)
    made = next(scratch.iterdir())
    data = made.read_bytes()
    shutil.rmtree(scratch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


@pytest.fixture()
def sorted_output(tmp_path: Path) -> tuple[Path, Path, dict[Path, bytes]]:
    """An output tree that already holds sorted files, and a configuration of synthetic stages."""
    out = tmp_path / "out"
    kept = {out / "B" / "a.png": png(out / "B" / "a.png", 1), out / "B" / "sub" / "b.png": png(out / "B" / "sub" / "b.png", 2),
            out / "A" / "c.png": png(out / "A" / "c.png", 3)}
    config = tmp_path / "binner.yaml"
    config.write_text(yaml.safe_dump(SYNTHETIC))
    return out, config, kept


def assert_untouched(kept: dict[Path, bytes]) -> None:
    for path, data in kept.items():
        assert path.is_file(), f"{path} was removed"
        assert path.read_bytes() == data, f"{path} changed"


@pytest.mark.parametrize("spelling", ["plain", "dotdot", "symlinked_parent"])
def test_once_refuses_an_input_inside_the_output_and_keeps_every_file(
        tmp_path: Path, sorted_output: tuple[Path, Path, dict[Path, bytes]], spelling: str) -> None:
    out, config, kept = sorted_output
    if spelling == "plain":
        given = out / "B"
    elif spelling == "dotdot":
        (tmp_path / "elsewhere").mkdir()
        given = tmp_path / "elsewhere" / ".." / "out" / "B"
    else:
        (tmp_path / "view").symlink_to(out)  # the output seen through a link: only real paths tell
        given = tmp_path / "view" / "B"
    for engine in ("local", "ray"):
        result = binner("once", str(given), "--output", str(out), "--state", str(tmp_path / "st"),
                        "--config", str(config), "--engine", engine, "--no-progress")
        if engine == "ray" and "install the extra" in result.stderr:
            continue
        assert result.returncode == 2, (engine, result.stdout, result.stderr)
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "inside output" in lines[0], result.stderr
    assert_untouched(kept)


def test_the_daemon_refuses_an_input_inside_the_output(
        tmp_path: Path, sorted_output: tuple[Path, Path, dict[Path, bytes]]) -> None:
    out, config, kept = sorted_output
    (tmp_path / "view").symlink_to(out)
    for given in (out / "B", tmp_path / "view" / "B"):
        result = binner("run", "--input", str(given), "--output", str(out), "--state", str(tmp_path / "st"),
                        "--config", str(config), timeout=60)
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = error_lines(result.stdout + result.stderr)
        assert len(lines) == 1 and "inside output" in lines[0], result.stderr
    check = binner("config", "check", "--config", str(config), env={"BINNER_INPUT": str(out / "A"),
                                                                     "BINNER_OUTPUT": str(out)})
    assert check.returncode == 2 and "inside output" in check.stderr, check.stderr
    assert_untouched(kept)


def test_rebin_refuses_an_input_inside_the_output(
        tmp_path: Path, sorted_output: tuple[Path, Path, dict[Path, bytes]]) -> None:
    out, config, kept = sorted_output
    state = tmp_path / "st"
    inbox = tmp_path / "in"
    png(inbox / "x.png", 9)
    placed = binner("once", str(inbox), "--output", str(out), "--state", str(state), "--config", str(config),
                    "--no-progress")
    assert placed.returncode == 0, placed.stderr
    inside = tmp_path / "inside.yaml"
    inside.write_text(yaml.safe_dump({**SYNTHETIC, "input": str(out / "B"), "output": str(out)}))
    result = binner("rebin", "--config", str(inside), "--state", str(state))
    assert result.returncode == 2 and "inside output" in result.stderr, (result.stdout, result.stderr)
    assert_untouched(kept)


def test_real_paths_are_compared_not_spellings(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "B").mkdir(parents=True)
    (tmp_path / "view").symlink_to(out)
    places = {"state_dir": tmp_path / "state"}
    config = load_config(None, {"input": tmp_path / "view" / "B", "output": out, **places})  # lexically apart
    with pytest.raises(ConfigError, match=r"input \(.*view/B\) is inside output"):
        prepare_dirs(config)
    # The other way round: an output reached through a link into the input.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "into").symlink_to(inbox)
    with pytest.raises(ConfigError, match=r"output \(.*into/bins\) is inside input"):
        prepare_dirs(load_config(None, {"input": inbox, "output": tmp_path / "into" / "bins", **places}))
    # Side by side is fine, and so is a sibling whose name merely starts the same.
    prepare_dirs(load_config(None, {"input": tmp_path / "out2", "output": out, "create_input": True, **places}))


@pytest.mark.parametrize("mounted", ["output", "folder_inside"])
def test_a_bind_mount_is_seen_through(tmp_path: Path, mounted: str) -> None:
    """In a private mount namespace (needs root and mount): ``output``, the output mounted a second time at MNT and
    input MNT/B, which only device and inode numbers tell; ``folder_inside``, ``mount --bind OUT/B MNT`` and input
    MNT, which no parent of MNT tells (none is OUT): only the mount table says that MNT shows a folder inside OUT."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private bind mount")
    out, mnt = tmp_path / "out", tmp_path / "mnt"
    (out / "B").mkdir(parents=True)
    (out / "B" / "a.png").write_bytes(b"placed")
    mnt.mkdir()
    source, given = (out, mnt / "B") if mounted == "output" else (out / "B", mnt)
    script = (f"mount --bind {source} {mnt} && {os.sys.executable} -c "
              f"\"from pathlib import Path; from app.config import load_config; from app.build import prepare_dirs; "
              f"prepare_dirs(load_config(None, {{'input': Path('{given}'), 'output': Path('{out}'), "
              f"'state_dir': Path('{tmp_path}/state')}}))\"")
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    if "mount:" in result.stderr and "permission denied" in result.stderr.lower():
        pytest.skip(f"bind mounts are not allowed here: {result.stderr.strip()}")
    assert result.returncode != 0 and "is inside output" in result.stderr, result.stderr
    assert (out / "B" / "a.png").read_bytes() == b"placed"


def test_the_mount_table_is_believed_only_where_the_file_system_confirms_it(tmp_path: Path) -> None:
    """A mount table given as data (the real bind mounts are the test above): NFS names ``/`` as the folder every
    export of a server shows, so two exports of one server mounted side by side (input and output on a NAS) share a
    device and a "place"; they must not look nested. A table that says MNT shows OUT/B is believed only if OUT/B is
    MNT's very folder (same device and inode); octal escapes in paths are read back."""
    from app.store.folders import is_within, read_mounts

    inbox, out, mnt = tmp_path / "nas-in", tmp_path / "nas-out", tmp_path / "mnt"
    for folder in (inbox, out / "B", mnt):
        folder.mkdir(parents=True)
    spaced = tmp_path / "with space"
    spaced.mkdir()
    table = tmp_path / "mountinfo"
    table.write_text(f"20 1 0:40 / / rw - ext4 /dev/x rw\n"
                     f"30 20 0:52 / {inbox} rw - nfs4 server:/vol/in rw\n"
                     f"31 20 0:52 / {out} rw - nfs4 server:/vol/out rw\n"
                     f"32 20 0:40 {out}/B {mnt} rw - ext4 /dev/x rw\n"
                     f"33 20 0:41 / {str(spaced).replace(' ', chr(92) + '040')} rw - tmpfs tmpfs rw\n")
    mounts = read_mounts(table)
    assert mounts[4] == ("0:41", "/", str(spaced)), "octal escapes in paths are read back"
    assert not is_within(inbox, out, mounts) and not is_within(out, inbox, mounts), "two NFS exports side by side"
    assert not is_within(mnt, out, mounts), "the table says so, but MNT is not OUT/B's folder"
    assert is_within(out / "B" / "new", out, mounts) and not is_within(tmp_path / "nas-out2", out, mounts)


def test_a_state_directory_inside_the_input_is_refused_before_it_is_created(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (tmp_path / "view").symlink_to(inbox)  # lexically apart: only the real folders tell
    with pytest.raises(ConfigError, match=r"state_dir .* is inside input"):
        prepare_dirs(load_config(None, {"input": inbox, "output": tmp_path / "out", "state_dir": tmp_path / "view" / "st"}))
    assert not (inbox / "st").exists() and not (tmp_path / "out").exists(), "nothing is left behind"


def test_placement_never_removes_an_input_that_is_its_own_output(tmp_path: Path) -> None:
    """The last line of defence, below the start-up check: place a file that already sits at its output path,
    then remove the 'input': the only copy stays, whatever spelling reaches it."""
    out = tmp_path / "out"
    data = png(out / "B" / "a.png", 7)
    (tmp_path / "view").symlink_to(out)
    placer = Placer(out, "move")
    source = out / "B" / "a.png"
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    placed = placer.place(source, "a.png", "B", sha)
    assert placed == source  # the same bytes at the same name: reused, not copied
    (out / "A").mkdir()  # so that the ``..`` spelling really reaches the placed file
    for spelling in (placed, tmp_path / "view" / "B" / "a.png", out / "A" / ".." / "B" / "a.png"):
        assert placer.remove_source(source, spelling, sha) is False
        assert source.read_bytes() == data
    # A real move still removes its input.
    inbox = tmp_path / "in"
    other = png(inbox / "x.png", 8)
    moved = placer.place(inbox / "x.png", "x.png", "A", hashlib.sha256(other).hexdigest())
    assert placer.remove_source(inbox / "x.png", moved) is True and moved.read_bytes() == other


def test_check_disjoint_accepts_sibling_folders(tmp_path: Path) -> None:
    for name in ("in", "out", "state"):
        (tmp_path / name).mkdir()
    check_disjoint(load_config(None, {"input": tmp_path / "in", "output": tmp_path / "out",
                                      "state_dir": tmp_path / "state"}))
