"""What every command that calls the daemon shares: connection options, the client, JSON output.

A group that talks to the daemon takes ``client_options()`` as a parent
parser and sets its handlers with ``client_call``: the connection comes from
--server/--ca/--cert/--key (or KMIPD_*), the result is printed as JSON, and
key bytes only with --reveal.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from kmipd import client as km
from kmipd.cli._common import CliError

#: The key-transport key pair's flags: (flag, environment variable, help).
TRANSPORT_FLAGS = (
    ("--transport-cert", "KMIPD_TRANSPORT_CERT", "key-transport certificate (PEM)"),
    ("--transport-key", "KMIPD_TRANSPORT_KEY", "key-transport private key (PEM)"),
)


def add_transport_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    for flag, env, what in TRANSPORT_FLAGS:
        parser.add_argument(flag, type=Path, default=os.environ.get(env), help=what)


def client_options() -> argparse.ArgumentParser:
    """--server/--ca/--cert/--key, each defaulting to a KMIPD_* environment variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "connection (or KMIPD_SERVER, KMIPD_CA, KMIPD_CERT, KMIPD_KEY)"
    )
    for flag, env, what in (
        ("--server", "KMIPD_SERVER", "HOST:PORT of the daemon (several: comma-separated)"),
        ("--ca", "KMIPD_CA", "CA certificate (PEM)"),
        ("--cert", "KMIPD_CERT", "client certificate (PEM)"),
        ("--key", "KMIPD_KEY", "client private key (PEM)"),
    ):
        group.add_argument(flag, default=os.environ.get(env), help=what)
    group.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    add_transport_flags(
        parent.add_argument_group(
            "sealed delivery (or KMIPD_TRANSPORT_CERT, KMIPD_TRANSPORT_KEY): keys come sealed "
            "to this key-transport key (HPKE) instead of in the clear inside TLS"
        )
    )
    return parent


def connect(args: argparse.Namespace) -> km.Client:
    missing = [f for f in ("server", "ca", "cert", "key") if not getattr(args, f)]
    if missing:
        raise CliError("missing " + ", ".join(f"--{f}" for f in missing))
    servers = [address.strip() for address in args.server.split(",")]
    return km.Client(
        servers,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        timeout=args.timeout,
        transport=transport_key(args, required=False),
    )


def transport_key(args: argparse.Namespace, *, required: bool) -> km.TransportKey | None:
    cert, key = args.transport_cert, args.transport_key
    if cert is None and key is None and not required:
        return None
    if cert is None or key is None:
        raise CliError("give both --transport-cert and --transport-key")
    try:
        return km.TransportKey.from_files(cert, key)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def recipient(client: km.Client, name: str) -> str:
    """A SPIFFE ID as given, or a client name in our own trust domain."""
    if name.startswith("spiffe://"):
        return name
    domain = client.connect().identity[len("spiffe://") :].split("/", 1)[0]
    return f"spiffe://{domain}/{name}"


def client_call(call: Callable[[km.Client, argparse.Namespace], Any]) -> Callable[..., int]:
    """A handler that makes one client call and prints its result as JSON."""

    def handler(args: argparse.Namespace) -> int:
        with connect(args) as client:
            result = call(client, args)
        print(json.dumps(to_json(result, reveal=getattr(args, "reveal", False)), indent=2))
        return 0

    return handler


def to_json(result: Any, *, reveal: bool) -> Any:
    if isinstance(result, list):
        return [to_json(item, reveal=reveal) for item in result]
    if isinstance(result, dict):
        return _jsonable(result, reveal=reveal)
    if isinstance(result, km.Dek):
        with result:
            fields = {
                "dek_id": result.dek_id,
                "namespace": result.namespace,
                "kek_version": result.kek_version,
                "key": bytes(result.key),
            }
        return _jsonable(fields, reveal=reveal)
    if isinstance(result, km.DataKey):
        with result:
            fields = {
                "key": bytes(result.key),
                "blob": result.blob,
                "kek": result.kek,
                "kek_version": result.kek_version,
            }
        return _jsonable(fields, reveal=reveal)
    return _jsonable(attrs.asdict(result), reveal=reveal)


def _jsonable(value: Any, *, reveal: bool) -> Any:
    """Bytes become base64, except a key: hex with --reveal, else only its length."""
    if isinstance(value, dict):
        out = {}
        for name, member in value.items():
            if name == "key" and isinstance(member, bytes):
                out[name] = member.hex() if reveal else f"<{len(member)} bytes; --reveal prints it>"
            else:
                out[name] = _jsonable(member, reveal=reveal)
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(member, reveal=reveal) for member in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def parse_context(pairs: list[str], flag: str = "--context") -> dict[str, str]:
    """--context KEY=VALUE (repeated) as the encryption context; ``flag`` names another."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} {pair!r}: expected KEY=VALUE")
        context[key] = value
    return context


def named_parser(what: str) -> argparse.ArgumentParser:
    """NAME and --namespace (default KMIPD_NAMESPACE): a secret's or a signing key's."""
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("name", metavar="NAME")
    named.add_argument(
        "--namespace",
        default=os.environ.get("KMIPD_NAMESPACE"),
        help=f"the {what}'s namespace (or KMIPD_NAMESPACE)",
    )
    return named


def namespace_of(args: argparse.Namespace) -> str:
    if not args.namespace:
        raise CliError("which namespace? give --namespace (or set KMIPD_NAMESPACE)")
    namespace: str = args.namespace
    return namespace
