"""Reading kmipd's secret files (master key, audit key, HSM PIN), refused if exposed."""

from __future__ import annotations

import stat
from pathlib import Path


class PrivateFileError(Exception):
    """The secret file cannot be read, or group or others can reach it: the message says which."""


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of ``path`` (``what`` names it in errors), refusing a file that group or
    others may access: a key whose file is readable by others is no longer a secret."""
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise PrivateFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrivateFileError(
            f"{what} {path} is accessible to group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); it must be 0600 or 0400"
        )
    return data
