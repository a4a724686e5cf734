"""Items on the wire between Ray tasks and actors: Arrow rows with raw RGB pixels and byte paths.

Images travel as raw RGB bytes (Arrow ``large_binary``) plus their shape, not as pickled PIL objects; paths travel
as bytes (``os.fsencode``), so names that are not UTF-8 round-trip exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from app.engine import final_failure
from app.store import Row
from stages.base import ImageItem, ItemFailure


def schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("key", pa.int64()), ("source", pa.binary()), ("rel_path", pa.binary()), ("size", pa.int64()),
        ("mtime_ns", pa.int64()), ("inode", pa.int64()), ("ctime_ns", pa.int64()), ("attempts", pa.int64()),
        ("seen_at", pa.float64()), ("sha256", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("image_width", pa.int64()), ("image_height", pa.int64()),
        ("pixels", pa.large_binary()), ("signals", pa.string()), ("timings", pa.string()), ("failure", pa.string()),
        ("not_computed", pa.string()), ("nodes", pa.string()), ("opened", pa.list_(pa.int64())),
    ])


def row_record(row: Row, max_attempts: int) -> dict[str, Any]:
    """A claimed ledger row as the first record of its item; a row past its attempts carries its final failure
    (``engine.final_failure``, as the local feeder decides it)."""
    failure = final_failure(row, max_attempts)
    return {
        "key": row.id, "source": os.fsencode(row.path), "rel_path": os.fsencode(row.rel_path), "size": row.size,
        "mtime_ns": row.mtime_ns, "inode": row.inode, "ctime_ns": row.ctime_ns, "attempts": row.attempts,
        "seen_at": row.seen_at, "sha256": None, "width": None,
        "height": None, "image_width": None, "image_height": None, "pixels": None, "signals": "{}", "timings": "{}",
        "failure": json.dumps(failure.__dict__) if failure else None, "not_computed": "{}", "nodes": "{}",
        "opened": None,
    }


@dataclass
class Carried:
    """What an item carries besides ``ImageItem``: the row's identity and where it ran."""

    rel_path: bytes
    size: int | None
    mtime_ns: int | None
    attempts: int
    nodes: dict[str, str]
    inode: int | None = None
    ctime_ns: int | None = None


def decode_items(table: Any) -> list[tuple[ImageItem, Carried]]:
    """Arrow rows -> items with PIL images rebuilt from their raw bytes (no copy of the pixels)."""
    import numpy as np
    from PIL import Image

    out: list[tuple[ImageItem, Carried]] = []
    for record in table.to_pylist():
        item = ImageItem(key=int(record["key"]), source=os.fsdecode(record["source"]), seen_at=record["seen_at"],
                         size=record["size"], sha256=record["sha256"], width=record["width"], height=record["height"])
        item.signals = json.loads(record["signals"] or "{}")
        item.timings = json.loads(record["timings"] or "{}")
        item.not_computed = json.loads(record["not_computed"] or "{}")
        item.opened = tuple(record["opened"]) if record["opened"] is not None else None  # type: ignore[assignment]
        if record["failure"]:
            item.failure = ItemFailure(**json.loads(record["failure"]))
        elif record["pixels"] is not None:
            pixels = np.frombuffer(record["pixels"], dtype=np.uint8)
            item.image = Image.fromarray(pixels.reshape(record["image_height"], record["image_width"], 3), "RGB")
        carried = Carried(record["rel_path"], record["size"], record["mtime_ns"], int(record["attempts"]),
                          json.loads(record["nodes"] or "{}"), record["inode"], record["ctime_ns"])
        out.append((item, carried))
    return out


def encode_items(pairs: list[tuple[ImageItem, Carried]], keep_image: bool) -> Any:
    """Items -> Arrow rows; the image goes as RGB bytes while a later stage still needs it."""
    import numpy as np
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [] for name in schema().names}
    for item, carried in pairs:
        pixels = width = height = None
        if keep_image and item.failure is None and item.image is not None:
            image = item.image if item.image.mode == "RGB" else item.image.convert("RGB")
            pixels = np.asarray(image, dtype=np.uint8).tobytes()
            width, height = image.size
        failure = item.failure
        values = {
            "key": item.key, "source": os.fsencode(item.source), "rel_path": carried.rel_path, "size": carried.size,
            "mtime_ns": carried.mtime_ns, "inode": carried.inode, "ctime_ns": carried.ctime_ns,
            "attempts": carried.attempts, "seen_at": item.seen_at, "sha256": item.sha256,
            "width": item.width, "height": item.height, "image_width": width, "image_height": height,
            "pixels": pixels, "signals": json.dumps(item.signals), "timings": json.dumps(item.timings),
            "failure": json.dumps(failure.__dict__) if failure is not None else None,
            "not_computed": json.dumps(item.not_computed), "nodes": json.dumps(carried.nodes),
            "opened": list(item.opened) if item.opened is not None else None,
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=schema())


def row_of(item: ImageItem, carried: Carried) -> Row:
    """The claimed ledger row the item came from, as far as finishing needs it."""
    return Row(id=item.key, path=item.source, rel_path=os.fsdecode(carried.rel_path), size=carried.size,
               mtime_ns=carried.mtime_ns, sha256=None, status="processing", attempts=carried.attempts, bin=None,
               rule=None, reason=None, decision=None, signals=None, output_path=None, last_error=None, timings=None,
               seen_at=item.seen_at, updated_at=item.seen_at, finished_at=None, inode=carried.inode,
               ctime_ns=carried.ctime_ns)
