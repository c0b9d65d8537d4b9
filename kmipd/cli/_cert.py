"""``kmipd cert ...``: certificates from the daemon's online CA, as a client asks for them.

``issue`` makes a key here (it never leaves this machine), sends a CSR and
writes ``key.pem`` and ``cert.pem`` (with the online CA's certificate) into
a directory, atomically, mode 0600. ``renew`` renews the certificate in such
a directory once it is past ``--renew-at`` of its lifetime (or at once with
``--force``), connecting with that same certificate: run it from a timer.
``revoke``, ``issued`` and ``ca`` are the administrator's and the verifier's
side: revoke by serial, list what was issued, fetch the chain and the CRL.
The managed certificates' actions (``create``, ``get``, ``list``, ...) come
from ``kmipd.cli._managed``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd import client as km
from kmipd.cli import _managed as managed
from kmipd.cli._client import client_call, client_options, connect
from kmipd.cli._common import CliError, Commands
from kmipd.cli._managed import with_expiry
from kmipd.client._certs import (
    CERT_FILE,
    DEFAULT_RENEW_AT,
    KEY_FILE,
    identity_of,
    write_key_and_certificate,
)
from pki import write_private_file


def register(commands: Commands) -> None:
    common = client_options()
    cert = commands.add_parser(
        "cert", help="certificates from the daemon's online CA (issue, renew, revoke)"
    )
    actions = cert.add_subparsers(metavar="ACTION")

    issue = actions.add_parser(
        "issue", parents=[common], help="a new key here, a certificate from the online CA"
    )
    issue.add_argument("--out", type=Path, required=True, help="directory for key.pem, cert.pem")
    issue.add_argument("--profile", choices=["client", "server"], default="client")
    issue.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="server: a DNS name (repeat)"
    )
    issue.add_argument("--key-type", choices=["p256", "p384", "rsa3072", "ed25519"], default="p256")
    issue.add_argument("--days", type=float, help="validity (default: the grant's maximum)")
    issue.add_argument("--force", action="store_true", help="replace key.pem and cert.pem in OUT")
    issue.set_defaults(handler=_issue)

    renew = actions.add_parser(
        "renew",
        parents=[common],
        help="renew the certificate in DIR when it is due (connects with it)",
    )
    renew.add_argument("--dir", type=Path, required=True, help="holds key.pem and cert.pem")
    renew.add_argument(
        "--renew-at",
        type=float,
        default=DEFAULT_RENEW_AT,
        help="fraction of the lifetime after which it is due (default 2/3)",
    )
    renew.add_argument("--force", action="store_true", help="renew now, whatever its age")
    renew.set_defaults(handler=_renew)

    revoke = actions.add_parser(
        "revoke", parents=[common], help="put an issued certificate on the online CA's CRL"
    )
    revoke.add_argument("serial", metavar="SERIAL", help="hex, as `kmipd cert issued` shows it")
    revoke.add_argument("--reason", default=None, help="e.g. key-compromise, superseded")
    revoke.set_defaults(
        handler=client_call(lambda c, a: c.revoke_certificate(a.serial, reason=a.reason))
    )

    issued = actions.add_parser(
        "issued", parents=[common], help="the online CA's issued certificates"
    )
    issued.add_argument("--subject", help="only those for this SPIFFE ID or DNS name")
    issued.add_argument("--after", help="page: serials after this one")
    issued.set_defaults(handler=client_call(_issued))

    ca = actions.add_parser(
        "ca", parents=[common], help="write the online CA's chain and its current CRL (PEM)"
    )
    ca.add_argument("--out", type=Path, required=True)
    ca.set_defaults(handler=_ca)

    managed.register(actions)


def _issued(client: km.Client, args: argparse.Namespace) -> dict[str, Any]:
    """As ``cert list`` shows managed ones: notAfter with its days to expiry beside it."""
    page = client.list_certificates(subject=args.subject, after=args.after)
    return {"certificates": [with_expiry(c) for c in page.certificates], "next": page.next}


def _issue(args: argparse.Namespace) -> int:
    paths = (args.out / KEY_FILE, args.out / CERT_FILE)
    if not args.force and any(p.exists() for p in paths):
        raise CliError(f"{args.out} already holds a key or certificate; --force replaces them")
    if args.profile == "server" and not args.dns:
        raise CliError("a server certificate needs at least one --dns NAME")
    key = km.generate_key(args.key_type)
    validity = None if args.days is None else int(args.days * 86400)
    with connect(args) as client:
        identity = client.connect().identity if args.profile == "client" else None
        csr = km.make_csr(key, identity=identity, dns_names=args.dns)
        issued = client.issue_certificate(csr, profile=args.profile, validity=validity)
    write_key_and_certificate(args.out, key, issued)
    _print(issued.certificate, paths, done="issued")
    return 0


def _renew(args: argparse.Namespace) -> int:
    cert, key = args.dir / CERT_FILE, args.dir / KEY_FILE
    args.cert = args.cert or cert
    args.key = args.key or key
    missing = [f for f in ("server", "ca") if not getattr(args, f)]
    if missing:
        raise CliError("missing " + ", ".join(f"--{f}" for f in missing))
    with km.Client(
        [address.strip() for address in args.server.split(",")],
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        timeout=args.timeout,
        renewal_dir=args.dir,
        renew_at=args.renew_at,
    ) as client:
        current = client.certificate
        if current is None:
            raise CliError(f"no certificate to renew in {args.dir} (or --cert)")
        if not (args.force or client.renewal_due):
            print(json.dumps({"renewed": False, **_summary(current)}, indent=2))
            return 0
        renewed = client.renew_now()
    _print(renewed, (key, cert), done="renewed")
    return 0


def _ca(args: argparse.Namespace) -> int:
    with connect(args) as client:
        found = client.get_ca_certificates()
    chain = b"".join(
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        for der in found.chain
    )
    crl = x509.load_der_x509_crl(found.crl).public_bytes(serialization.Encoding.PEM)
    args.out.mkdir(parents=True, exist_ok=True)
    write_private_file(args.out / "online-ca-chain.pem", chain, mode=0o644)
    write_private_file(args.out / "online-ca-crl.pem", crl, mode=0o644)
    print(f"wrote {args.out / 'online-ca-chain.pem'} and {args.out / 'online-ca-crl.pem'}")
    return 0


def _summary(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "serial": format(cert.serial_number, "x"),
        "subject": identity_of(cert) or cert.subject.rfc4514_string(),
        "not_after": int(cert.not_valid_after_utc.timestamp()),
    }


def _print(cert: x509.Certificate, paths: tuple[Path, Path], *, done: str) -> None:
    files = {"key": str(paths[0]), "cert": str(paths[1])}
    print(json.dumps({done: True, **_summary(cert), **files}, indent=2))
