"""Ledger semantics: intake, claims, crash recovery, changed files and leftovers."""

from __future__ import annotations

from pathlib import Path

from app.intake import SettleTracker, finish_leftovers, is_candidate_name, scan, to_discovered
from app.ledger import Discovered, Ledger, Outcome


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
    assert changed.requeued == 1 and ledger.get(row.id).status == "pending"
    assert ledger.get(row.id).bin is None


def test_leftover_of_a_crash_is_removed_only_when_output_holds_it(tmp_path: Path) -> None:
    from app.placement import Placer

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    source = inbox / "a.png"
    source.write_bytes(b"image bytes")
    placer = Placer(out, "move")
    from app.placement import sha256_file

    digest = sha256_file(source)
    placed = placer.place(source, "a.png", "A", digest)
    ledger = Ledger(tmp_path / "l.db")
    discovered = [to_discovered(inbox, seen) for seen in scan(inbox)]
    ledger.intake(discovered)
    row = ledger.claim_pending(1)[0]
    ledger.record([Outcome(row.id, "done", sha256=digest, bin="A", output_path=str(placed))])
    # the process died here, before removing the input: a restart finds it again
    result = ledger.intake(discovered)
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
    found = sorted(seen.path.relative_to(root).as_posix() for seen in scan(root))
    assert found == ["inside.png", "sub/a.png"]


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
    taken = tracker.hint(dropped.absolute())  # watchfiles reports absolute paths
    assert [d.rel_path for d in taken] == ["photo.jpg"] and taken[0].path == str(dropped.absolute())


def test_config_directories_are_absolute(tmp_path: Path, monkeypatch) -> None:
    from app.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"input": Path("inbox")})
    assert config.input == tmp_path / "inbox" and config.output == tmp_path / "bins"
    assert config.state_dir.is_absolute()
