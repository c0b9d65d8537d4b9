"""The sealed envelope: data for one recipient, from any sender (client-to-client).

One self-described CBOR item (protocol.cddl ``sealed-envelope``):

    55799({"header": bstr .cbor sealed-envelope-header, "chunks": [_ * bstr]})

The sender makes a fresh 256-bit content key, seals it with HPKE to the
recipient's certified transport key (``info`` binds it to the recipient, the
certificate's fingerprint and the body's parameters), and encrypts the data
under it with AES-256-GCM in chunks (kmipd.crypto._chunked_aead, the STREAM
construction). Every chunk authenticates the exact header bytes, so a header
moved onto another body, or a body cut, reordered or spliced, fails. The
chunk array is indefinite-length so a stream of unknown size is written in
one pass; every chunk's length is checked against the header's chunk size
before it is read, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import os
import secrets
import struct

import attrs
from cryptography import x509

from kmipd.crypto._chunked_aead import (
    PREFIX_SIZE,
    TAG_SIZE,
    Readable,
    StreamIntegrityError,
    Writable,
    decrypt_stream,
    encrypt_stream,
)
from kmipd.crypto._hpke import HpkeError, TransportKey, enc_length, seal_to_certificate
from kmipd.crypto._transport_cert import (
    certificate_fingerprint,
    certificate_identity,
    transport_kem,
)
from kmipd.protocol import ProtocolError, decode_item, encode_deterministic, encode_item
from kmipd.protocol._schema import Bytes, Text, UInt, encode_struct, parse_struct, wire
from pki import TransportKem

ENVELOPE_VERSION = 1
ENVELOPE_LABEL = "kmipd/sealed-envelope/v1"
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 1024 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
MAX_HEADER_SIZE = 8192
CONTENT_KEY_SIZE = 32

# The fixed bytes around the header and the chunks (see the module docstring).
_PREFIX = b"\xd9\xd9\xf7" + b"\xa2" + b"\x66header"
_CHUNKS_KEY = b"\x66chunks" + b"\x9f"
_BREAK = 0xFF


class SealedEnvelopeError(ValueError):
    """Not a sealed envelope, a damaged one, or one for another key: says which."""


@attrs.frozen
class SealedEnvelopeHeader:
    version: int = wire(UInt(minimum=1, maximum=1))
    suite: str = wire(
        Text(max_length=32, description="suite (" + ", ".join(k.value for k in TransportKem) + ")")
    )
    recipient: str = wire(Text(max_length=2048))
    recipient_fingerprint: bytes = wire(Bytes(min_length=32, max_length=32))
    #: HPKE enc || ct of the content key.
    sealed_key: bytes = wire(Bytes(min_length=32, max_length=2048))
    chunk_size: int = wire(UInt(minimum=MIN_CHUNK_SIZE, maximum=MAX_CHUNK_SIZE))
    nonce_prefix: bytes = wire(Bytes(min_length=PREFIX_SIZE, max_length=PREFIX_SIZE))


def _key_info(header: SealedEnvelopeHeader) -> bytes:
    return encode_deterministic(
        [
            ENVELOPE_LABEL,
            header.suite,
            header.recipient,
            header.recipient_fingerprint,
            header.chunk_size,
            header.nonce_prefix,
        ]
    )


def _bstr_head(length: int) -> bytes:
    if length < 24:
        return bytes([0x40 | length])
    if length < 0x100:
        return bytes([0x58, length])
    if length < 0x10000:
        return b"\x59" + struct.pack(">H", length)
    return b"\x5a" + struct.pack(">I", length)


class _ChunkSink:
    """Writes each ciphertext chunk encrypt_stream produces as one CBOR bstr."""

    def __init__(self, sink: Writable) -> None:
        self._sink = sink

    def write(self, data: bytes, /) -> object:
        self._sink.write(_bstr_head(len(data)) + data)
        return len(data)


def seal_stream(
    recipient: x509.Certificate,
    source: Readable,
    sink: Writable,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Seal ``source`` to ``recipient`` (an already verified transport certificate)."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealedEnvelopeError(f"chunk_size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    content_key = bytearray(secrets.token_bytes(CONTENT_KEY_SIZE))
    try:
        unsealed = SealedEnvelopeHeader(
            version=ENVELOPE_VERSION,
            suite=transport_kem(recipient).value,
            recipient=certificate_identity(recipient),
            recipient_fingerprint=certificate_fingerprint(recipient),
            sealed_key=b"\x00" * 32,
            chunk_size=chunk_size,
            nonce_prefix=os.urandom(PREFIX_SIZE),
        )
        header = attrs.evolve(
            unsealed,
            sealed_key=seal_to_certificate(recipient, bytes(content_key), _key_info(unsealed)),
        )
        encoded = encode_item(encode_struct(header))
        sink.write(_PREFIX + _bstr_head(len(encoded)) + encoded + _CHUNKS_KEY)
        total = encrypt_stream(
            memoryview(content_key),
            header.nonce_prefix,
            encoded,
            source,
            _ChunkSink(sink),
            chunk_size=chunk_size,
        )
        sink.write(bytes([_BREAK]))
        return total
    finally:
        content_key[:] = bytes(len(content_key))


def _read_exactly(source: Readable, size: int, what: str) -> bytes:
    parts, wanted = [], size
    while wanted:
        data = source.read(wanted)
        if not data:
            raise SealedEnvelopeError(f"sealed envelope truncated inside {what}")
        parts.append(data)
        wanted -= len(data)
    return b"".join(parts)


def _read_bstr_length(source: Readable, what: str) -> int | None:
    """The length of the next bstr, or None at the chunk array's break."""
    first = _read_exactly(source, 1, what)[0]
    if first == _BREAK:
        return None
    major, info = first >> 5, first & 0x1F
    if major != 2 or info > 26:
        raise SealedEnvelopeError(f"damaged sealed envelope: {what} is not a definite-length bstr")
    if info < 24:
        return info
    size = {24: 1, 25: 2, 26: 4}[info]
    return int.from_bytes(_read_exactly(source, size, what), "big")


def read_header(source: Readable) -> tuple[SealedEnvelopeHeader, bytes]:
    """Parse up to the first chunk; return the header and its exact bytes."""
    start = source.read(len(_PREFIX))
    if start != _PREFIX:
        if len(start) < len(_PREFIX) and _PREFIX.startswith(start):
            raise SealedEnvelopeError("sealed envelope truncated inside its header")
        raise SealedEnvelopeError("not a kmipd sealed envelope (bad start)")
    length = _read_bstr_length(source, "the header")
    if length is None or length > MAX_HEADER_SIZE:
        raise SealedEnvelopeError(
            f"sealed envelope header missing or larger than {MAX_HEADER_SIZE}"
        )
    encoded = _read_exactly(source, length, "the header")
    try:
        header = parse_struct(SealedEnvelopeHeader, decode_item(encoded), "sealed envelope header")
    except ProtocolError as exc:
        raise SealedEnvelopeError(f"damaged sealed envelope header: {exc.message}") from None
    if header.suite not in {k.value for k in TransportKem}:
        raise SealedEnvelopeError(f"sealed envelope uses an unknown suite {header.suite!r}")
    if _read_exactly(source, len(_CHUNKS_KEY), "the chunk list") != _CHUNKS_KEY:
        raise SealedEnvelopeError("damaged sealed envelope: no chunk list after the header")
    return header, encoded


class _ChunkSource:
    """Presents the envelope's bstr chunks as one byte stream to decrypt_stream.

    Each chunk's length is checked before it is read: every chunk but the
    last is exactly chunk_size + 16 bytes, the last at most that.
    """

    def __init__(self, source: Readable, chunk_size: int) -> None:
        self._source = source
        self._full = chunk_size + TAG_SIZE
        self._buffer = b""
        self._ended = False
        self._last_short = False

    def read(self, size: int = -1, /) -> bytes:
        while not self._buffer and not self._ended:
            self._next_chunk()
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _next_chunk(self) -> None:
        length = _read_bstr_length(self._source, "a chunk")
        if length is None:
            self._ended = True
            if self._source.read(1):
                raise SealedEnvelopeError("damaged sealed envelope: data after its end")
            return
        if length > self._full or self._last_short:
            raise SealedEnvelopeError(
                f"damaged sealed envelope: a chunk of {length} bytes where at most "
                f"{self._full} may follow"
            )
        if length < self._full:
            self._last_short = True
        self._buffer = _read_exactly(self._source, length, "a chunk")


def open_stream(key: TransportKey, source: Readable, sink: Writable) -> int:
    """Open an envelope sealed to ``key`` into ``sink``; returns bytes written.

    Each chunk is written only once it authenticated; if this raises, discard
    what reached ``sink`` (the CLI writes to a temporary file it then removes).
    """
    header, encoded = read_header(source)
    if header.recipient_fingerprint != key.fingerprint:
        raise SealedEnvelopeError(
            f"sealed to {header.recipient} "
            f"(certificate {header.recipient_fingerprint.hex()[:16]}...), "
            f"not to this key ({key.identity}, {key.fingerprint.hex()[:16]}...)"
        )
    kem = TransportKem(header.suite)
    if len(header.sealed_key) != enc_length(kem) + CONTENT_KEY_SIZE + TAG_SIZE:
        raise SealedEnvelopeError("damaged sealed envelope: the sealed key has the wrong size")
    try:
        content_key = bytearray(key.open(header.sealed_key, _key_info(header)))
    except HpkeError:
        raise SealedEnvelopeError(
            "the envelope's key does not open with this transport key (altered header?)"
        ) from None
    try:
        return decrypt_stream(
            memoryview(content_key),
            header.nonce_prefix,
            encoded,
            _ChunkSource(source, header.chunk_size),
            sink,
            chunk_size=header.chunk_size,
        )
    except StreamIntegrityError as exc:
        raise SealedEnvelopeError(f"sealed envelope body damaged: {exc}") from None
    finally:
        content_key[:] = bytes(len(content_key))
