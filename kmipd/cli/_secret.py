"""``kmipd secret set|get|list|versions|update|delete|recover|purge``: named, versioned values.

A value never comes from the command line, where ``ps`` and shell history
would show it: ``set`` reads it from stdin or ``--file`` and refuses one
given as an argument, without echoing it. ``get`` writes the value alone to
stdout, or with ``-o`` to a file that appears complete with mode 0600 (what
it wrote goes to stderr then). Every other command prints metadata as JSON,
never a value.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kmipd import client as km
from kmipd.cli._client import (
    client_call,
    client_options,
    connect,
    named_options,
    namespace_of,
    parse_context,
)
from kmipd.cli._common import CliError, Commands, parse_timestamp
from kmipd.cli._files import open_output
from kmipd.protocol import SECRET_MAX_VALUE_SIZE

#: Read one byte past the wire's own limit on a value, so a larger one is refused
#: here without reading it all; the daemon's secrets.max_size refuses smaller ones.
_READ_LIMIT = SECRET_MAX_VALUE_SIZE


def register(commands: Commands) -> None:
    common = client_options()
    secret = commands.add_parser(
        "secret",
        help="named, versioned secret values (passwords, credentials, tokens)",
        description="A secret lives in a namespace, wrapped under its KEK: give --namespace "
        "(or KMIPD_NAMESPACE). Values are read from stdin or --file, never from arguments.",
    )
    actions = secret.add_subparsers(metavar="ACTION")
    named = named_options("the secret's namespace (or KMIPD_NAMESPACE)")
    attributes = argparse.ArgumentParser(add_help=False)
    _add_attribute_flags(attributes, dates=parse_timestamp)

    def add(action: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(action, parents=[common, *parents], help=help_text)

    set_ = add("set", "add a version: the value from stdin or --file", named, attributes)
    set_.add_argument("--file", type=Path, help="read the value from FILE instead of stdin")
    set_.add_argument("--disabled", action="store_true", help="store the version disabled")
    # Taken only to be refused: a value in argv is neither used nor echoed.
    set_.add_argument("argv_value", nargs="*", help=argparse.SUPPRESS)
    set_.add_argument("--value", dest="argv_value_flag", help=argparse.SUPPRESS)
    set_.set_defaults(handler=client_call(_set))

    get = add("get", "the newest enabled version's value (or --version V)", named)
    get.add_argument("--version", type=int, help="this version instead of the newest enabled")
    get.add_argument("-o", "--output", type=Path, help="write it to FILE (atomically, mode 0600)")
    get.set_defaults(handler=_get)

    listing = add("list", "secrets and their newest version's metadata (never values)")
    listing.add_argument(
        "--namespace",
        default=os.environ.get("KMIPD_NAMESPACE"),
        help="a namespace or glob (default: KMIPD_NAMESPACE, else every one you may list)",
    )
    listing.add_argument("--deleted", action="store_true", help="the deleted ones instead")
    listing.set_defaults(
        handler=client_call(lambda c, a: c.list_secrets(a.namespace, deleted=a.deleted))
    )

    versions = add("versions", "every version's metadata, oldest first", named)
    versions.set_defaults(
        handler=client_call(lambda c, a: c.secret_versions(namespace_of(a), a.name))
    )

    update = add("update", "change a version's attributes (the newest unless --version)", named)
    update.add_argument("--version", type=int, help="this version instead of the newest")
    switch = update.add_mutually_exclusive_group()
    switch.add_argument("--enable", dest="enabled", action="store_true", default=None)
    switch.add_argument("--disable", dest="enabled", action="store_false")
    _add_attribute_flags(update, dates=_timestamp_or_none)
    update.set_defaults(handler=client_call(_update))

    for action, help_text, method in (
        ("delete", "soft delete (recover it until its purge date)", "delete_secret"),
        ("recover", "undo a delete", "recover_secret"),
        ("purge", "erase a deleted secret's every version now", "purge_secret"),
    ):
        add(action, help_text, named).set_defaults(
            handler=client_call(functools.partial(_by_name, method=method))
        )


def _add_attribute_flags(parser: argparse.ArgumentParser, *, dates: Callable[[str], int]) -> None:
    """--content-type, --tag, --not-before, --expires: for set, and for update (dates clearable)."""
    parser.add_argument("--content-type", help="e.g. text/plain (set: default the previous)")
    parser.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="a tag (repeatable; replaces all)"
    )
    clearable = dates is not parse_timestamp
    when = "ISO 8601 or epoch seconds" + (", or none to clear it" if clearable else "")
    parser.add_argument("--not-before", type=dates, metavar="WHEN", help=when)
    parser.add_argument("--expires", type=dates, metavar="WHEN", help=when)


def _by_name(client: km.Client, args: argparse.Namespace, *, method: str) -> Any:
    return getattr(client, method)(namespace_of(args), args.name)


def _set(client: km.Client, args: argparse.Namespace) -> km.SecretInfo:
    if args.argv_value or args.argv_value_flag is not None:
        raise CliError(
            "a secret value is never taken from the command line (ps and shell history "
            "show it): pipe it on stdin or give --file; nothing was stored"
        )
    namespace = namespace_of(args)
    return client.set_secret(
        namespace,
        args.name,
        _read_value(args.file),
        content_type=args.content_type,
        tags=_tags(args.tag),
        enabled=False if args.disabled else None,
        not_before=args.not_before,
        expires=args.expires,
    )


def _read_value(path: Path | None) -> bytes:
    if path is not None:
        where = f"--file {path}"
        try:
            with path.open("rb") as source:
                value = source.read(_READ_LIMIT + 1)
        except OSError as exc:
            raise CliError(f"cannot read {where}: {exc.strerror}; nothing was stored") from None
    else:
        where = "stdin"
        if sys.stdin.isatty():
            raise CliError("pipe the value on stdin, or give --file; nothing was stored")
        value = sys.stdin.buffer.read(_READ_LIMIT + 1)
    if len(value) > _READ_LIMIT:
        raise CliError(f"the value on {where} is over {_READ_LIMIT} bytes; nothing was stored")
    if not value:
        raise CliError(f"the value on {where} is empty; nothing was stored")
    return value


def _get(args: argparse.Namespace) -> int:
    namespace = namespace_of(args)
    with connect(args) as client, client.get_secret(namespace, args.name, args.version) as secret:
        with open_output(args) as sink:
            sink.write(secret.value)
        if args.output is not None:
            print(
                f"wrote secret {secret.name!r} version {secret.version} "
                f"({len(secret.value)} bytes) to {args.output} (mode 0600)",
                file=sys.stderr,
            )
    return 0


def _update(client: km.Client, args: argparse.Namespace) -> km.SecretInfo:
    return client.update_secret(
        namespace_of(args),
        args.name,
        version=args.version,
        enabled=args.enabled,
        content_type=args.content_type,
        tags=_tags(args.tag),
        not_before=args.not_before,
        expires=args.expires,
    )


def _tags(pairs: list[str] | None) -> dict[str, str] | None:
    """--tag KEY=VALUE (repeated); None when none is given (update then keeps the tags)."""
    return None if pairs is None else parse_context(pairs, "--tag")


def _timestamp_or_none(text: str) -> int:
    """As parse_timestamp; "none" is 0, which update-secret takes as "clear this date"."""
    return 0 if text.lower() == "none" else parse_timestamp(text)
