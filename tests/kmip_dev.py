"""A ``kmipd serve --dev`` subprocess for the KMIP interop tests, with its dev CA.

The dev CA also issues "stranger", an identity no grant names. The daemon
serves a whole test module (each test uses its own keys).
"""

from __future__ import annotations

import json
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
