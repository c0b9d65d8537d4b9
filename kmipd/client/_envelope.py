"""Envelope encryption for storage systems: data encrypted under a fresh data key.

An envelope is self-describing:

    "KMPE" 0x01 | header length (4 bytes, big-endian) | header (CBOR) | body

The header (``envelope-header`` in protocol.cddl) carries the data key's
wrapped blob, the KEK and version that wrapped it, the encryption context,
the chunk size and the nonce prefix. The body is the plaintext under
AES-256-GCM in bounded chunks (kmipd.crypto._chunked_aead), each chunk also
authenticating every byte before the body, so a header moved onto another
body, or a body cut, reordered or spliced, fails to decrypt.

Decrypting needs the daemon (or the client's cache) to unwrap the blob, for
an identity allowed to unwrap under that KEK, with the same context.
"""

from __future__ import annotations

import os
import struct

import attrs

from kmipd.client._errors import KmipdError
from kmipd.crypto._chunked_aead import (
    MAX_CHUNK_SIZE,
    PREFIX_SIZE,
    Readable,
    StreamIntegrityError,
    Writable,
    decrypt_stream,
    encrypt_stream,
)
from kmipd.protocol import ProtocolError, decode_item, encode_item, encode_struct, parse_struct
from kmipd.protocol._messages import BLOB, CONTEXT, NAMESPACE, VERSION
from kmipd.protocol._schema import Bytes, UInt, wire

MAGIC = b"KMPE\x01"
_LENGTH = struct.Struct(">I")
MAX_HEADER_SIZE = 16 * 1024


class EnvelopeError(KmipdError):
    """Not an envelope, or a damaged one: the message says which part."""


@attrs.frozen
class EnvelopeHeader:
    kek: str = wire(NAMESPACE)
    kek_version: int = wire(VERSION)
    blob: bytes = wire(BLOB)
    context: dict[str, str] = wire(CONTEXT)
    chunk_size: int = wire(UInt(minimum=1, maximum=MAX_CHUNK_SIZE))
    nonce_prefix: bytes = wire(Bytes(min_length=PREFIX_SIZE, max_length=PREFIX_SIZE))


def write_header(sink: Writable, header: EnvelopeHeader) -> bytes:
    """Write magic, length and header; return those bytes (the body's associated data)."""
    encoded = encode_item(encode_struct(header))
    prologue = MAGIC + _LENGTH.pack(len(encoded)) + encoded
    sink.write(prologue)
    return prologue


def new_header(
    kek: str, kek_version: int, blob: bytes, context: dict[str, str], chunk_size: int
) -> EnvelopeHeader:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise EnvelopeError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}")
    return EnvelopeHeader(
        kek=kek,
        kek_version=kek_version,
        blob=blob,
        context=dict(context),
        chunk_size=chunk_size,
        nonce_prefix=os.urandom(PREFIX_SIZE),
    )


def read_header(source: Readable) -> tuple[EnvelopeHeader, bytes]:
    """Parse the header; return it and the bytes it occupied (the body's associated data)."""
    start = source.read(len(MAGIC) + _LENGTH.size)
    if len(start) < len(MAGIC) + _LENGTH.size or not start.startswith(MAGIC[:4]):
        raise EnvelopeError("not a kmipd envelope (bad magic)")
    if start[4:5] != MAGIC[4:]:
        raise EnvelopeError(f"unsupported envelope format version {start[4]}")
    (length,) = _LENGTH.unpack_from(start, len(MAGIC))
    if length > MAX_HEADER_SIZE:
        raise EnvelopeError(f"envelope header of {length} bytes is larger than {MAX_HEADER_SIZE}")
    encoded = source.read(length)
    if len(encoded) != length:
        raise EnvelopeError("envelope truncated inside its header")
    try:
        header = parse_struct(EnvelopeHeader, decode_item(encoded), "envelope header")
    except ProtocolError as exc:
        raise EnvelopeError(f"damaged envelope header: {exc.message}") from None
    return header, start + encoded


def seal_body(
    key: memoryview, header: EnvelopeHeader, prologue: bytes, source: Readable, sink: Writable
) -> int:
    return encrypt_stream(
        key, header.nonce_prefix, prologue, source, sink, chunk_size=header.chunk_size
    )


def open_body(
    key: memoryview, header: EnvelopeHeader, prologue: bytes, source: Readable, sink: Writable
) -> int:
    try:
        return decrypt_stream(
            key, header.nonce_prefix, prologue, source, sink, chunk_size=header.chunk_size
        )
    except StreamIntegrityError as exc:
        raise EnvelopeError(f"envelope body damaged: {exc}") from None
