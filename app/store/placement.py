"""The writer: put an input file into ``OUTPUT/<bin>/<relative path>`` atomically, never overwriting.

Guarantees, for ``move``, ``copy`` and ``hardlink`` alike:

- A name in the output tree only ever appears complete: data goes to a ``.binner-tmp-*`` file in the
  destination directory, is fsynced, and is then linked to its final name. ``os.link`` fails when the name
  exists, so claiming a name is atomic and can never overwrite (``rename`` would silently replace).
- A name collision with *different* content takes ``name (1).ext``, ``name (2).ext``, ...; a file with the
  *same* content at a candidate name is the same placement done before a crash, and is reused: placing
  twice leaves one file (idempotence, so a restart after ``kill -9`` places nothing twice).
- The directory entry is made durable (fsync of the directory, and of the parents of new directories)
  before ``place`` returns, so the caller may then record the ledger row and only then ``remove_source``.
  Inside ``with placer.batch():`` those directory fsyncs are gathered and done once per directory when the
  block exits: record the ledger rows after the block.
- ``place`` never removes the source; ``move`` and ``hardlink`` link the source's inode into place when
  input and output share a file system (no data copied) and copy otherwise.
- On any failure no temporary file is left behind and the ``OSError`` (ENOSPC, EACCES, EROFS, ...) keeps
  its errno and names the paths involved.
- The source is reached without following a symlink in any component of its path (``open_no_symlinks``):
  a file or directory replaced by a link after intake is "gone" (``SourceVanished``), never followed, so no
  byte from outside the input is read, linked or deleted. A directory under the output root that is a link
  leading out of it is refused before anything is created through it.
- Names are bytes: a name that is not UTF-8 is placed with exactly its bytes (surrogate-escaped ``str``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Literal

import structlog

from stages.paths import open_no_symlinks, open_parent_no_symlinks, shown

log = structlog.get_logger(__name__)

PlacementMode = Literal["move", "copy", "hardlink"]

TEMP_PREFIX = ".binner-tmp-"
QUARANTINE_DIR = "_quarantine"
MAX_COLLISIONS = 10_000
_NAME_MAX = 255
_CHUNK = 1 << 20
_BIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_REASON = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# link(2) refusals that mean "this pair of places cannot share an inode", not "the disk refused a write".
_NO_LINK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
)


class SourceError(OSError):
    """A problem with the input file, not with the output disk: retry this one file later.

    Raised without an errno (the original errno is in the message and in ``source_errno``), so that a
    caller pausing all placement on ENOSPC/EACCES/EROFS of the *output* does not pause for one bad input.
    A missing input is not a SourceError: it stays ``FileNotFoundError``.
    """

    def __init__(self, message: str, source_errno: int | None = None) -> None:
        super().__init__(message)
        self.source_errno = source_errno


class SourceVanished(FileNotFoundError):
    """The input is no longer a file at its path: deleted, or replaced by a symlink that is never followed."""


class SourceChangedError(SourceError):
    """The input's bytes no longer match the sha256 it was classified with; process it again."""


class SourceUnreadableError(SourceError):
    """The input cannot be stat-ed or read (permissions, I/O error)."""


def sha256_file(path: Path | str, no_symlinks: bool = False) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks (``no_symlinks``: an input, see the module doc)."""
    digest = hashlib.sha256()
    if no_symlinks:
        fd = open_no_symlinks(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK)
        handle = open(fd, "rb", buffering=0)  # noqa: SIM115 (closed by the `with` below)
    else:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115
    with handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Placer:
    """Places files under one output root; used from one thread (the sink) at a time."""

    def __init__(self, output_root: Path, mode: PlacementMode) -> None:
        if mode not in ("move", "copy", "hardlink"):
            raise ValueError(f"placement mode must be move, copy or hardlink, got {mode!r}")
        self.output_root = Path(output_root).absolute()
        self.mode: PlacementMode = mode
        self._ready_dirs: set[Path] = set()
        self._root_real: str | None = None
        self._warned_copy_fallback = False
        self._pending_dirs: set[Path] | None = None  # inside batch(): directories still to fsync

    # --- public API ----------------------------------------------------------------------------
    def place(self, source: Path, rel_path: str, bin: str, sha256: str) -> Path:
        """Put ``source`` at ``OUTPUT/<bin>/<rel_path>`` (or a ``name (n).ext`` variant) and return that path."""
        _check_bin(bin)
        return self._put(Path(source), (bin,), rel_path, sha256)

    def quarantine(self, source: Path, rel_path: str, reason: str, sha256: str | None) -> Path:
        """Put ``source`` at ``OUTPUT/_quarantine/<reason>/<rel_path>``, with the same guarantees as ``place``.

        ``sha256`` may be ``None`` (a file too large to have been read): it is then computed when needed.
        """
        _check_reason(reason)
        return self._put(Path(source), (QUARANTINE_DIR, reason), rel_path, sha256)

    def remove_source(self, source: Path, placed: Path | None = None, sha256: str | None = None) -> bool:
        """Delete the input once the output and the ledger row are durable (move mode).

        With ``placed`` or ``sha256`` the input is first checked to still hold the placed content (same inode,
        or same bytes); if someone replaced it meanwhile it is kept and False is returned, so a new file that
        reused the name is never lost. Raises FileNotFoundError when the input is already gone.
        """
        source = self._source_path(Path(source))
        try:
            parent, name = open_parent_no_symlinks(str(source))
        except (FileNotFoundError, NotADirectoryError):
            raise SourceVanished(errno.ENOENT, "the input is gone (or a directory on its path became a link)",
                                 str(source)) from None
        try:
            if placed is not None and _same_entry(parent, name, Path(placed)):
                # The last line of defence: an input that *is* its output (an input folder inside the output, seen
                # through any spelling or mount) would be deleted together with the only copy.
                log.error("refusing to remove an input that is the output it was placed at; left where it is",
                          file=shown(source), output=shown(placed))
                return False
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                log.warning("input is no longer a regular file; left alone", file=shown(source))
                return False
            if (placed is not None or sha256 is not None) and not self._still_placed(source, info, placed, sha256):
                log.warning("input changed after placement; kept for another pass", file=shown(source))
                return False
            os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)
        return True

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the directory fsyncs of many placements: one per directory, done when the block exits.

        Use it around a batch whose ledger rows are committed after the block: everything placed inside is
        durable once it exits (also when it exits with an exception). File data is still fsynced before its
        name appears, so a crash inside the block can lose a name, never leave a name with partial data.
        """
        if self._pending_dirs is not None:  # nested: the outer block syncs
            yield
            return
        self._pending_dirs = set()
        try:
            yield
        finally:
            pending, self._pending_dirs = self._pending_dirs, None
            # Deepest first: a new directory's own entries before the entry naming it in its parent.
            for directory in sorted(pending, key=lambda path: len(path.parts), reverse=True):
                _fsync_dir(directory)

    def sweep_temp_files(self) -> int:
        """Remove ``.binner-tmp-*`` files a killed process left in the output tree; returns how many."""
        removed = 0
        if not self.output_root.is_dir():
            return 0
        for directory, _, files in os.walk(self.output_root):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    try:
                        os.unlink(os.path.join(directory, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        if removed:
            log.info("removed temporary files left by an interrupted run", count=removed,
                     output=str(self.output_root))
        return removed

    # --- placement -----------------------------------------------------------------------------
    def _put(self, source: Path, prefix: tuple[str, ...], rel_path: str, sha256: str | None) -> Path:
        relative = safe_relative_path(rel_path)
        dest_dir = self.output_root.joinpath(*prefix, *relative.parts[:-1])
        name = relative.parts[-1]
        source = self._source_path(source)
        try:
            try:
                return self._put_once(source, dest_dir, name, sha256)
            except FileNotFoundError:
                if not os.path.lexists(source) or dest_dir.is_dir():
                    raise
                # Someone removed part of the output tree under us: forget what we knew and create it again.
                self._ready_dirs.clear()
                return self._put_once(source, dest_dir, name, sha256)
        except SourceError:
            raise
        except OSError as error:
            raise _annotated(error, f"placing {source} into {dest_dir}") from error

    def _put_once(self, source: Path, dest_dir: Path, name: str, sha256: str | None) -> Path:
        self._ensure_dir(dest_dir)
        if self.mode in ("move", "hardlink"):
            try:
                return self._link_into(source, dest_dir, name, sha256)
            except SourceError:
                raise
            except OSError as error:
                if error.errno not in _NO_LINK_ERRNOS:
                    raise
                self._note_copy_fallback(source, dest_dir, error)
        return self._copy_into(source, dest_dir, name, sha256)

    def _link_into(self, source: Path, dest_dir: Path, name: str, sha256: str | None) -> Path:
        """Link the source inode to a free name (no data copied); the source stays where it is."""
        with _reading(source):
            parent, source_name = open_parent_no_symlinks(str(source))
        try:
            with _reading(source):
                source_stat = os.stat(source_name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(source_stat.st_mode):
                raise _replaced_by_link(source)
            _require_regular(source, source_stat)
            _fsync_file_if_readable(source)  # this inode becomes the output: a failure here is the output disk's
            content = _Content(source, source_stat, sha256)
            for candidate in _candidates(name):
                target = dest_dir / candidate
                try:
                    # linkat() relative to the safely reached directory, never following the entry itself
                    os.link(source_name, target, src_dir_fd=parent, follow_symlinks=False)
                except FileExistsError:
                    if content.matches(target):
                        self._sync_dir(dest_dir)
                        return target
                    continue
                linked = os.stat(target, follow_symlinks=False)
                if (linked.st_dev, linked.st_ino) != (source_stat.st_dev, source_stat.st_ino):
                    _unlink_quietly(target)  # swapped between the check and the link: never keep it
                    raise _replaced_by_link(source)
                self._sync_dir(dest_dir)
                return target
            raise _too_many(dest_dir, name)
        finally:
            os.close(parent)

    def _copy_into(self, source: Path, dest_dir: Path, name: str, sha256: str | None) -> Path:
        """Copy into a temp file beside the final name, fsync, then claim the name without overwriting."""
        with _reading(source):  # O_NONBLOCK: a named pipe must not hang the writer
            source_fd = open_no_symlinks(str(source), os.O_RDONLY | os.O_NONBLOCK)
        try:
            source_stat = os.fstat(source_fd)
            _require_regular(source, source_stat)
            reader = open(source_fd, "rb", buffering=0)  # noqa: SIM115 (closed by the `with reader` below)
        except BaseException:
            os.close(source_fd)
            raise
        with reader:
            fd, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest_dir)
            temp = Path(temp_name)
            try:
                digest = hashlib.sha256()
                with open(fd, "wb", buffering=0) as writer:
                    while True:
                        with _reading(source):
                            chunk = reader.read(_CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
                        view = memoryview(chunk)
                        while view:
                            view = view[writer.write(view):]
                    os.fchmod(writer.fileno(), (stat.S_IMODE(source_stat.st_mode) & 0o777) | 0o600)
                    os.utime(writer.fileno(), ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns))
                    os.fsync(writer.fileno())
                actual = digest.hexdigest()
                if sha256 is not None and actual != sha256:
                    raise SourceChangedError(
                        f"{source} changed after it was read (sha256 {actual[:12]}..., expected {sha256[:12]}...): "
                        "it will be processed again"
                    )
                copied = os.stat(temp)
                content = _Content(temp, copied, actual)
                for candidate in _candidates(name):
                    target = dest_dir / candidate
                    try:
                        _link_no_replace(temp, target)
                    except FileExistsError:
                        if content.matches(target):
                            break
                        continue
                    break
                else:
                    raise _too_many(dest_dir, name)
                _unlink_quietly(temp)
                self._sync_dir(dest_dir)
                return target
            except BaseException:
                _unlink_quietly(temp)
                raise

    # --- lookup --------------------------------------------------------------------------------
    def _still_placed(self, source: Path, source_stat: os.stat_result, placed: Path | None, sha256: str | None) -> bool:
        if placed is not None:
            try:
                placed_stat = os.stat(placed)
            except FileNotFoundError:
                return False
            if (placed_stat.st_dev, placed_stat.st_ino) == (source_stat.st_dev, source_stat.st_ino):
                return True
            if placed_stat.st_size != source_stat.st_size:
                return False
            expected = sha256 or sha256_file(placed)
        else:
            assert sha256 is not None
            expected = sha256
        return sha256_file(source, no_symlinks=True) == expected

    def _source_path(self, source: Path) -> Path:
        """Inputs are real paths already; an output being re-placed (rebin) is named under the real output root."""
        try:
            relative = source.relative_to(self.output_root)
        except ValueError:
            return source
        if self._root_real is None:
            self._root_real = os.path.realpath(self.output_root)
        return Path(self._root_real, relative)

    # --- directories ---------------------------------------------------------------------------
    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` (durably: each new entry's parent is fsynced) and check it is inside the root."""
        if directory in self._ready_dirs:
            return
        missing: list[Path] = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        if probe.is_relative_to(self.output_root):
            self._check_inside(probe)  # before creating anything through it: a linked directory leads out
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                if not path.is_dir():
                    raise NotADirectoryError(
                        errno.ENOTDIR, "exists and is not a directory: move it out of the output tree", str(path)
                    ) from None
                continue
            self._sync_dir(path.parent)
        self._check_inside(directory)
        self._ready_dirs.add(directory)

    def _check_inside(self, directory: Path) -> None:
        if self._root_real is None:
            self._root_real = os.path.realpath(self.output_root)
        real = os.path.realpath(directory)
        if os.path.commonpath([real, self._root_real]) != self._root_real:
            raise PermissionError(
                errno.EACCES, f"resolves to {real}, outside the output root (a symlink in the output tree?)",
                str(directory),
            )

    def _sync_dir(self, directory: Path) -> None:
        if self._pending_dirs is None:
            _fsync_dir(directory)
        else:
            self._pending_dirs.add(directory)

    def _note_copy_fallback(self, source: Path, dest_dir: Path, error: OSError) -> None:
        """Linking is impossible here (other file system, no hard links, protected_hardlinks): copy instead."""
        level = log.warning if not self._warned_copy_fallback else log.debug
        level(
            "cannot link input into the output; copying instead",
            mode=self.mode, file=shown(source), output=shown(dest_dir),
            error=errno.errorcode.get(error.errno or 0, str(error.errno)),
            hint="put input and output on one file system to place without copying",
        )
        self._warned_copy_fallback = True


# --- helpers -------------------------------------------------------------------------------------
def safe_relative_path(rel_path: str) -> PurePosixPath:
    """``rel_path`` as a relative path that stays inside its root, or ValueError naming the problem."""
    if not isinstance(rel_path, str) or not rel_path or "\x00" in rel_path:
        raise ValueError(f"relative path {rel_path!r} is empty or holds a NUL byte")
    path = PurePosixPath(rel_path)
    if path.is_absolute():
        raise ValueError(f"relative path {rel_path!r} is absolute: it must be relative to the input root")
    if any(part == ".." for part in path.parts):
        raise ValueError(f"relative path {rel_path!r} climbs out of its root with '..'")
    if not path.parts or path.name in ("", "."):
        raise ValueError(f"relative path {rel_path!r} names no file")
    if path.name.startswith(TEMP_PREFIX):
        raise ValueError(f"relative path {rel_path!r} uses binner's temporary-file prefix {TEMP_PREFIX!r}")
    return path


def _check_bin(bin: str) -> None:
    if not isinstance(bin, str) or not _BIN_NAME.match(bin):
        raise ValueError(f"bin name {bin!r} must be letters, digits, '-' or '_' and not start with '_' or '.'")


def _check_reason(reason: str) -> None:
    if not isinstance(reason, str) or not _REASON.match(reason):
        raise ValueError(f"quarantine reason {reason!r} must be a lower-case slug like 'truncated'")


def _split_name(name: str) -> tuple[str, str]:
    pure = PurePosixPath(name)
    return pure.stem, pure.suffix


def _candidates(name: str) -> Iterator[str]:
    yield name
    stem, suffix = _split_name(name)
    raw = os.fsencode(stem)
    try:
        raw.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    for index in range(1, MAX_COLLISIONS):
        tail = f" ({index}){suffix}"
        budget = _NAME_MAX - len(os.fsencode(tail))
        # a long name stays within NAME_MAX bytes; a UTF-8 name is not cut inside a character
        fitted = raw[:budget].decode("utf-8", "ignore") if utf8 else os.fsdecode(raw[:budget])
        yield f"{fitted}{tail}"


def _require_regular(source: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SourceUnreadableError(f"the input {source} is not a regular file: move it out of the input folder")


def _too_many(dest_dir: Path, name: str) -> OSError:
    return FileExistsError(
        errno.EEXIST, f"{MAX_COLLISIONS} files named like {name!r} with other content already exist", str(dest_dir)
    )


class _Content:
    """What is being placed, for "is the file already at this name the same placement?" checks."""

    def __init__(self, path: Path, info: os.stat_result, sha256: str | None) -> None:
        self.path = path
        self.info = info
        self.sha256 = sha256

    def matches(self, existing: Path) -> bool:
        try:
            found = os.stat(existing, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(found.st_mode):
            return False
        if (found.st_dev, found.st_ino) == (self.info.st_dev, self.info.st_ino):
            return True
        if found.st_size != self.info.st_size:
            return False
        if self.sha256 is None:
            with _reading(self.path):
                self.sha256 = sha256_file(self.path, no_symlinks=True)
        return sha256_file(existing) == self.sha256


def _link_no_replace(temp: Path, target: Path) -> None:
    """Give ``temp`` the name ``target``; FileExistsError if taken. Falls back where hard links are missing."""
    try:
        os.link(temp, target)
    except OSError as error:
        if error.errno not in _NO_LINK_ERRNOS:
            raise
        # File systems without hard links (FAT, some network shares): check, then rename. The output tree has
        # a single writer, so nothing can take the name between the check and the rename.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.rename(temp, target)


@contextlib.contextmanager
def _reading(source: Path) -> Iterator[None]:
    """Turn errors of stat/open/read on the *input* into SourceUnreadableError (a missing input stays missing)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except NotADirectoryError:  # a directory on the way is gone, or became a link (never followed)
        raise SourceVanished(errno.ENOENT, "the input is gone (or a directory on its path became a link)",
                             str(source)) from None
    except OSError as error:
        if isinstance(error, SourceError):
            raise
        if error.errno == errno.ELOOP:
            raise _replaced_by_link(source) from None
        code = errno.errorcode.get(error.errno or 0, str(error.errno))
        raise SourceUnreadableError(
            f"cannot read the input {source} ([{code}] {error.strerror or error}): fix its permissions or the "
            "disk it is on; it will be tried again",
            error.errno,
        ) from error


def _same_entry(source_dir: int, source_name: str, placed: Path) -> bool:
    """Whether ``placed`` names the very directory entry ``source_name`` in the directory ``source_dir``: the
    same name in the same directory (device and inode), whatever path or mount leads to either."""
    if os.fsencode(placed.name) != os.fsencode(source_name):
        return False
    try:
        here, there = os.fstat(source_dir), os.stat(placed.parent)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replaced_by_link(source: Path) -> SourceVanished:
    return SourceVanished(errno.ENOENT, "the input was replaced by a symbolic link (links are never followed)",
                          str(source))


def _fsync_file_if_readable(path: Path) -> None:
    """Make the linked inode's data durable; an unreadable file (quarantined for it) is linked as it is."""
    try:
        fd = open_no_symlinks(str(path), os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path, follow_symlinks=False).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _annotated(error: OSError, action: str) -> OSError:
    """The same kind of OSError (errno kept, so callers can react to ENOSPC), saying what was being done."""
    if error.errno is None:
        return error
    return OSError(error.errno, f"{error.strerror or error} ({action})", error.filename, None, error.filename2)
