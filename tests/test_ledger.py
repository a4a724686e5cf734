"""Ledger semantics: intake, claims, crash recovery, changed files and leftovers."""

from __future__ import annotations

from pathlib import Path

from app.store import Discovered, Ledger, Outcome, Row, SettleTracker, finish_leftovers, scan, to_discovered
from app.store.intake import is_candidate_name


def newest_row(ledger: Ledger, path: str) -> Row | None:
    """The newest record of an input path (a reused name has one record per generation)."""
    rows = [row for row in ledger.rows() if row.path == path]
    return max(rows, key=lambda row: row.id) if rows else None

def test_intake_is_idempotent_and_claims_mark_processing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    files = [Discovered(f"/in/{i}.png", f"{i}.png", 10, 1) for i in range(5)]
    assert ledger.intake(files).new == 5
    assert ledger.intake(files).new == 0
    claimed = ledger.claim_pending(3)
    assert [r.rel_path for r in claimed] == ["0.png", "1.png", "2.png"]
    assert all(r.status == "processing" and r.attempts == 1 for r in claimed)
    assert ledger.counts()["status"] == {"processing": 3, "pending": 2}
    assert ledger.recover_interrupted() == 3
    assert ledger.counts()["status"] == {"pending": 5}
    assert ledger.backlog()[0] == 5


def test_finished_files_same_or_changed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    entry = Discovered("/in/a.png", "a.png", 10, 1)
    ledger.intake([entry])
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "done", sha256="ab", bin="A", rule="r", output_path="/out/A/a.png")])
    same = ledger.intake([entry])
    assert same.new == 0 and [r.id for r in same.already_finished] == [row.id]
    changed = ledger.intake([Discovered("/in/a.png", "a.png", 11, 2)])
    assert changed.requeued == 1 and ledger.get(row.id).status == "done", "the first file keeps its own record"
    assert ledger.get(row.id).output_path == "/out/A/a.png"
    newest = newest_row(ledger, "/in/a.png")
    assert newest is not None and newest.id != row.id and newest.status == "pending" and newest.size == 11


def test_leftover_of_a_crash_is_removed_only_when_output_holds_it(tmp_path: Path) -> None:
    from app.store import Placer

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    source = inbox / "a.png"
    source.write_bytes(b"image bytes")
    placer = Placer(out, "move")
    from app.store import sha256_file

    digest = sha256_file(source)
    placed = placer.place(source, "a.png", "A", digest)
    ledger = Ledger(tmp_path / "l.db")
    discovered = [to_discovered(inbox, seen) for seen in scan(inbox)]
    ledger.intake(discovered)
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "done", sha256=digest, bin="A", output_path=str(placed))])
    # the process died here, before removing the input: a restart's scan finds it again
    result = ledger.intake([to_discovered(inbox, seen) for seen in scan(inbox)])
    removed, requeued = finish_leftovers(ledger, result.already_finished, True, placer.remove_source)
    assert (removed, requeued) == (1, 0) and not source.exists() and placed.exists()


def test_candidate_names_and_symlinks(tmp_path: Path) -> None:
    assert is_candidate_name("photo.jpg") and is_candidate_name("café menu.png")
    for name in (".hidden.jpg", "upload.jpg.part", "x.tmp", "backup.png~"):
        assert not is_candidate_name(name)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"a")
    (root / ".cache").mkdir()
    (root / ".cache" / "b.png").write_bytes(b"b")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"o")
    (root / "escape.png").symlink_to(outside)
    (root / "inside.png").symlink_to(root / "sub" / "a.png")
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    (root / "loop-a.png").symlink_to(root / "loop-b.png")
    (root / "loop-b.png").symlink_to(root / "loop-a.png")
    found = sorted(seen.path.relative_to(root).as_posix() for seen in scan(root))
    assert found == ["sub/a.png"], "every symlink is skipped, inside the root or not, loops included"
    tracker = SettleTracker(root, settle_s=0.0)
    for name in ("escape.png", "inside.png", "loop-a.png", "dirlink/outside.png", "dirlink/in/sub/a.png"):
        assert tracker.hint(root / name) == [], name


def test_settle_waits_for_size_and_mtime_to_stop_changing(tmp_path: Path) -> None:
    import os
    import time

    root = tmp_path / "in"
    root.mkdir()
    growing = root / "growing.png"
    growing.write_bytes(b"1")
    tracker = SettleTracker(root, settle_s=0.3)
    assert tracker.hint(growing) == [] and len(tracker) == 1
    growing.write_bytes(b"12")
    assert tracker.poll() == []
    deadline = time.monotonic() + 5
    settled = []
    while not settled and time.monotonic() < deadline:
        time.sleep(0.05)
        settled = tracker.poll()
    assert [d.rel_path for d in settled] == ["growing.png"] and settled[0].size == 2
    old = root / "renamed.png"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert [d.rel_path for d in tracker.hint(old)] == ["renamed.png"], "an old mtime means it arrived complete"


def test_watch_events_with_absolute_paths_match_a_relative_input(tmp_path: Path, monkeypatch) -> None:
    import os
    import time

    monkeypatch.chdir(tmp_path)
    Path("inbox").mkdir()
    dropped = Path("inbox/photo.jpg")
    dropped.write_bytes(b"jpeg")
    os.utime(dropped, (time.time() - 60, time.time() - 60))
    tracker = SettleTracker(Path("inbox"), settle_s=1.0)
    taken = tracker.hint(dropped.absolute())  # the watcher reports absolute paths
    assert [d.rel_path for d in taken] == ["photo.jpg"] and taken[0].path == str(dropped.absolute())


def test_config_directories_are_absolute(tmp_path: Path, monkeypatch) -> None:
    from app.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"input": Path("inbox")})
    assert config.input == tmp_path / "inbox" and config.output == tmp_path / "bins"
    assert config.state_dir.is_absolute()


# --- identity, generations, names --------------------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, rel_path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER,
    sha256 TEXT, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, bin TEXT, rule TEXT, reason TEXT,
    decision TEXT, signals TEXT, output_path TEXT, last_error TEXT, timings TEXT, seen_at REAL NOT NULL,
    updated_at REAL NOT NULL, finished_at REAL
);
CREATE INDEX files_status ON files(status, id);
CREATE INDEX files_rel_path ON files(rel_path);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO files(path, rel_path, size, mtime_ns, sha256, status, attempts, bin, rule, decision, output_path,
                  seen_at, updated_at, finished_at)
    VALUES ('/in/IMG_0001.jpg', 'IMG_0001.jpg', 10, 1, 'aa', 'done', 1, 'A', 'r', '{"bin": "A"}', '/out/A/IMG_0001.jpg',
            1.0, 1.0, 1.0);
INSERT INTO files(path, rel_path, size, mtime_ns, status, attempts, seen_at, updated_at)
    VALUES ('/in/next.jpg', 'next.jpg', 5, 1, 'processing', 1, 1.0, 1.0);
"""


def test_a_version_1_ledger_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
    old = Ledger(path, read_only=True)  # read-only opens it as it is, without migrating
    assert old.schema_version == "1" and old.counts()["bins"] == {"A": 1}
    old.close()
    ledger = Ledger(path)
    assert ledger.schema_version == "3"
    first = ledger.find("/out/A/IMG_0001.jpg")
    assert [(r.status, r.decision, r.inode) for r in first] == [("done", {"bin": "A", "rule": "r"}, None)]
    assert ledger.recover_interrupted() == 1
    # the name is reused with other content: a new row, the migrated one is untouched
    assert ledger.intake([Discovered("/in/IMG_0001.jpg", "IMG_0001.jpg", 12, 2, 7, 3)]).requeued == 1
    assert ledger.get(1).status == "done" and len(ledger.find("/in/IMG_0001.jpg")) == 2
    ledger.close()
    assert Ledger(path).schema_version == "3", "opening a migrated ledger again changes nothing"


def test_same_size_and_mtime_with_new_inode_or_ctime_is_a_new_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    first = Discovered("/in/a.png", "a.png", 10, 1, 100, 5)
    ledger.intake([first])
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "done", sha256="ab", bin="A", output_path="/out/A/a.png")])
    assert [f.id for f in ledger.intake([first]).already_finished] == [row.id]
    assert ledger.intake([Discovered("/in/a.png", "a.png", 10, 1, 100, 6)]).requeued == 1, "new ctime"
    second = ledger.claim_pending(1)[0]
    ledger.record([Outcome(second.id, "done", sha256="cd", bin="B", output_path="/out/B/a.png")])
    assert ledger.intake([Discovered("/in/a.png", "a.png", 10, 1, 101, 6)]).requeued == 1, "new inode"
    assert ledger.counts()["bins"] == {"A": 1, "B": 1} and ledger.counts()["status"]["pending"] == 1


def test_a_look_taken_before_a_row_finished_is_stale_and_records_nothing(tmp_path: Path) -> None:
    """A scan stats a file, the pipeline places it (a hardlink changes its ctime; the record keeps the new one), then
    the scan records what it saw: that look predates the row's finish and says nothing about the file now. A look
    taken after the finish is compared as always."""
    import time

    ledger = Ledger(tmp_path / "l.db")
    ledger.intake([Discovered("/in/a.png", "a.png", 10, 1, 100, 5)])
    row = ledger.claim_pending(1)[0]
    before = Discovered("/in/a.png", "a.png", 10, 1, 100, 5, seen_at=time.time())  # the scan's look
    ledger.record([Outcome(row.id, "done", sha256="ab", bin="A", output_path="/out/A/a.png", ctime_ns=6)])
    stale = ledger.intake([before])
    assert (stale.new, stale.requeued, stale.already_finished) == (0, 0, []), "the stale look recorded a new row"
    # A look from before the finish that is not the placed file as it was (other content, another inode: replaced
    # while its row was finishing) is a change all the same: a new generation, not ignored.
    replaced = Discovered("/in/a.png", "a.png", 12, 2, 101, 5, seen_at=time.time() - 60)
    assert ledger.intake([replaced]).requeued == 1 and ledger.counts()["status"] == {"done": 1, "pending": 1}
    ledger.claim_pending(1)
    ledger.recover_interrupted()
    after = Discovered("/in/a.png", "a.png", 10, 1, 100, 7, seen_at=time.time())  # changed since: a new generation
    assert ledger.intake([after]).requeued == 0, "the pending row takes the look (its identity is updated)"
    assert ledger.counts()["status"] == {"done": 1, "pending": 1}


def test_names_of_any_bytes_are_stored_faithfully(tmp_path: Path) -> None:
    import os

    root = tmp_path / "in"
    root.mkdir()
    odd = os.fsdecode(b"bad\xff.png")
    long_name = "L" * 251 + ".png"
    (root / odd).write_bytes(b"odd")
    (root / long_name).write_bytes(b"long")
    (root / "café.png").write_bytes(b"utf8")
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.intake(to_discovered(root, seen) for seen in scan(root)).new == 3
    rows = {row.rel_path: row for row in ledger.rows()}
    assert set(rows) == {odd, long_name, "café.png"}
    assert os.fsencode(rows[odd].path) == os.fsencode(str(root.resolve())) + b"/bad\xff.png"
    assert (root / odd).read_bytes() == b"odd" and rows[odd].shown_path.endswith("bad\\xff.png")
    assert [r.rel_path for r in ledger.find("bad\udcff.png")] == [odd]
    assert ledger.intake(to_discovered(root, seen) for seen in scan(root)).new == 0, "found again, not duplicated"


def test_read_only_open_never_writes_and_bad_files_raise_database_error(tmp_path: Path) -> None:
    import sqlite3

    import pytest

    path = tmp_path / "l.db"
    writer = Ledger(path)
    writer.intake([Discovered("/in/a.png", "a.png", 1, 1)])
    reader = Ledger(path, read_only=True)
    assert reader.counts()["status"] == {"pending": 1}
    writer.intake([Discovered("/in/b.png", "b.png", 1, 1)])
    assert reader.backlog()[0] == 2, "sees the writer's commits"
    with pytest.raises(sqlite3.OperationalError, match="read-only"):
        reader.claim_pending(1)
    assert writer.synchronous() == 2, "synchronous=FULL: a commit is durable when it returns"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all " * 500)
    for read_only in (False, True):
        with pytest.raises(sqlite3.DatabaseError, match="garbage.db"):
            Ledger(garbage, read_only=read_only)
    assert garbage.read_bytes() == b"not a database at all " * 500
    with pytest.raises(sqlite3.DatabaseError):
        Ledger(tmp_path / "missing.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_a_leftover_whose_input_holds_other_content_becomes_a_new_row(tmp_path: Path) -> None:
    import os

    from app.store import Placer, sha256_file

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    source = inbox / "a.png"
    source.write_bytes(b"first")
    placer = Placer(out, "move")
    digest = sha256_file(source)
    placed = placer.place(source, "a.png", "A", digest)
    ledger = Ledger(tmp_path / "l.db")
    st = source.stat()
    seen = Discovered(str(source), "a.png", st.st_size, st.st_mtime_ns)  # a row from before inode/ctime were kept
    ledger.intake([seen])
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "done", sha256=digest, bin="A", output_path=str(placed))])
    replacement = inbox / ".next"
    replacement.write_bytes(b"other")  # same size and mtime, other bytes, renamed over the input
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    replacement.rename(source)
    result = ledger.intake([seen])
    assert finish_leftovers(ledger, result.already_finished, True, placer.remove_source) == (0, 1)
    assert ledger.get(row.id).status == "done" and source.read_bytes() == b"other"
    assert newest_row(ledger, str(source)).status == "pending"


def test_messages_and_signals_naming_odd_files_are_recorded(tmp_path: Path) -> None:
    import os

    odd = os.fsdecode(b"/in/bad\xfe.jpg")
    ledger = Ledger(tmp_path / "l.db")
    ledger.intake([Discovered(odd, odd[4:], 3, 1)])
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "quarantined", reason="not_an_image", last_error=f"{odd}: not an image",
                           signals={"source": odd}, output_path=os.fsdecode(b"/out/_quarantine/not_an_image/bad\xfe.jpg"))])
    stored = ledger.get(row.id)
    assert stored.last_error == "/in/bad\\xfe.jpg: not an image" and stored.signals == {"source": odd}
    assert os.fsencode(stored.output_path).endswith(b"bad\xfe.jpg")
    assert [r.id for r in ledger.find(stored.output_path)] == [row.id]


def test_a_refused_row_waits_for_a_change_of_its_file_or_the_next_start(tmp_path: Path) -> None:
    """The output refused a file (its bin and the quarantine): rescans leave the row alone, a change of the file
    makes the same row pending again (nothing was placed), and so does ``retry_refused`` at a start."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    seen = Discovered(str(tmp_path / "in" / "notes.jpg"), "notes.jpg", 12, 1_000, 7, 2_000)
    ledger.intake([seen])
    (row,) = ledger.claim_pending(10)
    ledger.record([Outcome(row.id, "refused", reason="not_an_image", last_error="quarantine refused")])
    assert ledger.intake([seen]).requeued == 0 and not ledger.has_pending(), "a rescan leaves it alone"
    assert ledger.counts()["refused"] == {"not_an_image": 1} and ledger.counts()["quarantined"] == {}
    changed = Discovered(seen.path, seen.rel_path, 20, 3_000, 7, 4_000)
    assert ledger.intake([changed]).requeued == 1
    (again,) = ledger.claim_pending(10)
    assert again.id == row.id and again.attempts == 1, "the same row, from its first attempt"
    ledger.record([Outcome(again.id, "refused", reason="not_an_image", last_error="quarantine refused")])
    assert ledger.retry_refused() == 1 and [r.id for r in ledger.claim_pending(10)] == [row.id]
    assert len(list(ledger.rows())) == 1
    ledger.close()
