"""Daemon logging: one line per event on stderr, never key material."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("kmipd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
