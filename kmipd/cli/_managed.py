"""``kmipd cert create|get|list|versions|renew-managed|revoke-managed|delete|recover|purge|import``.

Managed certificates (Key Vault style), beside the CSR-based ``issue``/``renew``
of ``kmipd.cli._cert``: the daemon makes the key and keeps it. ``create``
reads a policy file (TOML or JSON, kmipd.client._managed documents it);
``get`` writes the chain (certificate first) to stdout or ``-o``, and with
``--with-key FILE`` the private key to FILE (atomically, mode 0600), when the
policy made it exportable and you hold the get-managed-certificate-key grant.
``renew-managed`` renews now (``renew`` is the CSR renewal of a directory);
``list`` shows each certificate's newest version with its days to expiry.
Everything else prints metadata as JSON, never key material.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd import client as km
from kmipd.cli._client import client_call, client_options, connect, named_parser, namespace_of
from kmipd.cli._common import CliError, Commands
from kmipd.cli._files import open_output
from pki import write_private_file

DAY = 86400


def register(actions: Commands) -> None:
    """Adds the managed-certificate actions to ``kmipd cert``'s subcommands."""
    common = client_options()
    named = named_parser("certificate")

    def add(action: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return actions.add_parser(action, parents=[common, *parents], help=help_text)

    create = add("create", "managed: the daemon makes key and certificate from a policy", named)
    create.add_argument(
        "--policy", type=Path, required=True, help="policy file, TOML (.toml) or JSON"
    )
    create.set_defaults(handler=client_call(_create))

    get = add("get", "managed: the chain PEM (and with --with-key the private key)", named)
    get.add_argument("--version", type=int, help="this version instead of the newest")
    get.add_argument("-o", "--output", type=Path, help="write the chain to FILE, not stdout")
    get.add_argument(
        "--with-key",
        type=Path,
        metavar="FILE",
        help="also the private key, to FILE (mode 0600): exportable ones, with the grant",
    )
    get.set_defaults(handler=_get)

    listing = add("list", "managed certificates, their newest version and days to expiry")
    listing.add_argument(
        "--namespace", help="a namespace or glob (default: every one you may list)"
    )
    listing.add_argument("--deleted", action="store_true", help="the deleted ones instead")
    listing.set_defaults(handler=_list)

    versions = add("versions", "managed: every version's metadata, oldest first", named)
    versions.set_defaults(
        handler=client_call(
            lambda c, a: [
                with_expiry(v) for v in c.managed_certificate_versions(namespace_of(a), a.name)
            ]
        )
    )

    renew = add("renew-managed", "managed: a new version now, with a new key", named)
    renew.set_defaults(
        handler=client_call(
            lambda c, a: with_expiry(c.renew_managed_certificate(namespace_of(a), a.name))
        )
    )

    revoke = add("revoke-managed", "managed: revoke a version (the online CA's: its CRL)", named)
    revoke.add_argument("--version", type=int, help="this version instead of the newest")
    revoke.add_argument("--reason", help="e.g. key-compromise, superseded")
    revoke.set_defaults(
        handler=client_call(
            lambda c, a: c.revoke_managed_certificate(
                namespace_of(a), a.name, a.version, reason=a.reason
            )
        )
    )

    for action, help_text, method in (
        ("delete", "managed: soft delete (recover it until its purge date)", "delete"),
        ("recover", "managed: undo a delete", "recover"),
        ("purge", "managed: erase a deleted certificate's versions and keys now", "purge"),
    ):
        add(action, help_text, named).set_defaults(
            handler=client_call(functools.partial(_by_name, method=method))
        )

    imported = add("import", "managed: bring an existing certificate and its key", named)
    # Not --cert/--key: those are the connection's own (who is asking).
    imported.add_argument(
        "--certificate", dest="import_cert", type=Path, required=True,
        help="the certificate PEM (certificates after the first are its chain)",
    )  # fmt: skip
    imported.add_argument(
        "--private-key", dest="import_key", type=Path, required=True, help="its private key, PEM"
    )
    imported.add_argument("--chain", type=Path, help="its issuers, PEM, nearest first")
    imported.add_argument(
        "--exportable", action="store_true", help="the key may be read back (with the grant)"
    )
    imported.set_defaults(handler=client_call(_import))


def _create(client: km.Client, args: argparse.Namespace) -> dict[str, Any]:
    namespace = namespace_of(args)
    try:
        policy = km.load_certificate_policy(args.policy)
    except km.PolicyFileError as exc:
        raise CliError(f"{exc}; nothing was created") from None
    return with_expiry(client.create_managed_certificate(namespace, args.name, policy))


def _get(args: argparse.Namespace) -> int:
    namespace = namespace_of(args)
    with connect(args) as client:
        bundle = client.get_managed_certificate(
            namespace, args.name, args.version, with_key=args.with_key is not None
        )
    if args.with_key is not None:
        write_private_file(args.with_key, bundle.key_pem())
    with open_output(args) as sink:
        sink.write(bundle.chain_pem())
    info = bundle.info
    wrote = f"the chain to {args.output}" if args.output is not None else "the chain"
    if args.with_key is not None:
        wrote += f" and the private key to {args.with_key} (mode 0600)"
    print(
        f"{wrote}: managed certificate {info.name!r} version {info.version}, "
        f"serial {info.serial}, {days_to_expiry(info.not_after)} days to expiry",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        found = client.list_managed_certificates(args.namespace, deleted=args.deleted)
    rows = []
    for summary in found:
        row: dict[str, Any] = {"namespace": summary.namespace, "name": summary.name}
        current = summary.current
        if current is not None:
            row |= {
                "version": current.version,
                "serial": current.serial,
                "issuer": current.issuer,
                "subject": current.subject,
                "key_type": current.key_type,
                "not_after": current.not_after,
                "days_to_expiry": days_to_expiry(current.not_after),
                "revoked": current.revoked,
            }
        row |= {
            "versions": summary.versions,
            "renew_after": summary.renew_after,
            "deleted": summary.deleted,
            "purge_at": summary.purge_at,
        }
        rows.append(row)
    print(json.dumps({"certificates": rows}, indent=2))
    return 0


def _by_name(client: km.Client, args: argparse.Namespace, *, method: str) -> Any:
    call = getattr(client, f"{method}_managed_certificate")
    return call(namespace_of(args), args.name)


def _import(client: km.Client, args: argparse.Namespace) -> dict[str, Any]:
    namespace = namespace_of(args)
    certs = _read_certificates(args.import_cert, "--certificate")
    chain = certs[1:] + (_read_certificates(args.chain, "--chain") if args.chain else [])
    try:
        key = serialization.load_pem_private_key(args.import_key.read_bytes(), password=None)
    except OSError as exc:
        raise CliError(f"cannot read --private-key {args.import_key}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CliError(
            f"--private-key {args.import_key}: not an unencrypted PEM private key "
            f"({type(exc).__name__}); nothing was imported"
        ) from None
    info = client.import_managed_certificate(
        namespace, args.name, certs[0], key, chain=chain, exportable=args.exportable
    )
    return with_expiry(info)


def _read_certificates(path: Path, flag: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {flag} {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CliError(f"{flag} {path}: no PEM certificate in it; nothing was imported") from None
    return certs


def days_to_expiry(not_after: int, now: float | None = None) -> int:
    """Whole days left (rounded down; negative once expired)."""
    left = not_after - (time.time() if now is None else now)
    return math.floor(left / DAY)


def with_expiry(info: Any) -> dict[str, Any]:
    """A certificate's metadata as JSON, with its days to expiry beside notAfter."""
    fields: dict[str, Any] = attrs.asdict(info)
    fields["days_to_expiry"] = days_to_expiry(fields["not_after"])
    return fields
