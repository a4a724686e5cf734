"""Fake stages for process-isolation tests. They run inside spawned children, so they live in an importable
module, keep only picklable state, and leave their traces in files (a child's memory dies with it)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import structlog

from stages.base import BatchPolicy, ImageItem, Stage, run_phases


class MisbehavingStage(Stage):
    """Records what it saw; ``abort_on`` files abort the child (like a segfault in a native library) every time,
    ``hang_once_on`` files make the child sleep for ``hang_s`` the first time only (a transient hang)."""

    def __init__(self, name: str, journal: Path, *, abort_on: set[str] | None = None, hang_once_on: set[str] | None = None,
                 hang_s: float = 3600.0, batch_size: int = 8, max_wait_ms: float = 30.0, per_item_s: float = 0.0) -> None:
        super().__init__(["cpu"], BatchPolicy(batch_size, max_wait_ms))
        self.name = name
        self.journal = str(journal)
        self.abort_on = set(abort_on or ())
        self.hang_once_on = set(hang_once_on or ())
        self.hang_s = hang_s
        self.per_item_s = per_item_s

    def _note(self, line: str) -> None:
        with open(self.journal, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def setup(self, device: str) -> None:
        super().setup(device)
        self._note(f"setup {os.getpid()}")
        structlog.get_logger("fake").info("fake stage set up", journal=self.journal)
        logging.getLogger("fake.library").warning("a library warning through stdlib logging")

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        names = [Path(item.source).name for item in items]
        self._note(f"batch {os.getpid()} {' '.join(names)}")
        if self.abort_on & set(names):
            os.abort()
        hang = self.hang_once_on & set(names)
        if hang:
            marker = Path(self.journal + ".hung")
            if not marker.exists():
                marker.write_text("x")
                time.sleep(self.hang_s)
        if self.per_item_s:
            time.sleep(self.per_item_s * len(items))
        for item in items:
            if self.name == "ocr":
                item.signals["ocr"] = {"text": "", "lines": [], "char_count": 0, "line_count": 0,
                                       "text_area_ratio": 0.0, "mean_confidence": 0.0}
            else:
                item.signals["detections"] = []
            item.signals[f"{self.name}_pid"] = os.getpid()
            item.signals[f"{self.name}_pixels"] = list(item.image.size) if hasattr(item.image, "size") else None
        return items

    def seen(self) -> list[tuple[int, list[str]]]:
        """Every batch the children started: (pid, file names)."""
        out = []
        for line in Path(self.journal).read_text().splitlines():
            if line.startswith("batch "):
                parts = line.split()
                out.append((int(parts[1]), parts[2:]))
        return out


class GilBoundStage(Stage):
    """A GPU-like stage with Python post-processing: ``sleep_ms`` per batch without the GIL (the kernel), then
    ``python_ms`` per item of pure-Python work holding it (decoding boxes, a token loop)."""

    def __init__(self, name: str, sleep_ms: float, python_ms: float, batch_size: int = 16) -> None:
        super().__init__(["cpu"], BatchPolicy(batch_size, 20.0))
        self.name = name
        self.sleep_ms, self.python_ms = sleep_ms, python_ms

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        time.sleep(self.sleep_ms / 1000.0)
        end = time.perf_counter() + self.python_ms * len(items) / 1000.0
        spins = 0
        while time.perf_counter() < end:
            spins += 1
        for item in items:
            item.signals.setdefault("ocr", {"text": "", "lines": [], "char_count": 0, "line_count": 0,
                                            "text_area_ratio": 0.0, "mean_confidence": 0.0})
            item.signals.setdefault("detections", [])
        return items


def gil_experiment(count: int = 1500, sleep_ms: float = 20.0, python_ms: float = 2.0) -> dict[str, float]:
    """Images/s of a two-stage pipeline of ``GilBoundStage``s in thread mode and in process mode (same files)."""
    import tempfile

    import anyio

    from app.engine import Hosting, Pipeline
    from app.metrics import Metrics
    from app.store import Ledger, scan, to_discovered
    from stages.rules import RuleThresholds

    rates: dict[str, float] = {}
    for mode in ("thread", "process", "thread", "process"):
        with tempfile.TemporaryDirectory() as scratch:
            inbox = Path(scratch) / "in"
            inbox.mkdir()
            for i in range(count):
                (inbox / f"f{i:05d}.png").write_bytes(b"x")
            ledger = Ledger(Path(scratch) / "ledger.sqlite3")
            ledger.intake(to_discovered(inbox, seen) for seen in scan(inbox))
            stages: list[Stage] = [GilBoundStage("ocr", sleep_ms, python_ms), GilBoundStage("vision", sleep_ms, python_ms)]
            hosting = {stage.name: Hosting("process") for stage in stages} if mode == "process" else {}
            pipeline = Pipeline(ledger=ledger, metrics=Metrics(), stages=stages, thresholds=RuleThresholds(),
                                placer=None, queue_capacities={"ocr": 32, "vision": 32, "sink": 64}, max_attempts=2,
                                placement_mode="copy", hosting=hosting)
            clock: dict[str, float] = {}

            async def main() -> None:
                await pipeline.setup()
                clock["start"] = time.monotonic()
                await pipeline.run(until_idle=True)
                clock["end"] = time.monotonic()
                await pipeline.teardown()

            anyio.run(main)
            ledger.close()
            rate = count / (clock["end"] - clock["start"])
            rates[mode] = max(rates.get(mode, 0.0), rate)
            print(f"{mode}: {rate:.1f} images/s", flush=True)
    return rates


if __name__ == "__main__":
    import sys

    gil_experiment(*(float(arg) if index else int(arg) for index, arg in enumerate(sys.argv[1:])))


class HostAndDeviceStage(Stage):
    """Host phases and a device call that each take a fixed time (sleep releases the GIL like real work does):
    ``prepare`` and ``finish`` ``host_s / 2`` each, ``forward`` ``device_s``. Records the device calls' spans."""

    produces = frozenset({"ocr"})

    def __init__(self, name: str, host_s: float, device_s: float, batch_size: int, journal: Path | None = None) -> None:
        super().__init__(["cpu"], BatchPolicy(batch_size, 1.0))
        self.name = name
        self.host_s, self.device_s = host_s, device_s
        self.journal = journal

    def prepare(self, items: list[ImageItem]) -> list[ImageItem]:
        time.sleep(self.host_s / 2)
        return items

    def forward(self, batch: list[ImageItem]) -> list[ImageItem]:
        started = time.monotonic()
        time.sleep(self.device_s)
        if self.journal is not None:
            with self.journal.open("a") as handle:
                handle.write(f"{started} {time.monotonic()}\n")
        return batch

    def finish(self, items: list[ImageItem], outputs: list[ImageItem]) -> list[ImageItem]:
        time.sleep(self.host_s / 2)
        for item in outputs:
            item.signals["ocr"] = {"char_count": 0, "line_count": 0, "text_area_ratio": 0.0}
        return outputs

    def process_batch(self, items: list[ImageItem]) -> list[ImageItem]:
        return run_phases(self, items)
