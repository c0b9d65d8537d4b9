"""A ``kmipd serve --dev`` subprocess for the KMIP interop tests, with its dev CA.

The dev CA also issues "stranger", an identity no grant names. The daemon
serves a whole test module (each test uses its own keys).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmipd.daemon._dev import prepare_dev
from pki import CertificateAuthority
from tests import processes


class DevDaemon:
    def __init__(self, data: Path, daemon: processes.Daemon) -> None:
        self.data = data
        self.daemon = daemon
        self.host, port = daemon.address.rsplit(":", 1)
        self.port = int(port)
        self.pki = data / "pki"

    def credentials(self, name: str) -> tuple[Path, Path, Path]:
        """(CA, certificate, key) of a dev client."""
        return self.pki / "ca.pem", self.pki / f"{name}.pem", self.pki / f"{name}-key.pem"

    def pykmip_client(self, name: str = "admin") -> Any:
        """PyKMIP 0.11's ProxyKmipClient for dev client ``name`` (not opened yet)."""
        with warnings.catch_warnings():
            # PyKMIP 0.11 imports SQLAlchemy 1.x names at import time; nothing else is silenced.
            warnings.simplefilter("ignore")
            from kmip.pie.client import ProxyKmipClient  # noqa: PLC0415 (a test dependency)
        ca, cert, key = self.credentials(name)
        return ProxyKmipClient(
            hostname=self.host,
            port=self.port,
            cert=str(cert),
            key=str(key),
            ca=str(ca),
            config_file="/dev/null",
            # What PyKMIP deployments configure: its client cannot do TLS 1.3.
            ssl_version="PROTOCOL_TLSv1_2",
        )

    def audit_records(self) -> list[dict[str, Any]]:
        lines = (self.data / "audit.log").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevDaemon]:
    data = tmp_path_factory.mktemp("kmip-dev")
    prepare_dev(data, "127.0.0.1:0")  # the dev CA, which serve --dev then reuses
    CertificateAuthority.load(data / "pki").issue_client("stranger")
    daemon = processes.Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=data / "log")
    # Module-scoped: the per-test reaper must not stop it between tests.
    processes.STARTED.remove(daemon)
    try:
        yield DevDaemon(data, daemon)
    finally:
        assert daemon.stop() == 0, daemon.stderr()
