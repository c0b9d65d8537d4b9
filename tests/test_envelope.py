"""Envelope encryption: round trips, every kind of tampering, the CLI pair."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
import trio

from kmipd.client import Client, DekCache, EnvelopeError, IntegrityFailureError
from kmipd.client._envelope import MAGIC, read_header
from kmipd.crypto._chunked_aead import TAG_SIZE
from tests.conftest import RunningServer
from tests.processes import Daemon, run_kmipd

CHUNK = 1024


def split(envelope: bytes) -> tuple[bytes, list[bytes]]:
    """(header bytes, body chunks) of an envelope made with chunk size CHUNK."""
    header, prologue = read_header(io.BytesIO(envelope))
    body = envelope[len(prologue) :]
    step = header.chunk_size + TAG_SIZE
    return prologue, [body[i : i + step] for i in range(0, len(body), step)]


async def in_thread(kmipd: RunningServer, work: object, **client_args: object) -> object:
    def run() -> object:
        with kmipd.client(**client_args) as kms:
            return work(kms)  # type: ignore[operator]

    return await trio.to_thread.run_sync(run)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 10 * CHUNK + 17])
async def test_round_trip_at_every_chunk_boundary(kmipd: RunningServer, size: int) -> None:
    data = os.urandom(size)

    def work(kms: Client) -> bytes:
        envelope = kms.encrypt(data, "archive", {"object": "o1"}, chunk_size=CHUNK)
        assert envelope.startswith(MAGIC)
        assert size < 16 or data not in envelope  # short strings may occur by chance
        return kms.decrypt(envelope)

    assert await in_thread(kmipd, work) == data


async def test_async_client_round_trip(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        envelope = await kms.encrypt(b"hello storage" * 1000, "archive", chunk_size=CHUNK)
        assert await kms.decrypt(envelope) == b"hello storage" * 1000


async def test_streams_round_trip(kmipd: RunningServer, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(3 * 1024 * 1024 + 5))

    def work(kms: Client) -> None:
        with plain.open("rb") as source, (tmp_path / "env").open("wb") as sink:
            assert kms.encrypt_stream(source, sink, "archive") == plain.stat().st_size
        with (tmp_path / "env").open("rb") as source, (tmp_path / "back").open("wb") as sink:
            kms.decrypt_stream(source, sink)

    await in_thread(kmipd, work)
    assert (tmp_path / "back").read_bytes() == plain.read_bytes()


def tamperings(envelope: bytes, other: bytes) -> dict[str, bytes]:
    prologue, chunks = split(envelope)
    other_prologue, other_chunks = split(other)
    flipped = bytearray(envelope)
    flipped[-5] ^= 0x01
    return {
        "truncated mid-chunk": envelope[:-7],
        "last chunk dropped": prologue + b"".join(chunks[:-1]),
        "cut to the header": prologue,
        "chunks reordered": prologue + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "chunk duplicated": prologue + chunks[0] + chunks[0] + b"".join(chunks[1:]),
        "bit flipped in body": bytes(flipped),
        "chunk spliced from another envelope": prologue + other_chunks[0] + b"".join(chunks[1:]),
        "header swapped onto another body": other_prologue + b"".join(chunks),
    }


async def test_tampered_envelopes_are_refused(kmipd: RunningServer) -> None:
    def work(kms: Client) -> dict[str, str]:
        data = os.urandom(4 * CHUNK)
        envelope = kms.encrypt(data, "archive", chunk_size=CHUNK)
        other = kms.encrypt(os.urandom(4 * CHUNK), "archive", chunk_size=CHUNK)
        refused = {}
        for name, damaged in tamperings(envelope, other).items():
            with pytest.raises(EnvelopeError) as caught:
                kms.decrypt(damaged)
            refused[name] = str(caught.value)
        assert kms.decrypt(envelope) == data  # the original is intact: nothing lost
        return refused

    refused = await in_thread(kmipd, work)
    assert isinstance(refused, dict)
    for name, message in refused.items():
        assert "does not authenticate" in message, name


async def test_altered_header_fields_are_refused(kmipd: RunningServer) -> None:
    def work(kms: Client) -> None:
        envelope = kms.encrypt(b"x" * 100, "archive", {"tenant": "a"}, chunk_size=CHUNK)
        # Change the context in the header: the daemon refuses to unwrap.
        forged = envelope.replace(b"\x66tenant\x61a", b"\x66tenant\x61b")
        assert forged != envelope
        with pytest.raises(IntegrityFailureError, match="wrong context"):
            kms.decrypt(forged)

    await in_thread(kmipd, work)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "bad magic"),
        (b"PK\x03\x04" + b"\x00" * 20, "bad magic"),
        (b"KMPE\x02" + struct.pack(">I", 4), "format version 2"),
        (MAGIC + struct.pack(">I", 10**6), "larger than"),
        (MAGIC + struct.pack(">I", 50) + b"\xa0", "truncated inside its header"),
        (
            MAGIC + struct.pack(">I", 1) + b"\xa0",
            "damaged envelope header: envelope header: missing",
        ),
        (MAGIC + struct.pack(">I", 2) + b"\xff\xff", "damaged envelope header: invalid CBOR"),
    ],
)
async def test_not_an_envelope_gets_a_clear_error(
    kmipd: RunningServer, data: bytes, says: str
) -> None:
    def work(kms: Client) -> None:
        with pytest.raises(EnvelopeError, match=says):
            kms.decrypt(data)

    await in_thread(kmipd, work)


async def test_decrypting_again_unwraps_through_the_cache(kmipd: RunningServer) -> None:
    cache = DekCache(ttl=60)

    def work(kms: Client) -> None:
        envelope = kms.encrypt(b"cached", "archive")
        before = cache.stats.hits
        for _ in range(3):
            assert kms.decrypt(envelope) == b"cached"
        assert cache.stats.hits - before == 3  # generate-data-key already cached it

    await in_thread(kmipd, work, cache=cache)
    assert len(cache) == 0  # closing the client wiped the cache


@pytest.mark.slow
def test_cli_encrypt_decrypt_and_refuse_tampering(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    daemon = Daemon("--dev", "--data", data_dir, "--listen", "127.0.0.1:0", log=tmp_path / "d.log")
    try:
        pki = data_dir / "pki"
        common = [
            "--server",
            daemon.address,
            "--ca",
            pki / "ca.pem",
            "--cert",
            pki / "storage.pem",
            "--key",
            pki / "storage-key.pem",
        ]
        plain = tmp_path / "report.csv"
        plain.write_bytes(os.urandom(300_000))
        made = run_kmipd(
            "encrypt",
            plain,
            "-o",
            tmp_path / "report.kmpe",
            "--kek",
            "archive",
            "--context",
            "file=report.csv",
            "--progress",
            *common,
        )
        assert made.returncode == 0, made.stderr
        assert "encrypt: 0.3 MiB of 0.3 MiB (100%)" in made.stderr
        opened = run_kmipd(
            "decrypt", tmp_path / "report.kmpe", "-o", tmp_path / "back.csv", *common
        )
        assert opened.returncode == 0, opened.stderr
        assert (tmp_path / "back.csv").read_bytes() == plain.read_bytes()

        damaged = bytearray((tmp_path / "report.kmpe").read_bytes())
        damaged[-100] ^= 1
        (tmp_path / "damaged.kmpe").write_bytes(bytes(damaged))
        refused = run_kmipd(
            "decrypt", tmp_path / "damaged.kmpe", "-o", tmp_path / "out.csv", *common
        )
        assert refused.returncode == 1
        assert "envelope body damaged" in refused.stderr
        assert not (tmp_path / "out.csv").exists()  # no partial plaintext left behind
        assert not list(tmp_path.glob(".out.csv*"))
        missing = run_kmipd("decrypt", tmp_path / "nope.kmpe", *common)
        assert missing.returncode == 1
        assert "cannot read" in missing.stderr
    finally:
        assert daemon.stop() == 0
