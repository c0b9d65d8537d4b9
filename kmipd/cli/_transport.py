"""``kmipd transport register|get``: key-transport certificates in the daemon's directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd import client as km
from kmipd.cli._client import client_options, connect, recipient
from kmipd.cli._common import CliError, Commands
from kmipd.cli._files import open_output
from kmipd.crypto import certificate_fingerprint, transport_kem


def register(commands: Commands) -> None:
    common = client_options()
    transport = commands.add_parser(
        "transport", help="key-transport certificates (the daemon's directory)"
    ).add_subparsers(metavar="ACTION")
    enrol = transport.add_parser(
        "register", parents=[common], help="register this client's transport certificate"
    )
    enrol.add_argument(
        "certificate",
        nargs="?",
        type=Path,
        help="certificate (PEM); default: --transport-cert",
    )
    enrol.set_defaults(handler=_transport_register)
    fetch = transport.add_parser(
        "get",
        parents=[common],
        help="fetch and verify a client's transport certificate",
    )
    fetch.add_argument("identity", metavar="NAME", help="a client name or SPIFFE ID")
    fetch.add_argument("-o", "--output", type=Path, help="write the certificate (PEM) here")
    fetch.set_defaults(handler=_transport_get)


def _transport_register(args: argparse.Namespace) -> int:
    path = args.certificate or args.transport_cert
    if path is None:
        raise CliError("give the certificate file or --transport-cert")
    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"{path} is not a PEM certificate") from None
    with connect(args) as client:
        info = client.register_transport_certificate(certificate)
    print(json.dumps(_certificate_json(info), indent=2))
    return 0


def _transport_get(args: argparse.Namespace) -> int:
    with connect(args) as client:
        identity = recipient(client, args.identity)
        certificate = client.get_transport_certificate(identity)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    if args.output is not None:
        with open_output(args) as sink:
            sink.write(pem)
    print(
        json.dumps(
            {
                "identity": identity,
                "suite": transport_kem(certificate).value,
                "fingerprint": certificate_fingerprint(certificate).hex(),
                "not_after": certificate.not_valid_after_utc.isoformat(),
                "verified": "against this client's CA",
            },
            indent=2,
        )
    )
    return 0


def _certificate_json(info: km.TransportCertInfo) -> dict[str, Any]:
    return {
        "identity": info.identity,
        "suite": info.suite,
        "fingerprint": info.fingerprint.hex(),
        "registered": info.registered,
        "not_after": info.not_after,
    }
