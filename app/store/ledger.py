"""The ledger: one SQLite (WAL) row per placed file (per input generation), the only source of truth for what has
been done.

Statuses: ``pending`` (known, waiting), ``processing`` (handed to the pipeline), ``done`` (placed in a bin),
``quarantined`` (placed under _quarantine), ``vanished`` (deleted before it could be placed), ``refused`` (the output
refused both its bin and the quarantine, so the input was left where it is: retried when the file changes or at the
next start, not at every rescan).
A crash leaves rows in ``processing``; ``recover_interrupted()`` returns them to ``pending`` at start and charges
a crash only to the rows that were inside a model call (``in_call``) when the process died.

Why it is built this way:

- A path may have many rows: a name reused with new content (scanners reuse ``IMG_0001.jpg``) starts a new
  row, and the earlier ``done`` row keeps describing the file it placed (``explain`` and ``status`` stay true).
  At most one row per path is unfinished (a partial unique index says so).
- A file is "the same" when size, mtime, inode and ctime all match: copy and hardlink modes keep their inputs,
  and new content written with the same size and mtime must still be noticed.
- An observation carries the time of its stat (``seen_at``). A finished row changed after that time is not
  compared with it: the pipeline placed the file meanwhile (a hardlink changes its ctime, a move removes it), and
  the stale look would otherwise record a new generation or a leftover that does not exist.
- Linux names are bytes. A path that is valid UTF-8 is stored as TEXT; any other name is stored as its raw
  bytes (a BLOB in the same column), so every name round-trips exactly and the same name always maps to the
  same value (equality and the unique index keep working). Python sees surrogate-escaped ``str`` paths.
- ``synchronous=FULL``: a commit is on disk when ``record()`` returns, so a ``done`` row can never roll back
  after the input it describes was removed (move mode removes only after ``record()``).
- The WAL is kept small relative to the state disk (``wal_autocheckpoint`` and ``journal_size_limit`` at a
  sixteenth of the disk, at most SQLite's default 1000 pages): on a small disk the WAL would otherwise grow to
  4 MB between checkpoints and fill it. When the disk does fill, ``reclaim_space`` checkpoints the WAL away
  (``wal_checkpoint(TRUNCATE)``) and says whether there is room to resume: ``headroom_bytes``, twice what the WAL
  may grow to before its next checkpoint (the WAL, and as much again for the pages it copies into the database).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from stages.paths import shown

Status = Literal["pending", "processing", "done", "quarantined", "vanished", "refused"]
FINISHED: tuple[str, ...] = ("done", "quarantined", "vanished", "refused")

SCHEMA_VERSION = "3"
_WAL_PAGES_DEFAULT = 1000  # SQLite's wal_autocheckpoint
_WAL_PAGES_MIN = 16

_FILES_V2 = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    rel_path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    inode INTEGER,
    ctime_ns INTEGER,
    sha256 TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    bin TEXT,
    rule TEXT,
    reason TEXT,
    decision TEXT,
    signals TEXT,
    output_path TEXT,
    last_error TEXT,
    timings TEXT,
    in_call TEXT,
    crash_stage TEXT,
    crashes INTEGER NOT NULL DEFAULT 0,
    seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    name TEXT
)
"""
_INDEXES_V2 = (
    "CREATE INDEX IF NOT EXISTS files_status ON files(status, id)",
    "CREATE INDEX IF NOT EXISTS files_rel_path ON files(rel_path)",
    "CREATE INDEX IF NOT EXISTS files_path ON files(path, id)",
    "CREATE INDEX IF NOT EXISTS files_output_path ON files(output_path)",
    "CREATE UNIQUE INDEX IF NOT EXISTS files_one_unfinished ON files(path) WHERE status IN ('pending', 'processing')",
)
# Version 3: the files' names (``explain NAME`` by index), counts kept by triggers (``status`` and the backlog in
# constant time at any size), and the removals a ``rebin`` still owes after a crash.
_V3 = (
    "CREATE INDEX IF NOT EXISTS files_name ON files(name)",
    "CREATE INDEX IF NOT EXISTS files_status_seen ON files(status, seen_at)",
    "CREATE TABLE IF NOT EXISTS counts (status TEXT NOT NULL, bin TEXT NOT NULL, reason TEXT NOT NULL,"
    " n INTEGER NOT NULL, PRIMARY KEY (status, bin, reason)) WITHOUT ROWID",
    "CREATE TRIGGER IF NOT EXISTS files_counted_in AFTER INSERT ON files BEGIN"
    " INSERT INTO counts VALUES (NEW.status, COALESCE(NEW.bin, ''), COALESCE(NEW.reason, ''), 1)"
    " ON CONFLICT DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS files_counted_out AFTER DELETE ON files BEGIN"
    " UPDATE counts SET n = n - 1 WHERE status = OLD.status AND bin = COALESCE(OLD.bin, '')"
    " AND reason = COALESCE(OLD.reason, ''); END",
    "CREATE TRIGGER IF NOT EXISTS files_counted_move AFTER UPDATE OF status, bin, reason ON files"
    " WHEN OLD.status IS NOT NEW.status OR OLD.bin IS NOT NEW.bin OR OLD.reason IS NOT NEW.reason BEGIN"
    " UPDATE counts SET n = n - 1 WHERE status = OLD.status AND bin = COALESCE(OLD.bin, '')"
    " AND reason = COALESCE(OLD.reason, '');"
    " INSERT INTO counts VALUES (NEW.status, COALESCE(NEW.bin, ''), COALESCE(NEW.reason, ''), 1)"
    " ON CONFLICT DO UPDATE SET n = n + 1; END",
    "CREATE TABLE IF NOT EXISTS owed_removals (row_id INTEGER NOT NULL, path TEXT NOT NULL, new_path TEXT NOT NULL)",
)
# Columns a version 1 ledger (binner 0.1.0) already has; the rest start empty after migration.
_V1_COLUMNS = (
    "id, path, rel_path, size, mtime_ns, sha256, status, attempts, bin, rule, reason, decision, signals, output_path,"
    " last_error, timings, seen_at, updated_at, finished_at"
)


class LedgerOpenError(sqlite3.DatabaseError):
    """The ledger cannot be opened (not a database, truncated, unreadable, or from a newer binner)."""


def sql_path(path: str) -> str | bytes:
    """A path as stored: TEXT when its bytes are UTF-8, else the raw bytes (see the module docstring)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def py_path(value: str | bytes | None) -> str | None:
    """A stored path back as a ``str`` that the os module maps to the exact original bytes."""
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return value


@dataclass(frozen=True)
class Discovered:
    """A complete file found under the input root, with the identity that says "same file" later."""

    path: str
    rel_path: str
    size: int
    mtime_ns: int
    inode: int | None = None
    ctime_ns: int | None = None
    seen_at: float | None = None  # wall time of the stat (None: unknown); a row changed since then knows better

    @property
    def identity(self) -> tuple[int | None, int | None, int | None, int | None]:
        return self.size, self.mtime_ns, self.inode, self.ctime_ns


@dataclass
class Row:
    id: int
    path: str
    rel_path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    status: str
    attempts: int
    bin: str | None
    rule: str | None
    reason: str | None
    decision: dict[str, Any] | None
    signals: dict[str, Any] | None
    output_path: str | None
    last_error: str | None
    timings: dict[str, Any] | None
    seen_at: float
    updated_at: float
    finished_at: float | None
    inode: int | None = None
    ctime_ns: int | None = None
    in_call: str | None = None
    crash_stage: str | None = None
    crashes: int = 0

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> Row:
        data = {key: row[key] for key in row.keys() if key in _ROW_FIELDS}
        for key in ("decision", "signals", "timings"):
            data[key] = json.loads(data[key]) if data[key] else None
        data["signals"] = _loaded_signals(data["signals"])
        if data["decision"] is not None:  # bin and rule are columns; older rows may also hold criteria
            data["decision"] = {"bin": data.get("bin"), "rule": data.get("rule"), **data["decision"]}
        for key in ("path", "rel_path", "output_path"):
            data[key] = py_path(data[key])
        return cls(**data)

    @property
    def shown_path(self) -> str:
        """``path`` safe to print (non-UTF-8 bytes escaped)."""
        return shown(self.path) or ""


_ROW_FIELDS = frozenset(f.name for f in fields(Row))


@dataclass(frozen=True)
class Finished:
    """A finished row whose input is still there unchanged (a crash leftover in move mode); no JSON decoded."""

    id: int
    path: str
    output_path: str | None
    sha256: str | None


@dataclass
class Outcome:
    """What the sink learned about one file, written in one transaction with its batch."""

    id: int
    status: Status
    sha256: str | None = None
    bin: str | None = None
    rule: str | None = None
    reason: str | None = None
    decision: dict[str, Any] | None = None
    signals: dict[str, Any] | None = None
    output_path: str | None = None
    last_error: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    mtime_ns: int | None = None
    inode: int | None = None
    ctime_ns: int | None = None


@dataclass(frozen=True)
class StateRoom:
    """Free space on the state disk against what resuming needs (``Ledger.reclaim_space``)."""

    free_bytes: int
    needed_bytes: int
    wal_bytes: int

    @property
    def enough(self) -> bool:
        return self.free_bytes >= self.needed_bytes


@dataclass(frozen=True)
class PlacementChange:
    """A placed file's new bin (``rebin``): where it is now, and the output it leaves (removed once this is durable)."""

    row_id: int
    bin: str
    rule: str
    decision: dict[str, Any]
    output_path: str
    old_path: str | None = None
    signals: dict[str, Any] | None = None


@dataclass
class IntakeResult:
    new: int = 0
    requeued: int = 0
    already_finished: list[Finished] = field(default_factory=list)


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 file name inside: \udcff escapes keep it valid, reversible JSON
        text = json.dumps(value, separators=(",", ":"))
    return text


def _name_of(rel_path: str | bytes) -> str | bytes:
    """The last component of a stored relative path (bytes stay bytes)."""
    if isinstance(rel_path, bytes):
        return rel_path.rsplit(b"/", 1)[-1]
    return rel_path.rsplit("/", 1)[-1]


# What a row stores, without what it would store twice: the decision's bin and rule are columns, its criteria are
# the signals' own values (``explain``, their one reader, measures them again with ``rules.criteria_of``); the OCR
# text is its lines' texts joined; timings keep 0.1 ms. ``Row.from_sql`` gives the same shapes back, criteria aside.
def _stored_decision(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    if not decision:
        return decision
    return {key: value for key, value in decision.items() if key not in ("bin", "rule", "criteria")}


def _stored_signals(signals: dict[str, Any] | None) -> dict[str, Any] | None:
    ocr = (signals or {}).get("ocr")
    if not isinstance(ocr, dict) or "text" not in ocr or "lines" not in ocr:
        return signals
    if ocr["text"] != "\n".join(line.get("text", "") for line in ocr["lines"]):
        return signals  # not the joined lines (another backend): keep it as it is
    return {**signals, "ocr": {key: value for key, value in ocr.items() if key != "text"}}  # type: ignore[dict-item]


def _stored_timings(timings: dict[str, Any] | None) -> dict[str, Any] | None:
    if not timings:
        return None
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in timings.items()}


def _loaded_signals(signals: dict[str, Any] | None) -> dict[str, Any] | None:
    ocr = (signals or {}).get("ocr")
    if isinstance(ocr, dict) and "text" not in ocr and "lines" in ocr:
        ocr["text"] = "\n".join(line.get("text", "") for line in ocr["lines"])
    return signals


def _placed_since(stored: tuple[Any, ...], seen: tuple[Any, ...]) -> bool:
    """Whether ``seen`` is the stored file as it was before binner placed it: the same size, mtime and inode, and a
    ctime no later than the stored one (linking it for placement moved its ctime on). Any other look is a change."""
    size, mtime_ns, inode, ctime_ns = stored
    return ((size, mtime_ns) == seen[:2] and inode in (None, seen[2])
            and (ctime_ns is None or seen[3] is None or seen[3] <= ctime_ns))


def _same_file(stored: tuple[Any, ...], seen: tuple[Any, ...]) -> bool:
    """Size and mtime must match; inode and ctime too where both sides know them (older rows may not)."""
    return all(a == b for a, b in zip(stored, seen, strict=True) if a is not None and b is not None) and \
        stored[:2] == seen[:2]


def is_disk_full(error: BaseException) -> bool:
    """SQLite says the state disk is full (SQLITE_FULL): pause, do not crash."""
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    return code == getattr(sqlite3, "SQLITE_FULL", 13) or "database or disk is full" in str(error)


class Ledger:
    """Thread-safe access to the ledger database (one connection, one lock, short transactions).

    ``read_only=True`` opens the file with ``mode=ro``: no schema change, no migration, no recovery; for
    ``status``, ``explain`` and dry runs beside a running daemon. A file that is not a binner ledger raises
    ``LedgerOpenError`` (a ``sqlite3.DatabaseError``) naming the file and what to do.
    """

    headroom_bytes = 0  # free space the state disk needs before a paused run resumes (set for a writable ledger)

    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()
        memory = str(path) == ":memory:"
        if not memory and not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if read_only:
                uri = f"file:{urllib.parse.quote(os.fsencode(self.path.absolute()))}?mode=ro"  # any bytes
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
            else:
                self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            if read_only:
                self.schema_version = self._read_version()
            else:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._size_the_wal(memory)
                self.schema_version = self._prepare_schema()
        except LedgerOpenError:
            self._close_quietly()
            raise
        except sqlite3.DatabaseError as error:
            self._close_quietly()
            raise LedgerOpenError(
                f"cannot open the ledger {self.path}: {error}. Check state_dir and its permissions, or move the "
                "file aside to start a new ledger (files already placed stay placed)."
            ) from error

    def _size_the_wal(self, memory: bool) -> None:
        """Checkpoint often enough that the WAL stays at a sixteenth of the state disk (see the module docstring)."""
        page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        pages = _WAL_PAGES_DEFAULT
        if not memory:
            disk = os.statvfs(self.path.parent)
            pages = max(_WAL_PAGES_MIN, min(_WAL_PAGES_DEFAULT, disk.f_blocks * disk.f_frsize // 16 // page_size))
        self._db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self._db.execute(f"PRAGMA journal_size_limit={pages * page_size}")
        self.headroom_bytes = 2 * pages * page_size

    def reclaim_space(self) -> StateRoom:
        """While the state disk is full: fold the WAL into the database and truncate it, then measure the room.

        The checkpoint itself may fail for want of space (it can grow the database file); the WAL then stays and
        the room measured says so. Never raises for a full disk."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:
                pass
        wal = Path(f"{self.path}-wal")
        try:
            wal_bytes = wal.stat().st_size
        except OSError:
            wal_bytes = 0
        if str(self.path) == ":memory:":
            return StateRoom(1 << 62, self.headroom_bytes, 0)
        disk = os.statvfs(self.path.parent)
        return StateRoom(disk.f_bavail * disk.f_frsize, self.headroom_bytes, wal_bytes)

    def _close_quietly(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()

    def _read_version(self) -> str:
        names = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "files" not in names:
            raise LedgerOpenError(f"{self.path} holds no binner ledger (no files table): is --state right?")
        if "meta" not in names:
            return "1"
        found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = found[0] if found else "1"
        if int(version) > int(SCHEMA_VERSION):
            raise LedgerOpenError(
                f"the ledger {self.path} has schema version {version}, newer than this binner understands "
                f"({SCHEMA_VERSION}): upgrade binner, or point state_dir elsewhere"
            )
        return version

    def _prepare_schema(self) -> str:
        """Create a new ledger, or migrate an older one in place (one transaction: all or nothing)."""
        with self._tx() as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            version = SCHEMA_VERSION
            if "files" not in names:
                db.execute(_FILES_V2)
            else:
                version = self._read_version()
                if version == "1":
                    self._migrate_v1(db)
            for statement in _INDEXES_V2:
                db.execute(statement)
            if version != SCHEMA_VERSION:
                self._migrate_to_v3(db)
            for statement in _V3:
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    @staticmethod
    def _migrate_to_v3(db: sqlite3.Connection) -> None:
        """Names for the rows there are, and the counts the triggers keep from now on."""
        columns = {r[1] for r in db.execute("PRAGMA table_info(files)")}
        if "name" not in columns:
            db.execute("ALTER TABLE files ADD COLUMN name TEXT")
        cursor = db.execute("SELECT id, rel_path FROM files")
        while batch := cursor.fetchmany(10_000):
            db.executemany("UPDATE files SET name = ? WHERE id = ?",
                           [(_name_of(rel_path), row_id) for row_id, rel_path in batch])
        db.execute("DROP TABLE IF EXISTS counts")
        db.execute(_V3[2])
        db.execute("INSERT INTO counts SELECT status, COALESCE(bin, ''), COALESCE(reason, ''), count(*) FROM files"
                   " GROUP BY 1, 2, 3")

    @staticmethod
    def _migrate_v1(db: sqlite3.Connection) -> None:
        """Version 1 kept ``path`` UNIQUE (one row per name, overwritten on reuse): rebuild without it."""
        db.execute("ALTER TABLE files RENAME TO files_v1")
        for index in ("files_status", "files_rel_path"):
            db.execute(f"DROP INDEX IF EXISTS {index}")
        db.execute(_FILES_V2)
        db.execute(f"INSERT INTO files({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM files_v1")
        db.execute("DROP TABLE files_v1")

    class _Tx:
        def __init__(self, ledger: Ledger, durable: bool = True) -> None:
            self.ledger = ledger
            self.durable = durable

        def __enter__(self) -> sqlite3.Connection:
            ledger = self.ledger
            if ledger.read_only:
                raise sqlite3.OperationalError(f"the ledger {ledger.path} is open read-only")
            ledger._lock.acquire()
            try:
                if not self.durable:
                    ledger._db.execute("PRAGMA synchronous=NORMAL")
                ledger._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self._restore()
                ledger._lock.release()
                raise
            return ledger._db

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            db = self.ledger._db
            try:
                if exc_type:
                    db.execute("ROLLBACK")
                else:
                    try:
                        db.execute("COMMIT")
                    except sqlite3.Error:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        raise
            finally:
                self._restore()
                self.ledger._lock.release()

        def _restore(self) -> None:
            if not self.durable:
                self.ledger._db.execute("PRAGMA synchronous=FULL")

    def _tx(self, durable: bool = True) -> Ledger._Tx:
        return Ledger._Tx(self, durable)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def synchronous(self) -> int:
        """The connection's ``PRAGMA synchronous`` (2 = FULL: every commit is fsynced)."""
        with self._lock:
            return int(self._db.execute("PRAGMA synchronous").fetchone()[0])

    # --- intake -----------------------------------------------------------------------------------
    def intake(self, files: Iterable[Discovered], chunk: int = 500) -> IntakeResult:
        """Record complete files as ``pending``.

        A path seen for the first time is a new row. A finished row whose file is still there unchanged is
        reported in ``already_finished`` (the caller decides: crash leftover or copy mode). A file that changed
        since its row finished is a new generation: a new row, the old one keeps describing what it placed.
        """
        result = IntakeResult()
        batch: list[Discovered] = []
        for entry in files:
            batch.append(entry)
            if len(batch) >= chunk:
                self._intake_chunk(batch, result)
                batch = []
        if batch:
            self._intake_chunk(batch, result)
        return result

    def _intake_chunk(self, batch: list[Discovered], result: IntakeResult) -> None:
        now = time.time()
        with self._tx() as db:
            for entry in batch:
                key = sql_path(entry.path)
                row = db.execute(
                    "SELECT id, status, size, mtime_ns, inode, ctime_ns, output_path, sha256, updated_at FROM files"
                    " WHERE path = ? ORDER BY id DESC LIMIT 1",
                    (key,),
                ).fetchone()
                if row is None:
                    self._insert(db, entry, now)
                    result.new += 1
                    continue
                stored = (row["size"], row["mtime_ns"], row["inode"], row["ctime_ns"])
                if (row["status"] not in ("pending", "processing") and entry.seen_at is not None
                        and row["updated_at"] > entry.seen_at and _placed_since(stored, entry.identity)):
                    continue  # the file before its placement, finished after the stat: a stale look
                same = _same_file(stored, entry.identity)
                if row["status"] in ("pending", "processing"):
                    if stored != entry.identity:
                        db.execute(
                            "UPDATE files SET size = ?, mtime_ns = ?, inode = ?, ctime_ns = ?, updated_at = ?"
                            " WHERE id = ?",
                            (*entry.identity, now, row["id"]),
                        )
                elif row["status"] == "refused":
                    if not same:  # nothing was placed: the row can describe the new file (the same file waits)
                        self._requeue(db, row["id"], entry, now)
                        result.requeued += 1
                elif same and row["status"] != "vanished":
                    result.already_finished.append(
                        Finished(row["id"], entry.path, py_path(row["output_path"]), row["sha256"])
                    )
                elif row["status"] == "vanished":  # nothing was placed: the row can describe the new file
                    self._requeue(db, row["id"], entry, now)
                    result.requeued += 1
                else:
                    self._insert(db, entry, now)
                    result.requeued += 1

    @staticmethod
    def _insert(db: sqlite3.Connection, entry: Discovered, now: float) -> None:
        rel = sql_path(entry.rel_path)
        db.execute(
            "INSERT INTO files(path, rel_path, name, size, mtime_ns, inode, ctime_ns, status, seen_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
            (sql_path(entry.path), rel, _name_of(rel), *entry.identity, now, now),
        )

    def new_generation(self, row_id: int) -> int:
        """The input of a finished row now holds other content: a new pending row for it; returns its id."""
        now = time.time()
        with self._tx() as db:
            old = db.execute("SELECT path, rel_path FROM files WHERE id = ?", (row_id,)).fetchone()
            cursor = db.execute(
                "INSERT INTO files(path, rel_path, name, status, seen_at, updated_at) VALUES (?, ?, ?, 'pending', ?, ?)",
                (old["path"], old["rel_path"], _name_of(old["rel_path"]), now, now),
            )
            return int(cursor.lastrowid or 0)

    def requeue(self, row_id: int, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Process the row's file again (its placed output went missing, so the row describes nothing placed)."""
        with self._tx() as db:
            db.execute(
                "UPDATE files SET size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns) WHERE id = ?",
                (size, mtime_ns, row_id),
            )
            self._requeue(db, row_id, None, time.time())

    @staticmethod
    def _requeue(db: sqlite3.Connection, row_id: int, entry: Discovered | None, now: float) -> None:
        identity = entry.identity if entry is not None else (None, None, None, None)
        db.execute(
            "UPDATE files SET status = 'pending', attempts = 0, crashes = 0, crash_stage = NULL, in_call = NULL,"
            " size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns), inode = COALESCE(?, inode),"
            " ctime_ns = COALESCE(?, ctime_ns), sha256 = NULL, bin = NULL, rule = NULL, reason = NULL,"
            " decision = NULL, signals = NULL, output_path = NULL, last_error = NULL, timings = NULL,"
            " seen_at = ?, updated_at = ?, finished_at = NULL WHERE id = ?",
            (*identity, now, now, row_id),
        )

    def recover_interrupted(self) -> int:
        """Rows a crash left in ``processing`` go back to ``pending``.

        Only rows that were inside a model call when the process died are charged a crash, under that
        stage; ``crashes`` counts consecutive deaths in the same stage's call (another stage starts at 1).
        """
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE files SET crashes = CASE WHEN crash_stage = in_call THEN crashes + 1 ELSE 1 END,"
                " crash_stage = in_call, in_call = NULL WHERE in_call IS NOT NULL"
            )
            return db.execute(
                "UPDATE files SET status = 'pending', updated_at = ? WHERE status = 'processing'", (now,)
            ).rowcount

    def retry_refused(self) -> int:
        """Rows whose file the output refused go back to pending, once per start (the output may have been fixed);
        between starts a rescan leaves them alone, so a refused file is not retried, and logged, every minute."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM files WHERE status = 'refused' AND NOT EXISTS (SELECT 1 FROM files AS other WHERE"
                " other.path = files.path AND other.status IN ('pending', 'processing'))").fetchall()]
            now = time.time()
            for row_id in ids:
                self._requeue(db, row_id, None, now)
        return len(ids)

    # --- feeding ----------------------------------------------------------------------------------
    def claim_pending(self, limit: int, after_id: int = 0) -> list[Row]:
        """Take up to ``limit`` pending rows (oldest id first, after ``after_id``) and mark them processing.

        ``attempts`` on the returned rows is the number of this try; the stored count only grows when a try
        ends (``record``), so a process killed while holding claims charges nobody for it.

        Rows charged a crash (``crashes > 0``) wait until a full pass (``after_id == 0``) finds nothing else:
        a process killed from outside soon after each start then charges fresh rows, not the same ones again,
        while a row that really kills the process still dies with it every time it is tried.
        """
        now = time.time()
        # Not fsynced: a claim lost to a power cut leaves its rows pending, which is what a restart does with
        # them anyway (recover_interrupted); the next durable commit syncs it with the WAL. One fsync less on
        # every file's path from intake to placement.
        with self._tx(durable=False) as db:
            rows = db.execute(
                "SELECT * FROM files WHERE status = 'pending' AND crashes = 0 AND id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            if not rows and after_id == 0:
                rows = db.execute(
                    "SELECT * FROM files WHERE status = 'pending' AND crashes > 0 ORDER BY id LIMIT ?", (limit,)
                ).fetchall()
            db.executemany(
                "UPDATE files SET status = 'processing', updated_at = ? WHERE id = ?",
                [(now, row["id"]) for row in rows],
            )
        claimed = [Row.from_sql(row) for row in rows]
        for row in claimed:
            row.status, row.attempts = "processing", row.attempts + 1
        return claimed

    def has_pending(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM files WHERE status = 'pending' LIMIT 1").fetchone() is not None

    def mark_in_call(self, ids: list[int], stage: str | None) -> None:
        """Say which rows are inside ``stage``'s model call now (``None``: the call returned).

        One UPDATE per batch, committed without an fsync: it only has to survive the process dying (kill -9,
        a crash in native code), which a commit to the WAL does; a power loss merely forgets a crash charge.
        """
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._tx(durable=False) as db:
            db.execute(f"UPDATE files SET in_call = ? WHERE id IN ({marks})", (stage, *ids))

    # --- results ----------------------------------------------------------------------------------
    def record(self, outcomes: list[Outcome]) -> None:
        """Write a batch of outcomes in one transaction, fsynced before returning (before any input removal)."""
        if not outcomes:
            return
        now = time.time()
        with self._tx() as db:
            for o in outcomes:
                finished = now if o.status in FINISHED else None
                db.execute(
                    "UPDATE files SET status = ?, sha256 = COALESCE(?, sha256), bin = ?, rule = ?, reason = ?,"
                    " decision = ?, signals = COALESCE(?, signals), output_path = ?, last_error = ?, timings = ?,"
                    " size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns), inode = COALESCE(?, inode),"
                    " ctime_ns = COALESCE(?, ctime_ns), attempts = attempts + 1, in_call = NULL, crashes = 0,"
                    " crash_stage = NULL, updated_at = ?, finished_at = ? WHERE id = ?",
                    (
                        o.status, o.sha256, o.bin, o.rule, o.reason, _dumps(_stored_decision(o.decision)),
                        _dumps(_stored_signals(o.signals)),
                        sql_path(o.output_path) if o.output_path else None, shown(o.last_error, lines=True),
                        _dumps(_stored_timings(o.timings)),
                        o.size, o.mtime_ns, o.inode, o.ctime_ns, now, finished, o.id,
                    ),
                )

    def update_placement(self, row_id: int, bin_name: str, rule: str, decision: dict[str, Any], output_path: str,
                         signals: dict[str, Any] | None = None) -> None:
        self.record_moves([PlacementChange(row_id, bin_name, rule, decision, output_path, None, signals)])

    def record_moves(self, moves: Iterable[PlacementChange]) -> None:
        """New bins for placed files, durably, in one transaction; a move that names the output it leaves is owed
        that removal until ``removals_done`` (a crash in between is finished by ``owed_removals``)."""
        now = time.time()
        with self._tx() as db:
            for move in moves:
                db.execute(
                    "UPDATE files SET bin = ?, rule = ?, decision = ?, output_path = ?, signals = COALESCE(?, signals),"
                    " updated_at = ? WHERE id = ?",
                    (move.bin, move.rule, _dumps(_stored_decision(move.decision)), sql_path(move.output_path),
                     _dumps(_stored_signals(move.signals)), now, move.row_id),
                )
                if move.old_path is not None:
                    db.execute("INSERT INTO owed_removals VALUES (?, ?, ?)",
                               (move.row_id, sql_path(move.old_path), sql_path(move.output_path)))

    def owed_removals(self) -> list[tuple[int, str, str]]:
        """(row id, output left behind, output it moved to) of moves whose old output may still be there."""
        with self._lock:
            found = self._db.execute("SELECT row_id, path, new_path FROM owed_removals").fetchall()
        return [(int(row_id), py_path(path) or "", py_path(new) or "") for row_id, path, new in found]

    def removals_done(self, row_ids: Iterable[int]) -> None:
        ids = list(row_ids)
        if not ids:
            return
        with self._tx(durable=False) as db:  # a lost "done" only means checking an absent file again
            db.executemany("DELETE FROM owed_removals WHERE row_id = ?", [(row_id,) for row_id in ids])

    # --- reading ----------------------------------------------------------------------------------
    def get(self, row_id: int) -> Row | None:
        with self._lock:
            found = self._db.execute("SELECT * FROM files WHERE id = ?", (row_id,)).fetchone()
        return Row.from_sql(found) if found else None

    def find(self, name: str) -> list[Row]:
        """Rows matching an input path, an output path, a relative path or a bare file name (in that order)."""
        key = sql_path(name)
        with self._lock:
            for column in ("path", "output_path", "rel_path"):
                found = self._db.execute(f"SELECT * FROM files WHERE {column} = ? ORDER BY id", (key,)).fetchall()
                if found:
                    return [Row.from_sql(row) for row in found]
            if self.schema_version == SCHEMA_VERSION:
                found = self._db.execute("SELECT * FROM files WHERE name = ? ORDER BY id", (_name_of(key),)).fetchall()
            else:  # an older ledger opened read-only has no name column: compare the paths' ends
                tail = (b"/" + key) if isinstance(key, bytes) else "/" + key
                found = [row for row in self._db.execute("SELECT * FROM files ORDER BY id")
                         if row["rel_path"] == key or row["rel_path"].endswith(tail)]
        return [Row.from_sql(row) for row in found]

    def rows(self, status: str | None = None, page: int = 1000) -> Iterator[Row]:
        """Rows in id order, read ``page`` at a time: memory stays flat however many rows there are."""
        after = 0
        while True:
            with self._lock:
                if status:
                    found = self._db.execute("SELECT * FROM files WHERE status = ? AND id > ? ORDER BY id LIMIT ?",
                                             (status, after, page)).fetchall()
                else:
                    found = self._db.execute("SELECT * FROM files WHERE id > ? ORDER BY id LIMIT ?",
                                             (after, page)).fetchall()
            if not found:
                return
            for row in found:
                yield Row.from_sql(row)
            after = found[-1]["id"]

    def counts(self) -> dict[str, Any]:
        """Files by status, done files by bin, quarantined and refused ones by reason (kept by triggers)."""
        with self._lock:
            if self.schema_version == SCHEMA_VERSION:
                found = self._db.execute("SELECT status, bin, reason, n FROM counts WHERE n > 0").fetchall()
            else:  # an older ledger opened read-only, as it is: count the rows themselves
                found = self._db.execute("SELECT status, COALESCE(bin, ''), COALESCE(reason, ''), count(*) FROM files"
                                         " GROUP BY 1, 2, 3").fetchall()
        by_status: dict[str, int] = {}
        by_bin: dict[str, int] = {}
        by_reason: dict[str, int] = {}
        refused: dict[str, int] = {}
        for status, bin_name, reason, n in found:
            by_status[status] = by_status.get(status, 0) + n
            if status == "done":
                by_bin[bin_name or None] = by_bin.get(bin_name or None, 0) + n  # type: ignore[index]
            elif status == "quarantined":
                by_reason[reason or None] = by_reason.get(reason or None, 0) + n  # type: ignore[index]
            elif status == "refused":
                refused[reason or None] = refused.get(reason or None, 0) + n  # type: ignore[index]
        return {"status": by_status, "bins": by_bin, "quarantined": by_reason, "refused": refused}

    def backlog(self) -> tuple[int, float | None]:
        """Unfinished files and the time the oldest of them was seen (both from indexes, at any ledger size)."""
        counted = ("SELECT COALESCE(sum(n), 0) FROM counts WHERE status IN ('pending', 'processing')"
                   if self.schema_version == SCHEMA_VERSION else
                   "SELECT count(*) FROM files WHERE status IN ('pending', 'processing')")
        with self._lock:
            (count,) = self._db.execute(counted).fetchone()
            (oldest,) = self._db.execute(
                "SELECT min(seen) FROM (SELECT min(seen_at) AS seen FROM files WHERE status = 'pending'"
                " UNION ALL SELECT min(seen_at) FROM files WHERE status = 'processing')").fetchone()
        return int(count), oldest
