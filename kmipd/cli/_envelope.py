"""``kmipd encrypt|decrypt|seal|open``: files, envelope-encrypted or sealed to another client."""

from __future__ import annotations

import argparse
from pathlib import Path

from kmipd.cli._client import (
    add_transport_flags,
    client_options,
    connect,
    parse_context,
    recipient,
    transport_key,
)
from kmipd.cli._common import CliError, Commands
from kmipd.cli._files import open_input, open_output
from kmipd.crypto import DEFAULT_CHUNK_SIZE as SEALED_CHUNK_SIZE
from kmipd.crypto import SealedEnvelopeError
from kmipd.crypto import open_stream as open_sealed_stream
from kmipd.crypto._chunked_aead import DEFAULT_CHUNK_SIZE


def register(commands: Commands) -> None:
    common = client_options()
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    progress.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress on stderr (default: when stderr is a terminal)",
    )
    encrypt = commands.add_parser(
        "encrypt", parents=[common, progress], help="envelope-encrypt a file under a fresh data key"
    )
    encrypt.add_argument("input", nargs="?", default="-", help="file to encrypt (default: stdin)")
    encrypt.add_argument("--kek", required=True, help="namespace whose KEK wraps the data key")
    encrypt.add_argument("--context", action="append", default=[], metavar="KEY=VALUE")
    encrypt.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    encrypt.set_defaults(handler=_encrypt)
    decrypt = commands.add_parser(
        "decrypt", parents=[common, progress], help="open an envelope made by kmipd encrypt"
    )
    decrypt.add_argument("input", nargs="?", default="-", help="envelope (default: stdin)")
    decrypt.set_defaults(handler=_decrypt)

    seal = commands.add_parser(
        "seal",
        parents=[common, progress],
        help="seal a file for another client (its certified transport key; HPKE)",
    )
    seal.add_argument("input", nargs="?", default="-", help="file to seal (default: stdin)")
    seal.add_argument(
        "--to", required=True, metavar="NAME", help="recipient: a client name or SPIFFE ID"
    )
    seal.add_argument("--chunk-size", type=int, default=SEALED_CHUNK_SIZE)
    seal.set_defaults(handler=_seal)
    opening = commands.add_parser(
        "open",
        parents=[progress],
        help="open a file sealed to this client's transport key (no daemon needed)",
    )
    opening.add_argument("input", nargs="?", default="-", help="sealed file (default: stdin)")
    add_transport_flags(opening)
    opening.set_defaults(handler=_open)


def _seal(args: argparse.Namespace) -> int:
    with connect(args) as client:
        to = recipient(client, args.to)
        with open_input(args) as source, open_output(args) as sink:
            client.seal_stream(source, sink, to, chunk_size=args.chunk_size)
    return 0


def _open(args: argparse.Namespace) -> int:
    key = transport_key(args, required=True)
    assert key is not None
    with open_input(args) as source, open_output(args) as sink:
        try:
            open_sealed_stream(key, source, sink)
        except SealedEnvelopeError as exc:
            lost = (
                f"{args.output} was not written"
                if args.output is not None
                else "discard what reached stdout"
            )
            raise CliError(f"{exc}; {lost}") from None
    return 0


def _encrypt(args: argparse.Namespace) -> int:
    context = parse_context(args.context)
    with connect(args) as client, open_input(args) as source, open_output(args) as sink:
        client.encrypt_stream(source, sink, args.kek, context, chunk_size=args.chunk_size)
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    with connect(args) as client, open_input(args) as source, open_output(args) as sink:
        client.decrypt_stream(source, sink)
    return 0
