"""``kmipd ca ...``: the daemon's online issuing CA (init, import).

``ca init`` makes the CA's signing key inside the configured HSM backend
(a software-keyring EC key, or a non-extractable key pair on the PKCS#11
token), has the offline root (a ``kmipd pki init --online-ca`` directory)
sign its certificate, signs an empty first CRL with the HSM key, and prints
the ``[online_ca]`` table to add to the config. ``ca import`` does the same
for an intermediate CA an operator already has (its key is imported into the
HSM backend, then only the HSM holds it for the daemon).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmipd.cli._common import CliError, Commands
from kmipd.daemon import open_hsm
from kmipd.daemon.config import Config, load_config
from kmipd.hsm import HsmBackend
from kmipd.service import OnlineCa, OnlineCaError, open_online_ca, sign_crl
from pki import CertificateAuthority, load_certificate, write_private_file

CERT_FILE = "online-ca.pem"
CRL_FILE = "online-ca-crl.pem"


def register(commands: Commands) -> None:
    ca = commands.add_parser("ca", help="the daemon's online issuing CA").add_subparsers(
        metavar="ACTION"
    )
    init = ca.add_parser(
        "init",
        help="make the online CA: its key in the HSM, its certificate from the offline root",
    )
    init.add_argument("--config", type=Path, required=True, help="the daemon's config file")
    init.add_argument(
        "--root", type=Path, required=True, help="the offline root (kmipd pki init --online-ca)"
    )
    init.add_argument("--curve", choices=["p256", "p384"], default="p256")
    init.add_argument("--days", type=int, default=1825, help="validity of the CA certificate")
    init.add_argument(
        "--out",
        type=Path,
        help="where to write online-ca.pem and its CRL (default: beside the config)",
    )
    init.set_defaults(handler=_ca_init)
    imported = ca.add_parser(
        "import", help="bring an existing intermediate CA: its key goes into the HSM"
    )
    imported.add_argument("--config", type=Path, required=True)
    imported.add_argument("--cert", type=Path, required=True, help="its certificate (PEM)")
    imported.add_argument("--key", type=Path, required=True, help="its EC private key (PEM)")
    imported.add_argument("--out", type=Path)
    imported.set_defaults(handler=_ca_import)


def _ca_init(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    root = CertificateAuthority.load(args.root)
    if root.certificate != load_certificate(config.tls.ca, "CA certificate"):
        raise CliError(f"{args.root} is not the CA in tls.ca ({config.tls.ca})")
    out = args.out or args.config.parent

    async def make(hsm: HsmBackend) -> tuple[str, x509.Certificate]:
        handle = await hsm.generate_signing_key("online-ca", args.curve)
        public = serialization.load_der_public_key(await hsm.signing_public_key(handle))
        issued = root.issue_intermediate(
            "online-ca",
            public,  # type: ignore[arg-type]
            validity_days=args.days,
            force=True,
        )
        return handle, load_certificate(issued.cert_path, "online CA certificate")

    return _finish(config, out, make)


def _ca_import(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    cert = load_certificate(args.cert, "online CA certificate")
    try:
        key = serialization.load_pem_private_key(args.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"--key {args.key}: not an unencrypted PEM private key ({exc})") from None
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out = args.out or args.config.parent

    async def bring(hsm: HsmBackend) -> tuple[str, x509.Certificate]:
        return await hsm.import_signing_key("online-ca", der), cert

    return _finish(config, out, bring)


def _finish(
    config: Config, out: Path, make: Callable[[HsmBackend], Awaitable[tuple[str, x509.Certificate]]]
) -> int:
    cert_path, crl_path = out / CERT_FILE, out / CRL_FILE

    async def run() -> tuple[OnlineCa, bytes]:
        hsm = await open_hsm(config)
        try:
            handle, cert = await make(hsm)
            root = load_certificate(config.tls.ca, "CA certificate")
            try:
                ca = await open_online_ca(hsm, cert, root, handle)
            except OnlineCaError as exc:
                raise CliError(str(exc)) from None
            crl = await sign_crl(hsm, ca, [], int(time.time()))
            return ca, crl.public_bytes(serialization.Encoding.PEM)
        finally:
            hsm.close()

    ca, crl = trio.run(run)
    write_private_file(
        cert_path, ca.certificate.public_bytes(serialization.Encoding.PEM), mode=0o644
    )
    write_private_file(crl_path, crl, mode=0o644)
    print(f"online CA {ca.certificate.subject.rfc4514_string()}, key in the HSM: {ca.key_handle}")
    print("add to the daemon's config:\n")
    print(f'[online_ca]\ncert = "{cert_path}"\nkey = "{ca.key_handle}"\ncrl = "{crl_path}"')
    return 0
