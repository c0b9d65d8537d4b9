"""The client's sans-IO core: every operation written once, run by both shells alike."""

from __future__ import annotations

import inspect
import socket
from typing import Any

import pytest
import trio

from kmipd.client import (
    AsyncClient,
    CertificateRejectedError,
    Client,
    DekCache,
    UnavailableError,
)
from kmipd.client._core import ClientCore, Send, Steps, operation
from kmipd.protocol import GetDek, Status, StatusResult
from tests.conftest import RunningServer, ServerFactory, credentials


def core_operations() -> dict[str, operation[Any, Any]]:
    return {name: op for name, op in vars(ClientCore).items() if isinstance(op, operation)}


def test_every_core_operation_is_a_method_of_both_clients_with_one_signature() -> None:
    operations = core_operations()
    assert {"get_dek", "create_dek", "unwrap", "seal", "changes_since"} <= set(operations)
    for name, op in operations.items():
        blocking, trio_method = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(blocking) == inspect.signature(trio_method) == op.__signature__
        assert "Steps" not in str(op.__signature__)  # callers see what the steps return
        assert blocking.__doc__ == trio_method.__doc__ == op.steps.__doc__


async def test_bound_operations_are_blocking_on_client_and_coroutines_on_async_client(
    kmipd: RunningServer,
) -> None:
    def blocking() -> None:
        with kmipd.client() as kms:
            method = kms.status
            assert method.__qualname__ == "Client.status"
            assert not inspect.iscoroutinefunction(method)
            assert isinstance(Client.status(kms), StatusResult)  # unbound, like a plain method

    await trio.to_thread.run_sync(blocking)
    async with kmipd.async_client() as kms:
        assert kms.status.__qualname__ == "AsyncClient.status"
        assert inspect.iscoroutinefunction(kms.status)
        assert isinstance(await AsyncClient.status(kms), StatusResult)


def test_one_constructor_with_each_shells_default_pool_size() -> None:
    blocking = inspect.signature(Client.__init__).parameters
    trio_params = inspect.signature(AsyncClient.__init__).parameters
    assert list(blocking) == list(trio_params)
    assert (blocking["pool_size"].default, trio_params["pool_size"].default) == (4, 2)


def fetch_in_one_send(dek_ids: list[str]) -> Steps[list[str]]:
    """Steps sending several requests in one Send: answered in order, whatever the shell."""
    answers = yield Send([Status(), *(GetDek(dek_id=dek_id) for dek_id in dek_ids)])
    status, *deks = (outcome for outcome, _, _ in answers)
    assert isinstance(status, StatusResult)
    return [dek.dek_id for dek in deks]


async def test_both_shells_answer_a_batch_in_request_order(kmipd: RunningServer) -> None:
    def blocking() -> tuple[list[str], list[str]]:
        with kmipd.client() as kms:
            ids = [kms.create_dek("orders").dek_id for _ in range(5)]
            return ids, kms._drive(fetch_in_one_send(ids))

    ids, answered = await trio.to_thread.run_sync(blocking)
    assert answered == ids
    async with kmipd.async_client() as kms:
        assert await kms._drive(fetch_in_one_send(ids[::-1])) == ids[::-1]


def caught(kms: ClientCore) -> Steps[str]:
    """Steps that catch the call's failure where they yielded, as operations do."""
    try:
        yield Send([Status()])
    except UnavailableError as exc:
        return f"caught: {exc.detail}"
    return "answered"


def closed_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


async def test_a_failed_call_is_raised_inside_the_steps_in_both_shells(
    kmipd: RunningServer,
) -> None:
    address = closed_port()
    options: dict[str, Any] = {**credentials(kmipd.ca, "storage"), "timeout": 2}

    def blocking() -> str:
        with Client(address, **options) as kms:
            return kms._drive(caught(kms))

    assert (await trio.to_thread.run_sync(blocking)).startswith("caught: cannot connect")
    trio_client = AsyncClient(address, **options)
    try:
        assert (await trio_client._drive(caught(trio_client))).startswith("caught: cannot connect")
    finally:
        await trio_client.aclose()


async def test_a_refused_certificate_empties_the_cache_in_both_shells_even_at_connect(
    start_server: ServerFactory,
) -> None:
    kmipd = await start_server(crl_check_interval=0)
    options: dict[str, Any] = credentials(kmipd.ca, "storage")
    blocking_cache, trio_cache = DekCache(), DekCache()
    blocking = Client(kmipd.address, **options, cache=blocking_cache)
    trio_client = AsyncClient(kmipd.address, **options, cache=trio_cache)
    try:

        def fill() -> None:
            blocking.get_dek(blocking.create_dek("orders").dek_id)

        await trio.to_thread.run_sync(fill)
        await trio_client.get_dek((await trio_client.create_dek("orders")).dek_id)
        assert (len(blocking_cache), len(trio_cache)) == (1, 1)
        kmipd.ca.revoke("storage")

        # A new client sharing each cache is refused at its handshake: the
        # guard is the core's, so connect() empties the cache as calls do.
        def refused() -> None:
            with (
                Client(kmipd.address, **options, cache=blocking_cache) as again,
                pytest.raises(CertificateRejectedError),
            ):
                again.connect()

        await trio.to_thread.run_sync(refused)
        assert len(blocking_cache) == 0
        trio_again = AsyncClient(kmipd.address, **options, cache=trio_cache)
        with pytest.raises(CertificateRejectedError):
            await trio_again.connect()
        assert len(trio_cache) == 0
        await trio_again.aclose()
    finally:
        blocking.close()
        await trio_client.aclose()
