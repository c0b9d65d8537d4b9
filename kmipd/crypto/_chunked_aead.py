"""AES-256-GCM over a stream, in bounded chunks (the STREAM construction).

Large payloads are encrypted a chunk at a time so that memory stays
constant whatever the size. Each chunk's nonce is

    nonce = prefix (7 random bytes) || chunk index (4 bytes, big-endian) || last (1 byte)

so a chunk only decrypts at its own position, and only the final chunk
decrypts as final: reordering, dropping, duplicating or splicing chunks
(from another stream: another prefix or key) and truncating the stream
all fail authentication. Every chunk also authenticates ``associated_data``
(the envelope header), so a header swapped onto another body fails too.

Ciphertext layout: chunk ciphertexts back to back, each exactly
``chunk_size + 16`` bytes except the final one, which holds the remaining
0..chunk_size plaintext bytes + 16. An empty plaintext is one final chunk
of 16 bytes.

Limits: 2**32 chunks per stream; a key (fresh per stream in every caller
here) with a random 56-bit prefix.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TAG_SIZE = 16
PREFIX_SIZE = 7
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024
_MAX_CHUNKS = 2**32


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class StreamIntegrityError(Exception):
    """The ciphertext does not authenticate: truncated, reordered, altered or foreign."""


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= _MAX_CHUNKS:
        raise ValueError("stream too long: at most 2**32 chunks")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _chunks(source: Readable, size: int) -> Iterator[tuple[bytes, bool]]:
    """(chunk, is_last) pairs; reads one chunk ahead to know which is last."""
    current = _read_exactly(source, size)
    while True:
        following = _read_exactly(source, size) if len(current) == size else b""
        last = not following
        yield current, last
        if last:
            return
        current = following


def _read_exactly(source: Readable, size: int) -> bytes:
    parts, wanted = [], size
    while wanted:
        data = source.read(wanted)
        if not data:
            break
        parts.append(data)
        wanted -= len(data)
    return b"".join(parts)


def encrypt_stream(
    key: bytes | memoryview,
    prefix: bytes,
    associated_data: bytes,
    source: Readable,
    sink: Writable,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Encrypt ``source`` into ``sink``; returns the plaintext length."""
    _check(prefix, chunk_size)
    cipher = AESGCM(key)
    total = 0
    for index, (chunk, last) in enumerate(_chunks(source, chunk_size)):
        sink.write(cipher.encrypt(_nonce(prefix, index, last), chunk, associated_data))
        total += len(chunk)
    return total


def decrypt_stream(
    key: bytes | memoryview,
    prefix: bytes,
    associated_data: bytes,
    source: Readable,
    sink: Writable,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Decrypt into ``sink``; raises StreamIntegrityError on any tampering.

    Plaintext of a chunk is written only after that chunk authenticated; a
    caller that must not act on a partial result writes to a temporary file
    and keeps it only if this returns.
    """
    _check(prefix, chunk_size)
    cipher = AESGCM(key)
    total = 0
    for index, (chunk, last) in enumerate(_chunks(source, chunk_size + TAG_SIZE)):
        try:
            plain = cipher.decrypt(_nonce(prefix, index, last), chunk, associated_data)
        except InvalidTag:
            raise StreamIntegrityError(
                f"chunk {index} does not authenticate: the data was truncated, reordered, "
                "altered or belongs to another envelope"
            ) from None
        sink.write(plain)
        total += len(plain)
    return total


def _check(prefix: bytes, chunk_size: int) -> None:
    if len(prefix) != PREFIX_SIZE:
        raise ValueError(f"the nonce prefix is {PREFIX_SIZE} bytes")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}")
