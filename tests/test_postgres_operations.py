"""Operating kmipd on PostgreSQL: what status says.

``status`` names the backend and whether the server kmipd reached is the
primary (a streaming replica here stands for a standby it was pointed at by
mistake).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmipd.hsm import SoftwareHsm
from kmipd.protocol import CreateDek, ErrorCode, Status
from kmipd.service import KeyService, ServiceError
from kmipd.store import open_postgres_store
from tests.conftest import make_policy
from tests.postgres import running_cluster
from tests.test_postgres import STORAGE


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
