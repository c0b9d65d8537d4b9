"""Operating kmipd on PostgreSQL: what status and check-config say.

``status`` names the backend and whether the server kmipd reached is the
primary (a streaming replica here stands for a standby it was pointed at by
mistake); ``check-config`` with a user that may only read names every
privilege it lacks, and a daemon serving as that user refuses writes
clearly while serving reads, losing nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kmipd.client as km
from kmipd.client import Client
from kmipd.hsm import SoftwareHsm
from kmipd.protocol import CreateDek, ErrorCode, Status
from kmipd.service import KeyService, ServiceError
from kmipd.store import _postgres as pg
from kmipd.store import open_postgres_store
from tests.conftest import make_policy
from tests.postgres import Cluster, running_cluster
from tests.processes import Daemon, run_kmipd
from tests.test_postgres import STORAGE, count, start_on_postgres


async def test_status_names_the_primary_and_a_standby(tmp_path: Path) -> None:
    with running_cluster() as primary:
        primary.execute("CREATE DATABASE kmipd")
        writer = open_postgres_store(primary.conninfo("kmipd"))  # makes the schema
        replica = primary.replica()
        hsm = SoftwareHsm.open(tmp_path / "master.key", tmp_path / "keyring.cbor", create=True)
        try:
            replica.start()
            services = []
            for cluster in (primary, replica):
                store = (
                    writer
                    if cluster is primary
                    else open_postgres_store(cluster.conninfo("kmipd"), connect_timeout=2)
                )
                services.append(
                    KeyService(
                        store=store, hsm=hsm, policy=make_policy(), create_kek_on_demand=True
                    )
                )
            on_primary, on_standby = services
            up = await on_primary.handle(STORAGE, Status())
            assert (up.state, up.store) == ("serving", "ok")
            assert up.store_backend == f"postgresql primary at {primary.socket_dir}"
            down = await on_standby.handle(STORAGE, Status())
            assert down.state == "degraded"
            assert down.store_backend == "postgresql standby"
            assert down.store == "unavailable: PostgreSQL is a standby (read-only)"
            assert await on_primary.store.is_primary()
            assert not await on_standby.store.is_primary()
            # A write through the standby is refused as retryable, and nothing is applied.
            with pytest.raises(ServiceError) as refused:
                await on_standby.handle(STORAGE, CreateDek(namespace="orders"))
            assert refused.value.code is ErrorCode.STORE_UNAVAILABLE
            assert "read-only" in refused.value.message
            # Promoted, the same store reports the primary, without a restart (once the
            # write probe the daemon runs every second goes through).
            replica.promote()
            assert await on_standby.store.probe_write()
            promoted = await on_standby.handle(STORAGE, Status())
            assert (promoted.state, promoted.store) == ("serving", "ok")
            assert promoted.store_backend == f"postgresql primary at {replica.socket_dir}"
            assert await on_standby.store.is_primary()
            await on_standby.handle(STORAGE, CreateDek(namespace="orders"))
            on_standby.store.close()
        finally:
            writer.close()
            hsm.close()
            replica.destroy()


# -- a user that may only read -------------------------------------------------------------------


def read_only_role(cluster: Cluster, conninfo: str, role: str) -> str:
    """A login role that may connect and SELECT kmipd's tables; its connection string."""
    dbname = conninfo.split("dbname=")[1].split(maxsplit=1)[0]
    cluster.execute(
        f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;"
        f" GRANT CONNECT ON DATABASE {dbname} TO {role};"
    )
    cluster.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}", dbname=dbname)
    return conninfo.replace("user=postgres", f"user={role}")


@pytest.mark.slow
def test_check_config_names_what_a_read_only_user_lacks_and_serving_as_it_loses_nothing(
    tmp_path: Path, postgres_db: str, postgres_cluster: Cluster
) -> None:
    (writer,), creds, _, config = start_on_postgres(tmp_path, postgres_db, 1)
    with Client(writer.address, **creds) as kms, kms.create_dek("orders") as dek:
        dek_id, key = dek.dek_id, bytes(dek.key)
    assert writer.stop() == 0

    reader = read_only_role(postgres_cluster, postgres_db, "kmipd_check_reader")
    path = config(1)
    path.write_text(path.read_text().replace(postgres_db, reader))
    checked = run_kmipd("check-config", path)
    assert checked.returncode == 1
    output = checked.stdout + checked.stderr
    # One line for what a read-only user lacks, naming the tables and the fix.
    [line] = [line.strip() for line in output.splitlines() if " lacks " in line]
    tables = len(pg.MIGRATION_TABLES)
    assert line == (
        "store.conninfo: kmipd_check_reader lacks INSERT, UPDATE, DELETE on "
        f"{tables} tables (keks, kek_versions, deks, ...): it may read but not write"
        " (GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public"
        " TO kmipd_check_reader)"
    )
    assert "1 problem(s)" in output

    # Serving as it anyway: reads are served, writes refused (retryable), nothing lost.
    daemon = Daemon("--config", path, log=tmp_path / "reader.log")
    with Client(daemon.address, **creds, timeout=10) as kms:
        with kms.get_dek(dek_id) as again:
            assert bytes(again.key) == key
        with pytest.raises(km.StoreUnavailableError, match="permission denied"):
            kms.create_dek("orders").close()
        status = kms.status()
        assert status.state == "degraded"
        assert status.store == "cannot write: PostgreSQL user may not write (permission denied)"
        with kms.get_dek(dek_id) as again:
            assert bytes(again.key) == key
    assert daemon.stop() == 0
    assert count(postgres_db, "SELECT count(*) FROM deks") == 1
