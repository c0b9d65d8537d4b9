"""``kmipd sign-key create|get|public-key|sign|verify|list|rotate|revoke|destroy|recover``.

Managed signing keys: the private half signs inside the daemon's HSM and
never leaves it. ``sign`` and ``verify`` hash the data here (``--file`` or
stdin; or take ``--digest HEX`` computed elsewhere) and send only the digest.
``public-key`` prints PEM (``-o FILE`` for a file), for ``openssl dgst
-verify``; ``sign -o FILE`` writes the raw signature, which openssl reads
as ``-signature FILE``. ``verify`` exits 1 when the signature does not verify.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from kmipd import client as km
from kmipd.cli._client import (
    client_call,
    client_options,
    connect,
    named_parser,
    namespace_of,
    to_json,
)
from kmipd.cli._common import CliError, Commands, parse_timestamp
from kmipd.cli._files import open_output
from kmipd.hsm._signing import SIGNATURE_ALGORITHMS, SIGNING_KEY_TYPES
from kmipd.lifecycle import RevocationReason

#: Data to hash is read in pieces: a file of any size is hashed without holding it.
_CHUNK = 1 << 20


def register(commands: Commands) -> None:
    common = client_options()
    group = commands.add_parser(
        "sign-key",
        help="signing keys held in the HSM: public key, sign and verify digests",
        description="A signing key lives in a namespace: give --namespace (or "
        "KMIPD_NAMESPACE). Its private half never leaves the daemon's HSM.",
    )
    actions = group.add_subparsers(metavar="ACTION")
    named = named_parser("key")
    versioned = argparse.ArgumentParser(add_help=False)
    versioned.add_argument("--version", type=int, help="this version (default: the current)")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--algorithm",
        default="ES256",
        choices=sorted(SIGNATURE_ALGORITHMS),
        help="ES256 (P-256), ES384 (P-384), PS256/PS384/RS256/RS384 (RSA); default ES256",
    )
    source = data.add_mutually_exclusive_group()
    source.add_argument("--file", type=Path, help="hash the data in FILE (default: stdin)")
    source.add_argument("--digest", metavar="HEX", help="sign/verify this digest (hex) as is")

    def add(action: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(action, parents=[common, *parents], help=help_text)

    create = add("create", "a new key pair in the HSM", named)
    create.add_argument("--type", dest="key_type", default="p256", choices=SIGNING_KEY_TYPES)
    create.add_argument(
        "--activation", type=parse_timestamp, metavar="WHEN", help="signs from then on"
    )
    create.set_defaults(
        handler=client_call(
            lambda c, a: c.create_signing_key(
                namespace_of(a), a.name, a.key_type, activation=a.activation
            )
        )
    )

    get = add("get", "a version's metadata and public key (DER, base64)", named, versioned)
    get.set_defaults(
        handler=client_call(lambda c, a: c.get_signing_key(namespace_of(a), a.name, a.version))
    )

    public = add("public-key", "the public key as PEM (for openssl)", named, versioned)
    public.add_argument("-o", "--output", type=Path, help="write it to FILE")
    public.set_defaults(handler=_public_key)

    sign = add("sign", "sign the data's digest with the current version", named, data)
    sign.add_argument("-o", "--output", type=Path, help="write the raw signature to FILE")
    sign.set_defaults(handler=_sign)

    verify = add("verify", "check a signature (exit 1 if it does not verify)", named, data)
    verify.add_argument("--signature", type=Path, required=True, help="the raw signature file")
    verify.add_argument("--version", type=int, help="only this version (default: any)")
    verify.set_defaults(handler=_verify)

    listing = add("list", "signing keys you may list (their current version)")
    listing.add_argument(
        "--namespace",
        default=os.environ.get("KMIPD_NAMESPACE"),
        help="a namespace or glob (default: KMIPD_NAMESPACE, else every one you may list)",
    )
    listing.set_defaults(handler=client_call(lambda c, a: c.list_signing_keys(a.namespace)))

    rotate = add("rotate", "a new version that signs from now on", named)
    rotate.set_defaults(
        handler=client_call(lambda c, a: c.rotate_signing_key(namespace_of(a), a.name))
    )

    revoke = add("revoke", "deactivate (or mark compromised) a version", named, versioned)
    revoke.add_argument("--reason", required=True, choices=[r.value for r in RevocationReason])
    revoke.add_argument("--message", help="why, for the record")
    revoke.set_defaults(
        handler=client_call(
            lambda c, a: c.revoke_signing_key(
                namespace_of(a), a.name, a.reason, version=a.version, message=a.message
            )
        )
    )

    destroy = add("destroy", "erase a revoked version after the soft-delete window", named)
    destroy.add_argument("--version", type=int, help="this version (default: the current)")
    destroy.add_argument("--purge-now", action="store_true", help="erase it now")
    destroy.set_defaults(
        handler=client_call(
            lambda c, a: c.destroy_signing_key(
                namespace_of(a), a.name, version=a.version, purge_now=a.purge_now
            )
        )
    )

    recover = add("recover", "cancel a pending destroy", named, versioned)
    recover.set_defaults(
        handler=client_call(
            lambda c, a: c.recover_signing_key(namespace_of(a), a.name, version=a.version)
        )
    )


def _digest(args: argparse.Namespace) -> bytes:
    """--digest as given (the daemon checks its length), else the hash of --file or stdin."""
    if args.digest is not None:
        try:
            return bytes.fromhex(args.digest)
        except ValueError:
            raise CliError("--digest must be hexadecimal; nothing was signed") from None
    hasher = hashlib.new(f"sha{args.algorithm[2:]}")
    try:
        stream = sys.stdin.buffer if args.file is None else args.file.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read --file {args.file}: {exc.strerror}") from None
    with stream:
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
    return hasher.digest()


def _public_key(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.get_signing_key(namespace_of(args), args.name, args.version)
    pem = serialization.load_der_public_key(info.public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with open_output(args) as sink:
        sink.write(pem)
    return 0


def _sign(args: argparse.Namespace) -> int:
    namespace, digest = namespace_of(args), _digest(args)
    with connect(args) as client:
        result = client.sign_digest(namespace, args.name, digest, args.algorithm)
    if args.output is None:
        print(json.dumps(to_json(result, reveal=False), indent=2))
        return 0
    with open_output(args) as sink:
        sink.write(result.signature)
    print(
        f"signed with {result.name!r} version {result.version} ({result.algorithm}); "
        f"signature in {args.output}",
        file=sys.stderr,
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    namespace, digest = namespace_of(args), _digest(args)
    try:
        signature = args.signature.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read --signature {args.signature}: {exc.strerror}") from None
    with connect(args) as client:
        result: km.VerifyResult = client.verify_digest(
            namespace, args.name, digest, signature, args.algorithm, version=args.version
        )
    print(json.dumps(to_json(result, reveal=False), indent=2))
    if not result.valid:
        print("the signature does not verify with any version of the key", file=sys.stderr)
        return 1
    return 0
