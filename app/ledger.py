"""The ledger: one SQLite (WAL) row per input file, the only source of truth for what has been done.

Statuses: ``pending`` (known, waiting), ``processing`` (handed to the pipeline), ``done`` (placed in a bin),
``quarantined`` (placed under _quarantine), ``vanished`` (deleted before it could be placed).
A crash leaves rows in ``processing``; ``recover_interrupted()`` returns them to ``pending`` at start.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["pending", "processing", "done", "quarantined", "vanished"]
FINISHED: tuple[str, ...] = ("done", "quarantined", "vanished")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    rel_path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
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
    seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS files_status ON files(status, id);
CREATE INDEX IF NOT EXISTS files_rel_path ON files(rel_path);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class Discovered:
    """A complete file found under the input root."""

    path: str
    rel_path: str
    size: int
    mtime_ns: int


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

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> Row:
        data = dict(row)
        for key in ("decision", "signals", "timings"):
            data[key] = json.loads(data[key]) if data[key] else None
        return cls(**data)


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


@dataclass
class IntakeResult:
    new: int = 0
    requeued: int = 0
    already_finished: list[Row] = field(default_factory=list)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Ledger:
    """Thread-safe access to the ledger database (one connection, one lock, short transactions)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise RuntimeError(
                f"cannot open the ledger {self.path}: {error}. Check state_dir permissions, or move the file aside "
                "to start a new ledger (files already placed stay placed)."
            ) from error
        self._lock = threading.RLock()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))

    class _Tx:
        def __init__(self, ledger: Ledger) -> None:
            self.ledger = ledger

        def __enter__(self) -> sqlite3.Connection:
            self.ledger._lock.acquire()
            self.ledger._db.execute("BEGIN IMMEDIATE")
            return self.ledger._db

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                self.ledger._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.ledger._lock.release()

    def _tx(self) -> Ledger._Tx:
        return Ledger._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- intake -----------------------------------------------------------------------------------
    def known(self, path: str) -> Row | None:
        with self._lock:
            found = self._db.execute("SELECT * FROM files WHERE path = ?", (path,)).fetchone()
        return Row.from_sql(found) if found else None

    def intake(self, files: Iterable[Discovered], chunk: int = 500) -> IntakeResult:
        """Record complete files as ``pending``. A finished row whose file is still there with the same size
        and mtime is reported in ``already_finished`` (the caller decides: crash leftover or copy mode);
        a finished row whose file changed is a new file at the same path and goes back to ``pending``."""
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
                row = db.execute("SELECT * FROM files WHERE path = ?", (entry.path,)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO files(path, rel_path, size, mtime_ns, status, seen_at, updated_at)"
                        " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                        (entry.path, entry.rel_path, entry.size, entry.mtime_ns, now, now),
                    )
                    result.new += 1
                elif row["status"] in ("pending", "processing"):
                    if (row["size"], row["mtime_ns"]) != (entry.size, entry.mtime_ns):
                        db.execute(
                            "UPDATE files SET size = ?, mtime_ns = ?, updated_at = ? WHERE id = ?",
                            (entry.size, entry.mtime_ns, now, row["id"]),
                        )
                elif (row["size"], row["mtime_ns"]) == (entry.size, entry.mtime_ns) and row["status"] != "vanished":
                    result.already_finished.append(Row.from_sql(row))
                else:
                    self._requeue(db, row["id"], entry.size, entry.mtime_ns, now)
                    result.requeued += 1

    def requeue(self, row_id: int, size: int | None = None, mtime_ns: int | None = None) -> None:
        """Treat the file as new (changed content, or its placed output went missing)."""
        with self._tx() as db:
            self._requeue(db, row_id, size, mtime_ns, time.time())

    @staticmethod
    def _requeue(db: sqlite3.Connection, row_id: int, size: int | None, mtime_ns: int | None, now: float) -> None:
        db.execute(
            "UPDATE files SET status = 'pending', attempts = 0, size = COALESCE(?, size),"
            " mtime_ns = COALESCE(?, mtime_ns), sha256 = NULL, bin = NULL, rule = NULL, reason = NULL,"
            " decision = NULL, signals = NULL, output_path = NULL, last_error = NULL, timings = NULL,"
            " seen_at = ?, updated_at = ?, finished_at = NULL WHERE id = ?",
            (size, mtime_ns, now, now, row_id),
        )

    def recover_interrupted(self) -> int:
        """Rows a crash left in ``processing`` go back to ``pending`` (their attempt stays counted)."""
        with self._tx() as db:
            return db.execute(
                "UPDATE files SET status = 'pending', updated_at = ? WHERE status = 'processing'", (time.time(),)
            ).rowcount

    # --- feeding ----------------------------------------------------------------------------------
    def claim_pending(self, limit: int, after_id: int = 0) -> list[Row]:
        """Take up to ``limit`` pending rows (oldest id first, after ``after_id``) and mark them processing."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT * FROM files WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
            db.executemany(
                "UPDATE files SET status = 'processing', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                [(now, row["id"]) for row in rows],
            )
        claimed = [Row.from_sql(row) for row in rows]
        for row in claimed:
            row.status, row.attempts = "processing", row.attempts + 1
        return claimed

    def has_pending(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM files WHERE status = 'pending' LIMIT 1").fetchone() is not None

    # --- results ----------------------------------------------------------------------------------
    def record(self, outcomes: list[Outcome]) -> None:
        """Write a batch of outcomes in one transaction (durable before any input is removed)."""
        if not outcomes:
            return
        now = time.time()
        with self._tx() as db:
            for o in outcomes:
                finished = now if o.status in FINISHED else None
                db.execute(
                    "UPDATE files SET status = ?, sha256 = COALESCE(?, sha256), bin = ?, rule = ?, reason = ?,"
                    " decision = ?, signals = COALESCE(?, signals), output_path = ?, last_error = ?, timings = ?,"
                    " size = COALESCE(?, size), mtime_ns = COALESCE(?, mtime_ns), updated_at = ?, finished_at = ?"
                    " WHERE id = ?",
                    (
                        o.status, o.sha256, o.bin, o.rule, o.reason, _dumps(o.decision), _dumps(o.signals),
                        o.output_path, o.last_error, _dumps(o.timings or None), o.size, o.mtime_ns, now,
                        finished, o.id,
                    ),
                )

    def update_placement(self, row_id: int, bin_name: str, rule: str, decision: dict[str, Any], output_path: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE files SET bin = ?, rule = ?, decision = ?, output_path = ?, updated_at = ? WHERE id = ?",
                (bin_name, rule, _dumps(decision), output_path, time.time(), row_id),
            )

    # --- reading ----------------------------------------------------------------------------------
    def get(self, row_id: int) -> Row | None:
        with self._lock:
            found = self._db.execute("SELECT * FROM files WHERE id = ?", (row_id,)).fetchone()
        return Row.from_sql(found) if found else None

    def find(self, name: str) -> list[Row]:
        """Rows matching an input path, an output path, a relative path or a bare file name (in that order)."""
        with self._lock:
            for column in ("path", "output_path", "rel_path"):
                found = self._db.execute(f"SELECT * FROM files WHERE {column} = ?", (name,)).fetchall()
                if found:
                    return [Row.from_sql(row) for row in found]
            found = self._db.execute(
                "SELECT * FROM files WHERE rel_path = ? OR rel_path LIKE ? ESCAPE '\\'",
                (name, "%/" + name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")),
            ).fetchall()
        return [Row.from_sql(row) for row in found]

    def rows(self, status: str | None = None) -> Iterator[Row]:
        with self._lock:
            if status:
                found = self._db.execute("SELECT * FROM files WHERE status = ? ORDER BY id", (status,)).fetchall()
            else:
                found = self._db.execute("SELECT * FROM files ORDER BY id").fetchall()
        for row in found:
            yield Row.from_sql(row)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            by_status = dict(self._db.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
            by_bin = dict(
                self._db.execute("SELECT bin, count(*) FROM files WHERE status = 'done' GROUP BY bin").fetchall()
            )
            by_reason = dict(
                self._db.execute(
                    "SELECT reason, count(*) FROM files WHERE status = 'quarantined' GROUP BY reason"
                ).fetchall()
            )
        return {"status": by_status, "bins": by_bin, "quarantined": by_reason}

    def backlog(self) -> tuple[int, float | None]:
        """Unfinished files and the time the oldest of them was seen."""
        with self._lock:
            count, oldest = self._db.execute(
                "SELECT count(*), min(seen_at) FROM files WHERE status IN ('pending', 'processing')"
            ).fetchone()
        return int(count), oldest
