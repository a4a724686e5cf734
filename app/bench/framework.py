"""The `framework` scenario: what binner itself costs per file, with models that do nothing.

The full path runs for real: files on disk -> ledger -> loader (read, hash, decode) -> no-op OCR and vision
stages -> rules -> placement (move, atomic, fsynced) -> ledger. Once on small PNGs (the per-file overhead of
the framework) and once on 12-megapixel JPEGs (where decoding dominates).
"""

from __future__ import annotations

from typing import Any

from app.bench.common import BenchOptions, make_images, make_photos, run_backlog, synthetic_overrides

FRAMEWORK_IMAGES = 3000
FRAMEWORK_LARGE_IMAGES = 300
TARGET_IMAGES_PER_SECOND = 2500.0


def _framework_run(options: BenchOptions, fill: Any) -> dict[str, Any]:
    run = run_backlog(synthetic_overrides((0.0, 0.0), (0.0, 0.0), options.batch, options.queue), fill)
    report = run.summary()
    rate = run.images_per_second
    report["overhead_us_per_file"] = round(1e6 / rate, 1) if rate else None
    return report


def run_framework(options: BenchOptions) -> dict[str, Any]:
    count = options.count(FRAMEWORK_IMAGES)
    large = FRAMEWORK_LARGE_IMAGES if options.large_images is None else options.large_images
    report = _framework_run(options, lambda inbox: make_images(inbox, count))
    report["small_png"] = {"files": count, "size": "64x64"}
    if large:
        report["large_jpeg"] = {"size": "4000x3000", **_framework_run(options, lambda inbox: make_photos(inbox, large))}
    rate = report["images_per_second"]
    report["target"] = {"text": f">= {TARGET_IMAGES_PER_SECOND:,.0f} small images/s",
                        "met": bool(rate and rate >= TARGET_IMAGES_PER_SECOND)}
    return report
