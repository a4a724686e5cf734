"""The writer on a real file system: atomic, never overwriting, idempotent, and clean after failures."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
from pathlib import Path

import pytest

from app.store.placement import (
    TEMP_PREFIX,
    Placer,
    SourceChangedError,
    SourceError,
    safe_relative_path,
    sha256_file,
)

MODES = ["move", "copy", "hardlink"]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def temp_files(root: Path) -> list[Path]:
    return [path for path in root.rglob(f"{TEMP_PREFIX}*")]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    inbox, out = tmp_path / "inbox", tmp_path / "bins"
    inbox.mkdir()
    return inbox, out


@pytest.mark.parametrize("mode", MODES)
def test_place_puts_the_file_under_its_bin_and_keeps_the_source(dirs, mode: str) -> None:
    inbox, out = dirs
    data = b"\x89PNG fake image bytes" * 100
    source = write(inbox / "sub" / "photo.png", data)
    os.utime(source, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    placed = Placer(out, mode).place(source, "sub/photo.png", "B", digest(data))
    assert placed == out / "B" / "sub" / "photo.png"
    assert placed.read_bytes() == data
    assert source.exists()  # place() never removes the input; the caller does, after the ledger row
    assert temp_files(out) == []
    same_inode = placed.stat().st_ino == source.stat().st_ino
    assert same_inode == (mode != "copy")  # same file system: move and hardlink link, never copy
    assert placed.stat().st_mtime_ns == source.stat().st_mtime_ns  # a copy keeps the photo's date


@pytest.mark.parametrize("mode", MODES)
def test_collision_with_other_content_takes_a_new_name_and_never_overwrites(dirs, mode: str) -> None:
    inbox, out = dirs
    placer = Placer(out, mode)
    contents = [b"first" * 10, b"second" * 10, b"third" * 10]
    placed = []
    for index, data in enumerate(contents):
        source = write(inbox / f"drop{index}" / "menu.jpg", data)
        placed.append(placer.place(source, "menu.jpg", "A", digest(data)))
    assert [path.name for path in placed] == ["menu.jpg", "menu (1).jpg", "menu (2).jpg"]
    assert [path.read_bytes() for path in placed] == contents
    assert len(files_under(out)) == 3 and temp_files(out) == []


@pytest.mark.parametrize("mode", MODES)
def test_same_content_twice_is_one_file(dirs, mode: str) -> None:
    inbox, out = dirs
    data = b"same bytes" * 50
    source = write(inbox / "x.png", data)
    placer = Placer(out, mode)
    first = placer.place(source, "x.png", "C", digest(data))
    again = Placer(out, mode).place(source, "x.png", "C", digest(data))  # e.g. after a restart
    twin = write(inbox / "elsewhere" / "x.png", data)  # another inode, same bytes
    third = placer.place(twin, "x.png", "C", digest(data))
    assert first == again == third
    assert files_under(out) == [first]


def test_same_content_found_at_a_numbered_name_is_reused(dirs) -> None:
    inbox, out = dirs
    placer = Placer(out, "copy")
    other, mine = b"someone else's" * 9, b"mine" * 9
    placer.place(write(inbox / "1" / "a.png", other), "a.png", "B", digest(other))
    first = placer.place(write(inbox / "2" / "a.png", mine), "a.png", "B", digest(mine))
    again = placer.place(inbox / "2" / "a.png", "a.png", "B", digest(mine))
    assert first == again == out / "B" / "a (1).png"
    assert len(files_under(out)) == 2


def test_an_existing_different_file_is_left_byte_for_byte_alone(dirs) -> None:
    inbox, out = dirs
    existing = write(out / "A" / "p.jpg", b"precious")
    before = existing.stat()
    for mode in MODES:
        data = f"new {mode}".encode()
        Placer(out, mode).place(write(inbox / mode / "p.jpg", data), "p.jpg", "A", digest(data))
    after = existing.stat()
    assert existing.read_bytes() == b"precious"
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_remove_source_only_removes_what_was_placed(dirs) -> None:
    inbox, out = dirs
    placer = Placer(out, "move")
    data = b"move me" * 20
    source = write(inbox / "m.png", data)
    placed = placer.place(source, "m.png", "A", digest(data))
    assert placer.remove_source(source, placed=placed) is True
    assert not source.exists() and placed.read_bytes() == data
    with pytest.raises(FileNotFoundError):
        placer.remove_source(source)
    # A new file dropped under the same name after placement must survive the removal.
    placed_again = placer.place(write(inbox / "n.png", data), "n.png", "A", digest(data))
    write(inbox / "n.png.new", b"a newer picture").rename(inbox / "n.png")
    assert placer.remove_source(inbox / "n.png", placed=placed_again, sha256=digest(data)) is False
    assert (inbox / "n.png").read_bytes() == b"a newer picture"


def test_quarantine_layout_and_unknown_hash(dirs) -> None:
    inbox, out = dirs
    placer = Placer(out, "move")
    data = b"\xff\xd8\xff truncated"
    source = write(inbox / "cam" / "IMG 1.jpg", data)
    path = placer.quarantine(source, "cam/IMG 1.jpg", "truncated", None)
    assert path == out / "_quarantine" / "truncated" / "cam" / "IMG 1.jpg"
    assert placer.quarantine(source, "cam/IMG 1.jpg", "truncated", None) == path  # idempotent without a hash
    assert path.read_bytes() == data
    assert files_under(out) == [path]


def test_unicode_and_spaces_in_names(dirs) -> None:
    inbox, out = dirs
    placer = Placer(out, "copy")
    rel = "dossier été/café menu ü.png"
    first, second = b"premier", b"second"
    a = placer.place(write(inbox / "1.png", first), rel, "B", digest(first))
    b = placer.place(write(inbox / "2.png", second), rel, "B", digest(second))
    assert a == out / "B" / "dossier été" / "café menu ü.png"
    assert b.name == "café menu ü (1).png" and b.read_bytes() == second


@pytest.mark.parametrize(
    "rel_path", ["../escape.png", "a/../../escape.png", "/etc/passwd", "", "a/..", ".", f"a/{TEMP_PREFIX}x", "a\x00b"]
)
def test_relative_paths_that_escape_or_name_nothing_are_rejected(dirs, rel_path: str) -> None:
    inbox, out = dirs
    source = write(inbox / "s.png", b"data")
    with pytest.raises(ValueError):
        Placer(out, "copy").place(source, rel_path, "A", digest(b"data"))
    assert files_under(out.parent) == [source]


@pytest.mark.parametrize("bin_name", ["../A", "_quarantine", ".hidden", "A/B", ""])
def test_bad_bin_names_are_rejected(dirs, bin_name: str) -> None:
    inbox, out = dirs
    with pytest.raises(ValueError):
        Placer(out, "copy").place(write(inbox / "s.png", b"d"), "s.png", bin_name, digest(b"d"))
    with pytest.raises(ValueError):
        Placer(out, "copy").quarantine(inbox / "s.png", "s.png", "../../etc", None)


def test_symlinked_bin_pointing_outside_the_root_is_refused(dirs, tmp_path: Path) -> None:
    inbox, out = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    out.mkdir()
    (out / "A").symlink_to(outside)
    with pytest.raises(PermissionError, match="outside the output root"):
        Placer(out, "copy").place(write(inbox / "s.png", b"d"), "s.png", "A", digest(b"d"))
    assert list(outside.iterdir()) == []


# --- failures ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_fsync_failure_leaves_no_temp_file_and_names_the_paths(
    dirs, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    inbox, out = dirs
    data = b"will not fit" * 100
    source = write(inbox / "full.png", data)
    placer = Placer(out, mode)
    placer.place(write(inbox / "warm.png", b"warm"), "warm.png", "A", digest(b"warm"))  # directories exist

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as caught:
        placer.place(source, "full.png", "A", digest(data))
    assert caught.value.errno == errno.ENOSPC
    assert str(source) in str(caught.value) and str(out / "A") in str(caught.value)
    assert temp_files(out) == []
    assert not (out / "A" / "full.png").exists()
    assert source.read_bytes() == data


def test_real_write_failure_mid_copy_leaves_nothing_behind(dirs) -> None:
    """RLIMIT_FSIZE makes the kernel refuse the write half-way (EFBIG), as a full disk would."""
    inbox, out = dirs
    data = os.urandom(300_000)
    source = write(inbox / "big.png", data)
    placer = Placer(out, "copy")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OSError) as caught:
            placer.place(source, "big.png", "B", digest(data))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert caught.value.errno == errno.EFBIG and str(source) in str(caught.value)
    assert temp_files(out) == [] and not (out / "B" / "big.png").exists()
    assert placer.place(source, "big.png", "B", digest(data)).read_bytes() == data  # fine once the disk is


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_destination_raises_eacces_and_leaves_nothing(dirs) -> None:
    inbox, out = dirs
    (out / "A").mkdir(parents=True)
    (out / "A").chmod(0o555)
    try:
        with pytest.raises(PermissionError) as caught:
            Placer(out, "copy").place(write(inbox / "s.png", b"d"), "s.png", "A", digest(b"d"))
        assert str(out / "A") in str(caught.value)
        assert temp_files(out) == []
    finally:
        (out / "A").chmod(0o755)


def test_source_changed_since_it_was_read_is_not_placed(dirs) -> None:
    inbox, out = dirs
    source = write(inbox / "c.png", b"edited after reading")
    with pytest.raises(SourceChangedError) as caught:
        Placer(out, "copy").place(source, "c.png", "A", digest(b"what the loader read"))
    assert isinstance(caught.value, SourceError) and caught.value.errno is None  # an item problem, not a disk one
    assert files_under(out) == []


def test_missing_source_stays_file_not_found(dirs) -> None:
    inbox, out = dirs
    for mode in MODES:
        with pytest.raises(FileNotFoundError):
            Placer(out, mode).place(inbox / "gone.png", "gone.png", "A", digest(b""))
    assert temp_files(out) == []


def test_output_folder_removed_while_running_is_recreated(dirs) -> None:
    inbox, out = dirs
    placer = Placer(out, "hardlink")
    placer.place(write(inbox / "1.png", b"1"), "d/1.png", "A", digest(b"1"))
    for path in files_under(out):
        path.unlink()
    (out / "A" / "d").rmdir()
    assert placer.place(write(inbox / "2.png", b"2"), "d/2.png", "A", digest(b"2")).read_bytes() == b"2"


def test_cross_device_hardlink_falls_back_to_a_copy(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp dir")
    source_dir = Path(os.path.join(shm, f"binner-test-{os.getpid()}"))
    source_dir.mkdir()
    try:
        source = write(source_dir / "x.png", b"across devices")
        for mode in ("hardlink", "move"):
            placed = Placer(tmp_path / "out", mode).place(source, "x.png", "A", digest(b"across devices"))
            assert placed.read_bytes() == b"across devices" and placed.stat().st_ino != source.stat().st_ino
        assert len(files_under(tmp_path / "out")) == 1 and source.exists()
    finally:
        for path in source_dir.iterdir():
            path.unlink()
        source_dir.rmdir()


def test_long_names_stay_within_the_name_limit_on_collision(dirs) -> None:
    inbox, out = dirs
    name = "é" * 120 + ".png"  # 245 bytes: "(1)" would push it past 255
    placer = Placer(out, "copy")
    first = placer.place(write(inbox / "1.png", b"1"), name, "A", digest(b"1"))
    second = placer.place(write(inbox / "2.png", b"2"), name, "A", digest(b"2"))
    assert first.name == name and second.name.endswith(" (1).png")
    assert len(second.name.encode()) <= 255 and second.read_bytes() == b"2"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("mode", MODES)
def test_non_regular_input_is_refused_as_a_source_problem(dirs, mode: str) -> None:
    inbox, out = dirs
    pipe = inbox / "pipe.jpg"
    os.mkfifo(pipe)
    folder = inbox / "folder.jpg"
    folder.mkdir()
    for source in (pipe, folder):
        with pytest.raises(SourceError, match="not a regular file"):
            Placer(out, mode).quarantine(source, source.name, "unreadable", None)
    assert files_under(out) == []


def test_batch_gathers_directory_fsyncs(dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, out = dirs
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    blobs = [f"picture {i}".encode() for i in range(20)]
    sources = [write(inbox / f"{i}.png", blob) for i, blob in enumerate(blobs)]
    Placer(out / "warm", "hardlink").place(sources[0], "w.png", "A", digest(blobs[0]))
    calls.clear()
    single = Placer(out, "hardlink")
    for i in range(10):
        single.place(sources[i], f"{i}.png", "A", digest(blobs[i]))
    one_by_one = len(calls)
    calls.clear()
    batched = Placer(out, "hardlink")
    with batched.batch():
        for i in range(10, 20):
            batched.place(sources[i], f"{i}.png", "A", digest(blobs[i]))
    assert len(calls) < one_by_one - 5  # 10 data fsyncs + 1 directory, instead of 10 + 10
    assert len(files_under(out / "A")) == 20


def test_sweep_removes_only_temp_files(dirs) -> None:
    _, out = dirs
    keep = write(out / "A" / "keep.png", b"k")
    write(out / "A" / f"{TEMP_PREFIX}abc123", b"half a copy")
    write(out / "_quarantine" / "truncated" / f"{TEMP_PREFIX}x", b"half")
    assert Placer(out, "copy").sweep_temp_files() == 2
    assert files_under(out) == [keep]


def test_sha256_file_and_safe_relative_path(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)  # several read chunks
    assert sha256_file(write(tmp_path / "f", data)) == digest(data)
    assert safe_relative_path("a//b/./c.png").parts == ("a", "b", "c.png")



# --- the input root is a boundary -----------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", MODES)
def test_a_source_replaced_by_a_symlink_is_never_followed(dirs, tmp_path: Path, mode: str) -> None:
    """`ln -sfn OUTSIDE/secret INPUT/a.png` while the row is pending: no outside byte lands anywhere."""
    inbox, out = dirs
    outside = tmp_path / "outside"
    secret = write(outside / "secret.png", b"outside secret bytes")
    write(outside / "dir" / "b.png", b"outside dir bytes")
    before = snapshot(outside)
    (inbox / "a.png").symlink_to(secret)
    (inbox / "sub").symlink_to(outside / "dir", target_is_directory=True)
    placer = Placer(out, mode)
    for source, rel in ((inbox / "a.png", "a.png"), (inbox / "sub" / "b.png", "sub/b.png")):
        with pytest.raises(FileNotFoundError):
            placer.place(source, rel, "A", digest(b"outside secret bytes"))
        with pytest.raises(FileNotFoundError):
            placer.quarantine(source, rel, "unreadable", None)
        try:
            assert placer.remove_source(source, None, digest(b"outside dir bytes")) is False
        except FileNotFoundError:
            pass
    assert files_under(out) == [] and temp_files(out) == []
    assert snapshot(outside) == before and (inbox / "a.png").is_symlink()


def test_a_linked_directory_under_a_bin_creates_nothing_outside(dirs, tmp_path: Path) -> None:
    inbox, out = dirs
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "A").mkdir(parents=True)
    (out / "A" / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PermissionError, match="outside the output root"):
        Placer(out, "copy").place(write(inbox / "s.png", b"d"), "sub/new/s.png", "A", digest(b"d"))
    assert list(outside.iterdir()) == [], "no directory may be created through the link"


@pytest.mark.parametrize("mode", MODES)
def test_names_of_any_bytes_are_placed_faithfully(dirs, mode: str) -> None:
    inbox, out = dirs
    odd = os.fsdecode(b"bad\xff.png")
    long_name = "L" * 251 + ".png"  # 255 bytes: a collision must shorten the stem, not fail
    placer = Placer(out, mode)
    for name in (odd, long_name):
        first = placer.place(write(inbox / name, b"one"), name, "A", digest(b"one"))
        second = placer.place(write(inbox / "other", b"two"), name, "A", digest(b"two"))
        assert os.fsencode(first.name) == os.fsencode(name) and first.read_bytes() == b"one"
        assert second.read_bytes() == b"two" and len(os.fsencode(second.name)) <= 255
        assert second.name.endswith(" (1).png")
    assert b"bad\xff (1).png" in os.listdir(os.fsencode(out / "A"))
