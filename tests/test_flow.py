"""The DEK delivery flow end to end: real TLS, real SQLite, both client libraries."""

from __future__ import annotations

import pytest
import trio

from kmipd.client import (
    AsyncClient,
    BadRequestError,
    Client,
    IntegrityFailureError,
    KmipdError,
    NotAuthorizedError,
    NotFoundError,
)
from tests.conftest import RunningServer, ServerFactory, credentials


async def test_async_client_walks_the_whole_flow(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        info = await kms.connect()
        assert info.tls_version == "TLSv1.3"
        assert info.identity == "spiffe://kmipd.test/storage"
        dek = await kms.create_dek("orders")
        assert len(dek.key_bytes()) == 32
        assert dek.namespace == "orders"
        assert dek.kek_version == 1
        again = await kms.get_dek(dek.dek_id)
        assert again.key_bytes() == dek.key_bytes()
        assert again.dek_id == dek.dek_id

        data_key = await kms.generate_data_key("orders", {"table": "t1", "row": "7"})
        unwrapped = await kms.unwrap(data_key.blob, {"row": "7", "table": "t1"})
        assert unwrapped.key_bytes() == data_key.key_bytes()
        with pytest.raises(IntegrityFailureError, match="wrong context"):
            await kms.unwrap(data_key.blob, {"table": "t2", "row": "7"})
        with pytest.raises(IntegrityFailureError):
            await kms.unwrap(data_key.blob)  # the context is not optional once given
        status = await kms.status()
        assert status.state == "serving"
        assert status.hsm == "software: ok"
        assert status.connections >= 1


async def test_blocking_client_walks_the_flow_from_a_thread(kmipd: RunningServer) -> None:
    def storage_system() -> None:
        with kmipd.client() as kms:
            dek = kms.create_dek("orders")
            assert kms.get_dek(dek.dek_id).key_bytes() == dek.key_bytes()
            batch = kms.get_deks([dek.dek_id] * 200)  # pipelined: more than max_in_flight
            assert {d.key_bytes() for d in batch} == {dek.key_bytes()}
            blob = kms.generate_data_key("orders", {"volume": "v1"})
            assert kms.unwrap(blob.blob, {"volume": "v1"}).key_bytes() == blob.key_bytes()

    await trio.to_thread.run_sync(storage_system)


async def test_results_never_show_key_bytes(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        dek = await kms.create_dek("orders")
        data_key = await kms.generate_data_key("orders")
        unwrapped = await kms.unwrap(data_key.blob)
    for result in (dek, data_key, unwrapped):
        text = repr(result) + str(result)
        assert "ProtectedKey 32 bytes" in text
        assert result.key_bytes().hex() not in text
        assert repr(result.key_bytes())[2:-1] not in text


async def test_concurrent_calls_pipeline_over_one_connection(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        deks = [await kms.create_dek("orders") for _ in range(5)]
        expected = {d.dek_id: d.key_bytes() for d in deks}
        fetched = await kms.get_deks([d.dek_id for d in deks] * 60)
        assert all(expected[d.dek_id] == d.key_bytes() for d in fetched)
        assert kmipd.server.connection_count == 1


async def test_errors_are_typed_and_name_server_and_request(kmipd: RunningServer) -> None:
    async with kmipd.async_client() as kms:
        with pytest.raises(NotFoundError) as missing:
            await kms.get_dek("dek_doesnotexist")
        assert kmipd.address in str(missing.value)
        assert "request" in str(missing.value)
        with pytest.raises(BadRequestError, match="namespace"):
            await kms.create_dek("../escape")
        # the connection is still good after refusals
        assert len((await kms.create_dek("orders")).key_bytes()) == 32


async def test_authorization_is_default_deny_across_namespaces(kmipd: RunningServer) -> None:
    async with kmipd.async_client("storage") as storage, kmipd.async_client("tenant") as tenant:
        foreign = await storage.create_dek("orders")
        own = await tenant.create_dek("tenant-a/db1")
        assert (
            await storage.get_dek(own.dek_id)
        ).key_bytes() == own.key_bytes()  # storage may read anywhere
        with pytest.raises(NotAuthorizedError, match="tenant"):
            await tenant.get_dek(foreign.dek_id)
        with pytest.raises(NotAuthorizedError):
            await tenant.create_dek("orders")
        with pytest.raises(NotAuthorizedError):
            await tenant.generate_data_key("orders")
        blob = await storage.generate_data_key("orders")
        with pytest.raises(NotAuthorizedError):
            await tenant.unwrap(blob.blob)
        with pytest.raises(NotAuthorizedError, match="create-kek"):
            await storage.create_kek("new-ns")
        with pytest.raises(NotAuthorizedError, match="list-keks"):
            await storage.list_keks()


async def test_admin_creates_and_lists_keks(kmipd: RunningServer) -> None:
    async with kmipd.async_client("admin") as admin:
        info = await admin.create_kek("payments")
        assert (info.name, info.version) == ("payments", 1)
        names = [k.name for k in await admin.list_keks()]
        assert "payments" in names
        assert [k.name for k in await admin.list_keks(prefix="pay")] == ["payments"]


async def test_identity_comes_from_the_certificate_only(kmipd: RunningServer) -> None:
    """A request cannot claim another identity: there is no field for it, and extras are refused."""
    raw = await kmipd.raw("tenant")
    await raw.send(
        {
            "id": 1,
            "op": "create-dek",
            "args": {"namespace": "orders"},
            "identity": "spiffe://kmipd.test/admin",
        }
    )
    refusal = await raw.receive()
    assert refusal["error"]["name"] == "bad-request"
    await raw.send({"id": 2, "op": "create-dek", "args": {"namespace": "orders"}})
    assert (await raw.receive())["error"]["name"] == "not-authorized"
    await raw.aclose()


async def test_clients_reconnect_after_the_server_closed_an_idle_connection(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(idle_timeout=0.2)
    kms = kmipd.client()
    dek = await trio.to_thread.run_sync(kms.create_dek, "orders")
    await kmipd.server.wait_until_idle()  # the server closed our idle connection
    # The blocking client sees the close before sending and reconnects, so
    # even a non-idempotent create goes through.
    await trio.to_thread.run_sync(kms.create_dek, "orders")
    await kmipd.server.wait_until_idle()
    assert (await trio.to_thread.run_sync(kms.get_dek, dek.dek_id)).key_bytes() == dek.key_bytes()
    kms.close()

    async with kmipd.async_client() as akms:
        await akms.get_dek(dek.dek_id)
        await kmipd.server.wait_until_idle()
        # get-dek is idempotent: retried once on a fresh connection
        assert (await akms.get_dek(dek.dek_id)).key_bytes() == dek.key_bytes()


async def test_client_refuses_to_start_without_credentials(kmipd: RunningServer) -> None:
    with pytest.raises(KmipdError, match="ca, cert and key"):
        Client(kmipd.address)
    with pytest.raises(KmipdError, match="cannot load client certificate"):
        AsyncClient(kmipd.address, ca=kmipd.ca.ca_cert_path, cert="/nonexistent.pem", key="/x")
    with pytest.raises(KmipdError, match="port"):
        Client("127.0.0.1:99999", **credentials(kmipd.ca, "storage"))
