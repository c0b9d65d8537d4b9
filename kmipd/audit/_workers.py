"""Where the workers of a daemon with ``server.workers`` > 1 keep their audit chains."""

from __future__ import annotations

from pathlib import Path


def worker_trail(path: Path, index: int) -> Path:
    """Worker ``index``'s trail beside ``audit.path``: audit.log -> audit-w0.log."""
    return path.with_name(f"{path.stem}-w{index}{path.suffix}")


def worker_trails(path: Path) -> list[Path]:
    """The workers' trails beside ``audit.path`` that exist, in worker order."""
    found = []
    for candidate in path.parent.glob(f"{path.stem}-w*{path.suffix}"):
        index = candidate.name[len(path.stem) + 2 : len(candidate.name) - len(path.suffix)]
        if index.isdigit():
            found.append((int(index), candidate))
    return [trail for _, trail in sorted(found)]
