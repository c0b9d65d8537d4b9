"""Input and output files of the commands that stream data (encrypt, seal, open, ...).

Output appears only complete: it is written beside its name, mode 0600 from
the first byte, and renamed on success, so a failed decrypt leaves no
half-written plaintext under the name the user asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

from kmipd.cli._common import CliError
from kmipd.crypto._chunked_aead import Readable


@contextlib.contextmanager
def open_input(args: argparse.Namespace) -> Iterator[Readable]:
    """args.input ("-": stdin), with a progress line on stderr if args.progress says so."""
    if args.input == "-":
        source: BinaryIO = sys.stdin.buffer
        size = None
    else:
        try:
            source = open(args.input, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CliError(f"cannot read {args.input}: {exc.strerror}") from None
        size = os.fstat(source.fileno()).st_size
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        yield _Progress(source, size, args.handler.__name__.strip("_")) if show else source
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if show:
            print(file=sys.stderr)


@contextlib.contextmanager
def open_output(args: argparse.Namespace) -> Iterator[BinaryIO]:
    """stdout, or a file that appears only complete: written aside, renamed on success."""
    if args.output is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = args.output.with_name(f".{args.output.name}.partial")
    try:
        # 0600 from the first byte: the output may be plaintext (decrypt, open).
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a partial file left by a crash keeps no wider mode
        sink = os.fdopen(fd, "wb")
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror}") from None
    try:
        yield sink
    except BaseException:
        sink.close()
        partial.unlink(missing_ok=True)
        raise
    sink.close()
    os.replace(partial, args.output)


class _Progress:
    """A reader that reports how far it got, on one stderr line."""

    def __init__(self, source: BinaryIO, size: int | None, verb: str) -> None:
        self._source, self._size, self._verb = source, size, verb
        self._done = 0
        self._started = time.monotonic()
        self._shown = 0.0

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(n)
        self._done += len(data)
        now = time.monotonic()
        if now - self._shown >= 0.2 or not data:
            self._shown = now
            rate = self._done / max(now - self._started, 1e-6) / 2**20
            done = f"{self._done / 2**20:.1f} MiB"
            if self._size:
                done += f" of {self._size / 2**20:.1f} MiB ({100 * self._done // self._size}%)"
            print(f"\r{self._verb}: {done}, {rate:.1f} MiB/s", end="", file=sys.stderr)
        return data
