"""Whether one folder lies inside another as the file system sees it, not as the paths are spelled.

An input inside the output makes binner sort its own bins and remove what it placed, so the comparison has to see
through every way the same folder can appear under another name: ``..``, symlinked parents, and bind mounts. A bind
mount of a folder *inside* the output (``mount --bind OUT/B /mnt/in``) shares no parent with the output, so device
and inode numbers of the parents do not tell; what does is the mount table: each mount says which folder of its file
system it shows (``/proc/self/mountinfo``'s root field), so every path has one place on its file system, whatever
mount it is reached through.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as three octal digits (``\\040``)."""
    out, index = [], 0
    while index < len(field):
        digits = field[index + 1:index + 4]
        if field[index] == "\\" and len(digits) == 3 and all(d in "01234567" for d in digits):
            out.append(chr(int(digits, 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def read_mounts(mountinfo: Path = MOUNTINFO) -> list[tuple[str, str, str]]:
    """(device ``major:minor``, the folder of that file system it shows, where it is mounted) for each mount, in
    the kernel's order (a later mount at the same place hides an earlier one); empty where there is no mount table."""
    try:
        text = mountinfo.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) >= 5:
            mounts.append((fields[2], _unescape(fields[3]), _unescape(fields[4])))
    return mounts


def _below(path: PurePosixPath, top: PurePosixPath) -> bool:
    return path == top or top in path.parents


def _existing_part(path: Path) -> tuple[Path, PurePosixPath]:
    """``path`` as (its nearest real folder that exists, the names still to be created below it): a folder not
    created yet is judged where it will be created."""
    real = Path(os.path.realpath(path))
    existing = real
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing, PurePosixPath(real.relative_to(existing))


def place_on_file_system(path: Path, mounts: list[tuple[str, str, str]]) -> tuple[str, PurePosixPath] | None:
    """(device, folder within that file system) of ``path``, through whichever mount reaches it: the same for every
    name of one folder. None without a mount table."""
    existing, rest = _existing_part(path)
    real = PurePosixPath(existing)
    best: tuple[str, str, PurePosixPath] | None = None
    for device, root, mount_point in mounts:
        point = PurePosixPath(mount_point)
        if _below(real, point) and (best is None or len(point.parts) >= len(best[2].parts)):
            best = (device, root, point)
    if best is None:
        return None
    device, root, point = best
    return device, PurePosixPath(root).joinpath(real.relative_to(point), rest)


def _directory_ids(path: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of ``path`` and of each of its parents up to ``/``."""
    ids: list[tuple[int, int]] = []
    current = path
    while True:
        try:
            info = os.stat(current)
        except OSError:
            info = None
        if info is not None:
            ids.append((info.st_dev, info.st_ino))
        if current.parent == current:
            return ids
        current = current.parent


def is_within(inner: Path, outer: Path, mounts: list[tuple[str, str, str]] | None = None) -> bool:
    """Whether folder ``inner`` is ``outer`` or lies below it, as the file system sees it: real paths (``..`` and
    symlinked parents resolved), device and inode numbers of ``inner``'s parents (``outer`` mounted a second time
    above ``inner``), and each path's place on its file system from the mount table (a folder inside ``outer``
    bind-mounted elsewhere). A folder not created yet is judged where it will be created.

    What the mount table suggests is believed only once the file system confirms it: the folder it names below
    ``outer`` must be ``inner``'s folder itself (same device and inode). Some mounts do not say which folder they
    show (NFS gives ``/`` for every export of a server), and two such mounts must not look nested."""
    inner_existing, inner_rest = _existing_part(inner)
    outer_existing, outer_rest = _existing_part(outer)
    if not outer_rest.parts:
        outer_info = os.stat(outer_existing)
        if (outer_info.st_dev, outer_info.st_ino) in _directory_ids(inner_existing):
            return True
    if _below(PurePosixPath(inner_existing, inner_rest), PurePosixPath(outer_existing, outer_rest)):
        return True
    if outer_rest.parts:  # nothing can be mounted inside a folder that does not exist yet
        return False
    mounts = read_mounts() if mounts is None else mounts
    inner_place, outer_place = place_on_file_system(inner_existing, mounts), place_on_file_system(outer_existing, mounts)
    if inner_place is None or outer_place is None or inner_place[0] != outer_place[0]:
        return False
    if not _below(inner_place[1], outer_place[1]):
        return False
    seen_from_outer = outer_existing / inner_place[1].relative_to(outer_place[1])
    try:
        return os.path.samestat(os.stat(seen_from_outer), os.stat(inner_existing))
    except OSError:
        return False
