"""Reading and writing the CA's files: atomic writes with the right mode from the first byte."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from pki._errors import PkiError


def write_private_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically; the file has ``mode`` when it appears.

    The temporary file is created with O_EXCL and mode 0600, so a private key is
    never readable by others, not even for an instant, and is only widened to
    ``mode`` (0644 for certificates) once complete. It is fsynced, renamed over
    the target and the directory fsynced, so a crash leaves the old file or the
    new one, never a torn one. On failure the temporary file is removed.
    """
    target = Path(path)
    directory = target.parent
    temporary = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            # Set explicitly: the umask must neither narrow a public file nor
            # matter for a private one.
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def read_file(path: Path, what: str) -> bytes:
    """Read a whole file, or raise PkiError naming it (``what`` says which file it is)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
