"""Structured logs: JSON lines under systemd/journald or when piped, readable console output in a terminal."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import structlog


def wants_json(fmt: str, stream: TextIO) -> bool:
    if fmt != "auto":
        return fmt == "json"
    under_systemd = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    return under_systemd or not stream.isatty()


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    numeric = getattr(logging, level.upper())
    renderer = structlog.processors.JSONRenderer() if wants_json(fmt, stream) else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (ultralytics, transformers) go to the same stream, quieter.
    logging.basicConfig(stream=stream, level=max(numeric, logging.WARNING), format="%(levelname)s %(name)s: %(message)s",
                        force=True)
