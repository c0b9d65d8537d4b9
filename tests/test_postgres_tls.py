"""kmipd to PostgreSQL over TCP: TLS with ``sslmode=verify-full`` and a password from a file.

A throwaway cluster listens on 127.0.0.1 with ``ssl = on`` and a server
certificate from a CA of its own; ``pg_hba.conf`` takes only ``hostssl``
connections with a SCRAM password there, and rejects clear TCP. A real
``kmipd serve`` reaches it with ``sslmode=verify-full`` and
``store.password_file``: its connections are TLS (``pg_stat_ssl``), the
password appears nowhere in its config, log or ``check-config`` output, and
each mistake (a CA that did not sign the server's certificate, a wrong
password, a password file others can read, a password written into the
conninfo) is one clear line and changes nothing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmipd.client import Client
from pki import CertificateAuthority
from tests import postgres
from tests.processes import Daemon, run_kmipd
from tests.test_postgres import postgres_config

PASSWORD = "pg-" + secrets.token_hex(12)


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[postgres.Cluster, CertificateAuthority]]:
    bindir = postgres.require_postgres()
    cluster = postgres.Cluster.create(bindir)
    ca = CertificateAuthority.init(tmp_path / "pg-pki", dns_names=("localhost",))
    # The server's key must belong to the postgres user and be private to it.
    for name in ("server.pem", "server-key.pem", "ca.pem"):
        target = cluster.data / f"pg-{name}"
        target.write_bytes((ca.directory / name).read_bytes())
        target.chmod(0o600)
        cluster._own(target)
    (cluster.data / "pg_hba.conf").write_text(
        "local all postgres trust\n"
        "hostssl kmipd kmipd 127.0.0.1/32 scram-sha-256\n"
        "host all all 127.0.0.1/32 reject\n"
    )
    cluster.configure(
        listen_addresses="'127.0.0.1'",
        ssl="on",
        ssl_cert_file="'pg-server.pem'",
        ssl_key_file="'pg-server-key.pem'",
        password_encryption="'scram-sha-256'",
    )
    try:
        cluster.start()
        cluster.execute(f"CREATE USER kmipd PASSWORD '{PASSWORD}'")
        cluster.execute("CREATE DATABASE kmipd OWNER kmipd")
        yield cluster, ca
    finally:
        cluster.destroy()


def _conninfo(cluster: postgres.Cluster, ca: Path, **extra: str) -> str:
    parts = {
        "host": "localhost",
        "port": str(cluster.port),
        "dbname": "kmipd",
        "user": "kmipd",
        "sslmode": "verify-full",
        "sslrootcert": str(ca),
        "connect_timeout": "5",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in parts.items())


def _configs(tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "dev"
    first = Daemon("--dev", "--data", data, "--listen", "127.0.0.1:0", log=tmp_path / "init.log")
    assert first.stop() == 0
    return data, (data / "kmipd.toml").read_text()


def _write(data: Path, name: str, template: str, conninfo: str, store: str) -> Path:
    path = data / name
    path.write_text(postgres_config(template, conninfo, 0, store))
    path.chmod(0o600)
    return path


def _password_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_the_daemon_reaches_postgres_over_verified_tls_with_a_password_file(
    tmp_path: Path, tls_cluster: tuple[postgres.Cluster, CertificateAuthority]
) -> None:
    cluster, pg_ca = tls_cluster
    data, template = _configs(tmp_path)
    password_file = _password_file(tmp_path / "pg-password", PASSWORD + "\n")
    store = f'password_file = "{password_file}"\n'
    config = _write(data, "tls.toml", template, _conninfo(cluster, pg_ca.ca_cert_path), store)

    checked = run_kmipd("check-config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "verify-full" not in checked.stdout + checked.stderr  # no clear-TCP warning

    daemon = Daemon("--config", config, log=tmp_path / "daemon.log")
    try:
        pki = data / "pki"
        with Client(
            daemon.address, ca=pki / "ca.pem", cert=pki / "storage.pem",
            key=pki / "storage-key.pem",
        ) as kms:  # fmt: skip
            made = kms.create_dek("tls")
            assert kms.get_dek(made.dek_id).key == made.key
        # Every connection the daemon holds to the database is TLS, as user kmipd.
        rows = cluster.execute(
            "SELECT s.ssl, s.version, a.usename FROM pg_stat_ssl s "
            "JOIN pg_stat_activity a USING (pid) WHERE a.datname = 'kmipd'"
        )
        assert rows and all(ssl and user == "kmipd" for ssl, _, user in rows), rows
        assert {version for _, version, _ in rows} <= {"TLSv1.2", "TLSv1.3"}
        # The wrapped DEK reached PostgreSQL (and only the wrapped one).
        assert cluster.execute("SELECT count(*) FROM deks", dbname="kmipd") == [(1,)]
    finally:
        assert daemon.stop() == 0
    for text in (config.read_text(), (tmp_path / "daemon.log").read_text(), checked.stdout):
        assert PASSWORD not in text


def test_each_tls_or_password_mistake_is_one_clear_line_and_changes_nothing(
    tmp_path: Path, tls_cluster: tuple[postgres.Cluster, CertificateAuthority]
) -> None:
    cluster, pg_ca = tls_cluster
    data, template = _configs(tmp_path)
    good_password = _password_file(tmp_path / "pg-password", PASSWORD)
    wrong_password = _password_file(tmp_path / "wrong-password", "not-" + PASSWORD)
    readable_password = _password_file(tmp_path / "readable-password", PASSWORD, 0o644)
    stranger_ca = CertificateAuthority.init(tmp_path / "stranger-pki")

    good = _conninfo(cluster, pg_ca.ca_cert_path)
    cases = [
        # A CA that did not sign the server's certificate: verify-full refuses the server.
        (_conninfo(cluster, stranger_ca.ca_cert_path), good_password, "certificate verify failed"),
        # The right server, reached under a name its certificate does not hold.
        (good.replace("host=localhost", "host=db.example hostaddr=127.0.0.1"), good_password,
         "does not match host name"),
        (good, wrong_password, "password authentication failed"),
        (good, readable_password, "readable-password"),  # mode 0644: refused, not read
    ]  # fmt: skip
    for n, (conninfo, password_file, says) in enumerate(cases):
        config = _write(
            data, f"bad-{n}.toml", template, conninfo, f'password_file = "{password_file}"\n'
        )
        served = run_kmipd("serve", "--config", config)
        assert served.returncode != 0, (says, served.stderr)
        last = served.stderr.strip().splitlines()[-1]
        assert last.startswith("kmipd: error:") and says in last, (says, served.stderr)
        assert "Traceback" not in served.stderr and PASSWORD not in served.stderr
        checked = run_kmipd("check-config", config)
        assert checked.returncode != 0 and says in checked.stdout + checked.stderr, says
        assert PASSWORD not in checked.stdout + checked.stderr
    # A password written into the conninfo is refused before anything connects.
    inline = _write(data, "inline.toml", template, good + f" password={PASSWORD}", "")
    refused = run_kmipd("serve", "--config", inline)
    assert refused.returncode != 0 and "store.password_file" in refused.stderr
    assert PASSWORD not in refused.stderr
    # Nothing was created by any of them: the schema is not even there.
    assert cluster.execute(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'deks'", dbname="kmipd"
    ) == [(0,)]
    assert os.stat(readable_password).st_mode & 0o777 == 0o644  # left as it was
