"""``kmipd serve --dev``: everything a first run needs, created once under one directory.

Layout of the data directory (reused on restart):

    pki/            test CA, server certificate, admin and storage client certificates, CRL
    master.key      software HSM master key (0600)
    keyring.cbor    KEKs, encrypted under the master key
    kmipd.db        the key store
    kmipd.toml      the config the dev server runs with: a template for real deployments
"""

from __future__ import annotations

import datetime
from pathlib import Path

from kmipd.daemon.config import render_config
from kmipd.hsm import create_master_key
from pki import CertificateAuthority, load_certificate

DEV_TRUST_DOMAIN = "kmipd.test"
DEV_CLIENTS = ("admin", "storage")
#: Server certificates live 90 days (pki.SERVER_VALIDITY_DAYS); a restart renews one
#: that has less than this left, so a dev server never serves an expired certificate.
RENEW_SERVER_CERT_BEFORE = datetime.timedelta(days=30)


def prepare_dev(data_dir: Path, listen: str) -> Path:
    """Create (or reuse) the dev CA and write the dev config; return the config path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pki_dir = data_dir / "pki"
    if (pki_dir / "ca.pem").exists():
        ca = CertificateAuthority.load(pki_dir)
        expires = load_certificate(ca.server_cert_path, "server certificate").not_valid_after_utc
        if expires - datetime.datetime.now(datetime.UTC) < RENEW_SERVER_CERT_BEFORE:
            ca.renew_server()
    else:
        ca = CertificateAuthority.init(
            pki_dir,
            trust_domain=DEV_TRUST_DOMAIN,
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1", "::1"),
        )
    for name in DEV_CLIENTS:
        if not (pki_dir / f"{name}.pem").exists():
            ca.issue_client(name)
    master_key = data_dir / "master.key"
    if not master_key.exists():
        create_master_key(master_key)
    config_path = data_dir / "kmipd.toml"
    config_path.write_text(
        render_config(
            {
                "server": {"listen": [listen]},
                "tls": {
                    "ca": "pki/ca.pem",
                    "cert": "pki/server.pem",
                    "key": "pki/server-key.pem",
                    "crl": "pki/crl.pem",
                    "trust_domain": ca.trust_domain,
                },
                "store": {"path": "kmipd.db"},
                "hsm": {
                    "backend": "software",
                    "master_key": master_key.name,
                    "keyring": "keyring.cbor",
                },
                "keys": {"create_kek_on_demand": True},
            },
            [
                {
                    "identity": ca.identity_for("storage"),
                    "namespaces": ["*"],
                    "operations": ["data"],
                },
                {"identity": ca.identity_for("admin"), "namespaces": ["*"], "operations": ["*"]},
            ],
        ),
        encoding="utf-8",
    )
    return config_path


def client_command(data_dir: Path, address: str, name: str = "storage") -> str:
    """The exact command line a user can paste to talk to the dev server."""
    pki_dir = data_dir / "pki"
    return (
        f"kmipd dek create --namespace demo --server {address} --ca {pki_dir / 'ca.pem'} "
        f"--cert {pki_dir / (name + '.pem')} --key {pki_dir / (name + '-key.pem')}"
    )
